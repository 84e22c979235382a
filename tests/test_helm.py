"""The Helm charts under kubernetes/ and the multi-node pods' entry script, checked without a cluster.

The real `helm` lints and renders each chart with its defaults and with the values the README's commands set, under
several release names (the longest Helm allows included); `kubernetes-validate --strict` checks every rendered object
against the Kubernetes API schemas; the tests then read the rendered objects for what the charts promise (GPUs,
one pod per node, rank 0 behind the Service, the cache claim, the probes, the image's non-root user, a grace period
that outlasts the server's drain, the token from a Secret). kubernetes/multi-node/entrypoint.sh runs
under `sh` in its dry-run mode for several pods and groups, and its probe mode against a health file and a stub of
Triton's health endpoints. helm and kubernetes-validate come from `./install.sh --test` (the venv's bin folder).
"""
from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import pytest
import yaml

from serving import tool

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "kubernetes"
CHARTS = ("single-node", "multi-node", "test")
ENTRYPOINT = KUBERNETES / "multi-node" / "entrypoint.sh"
VOLUME_MANIFESTS = ("persistent-volume-claim-csi.yaml", "persistent-volume-nfs.yaml",
                    "persistent-volume-claim-nfs.yaml")
KUBERNETES_VERSION = "1.30.0"  # a release kubernetes-validate has schemas for (1.25 to 1.37)

IMAGE = "registry.example.com:5000/jax-example:latest"
# What the original example's README commands set, verbatim but for the image (our README gives the same commands).
README_VALUES = {
    "single-node": (f"deployment.image={IMAGE}", "deployment.numOfGPUs=1"),
    "multi-node": (f"statefulset.image={IMAGE}", "statefulset.persistentVolumeClaim=llm-cache-pvc",
                   "statefulset.numOfNodes=3", "statefulset.numOfGPUs=1"),
    "test": (f"image={IMAGE}",),
}
LONG_RELEASE = ("my-long-release-name-opt-" + "x" * 53)[:53]  # Helm refuses release names over 53 characters
RELEASES = ("jax-example", "x", LONG_RELEASE)
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # what a Service's name must be; we hold every name to it


# ------------------------------------------------------------------------------------------------------------------
# Running helm and kubernetes-validate
# ------------------------------------------------------------------------------------------------------------------


def helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([tool("helm"), *args], capture_output=True, text=True, timeout=60)


def set_flags(values: Sequence[str]) -> list[str]:
    return [flag for value in values for flag in ("--set", value)]


@functools.lru_cache(maxsize=None)
def render_text(chart: str, release: str = "jax-example", values: tuple[str, ...] = ()) -> str:
    result = helm("template", release, str(KUBERNETES / chart), "--namespace", "llm", *set_flags(values))
    assert result.returncode == 0, f"helm template {chart} {values} failed:\n{result.stderr}"
    return result.stdout


def render(chart: str, release: str = "jax-example", values: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Every object `helm template` renders (the `helm test` hooks included)."""
    documents = [doc for doc in yaml.safe_load_all(render_text(chart, release, values)) if doc]
    assert documents, f"{chart} rendered nothing"
    return documents


def find(documents: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [d for d in documents if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {[d['metadata']['name'] for d in matches]}"
    return matches[0]


def hook_pods(documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in documents if d.get("metadata", {}).get("annotations", {}).get("helm.sh/hook") == "test"]


def server_container(documents: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (container,) = find(documents, kind)["spec"]["template"]["spec"]["containers"]
    return container


def flag(args: Sequence[str], name: str) -> str:
    """The value after `name` in a command line; the test fails when it is not there exactly once."""
    positions = [i for i, arg in enumerate(args) if arg == name]
    assert len(positions) == 1, f"{name} appears {len(positions)} times in {list(args)}"
    return args[positions[0] + 1]


def validate(paths: Sequence[Path]) -> None:
    """kubernetes-validate --strict over the files: every object must be known and valid (unknown kinds only warn)."""
    result = subprocess.run([tool("kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION, *map(str, paths)],
                            capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "ERROR" not in output and "WARN" not in output, output
    objects = sum(len([d for d in yaml.safe_load_all(p.read_text()) if d]) for p in paths)
    assert output.count(" passed for resource ") == objects, output


# ------------------------------------------------------------------------------------------------------------------
# Every chart: lint, schema, valid objects
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("values", ["defaults", "readme"])
@pytest.mark.parametrize("chart", CHARTS)
def test_chart_passes_helm_lint_strict(chart: str, values: str) -> None:
    result = helm("lint", "--strict", str(KUBERNETES / chart),
                  *set_flags(README_VALUES[chart] if values == "readme" else ()))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout, result.stdout


@pytest.mark.parametrize("chart", CHARTS)
def test_rendered_objects_are_valid_kubernetes_for_any_release_name(chart: str, tmp_path: Path) -> None:
    paths = []
    for release in RELEASES:
        for values in ((), README_VALUES[chart]):
            path = tmp_path / f"{release}-{len(values)}.yaml"
            path.write_text(render_text(chart, release, values))
            paths.append(path)
            for document in render(chart, release, values):
                name = document["metadata"]["name"]
                assert DNS_LABEL.fullmatch(name), f"{document['kind']} name {name!r} is not a DNS label"
                for key, value in document["metadata"]["labels"].items():
                    assert len(value) <= 63, f"label {key}={value!r} of {name} is longer than 63 characters"
    validate(paths)


def test_volume_manifests_are_valid_and_give_the_claim_the_readme_names() -> None:
    paths = [KUBERNETES / name for name in VOLUME_MANIFESTS]
    validate(paths)
    csi_claim, nfs_volume, nfs_claim = (yaml.safe_load(path.read_text()) for path in paths)
    for claim in (csi_claim, nfs_claim):
        assert claim["kind"] == "PersistentVolumeClaim" and claim["metadata"]["name"] == "llm-cache-pvc"
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every pod of the group mounts it at once
    assert nfs_volume["kind"] == "PersistentVolume" and nfs_volume["spec"]["accessModes"] == ["ReadWriteMany"]
    assert nfs_claim["spec"]["volumeName"] == nfs_volume["metadata"]["name"]
    assert nfs_claim["spec"]["storageClassName"] == nfs_volume["spec"]["storageClassName"] == ""


def value_paths(values: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, bool]]:
    """(dotted path, whether it is a leaf) of every key; an empty map such as `resources: {}` is a leaf."""
    for key, value in values.items():
        section = isinstance(value, dict) and bool(value)
        yield prefix + key, not section
        if section:
            yield from value_paths(value, f"{prefix}{key}.")


@pytest.mark.parametrize("chart", CHARTS)
def test_every_value_is_documented_where_declared_and_in_the_schema(chart: str) -> None:
    text = (KUBERNETES / chart / "values.yaml").read_text()
    documented = re.findall(r"^\s*## @param (\S+) \S", text, flags=re.MULTILINE)
    paths = dict(value_paths(yaml.safe_load(text)))
    leaves = {path for path, leaf in paths.items() if leaf}
    assert len(documented) == len(set(documented)), f"a value documented twice: {sorted(documented)}"
    assert set(documented) == leaves, (f"values without a ## @param line: {sorted(leaves - set(documented))}; "
                                       f"@param lines for no value: {sorted(set(documented) - leaves)}")
    schema = json.loads((KUBERNETES / chart / "values.schema.json").read_text())
    for path in paths:
        node = schema
        for key in path.split("."):
            assert key in node.get("properties", {}), f"values.schema.json does not know {path}"
            node = node["properties"][key]
            node = schema["definitions"][node["$ref"].rsplit("/", 1)[1]] if "$ref" in node else node


@pytest.mark.parametrize(("chart", "value", "complaint"), [
    ("single-node", "deployment.numOfGPUs=abc", "deployment.numOfGPUs: Invalid type. Expected: integer"),
    ("single-node", "deployment.numOfGPUs=0", "deployment.numOfGPUs: Must be greater than or equal to 1"),
    ("single-node", "deployment.image=", "deployment.image"),
    ("single-node", "deployment.numOfGpus=2", "numOfGpus is not allowed"),
    ("single-node", "service.ports.http=http", "service.ports.http: Invalid type"),
    ("multi-node", "statefulset.numOfNodes=abc", "statefulset.numOfNodes: Invalid type. Expected: integer"),
    ("multi-node", "statefulset.numOfGPUs=1.5", "statefulset.numOfGPUs: Invalid type. Expected: integer"),
    ("multi-node", "statefulset.persistentVolumeClaim[0]=x", "statefulset.persistentVolumeClaim: Invalid type"),
    ("multi-node", "statefulset.updateStrategy=Parallel", "statefulset.updateStrategy"),
    ("test", "outputLength=abc", "outputLength: Invalid type. Expected: integer"),
    ("test", "image=", "image"),
    ("test", "serviceUrl=jax-example-service", "serviceUrl: Does not match pattern"),
    ("single-node", "deployment.drainSeconds=abc", "deployment.drainSeconds: Invalid type. Expected: integer"),
    ("multi-node", "statefulset.drainSeconds=-1", "statefulset.drainSeconds: Must be greater than or equal to 0"),
    ("multi-node", "statefulset.terminationGracePeriodSeconds=1.5",
     "statefulset.terminationGracePeriodSeconds: Invalid"),
    ("single-node", "deployment.podSecurityContext.runAsUser=opt", "deployment.podSecurityContext.runAsUser: Invalid"),
    ("multi-node", "statefulset.securityContext.allowPrivilegeEscalation=no",
     "statefulset.securityContext.allowPrivilegeEscalation: Invalid type"),
    ("single-node", "deployment.accessToken.secretName[0]=x", "deployment.accessToken.secretName: Invalid type"),
    ("multi-node", "statefulset.accessToken.secret=x", "secret is not allowed"),
    ("test", "podSecurityContext.runAsNonRoot=yes", "podSecurityContext.runAsNonRoot: Invalid type"),
])
def test_schema_rejects_a_wrong_value_before_anything_renders(chart: str, value: str, complaint: str) -> None:
    result = helm("template", "jax-example", str(KUBERNETES / chart), "--set", value)
    assert result.returncode != 0, f"--set {value} rendered:\n{result.stdout}"
    assert "don't meet the specifications of the schema" in result.stderr, result.stderr
    assert complaint in result.stderr, result.stderr


# ------------------------------------------------------------------------------------------------------------------
# single-node
# ------------------------------------------------------------------------------------------------------------------


def test_single_node_pod_gets_the_gpus_model_and_ports_of_its_values() -> None:
    documents = render("single-node", values=("deployment.numOfGPUs=4", "deployment.modelId=facebook/opt-6.7b",
                                              "deployment.maxBatchSize=32", "deployment.resources.limits.memory=64Gi",
                                              "service.ports.http=9000"))
    container = server_container(documents, "Deployment")
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 4, "memory": "64Gi"}
    args = container["args"]
    assert args[:2] == ["python3", "server.py"]
    assert flag(args, "--number-of-gpus") == "4"
    assert flag(args, "--model-name") == "facebook/opt-6.7b"
    assert flag(args, "--max-batch-size") == "32"
    assert flag(args, "--http-port") == "9000"
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": 9000, "grpc": 8001, "metrics": 8002}


def test_single_node_readme_values_give_one_gpu_and_the_image() -> None:
    container = server_container(render("single-node", values=README_VALUES["single-node"]), "Deployment")
    assert container["image"] == IMAGE
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert flag(container["args"], "--number-of-gpus") == "1"


def test_single_node_probes_ask_triton_and_allow_a_long_start() -> None:
    container = server_container(render("single-node"), "Deployment")
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/models/OPT_stream/ready", "port": "http"}
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/v2/health/live"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800  # download, load and compile take minutes
    # A warm restart serves in about 12 s (README): the probe sees it within a few seconds of that.
    assert startup["initialDelaySeconds"] + startup["periodSeconds"] <= 10


def test_single_node_service_exposes_tritons_ports_of_the_server_pods_only() -> None:
    documents = render("single-node", values=("service.ports.grpc=9001",))
    service = find(documents, "Service")
    assert {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        "http": (8000, "http"), "grpc": (9001, "grpc"), "metrics": (8002, "metrics")}
    pod_labels = find(documents, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    for pod in hook_pods(documents):  # the helm test pod must not receive the Service's requests
        assert not service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()


def test_single_node_cache_is_an_empty_dir_unless_a_claim_is_given() -> None:
    def cache_volume(values: tuple[str, ...]) -> dict[str, Any]:
        spec = find(render("single-node", values=values), "Deployment")["spec"]["template"]["spec"]
        mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "cache")
        assert mount["mountPath"] == flag(spec["containers"][0]["args"], "--cache-dir")
        return next(v for v in spec["volumes"] if v["name"] == "cache")

    assert cache_volume(()) == {"name": "cache", "emptyDir": {}}
    claim = cache_volume(("deployment.persistentVolumeClaim=models",))
    assert claim == {"name": "cache", "persistentVolumeClaim": {"claimName": "models"}}


# ------------------------------------------------------------------------------------------------------------------
# multi-node
# ------------------------------------------------------------------------------------------------------------------


def test_multi_node_runs_one_pod_per_node_all_started_at_once() -> None:
    documents = render("multi-node", values=README_VALUES["multi-node"])
    statefulset = find(documents, "StatefulSet")
    assert statefulset["spec"]["replicas"] == 3
    assert statefulset["spec"]["podManagementPolicy"] == "Parallel"
    container = server_container(documents, "StatefulSet")
    assert container["image"] == IMAGE
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["OPT_NUMBER_OF_NODES"] == "3"
    assert flag(container["args"], "--number-of-gpus") == "1"


@pytest.mark.parametrize("nodes,gpus", [(2, 8), (16, 1)])
def test_multi_node_replicas_and_gpu_limits_follow_the_values(nodes: int, gpus: int) -> None:
    documents = render("multi-node", values=(f"statefulset.numOfNodes={nodes}", f"statefulset.numOfGPUs={gpus}"))
    assert find(documents, "StatefulSet")["spec"]["replicas"] == nodes
    container = server_container(documents, "StatefulSet")
    assert container["resources"]["limits"] == {"nvidia.com/gpu": gpus}
    assert flag(container["args"], "--number-of-gpus") == str(gpus)
    assert {e["name"]: e.get("value") for e in container["env"]}["OPT_NUMBER_OF_NODES"] == str(nodes)


@pytest.mark.parametrize("release", RELEASES)
def test_multi_node_service_reaches_rank_0_only(release: str) -> None:
    documents = render("multi-node", release, README_VALUES["multi-node"])
    statefulset = find(documents, "StatefulSet")
    name = statefulset["metadata"]["name"]
    assert len(name) <= 52, name  # the pods' controller-revision-hash label is <name>-<10 characters>
    service = find(documents, "Service", f"{release}-service")
    selector = service["spec"]["selector"]
    assert selector["statefulset.kubernetes.io/pod-name"] == f"{name}-0"
    assert selector.items() - {("statefulset.kubernetes.io/pod-name", f"{name}-0")} <= \
        statefulset["spec"]["template"]["metadata"]["labels"].items()
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"http": 8000, "grpc": 8001, "metrics": 8002}


@pytest.mark.parametrize("release", RELEASES)
def test_multi_node_headless_service_names_every_pod_before_it_is_ready(release: str) -> None:
    documents = render("multi-node", release, ("jaxPort=23456",))
    statefulset = find(documents, "StatefulSet")
    headless = find(documents, "Service", statefulset["spec"]["serviceName"])
    assert len(headless["metadata"]["name"]) <= 63
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert headless["spec"]["selector"].items() <= statefulset["spec"]["template"]["metadata"]["labels"].items()
    assert [(p["port"], p["targetPort"]) for p in headless["spec"]["ports"]] == [(23456, "jax")]
    container = server_container(documents, "StatefulSet")
    assert {"name": "jax", "containerPort": 23456, "protocol": "TCP"} in container["ports"]


def test_multi_node_cache_is_the_claim_given_mounted_at_the_cache_dir() -> None:
    documents = render("multi-node", values=README_VALUES["multi-node"] + ("statefulset.cacheDir=/models",))
    spec = find(documents, "StatefulSet")["spec"]["template"]["spec"]
    cache = next(v for v in spec["volumes"] if v["name"] == "cache")
    assert cache["persistentVolumeClaim"] == {"claimName": "llm-cache-pvc"}
    container = spec["containers"][0]
    assert next(m for m in container["volumeMounts"] if m["name"] == "cache")["mountPath"] == "/models"
    assert flag(container["args"], "--cache-dir") == "/models"
    default = find(render("multi-node"), "StatefulSet")["spec"]["template"]["spec"]["volumes"]
    assert next(v for v in default if v["name"] == "cache") == {"name": "cache", "emptyDir": {}}


def test_multi_node_probes_run_the_entry_script_for_every_rank() -> None:
    container = server_container(render("multi-node"), "StatefulSet")
    script = next(m for m in container["volumeMounts"] if m["name"] == "entrypoint")["mountPath"] + "/entrypoint.sh"
    assert container["args"][:3] == ["sh", script, "serve"]
    assert container["startupProbe"]["exec"]["command"] == ["sh", script, "probe", "live"]
    assert container["livenessProbe"]["exec"]["command"] == ["sh", script, "probe", "live"]
    assert container["readinessProbe"]["exec"]["command"] == ["sh", script, "probe", "ready"]
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800
    assert startup["initialDelaySeconds"] + startup["periodSeconds"] <= 10


def test_multi_node_configmap_carries_the_charts_entry_script() -> None:
    documents = render("multi-node")
    volume = next(v for v in find(documents, "StatefulSet")["spec"]["template"]["spec"]["volumes"]
                  if v["name"] == "entrypoint")
    configmap = find(documents, "ConfigMap", volume["configMap"]["name"])
    assert configmap["data"]["entrypoint.sh"] == ENTRYPOINT.read_text()


# ------------------------------------------------------------------------------------------------------------------
# test chart, and how it finds the servers
# ------------------------------------------------------------------------------------------------------------------


def test_test_chart_job_runs_the_client_against_the_service_url() -> None:
    documents = render("test", "jax-example-test", ("image=img:1", "serviceUrl=grpc://opt:8001", "input=Hello\\, world",
                                                    "outputLength=5"))
    job = find(documents, "Job", "jax-example-test")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "img:1"
    args = container["args"]
    assert args[:2] == ["python3", "client.py"]
    assert (flag(args, "--server-url"), flag(args, "--input"), flag(args, "--output-length")) == \
        ("grpc://opt:8001", "Hello, world", "5")
    (hook,) = hook_pods(documents)
    assert hook["spec"]["containers"][0]["args"] == args


@pytest.mark.parametrize("chart", ["single-node", "multi-node"])
def test_test_charts_default_url_reaches_either_server_chart_of_the_readme(chart: str) -> None:
    test_job = find(render("test", "jax-example-test", README_VALUES["test"]), "Job")
    url = flag(test_job["spec"]["template"]["spec"]["containers"][0]["args"], "--server-url")
    documents = render(chart, "jax-example", README_VALUES[chart])
    host, port = re.fullmatch(r"http://([^:/]+):(\d+)", url).groups()
    service = find(documents, "Service", host)
    assert int(port) in [p["port"] for p in service["spec"]["ports"] if p["name"] == "http"]
    (hook,) = hook_pods(documents)  # and the chart's own helm test calls that same Service
    assert flag(hook["spec"]["containers"][0]["args"], "--server-url") == url


# ------------------------------------------------------------------------------------------------------------------
# Who the pods run as, how long they may drain, the token of Triton's restricted endpoints
# ------------------------------------------------------------------------------------------------------------------

SERVER_CHARTS = {"single-node": ("deployment", "Deployment"), "multi-node": ("statefulset", "StatefulSet")}
TOKEN_VARIABLE = "OPT_SERVER_ACCESS_TOKEN"  # what server.py reads its --access-token from (tests/test_security.py)


def image_user() -> tuple[int, int]:
    """uid and gid of the image's last USER (numeric: tests/test_docker.py holds the Dockerfile to that)."""
    users = re.findall(r"^USER\s+(\d+):(\d+)\s*$", (ROOT / "Dockerfile").read_text(), flags=re.MULTILINE)
    assert users, "the Dockerfile has no numeric USER uid:gid"
    return int(users[-1][0]), int(users[-1][1])


def pod_spec(documents: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    return find(documents, kind)["spec"]["template"]["spec"]


def assert_unprivileged(spec: dict[str, Any]) -> None:
    """The pod runs as the image's user, non-root checked by the kubelet, with no privilege to gain."""
    uid, gid = image_user()
    context = spec["securityContext"]
    assert context["runAsNonRoot"] is True
    assert (context["runAsUser"], context["runAsGroup"]) == (uid, gid)
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in spec["containers"]:
        assert container["securityContext"]["allowPrivilegeEscalation"] is False, container["name"]
        assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}, container["name"]


@pytest.mark.parametrize("chart", SERVER_CHARTS)
def test_server_and_test_pods_run_as_the_images_non_root_user_without_privileges(chart: str) -> None:
    _, kind = SERVER_CHARTS[chart]
    documents = render(chart, values=README_VALUES[chart])
    server = pod_spec(documents, kind)
    assert_unprivileged(server)
    assert server["securityContext"]["fsGroup"] == image_user()[1]  # the cache volume, a claim too, is writable
    (hook,) = hook_pods(documents)
    assert_unprivileged(hook["spec"])


def test_test_charts_client_runs_as_the_images_non_root_user_without_privileges() -> None:
    documents = render("test", "jax-example-test", README_VALUES["test"])
    assert_unprivileged(pod_spec(documents, "Job"))
    (hook,) = hook_pods(documents)
    assert_unprivileged(hook["spec"])


@pytest.mark.parametrize("chart", SERVER_CHARTS)
def test_security_context_fields_can_be_changed_added_or_removed(chart: str) -> None:
    key, kind = SERVER_CHARTS[chart]
    spec = pod_spec(render(chart, values=(f"{key}.podSecurityContext.runAsUser=2000",
                                          f"{key}.podSecurityContext.fsGroup=null",
                                          f"{key}.securityContext.readOnlyRootFilesystem=true")), kind)
    assert spec["securityContext"]["runAsUser"] == 2000 and "fsGroup" not in spec["securityContext"]
    assert spec["securityContext"]["runAsNonRoot"] is True  # the fields not named keep their defaults
    assert spec["containers"][0]["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {
        "drop": ["ALL"]}, "readOnlyRootFilesystem": True}


# (values, drainSeconds, terminationGracePeriodSeconds) as rendered; {key} is deployment or statefulset.
GRACE_CASES = {
    "defaults": ((), 30, 60),
    "longer-drain": (("{key}.drainSeconds=120",), 120, 150),
    "no-drain": (("{key}.drainSeconds=0",), 0, 30),
    "grace-set": (("{key}.terminationGracePeriodSeconds=300",), 30, 300),
    "both-set-20-s-apart": (("{key}.drainSeconds=100", "{key}.terminationGracePeriodSeconds=120"), 100, 120),
}


@pytest.mark.parametrize("case", GRACE_CASES)
@pytest.mark.parametrize("chart", SERVER_CHARTS)
def test_grace_period_outlasts_the_servers_drain_by_20_s_or_more(chart: str, case: str) -> None:
    key, kind = SERVER_CHARTS[chart]
    overrides, drain, grace = GRACE_CASES[case]
    documents = render(chart, values=README_VALUES[chart] + tuple(value.format(key=key) for value in overrides))
    spec = pod_spec(documents, kind)
    exit_timeout = int(flag(spec["containers"][0]["args"], "--exit-timeout"))
    assert (exit_timeout, spec["terminationGracePeriodSeconds"]) == (drain, grace)
    # The drain, then Triton's stop (about 10 s), then the exit: all before the kubelet's SIGKILL.
    assert spec["terminationGracePeriodSeconds"] - exit_timeout >= 20


@pytest.mark.parametrize(("overrides", "complaint"), [
    (("{key}.terminationGracePeriodSeconds=40",),
     "{key}.terminationGracePeriodSeconds=40 is too short for {key}.drainSeconds=30"),
    (("{key}.drainSeconds=100", "{key}.terminationGracePeriodSeconds=119"),
     "{key}.terminationGracePeriodSeconds=119 is too short for {key}.drainSeconds=100"),
    (("{key}.extraArgs={{--dtype,bfloat16,--exit-timeout}}",),
     "{key}.extraArgs sets --exit-timeout: set {key}.drainSeconds"),
    (("{key}.extraArgs={{--verbose,--exit-timeout=5}}",), "{key}.extraArgs sets --exit-timeout"),
], ids=["grace-too-short", "grace-19-s-over-the-drain", "exit-timeout-in-extra-args", "exit-timeout-equals-form"])
@pytest.mark.parametrize("chart", SERVER_CHARTS)
def test_chart_refuses_a_grace_period_that_the_drain_does_not_fit_in(chart: str, overrides: tuple[str, ...],
                                                                      complaint: str) -> None:
    key, _ = SERVER_CHARTS[chart]
    values = [value.format(key=key) for value in overrides]
    result = helm("template", "jax-example", str(KUBERNETES / chart), *set_flags(values))
    assert result.returncode != 0, f"{values} rendered:\n{result.stdout}"
    assert complaint.format(key=key) in result.stderr, result.stderr


@pytest.mark.parametrize("chart", SERVER_CHARTS)
def test_access_token_comes_from_the_named_secret_into_the_servers_environment(chart: str) -> None:
    key, kind = SERVER_CHARTS[chart]
    default = server_container(render(chart, values=README_VALUES[chart]), kind)
    assert TOKEN_VARIABLE not in [e["name"] for e in default["env"]]  # the server makes a random one
    documents = render(chart, values=README_VALUES[chart] + (f"{key}.accessToken.secretName=opt-triton-token",
                                                             f"{key}.accessToken.secretKey=access-token"))
    container = server_container(documents, kind)
    (variable,) = [e for e in container["env"] if e["name"] == TOKEN_VARIABLE]
    assert variable["valueFrom"] == {"secretKeyRef": {"name": "opt-triton-token", "key": "access-token"}}
    assert "--access-token" not in container["args"]  # a flag's value would show in ps
    (hook,) = hook_pods(documents)  # the client's requests (inference, health) are not restricted
    assert TOKEN_VARIABLE not in [e["name"] for e in hook["spec"]["containers"][0]["env"]]


@pytest.mark.parametrize("chart", SERVER_CHARTS)
def test_rendered_objects_with_a_token_secret_a_drain_and_changed_contexts_are_valid(chart: str,
                                                                                     tmp_path: Path) -> None:
    key, _ = SERVER_CHARTS[chart]
    values = README_VALUES[chart] + (f"{key}.accessToken.secretName=opt-triton-token", f"{key}.drainSeconds=90",
                                     f"{key}.podSecurityContext.fsGroup=null",
                                     f"{key}.securityContext.readOnlyRootFilesystem=true")
    path = tmp_path / "rendered.yaml"
    path.write_text(render_text(chart, "jax-example", values))
    validate([path])

# ------------------------------------------------------------------------------------------------------------------
# entrypoint.sh
# ------------------------------------------------------------------------------------------------------------------


def entrypoint(*args: str, pod: str | None, nodes: int | str | None = 3, headless: str = "svc-headless",
               **env: str) -> subprocess.CompletedProcess:
    """Runs entrypoint.sh under sh with the environment the StatefulSet gives it (dry run: prints the command)."""
    environment = {"PATH": os.environ["PATH"], "OPT_HEADLESS_SERVICE": headless, "OPT_NAMESPACE": "llm",
                   "OPT_ENTRYPOINT_DRY_RUN": "1", "OPT_PYTHON": sys.executable, **env}
    if pod is not None:
        environment["POD_NAME"] = pod
    if nodes is not None:
        environment["OPT_NUMBER_OF_NODES"] = str(nodes)
    return subprocess.run(["sh", str(ENTRYPOINT), *args], env=environment, capture_output=True, text=True,
                          timeout=30)


def served(result: subprocess.CompletedProcess) -> list[str]:
    assert result.returncode == 0, result.stderr
    return shlex.split(result.stdout)


@pytest.mark.parametrize(("pod", "nodes", "headless", "rank", "head"), [
    ("jax-example-multi-node-0", 3, "jax-example-multi-node-headless", "0",
     "jax-example-multi-node-0.jax-example-multi-node-headless.llm.svc.cluster.local:12345"),
    ("jax-example-multi-node-2", 3, "jax-example-multi-node-headless", "2",
     "jax-example-multi-node-0.jax-example-multi-node-headless.llm.svc.cluster.local:12345"),
    ("x-2", 3, "x-headless", "2", "x-0.x-headless.llm.svc.cluster.local:12345"),
    ("my-long-release-name-opt-multi-node-12", 16, "my-long-release-name-opt-multi-node-headless", "12",
     "my-long-release-name-opt-multi-node-0.my-long-release-name-opt-multi-node-headless.llm.svc.cluster.local:12345"),
    ("solo-0", 1, "solo-headless", "0", "solo-0.solo-headless.llm.svc.cluster.local:12345"),
], ids=["head", "last-worker", "short-release", "long-release-rank-12-of-16", "group-of-one"])
def test_entrypoint_gives_each_pod_its_rank_and_rank_0s_address(pod: str, nodes: int, headless: str, rank: str,
                                                               head: str) -> None:
    command = served(entrypoint("serve", "python3", "server.py", "--model-name", "facebook/opt-1.3b", pod=pod,
                                nodes=nodes, headless=headless))
    assert command[:4] == ["python3", "server.py", "--model-name", "facebook/opt-1.3b"]
    assert flag(command, "--rank") == rank
    assert flag(command, "--head-url") == head
    assert flag(command, "--number-of-nodes") == str(nodes)
    assert flag(command, "--health-file") == "/tmp/opt-health"


def test_entrypoint_takes_hostname_domain_and_port_from_the_environment() -> None:
    command = served(entrypoint("serve", "python3", "server.py", pod=None, HOSTNAME="opt-4", nodes=8,
                                headless="opt-headless", OPT_CLUSTER_DOMAIN="k8s.example.org",
                                OPT_COORDINATOR_PORT="23456", OPT_HEALTH_FILE="/run/health"))
    assert flag(command, "--rank") == "4"
    assert flag(command, "--head-url") == "opt-0.opt-headless.llm.svc.k8s.example.org:23456"
    assert flag(command, "--health-file") == "/run/health"


def test_entrypoint_passes_every_argument_through_unchanged() -> None:
    words = ["python3", "server.py", "--tokenizer", "it's a folder/with spaces", "--verbose", ""]
    command = served(entrypoint("serve", *words, pod="x-1"))
    assert command[:len(words)] == words


@pytest.mark.parametrize(("pod", "nodes"), [("x-3", 3), ("jax-example-multi-node-16", 16), ("x-1", 1)])
def test_entrypoint_refuses_an_ordinal_outside_the_group(pod: str, nodes: int) -> None:
    result = entrypoint("serve", "python3", "server.py", pod=pod, nodes=nodes)
    assert result.returncode == 2 and result.stdout == ""
    ordinal = pod.rsplit("-", 1)[1]
    assert f"has ordinal {ordinal} but the group has {nodes} nodes" in result.stderr, result.stderr


@pytest.mark.parametrize("pod", ["jax-example", "x-", "x-01", "x-1a", "-0", "0"])
def test_entrypoint_refuses_a_pod_name_without_an_ordinal(pod: str) -> None:
    result = entrypoint("serve", "python3", "server.py", pod=pod)
    assert result.returncode == 2 and result.stdout == ""
    assert f"pod name '{pod}' does not end in -<ordinal>" in result.stderr, result.stderr


@pytest.mark.parametrize(("nodes", "env", "complaint"), [
    (None, {}, "OPT_NUMBER_OF_NODES is not set"),
    ("three", {}, "OPT_NUMBER_OF_NODES must be a whole number >= 1, got 'three'"),
    (0, {}, "OPT_NUMBER_OF_NODES must be a whole number >= 1, got '0'"),
    (3, {"OPT_NAMESPACE": ""}, "OPT_NAMESPACE is not set"),
    (3, {"OPT_COORDINATOR_PORT": "http"}, "OPT_COORDINATOR_PORT must be a port number"),
])
def test_entrypoint_refuses_a_missing_or_malformed_setting(nodes: int | str | None, env: dict[str, str],
                                                            complaint: str) -> None:
    result = entrypoint("serve", "python3", "server.py", pod="x-0", nodes=nodes, **env)
    assert result.returncode == 2 and complaint in result.stderr, result.stderr


@pytest.mark.parametrize("args", [(), ("serve",), ("start", "python3"), ("probe",), ("probe", "alive")])
def test_entrypoint_explains_its_usage(args: tuple[str, ...]) -> None:
    result = entrypoint(*args, pod="x-0")
    assert result.returncode == 2 and "usage: entrypoint.sh" in result.stderr, result.stderr


def test_rendered_statefulset_and_entrypoint_agree_on_every_pods_rank() -> None:
    """The pod's command and environment as the chart renders them, through the script, for a long release name."""
    documents = render("multi-node", LONG_RELEASE, ("statefulset.numOfNodes=16", "statefulset.numOfGPUs=2"))
    statefulset = find(documents, "StatefulSet")
    container = server_container(documents, "StatefulSet")
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    env["OPT_NAMESPACE"] = "llm"  # the downward API's metadata.namespace
    args = container["args"]
    assert args[0] == "sh" and args[1].endswith("/entrypoint.sh") and args[2] == "serve", args
    name = statefulset["metadata"]["name"]
    head = f"{name}-0.{statefulset['spec']['serviceName']}.llm.svc.cluster.local:12345"

    def run(pod: str) -> subprocess.CompletedProcess:
        environment = {"PATH": os.environ["PATH"], **env, "POD_NAME": pod, "OPT_ENTRYPOINT_DRY_RUN": "1"}
        return subprocess.run(["sh", str(ENTRYPOINT), *args[2:]], env=environment, capture_output=True, text=True,
                              timeout=30)

    for ordinal in (0, 7, 15):
        command = served(run(f"{name}-{ordinal}"))
        assert command[:len(args) - 3] == args[3:]
        assert (flag(command, "--rank"), flag(command, "--head-url"), flag(command, "--number-of-nodes")) == \
            (str(ordinal), head, "16")
        assert flag(command, "--health-file") == env["OPT_HEALTH_FILE"]
    over = run(f"{name}-16")
    assert over.returncode == 2, over.stderr


def test_worker_probe_passes_while_its_health_file_is_fresh(tmp_path: Path) -> None:
    health = tmp_path / "opt-health"
    health.touch()
    for kind in ("live", "ready"):
        result = entrypoint("probe", kind, pod="x-1", OPT_HEALTH_FILE=str(health))
        assert result.returncode == 0, result.stderr


def test_worker_probe_fails_when_its_health_file_is_stale_or_missing(tmp_path: Path) -> None:
    health = tmp_path / "opt-health"
    for kind in ("live", "ready"):
        result = entrypoint("probe", kind, pod="x-2", OPT_HEALTH_FILE=str(health))
        assert result.returncode == 1 and "does not exist" in result.stderr, result.stderr
    health.touch()
    minute_ago = time.time() - 60
    os.utime(health, (minute_ago, minute_ago))
    for kind in ("live", "ready"):
        result = entrypoint("probe", kind, pod="x-2", OPT_HEALTH_FILE=str(health))
        assert result.returncode == 1 and "last touched 60 s ago" in result.stderr, result.stderr
    result = entrypoint("probe", "live", pod="x-2", OPT_HEALTH_FILE=str(health), OPT_HEALTH_MAX_AGE="90")
    assert result.returncode == 0, result.stderr


class TritonHealth(http.server.BaseHTTPRequestHandler):
    """Triton's health endpoints while the server is live but not ready: live 200, ready 400."""

    def do_GET(self) -> None:  # noqa: N802 (the handler's API)
        self.send_response({"/v2/health/live": 200, "/v2/models/OPT_stream/ready": 400}.get(self.path, 404))
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture()
def triton_health() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), TritonHealth)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_rank_0_probe_asks_tritons_health_endpoints(triton_health: int, tmp_path: Path) -> None:
    # The health file is fresh, so a pass can only come from Triton's answer.
    health = tmp_path / "opt-health"
    health.touch()
    common = {"pod": "x-0", "OPT_HTTP_PORT": str(triton_health), "OPT_HEALTH_FILE": str(health)}
    assert entrypoint("probe", "live", **common).returncode == 0
    result = entrypoint("probe", "ready", **common)
    assert result.returncode == 1 and "/v2/models/OPT_stream/ready" in result.stderr and "400" in result.stderr, result.stderr


def test_rank_0_probe_fails_when_triton_does_not_answer() -> None:
    with socket.socket() as unused:  # bound, never listening: connections to it are refused
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
        result = entrypoint("probe", "live", pod="x-0", OPT_HTTP_PORT=str(port))
    assert result.returncode == 1 and f"127.0.0.1:{port}/v2/health/live" in result.stderr, result.stderr
