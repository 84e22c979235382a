#!/bin/sh
# One pod of the multi-node StatefulSet is one rank of server.py's group; this script works out which from the pod's
# name, whatever the release is called, and serves as that rank or probes it. The chart mounts it from a ConfigMap.
#
#   entrypoint.sh serve COMMAND [ARG...]   exec COMMAND ARG... --head-url H --number-of-nodes N --rank R --health-file F
#   entrypoint.sh probe live|ready         exit 0 while this rank is healthy (the pod's exec probes)
#
# A StatefulSet names its pods <statefulset>-<ordinal>: the ordinal is the rank, and rank 0's JAX coordinator is
# <statefulset>-0.<headless service>.<namespace>.svc.<cluster domain>:<port> (the headless Service publishes every
# pod's address before it is ready, so the ranks can find each other while they start).
#
# Probes: rank 0 asks Triton (GET /v2/health/live or /v2/models/OPT_stream/ready on 127.0.0.1), which reports ready only once
# every rank has joined, loaded and compiled. A worker has no HTTP port: server.py touches the health file every
# second while the worker is ready and its group is whole, so a file older than OPT_HEALTH_MAX_AGE fails both.
#
# Environment (the StatefulSet template sets it):
#   POD_NAME                this pod's name (the downward API); HOSTNAME when unset
#   OPT_NUMBER_OF_NODES     ranks in the group: the StatefulSet's replicas
#   OPT_HEADLESS_SERVICE    the headless Service that gives each pod its DNS name
#   OPT_NAMESPACE           the pod's namespace
#   OPT_CLUSTER_DOMAIN      the cluster's DNS domain (cluster.local)
#   OPT_COORDINATOR_PORT    the port of rank 0's JAX coordinator (12345)
#   OPT_HTTP_PORT           Triton's HTTP port on rank 0 (8000)
#   OPT_HEALTH_FILE         the file a ready worker touches every second (/tmp/opt-health)
#   OPT_HEALTH_MAX_AGE      seconds after which that file counts as stale (30)
#   OPT_PYTHON              the interpreter the probes run (python3)
#   OPT_ENTRYPOINT_DRY_RUN  1: `serve` prints the command, one line a shell reads back, instead of running it
set -eu

fail() {
    echo "entrypoint.sh: $*" >&2
    exit 2
}

require() {  # require NAME: the variable NAME must be set and non-empty
    eval "value=\${$1:-}"
    [ -n "$value" ] || fail "$1 is not set (the chart's StatefulSet sets it)"
}

is_number() {  # a decimal integer without sign or leading zeros: what a StatefulSet ordinal looks like
    case $1 in
        0) return 0 ;;
        '' | 0* | *[!0-9]*) return 1 ;;
    esac
}

# Sets pod, statefulset, rank, nodes, head_url and health_file from the environment, or fails with status 2.
identify() {
    # Container runtimes put HOSTNAME, the pod's name, in the environment (not a POSIX shell variable here).
    # shellcheck disable=SC3028
    pod=${POD_NAME:-${HOSTNAME:-}}
    [ -n "$pod" ] || fail "neither POD_NAME nor HOSTNAME is set: cannot tell this pod's rank"
    ordinal=${pod##*-}
    statefulset=${pod%-*}
    if [ "$statefulset" = "$pod" ] || [ -z "$statefulset" ] || ! is_number "$ordinal"; then
        fail "pod name '$pod' does not end in -<ordinal>: run this script in a pod of the chart's StatefulSet"
    fi
    require OPT_NUMBER_OF_NODES
    nodes=$OPT_NUMBER_OF_NODES
    if ! is_number "$nodes" || [ "$nodes" -lt 1 ]; then
        fail "OPT_NUMBER_OF_NODES must be a whole number >= 1, got '$nodes'"
    fi
    if [ "$ordinal" -ge "$nodes" ]; then
        fail "pod '$pod' has ordinal $ordinal but the group has $nodes nodes (ranks 0 to $((nodes - 1))):" \
             "the StatefulSet's replicas and OPT_NUMBER_OF_NODES differ"
    fi
    rank=$ordinal
    require OPT_HEADLESS_SERVICE
    require OPT_NAMESPACE
    port=${OPT_COORDINATOR_PORT:-12345}
    is_number "$port" || fail "OPT_COORDINATOR_PORT must be a port number, got '$port'"
    head_url="$statefulset-0.$OPT_HEADLESS_SERVICE.$OPT_NAMESPACE.svc.${OPT_CLUSTER_DOMAIN:-cluster.local}:$port"
    health_file=${OPT_HEALTH_FILE:-/tmp/opt-health}
}

quoted() {  # the arguments as one line that a shell reads back as the same words
    line=
    for word do
        case $word in
            '' | *[!A-Za-z0-9_./:=@%+,-]*) word="'$(printf '%s' "$word" | sed "s/'/'\\\\''/g")'" ;;
        esac
        line="${line:+$line }$word"
    done
    printf '%s\n' "$line"
}

serve() {
    [ $# -gt 0 ] || fail "usage: entrypoint.sh serve COMMAND [ARG...], e.g. serve python3 server.py --model-name M"
    identify
    set -- "$@" --head-url "$head_url" --number-of-nodes "$nodes" --rank "$rank" --health-file "$health_file"
    echo "entrypoint.sh: pod $pod is rank $rank of $nodes; rank 0's coordinator is $head_url" >&2
    if [ "${OPT_ENTRYPOINT_DRY_RUN:-0}" = 1 ]; then
        quoted "$@"
        exit 0
    fi
    exec "$@"
}

# Triton's path for a probe: ready is the last model to load (/v2/health/ready can read ready for a moment before
# any model is).
ready_path() {
    if [ "$1" = ready ]; then echo v2/models/OPT_stream/ready; else echo v2/health/live; fi
}

probe() {
    case ${1:-} in
        live | ready) ;;
        *) fail "usage: entrypoint.sh probe live|ready" ;;
    esac
    identify
    if [ "$rank" -eq 0 ]; then
        exec "${OPT_PYTHON:-python3}" -c '
import sys, urllib.request
url = sys.argv[1]
try:
    urllib.request.urlopen(url, timeout=5).close()
except Exception as error:  # HTTPError (not ready: 400) or no answer at all
    sys.exit(f"{url}: {error}")
' "http://127.0.0.1:${OPT_HTTP_PORT:-8000}/$(ready_path "$1")"
    fi
    exec "${OPT_PYTHON:-python3}" -c '
import os, sys, time
path, max_age = sys.argv[1], float(sys.argv[2])
try:
    age = time.time() - os.stat(path).st_mtime
except OSError:
    sys.exit(f"{path} does not exist: this worker has not finished loading and compiling")
if age >= max_age:
    sys.exit(f"{path} was last touched {age:.0f} s ago (more than {max_age:g} s): "
             "this worker or its group is not healthy")
' "$health_file" "${OPT_HEALTH_MAX_AGE:-30}"
}

mode=${1:-}
[ $# -gt 0 ] && shift
case $mode in
    serve) serve "$@" ;;
    probe) probe "$@" ;;
    *) fail "usage: entrypoint.sh serve COMMAND [ARG...] | entrypoint.sh probe live|ready" ;;
esac
