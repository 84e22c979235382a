"""The Helm charts under kubernetes/ and the multi-node pods' entry script, checked without a cluster.

The real `helm` lints and renders each chart with its defaults and with the values the README's commands set, under
several release names (the longest Helm allows included); `kubernetes-validate --strict` checks every rendered object
against the Kubernetes API schemas; the tests then read the rendered objects for what the charts promise (GPUs,
one pod per node, rank 0 behind the Service, the cache claim, the probes, the image's non-root user, a grace period
that outlasts the server's drain, the token from a Secret; the OpenAI-compatible API's and the generation metrics'
ports, flags and API key, Prometheus' annotations and the ServiceMonitor, whose fields are checked here because
kubernetes-validate has no schema for it). kubernetes/multi-node/entrypoint.sh runs under `sh` in its dry-run mode
for several pods and groups, and its probe mode against a health file and a stub of Triton's health endpoints. The
test chart's openai_completion.py runs against a stub of the OpenAI API, alone and as the Job's rendered command.
helm and kubernetes-validate come from `./install.sh --test` (the venv's bin folder).
"""
from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shlex
import shutil
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
# Every new option at once: the OpenAI API's key and second name, the ServiceMonitor; the test chart's key and model.
OPTION_VALUES = {
    "single-node": ("openai.servedModelName=opt", "openai.apiKeySecret.name=opt-api-key",
                    "metrics.serviceMonitor.enabled=true", "metrics.serviceMonitor.labels.release=prometheus"),
    "multi-node": ("openai.servedModelName=opt", "openai.apiKeySecret.name=opt-api-key",
                   "metrics.serviceMonitor.enabled=true", "metrics.serviceMonitor.scrapeTimeout=10s"),
    "test": ("openaiModel=opt", "openaiApiKeySecret.name=opt-api-key"),
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


def client_words(args: Sequence[str]) -> list[str]:
    """The test chart's client command line: its args, less the `sh -c SCRIPT sh` that runs the completion after."""
    if list(args[:2]) == ["sh", "-c"]:
        assert args[3] == "sh", args
        return list(args[4:])
    return list(args)


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


@pytest.mark.parametrize("values", ["defaults", "readme", "options"])
@pytest.mark.parametrize("chart", CHARTS)
def test_chart_passes_helm_lint_strict(chart: str, values: str) -> None:
    chosen = {"defaults": (), "readme": README_VALUES[chart], "options": README_VALUES[chart] + OPTION_VALUES[chart]}
    result = helm("lint", "--strict", str(KUBERNETES / chart), *set_flags(chosen[values]))
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
    ("single-node", "service.ports.openai=api", "service.ports.openai: Invalid type. Expected: integer"),
    ("multi-node", "service.ports.generationMetrics=70000", "service.ports.generationMetrics: Must be less than"),
    ("single-node", "service.ports.genMetrics=8003", "genMetrics is not allowed"),
    ("single-node", "openai.enabled=yes", "openai.enabled: Invalid type. Expected: boolean"),
    ("multi-node", "openai.enabled=1", "openai.enabled: Invalid type. Expected: boolean"),
    ("single-node", "openai.servedModelName=1", "openai.servedModelName: Invalid type. Expected: string"),
    ("multi-node", "openai.servedModelName[0]=opt", "openai.servedModelName: Invalid type"),
    ("single-node", "openai.apiKeySecret.name[0]=x", "openai.apiKeySecret.name: Invalid type"),
    ("multi-node", "openai.apiKeySecret.key=", "openai.apiKeySecret.key: String length must be greater than"),
    ("single-node", "openai.apiKeySecret.value=sk-123", "value is not allowed"),  # a key is never a plain value
    ("multi-node", "openai.apiKey=sk-123", "apiKey is not allowed"),
    ("single-node", "metrics.scrapeAnnotations=on", "metrics.scrapeAnnotations: Invalid type. Expected: boolean"),
    ("multi-node", "metrics.serviceMonitor.enabled=1", "metrics.serviceMonitor.enabled: Invalid type"),
    ("single-node", "metrics.serviceMonitor.interval=30", "metrics.serviceMonitor.interval: Invalid type"),
    ("multi-node", "metrics.serviceMonitor.interval=half-a-minute", "metrics.serviceMonitor.interval: Does not match"),
    ("single-node", "metrics.serviceMonitor.scrapeTimeout=10", "metrics.serviceMonitor.scrapeTimeout"),
    ("multi-node", "metrics.serviceMonitor.labels.release=1", "metrics.serviceMonitor.labels.release: Invalid type"),
    ("test", "openaiUrl=jax-example-service:9000", "openaiUrl: Does not match pattern"),
    ("test", "openaiUrl=grpc://jax-example-service:8001", "openaiUrl: Does not match pattern"),
    ("test", "openaiModel=1", "openaiModel: Invalid type. Expected: string"),
    ("test", "openaiApiKeySecret.name[0]=x", "openaiApiKeySecret.name: Invalid type"),
    ("test", "openaiApiKeySecret.value=sk-123", "value is not allowed"),
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
                                              "service.ports.http=9100"))
    container = server_container(documents, "Deployment")
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 4, "memory": "64Gi"}
    args = container["args"]
    assert args[:2] == ["python3", "server.py"]
    assert flag(args, "--number-of-gpus") == "4"
    assert flag(args, "--model-name") == "facebook/opt-6.7b"
    assert flag(args, "--max-batch-size") == "32"
    assert flag(args, "--http-port") == "9100"
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "http": 9100, "grpc": 8001, "metrics": 8002, "gen-metrics": 8003, "openai": 9000}


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
        "http": (8000, "http"), "grpc": (9001, "grpc"), "metrics": (8002, "metrics"),
        "gen-metrics": (8003, "gen-metrics"), "openai": (9000, "openai")}
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
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {
        "http": 8000, "grpc": 8001, "metrics": 8002, "gen-metrics": 8003, "openai": 9000}


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
    args = client_words(container["args"])
    assert args[:2] == ["python3", "client.py"]
    assert (flag(args, "--server-url"), flag(args, "--input"), flag(args, "--output-length")) == \
        ("grpc://opt:8001", "Hello, world", "5")
    (hook,) = hook_pods(documents)
    assert hook["spec"]["containers"][0]["args"] == container["args"]


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
# The OpenAI-compatible API, the generation metrics and how Prometheus finds them
# ------------------------------------------------------------------------------------------------------------------

API_KEY_VARIABLE = "OPT_SERVER_API_KEY"  # what server.py reads its --api-key from (openai_api.API_KEY_ENV)
SERVICE_MONITOR = ("monitoring.coreos.com/v1", "ServiceMonitor")


def container_ports(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container["ports"]}


def service_ports(service: dict[str, Any]) -> dict[str, tuple[int, str]]:
    return {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}


def server_args(container: dict[str, Any]) -> list[str]:
    """server.py's command line in the container (the multi-node chart runs it through `entrypoint.sh serve`)."""
    args = container["args"]
    return args[3:] if args[0] == "sh" and args[1].endswith("/entrypoint.sh") else args


@pytest.mark.parametrize("chart", SERVER_CHARTS)
def test_server_charts_serve_the_openai_api_and_the_generation_metrics_on_their_ports(chart: str) -> None:
    _, kind = SERVER_CHARTS[chart]
    for values, openai, generation in (((), 9000, 8003),
                                       (("service.ports.openai=9100", "service.ports.generationMetrics=9103"), 9100,
                                        9103)):
        documents = render(chart, values=README_VALUES[chart] + values)
        container = server_container(documents, kind)
        args = server_args(container)
        assert (flag(args, "--openai-port"), flag(args, "--generation-metrics-port")) == (str(openai), str(generation))
        assert "--served-model-name" not in args  # only --model-name unless openai.servedModelName is set
        ports = container_ports(container)
        assert (ports["openai"], ports["gen-metrics"]) == (openai, generation)
        service = service_ports(find(documents, "Service", "jax-example-service"))
        assert (service["openai"], service["gen-metrics"]) == ((openai, "openai"), (generation, "gen-metrics"))


@pytest.mark.parametrize("chart", SERVER_CHARTS)
def test_disabled_openai_api_passes_port_0_and_leaves_the_port_off(chart: str) -> None:
    _, kind = SERVER_CHARTS[chart]
    documents = render(chart, values=README_VALUES[chart] + ("openai.enabled=false", "openai.servedModelName=opt",
                                                             "openai.apiKeySecret.name=opt-api-key",
                                                             "service.ports.openai=8000"))  # unused: no clash
    container = server_container(documents, kind)
    args = server_args(container)
    assert flag(args, "--openai-port") == "0"  # server.py's "none"; its default would serve on 9000
    assert flag(args, "--generation-metrics-port") == "8003"
    assert "--served-model-name" not in args
    assert API_KEY_VARIABLE not in [e["name"] for e in container["env"]]
    assert "openai" not in container_ports(container)
    assert set(service_ports(find(documents, "Service", "jax-example-service"))) == {
        "http", "grpc", "metrics", "gen-metrics"}


@pytest.mark.parametrize("chart", SERVER_CHARTS)
def test_served_model_name_becomes_the_servers_flag(chart: str) -> None:
    _, kind = SERVER_CHARTS[chart]
    args = server_args(server_container(render(chart, values=("openai.servedModelName=opt",)), kind))
    assert flag(args, "--served-model-name") == "opt"
    assert flag(args, "--model-name") == "facebook/opt-1.3b"


@pytest.mark.parametrize("chart", SERVER_CHARTS)
def test_every_flag_the_server_charts_render_is_one_server_py_knows(chart: str) -> None:
    _, kind = SERVER_CHARTS[chart]
    usage = subprocess.run([sys.executable, str(ROOT / "server.py"), "--help"], capture_output=True, text=True,
                           timeout=60, cwd=ROOT)
    assert usage.returncode == 0, usage.stderr
    known = set(re.findall(r"(--[a-z][-a-z0-9]*)", usage.stdout))
    args = server_args(server_container(render(chart, values=("openai.servedModelName=opt",)), kind))
    rendered = {arg for arg in args if arg.startswith("--")}
    assert {"--openai-port", "--generation-metrics-port", "--served-model-name"} <= rendered
    assert rendered <= known, sorted(rendered - known)


@pytest.mark.parametrize("chart", SERVER_CHARTS)
def test_api_key_comes_from_the_named_secret_into_the_servers_environment(chart: str) -> None:
    _, kind = SERVER_CHARTS[chart]
    default = server_container(render(chart, values=README_VALUES[chart]), kind)
    assert API_KEY_VARIABLE not in [e["name"] for e in default["env"]]  # no key: the API is open
    documents = render(chart, values=README_VALUES[chart] + ("openai.apiKeySecret.name=opt-api-key",
                                                             "openai.apiKeySecret.key=key"))
    container = server_container(documents, kind)
    (variable,) = [e for e in container["env"] if e["name"] == API_KEY_VARIABLE]
    assert variable == {"name": API_KEY_VARIABLE, "valueFrom": {"secretKeyRef": {"name": "opt-api-key", "key": "key"}}}
    assert "--api-key" not in container["args"]  # a flag's value would show in ps and in the pod spec


@pytest.mark.parametrize("extra", ["--openai-port", "--generation-metrics-port=9", "--served-model-name",
                                   "--api-key", "--api-key=secret"])
@pytest.mark.parametrize("chart", SERVER_CHARTS)
def test_extra_args_may_not_carry_a_flag_the_chart_sets_from_values(chart: str, extra: str) -> None:
    key, _ = SERVER_CHARTS[chart]
    result = helm("template", "jax-example", str(KUBERNETES / chart), "--set", f"{key}.extraArgs={{{extra},x}}")
    assert result.returncode != 0, result.stdout
    name = extra.split("=")[0]
    assert f"{key}.extraArgs sets {name}: " in result.stderr, result.stderr
    assert "secret" not in result.stderr.replace("Secret", "")  # the refusal does not repeat a key it was given


@pytest.mark.parametrize(("chart", "values"), [
    ("single-node", ("service.ports.openai=8000",)),
    ("single-node", ("service.ports.generationMetrics=8002",)),
    ("multi-node", ("service.ports.openai=8001",)),
    ("multi-node", ("jaxPort=8003",)),
])
def test_chart_refuses_two_listeners_on_one_port(chart: str, values: tuple[str, ...]) -> None:
    result = helm("template", "jax-example", str(KUBERNETES / chart), *set_flags(values))
    assert result.returncode != 0, result.stdout
    assert "one port number to two listeners" in result.stderr, result.stderr


def test_single_node_pods_carry_prometheus_scrape_annotations_for_the_generation_metrics() -> None:
    def annotations(values: tuple[str, ...]) -> dict[str, str]:
        return find(render("single-node", values=values), "Deployment")["spec"]["template"]["metadata"].get(
            "annotations", {})

    assert annotations(()) == {"prometheus.io/scrape": "true", "prometheus.io/port": "8003",
                               "prometheus.io/path": "/metrics"}
    assert annotations(("service.ports.generationMetrics=9103",))["prometheus.io/port"] == "9103"
    assert annotations(("metrics.scrapeAnnotations=false",)) == {}
    mine = annotations(("deployment.podAnnotations.prometheus\\.io/path=/other", "deployment.podAnnotations.team=ml"))
    assert (mine["prometheus.io/path"], mine["team"], mine["prometheus.io/port"]) == ("/other", "ml", "8003")
    # Triton's own metrics are on the Service too, for a job of their own or the ServiceMonitor.
    assert service_ports(find(render("single-node"), "Service"))["metrics"] == (8002, "metrics")


def test_multi_node_scrape_annotations_are_on_rank_0s_service_not_on_the_pods() -> None:
    documents = render("multi-node", values=README_VALUES["multi-node"])
    service = find(documents, "Service", "jax-example-service")
    assert service["metadata"]["annotations"] == {"prometheus.io/scrape": "true", "prometheus.io/port": "8003",
                                                  "prometheus.io/path": "/metrics"}
    # Every pod has the same template and the workers serve no metrics: annotated pods would scrape as down.
    pod_annotations = find(documents, "StatefulSet")["spec"]["template"]["metadata"]["annotations"]
    assert not [name for name in pod_annotations if name.startswith("prometheus.io/")]
    headless = find(documents, "Service", "jax-example-multi-node-headless")
    assert "annotations" not in headless["metadata"]
    off = find(render("multi-node", values=("metrics.scrapeAnnotations=false",)), "Service", "jax-example-service")
    assert "annotations" not in off["metadata"]


@pytest.mark.parametrize("chart", SERVER_CHARTS)
def test_service_monitor_scrapes_both_metrics_ports_of_the_charts_service(chart: str, tmp_path: Path) -> None:
    assert not [d for d in render(chart) if d["kind"] == "ServiceMonitor"]  # off by default: it needs the CRDs
    values = README_VALUES[chart] + ("metrics.serviceMonitor.enabled=true", "metrics.serviceMonitor.interval=15s",
                                     "metrics.serviceMonitor.scrapeTimeout=10s",
                                     "metrics.serviceMonitor.labels.release=prometheus",
                                     "openai.apiKeySecret.name=opt-api-key", "openai.servedModelName=opt")
    documents = render(chart, values=values)
    monitor = find(documents, "ServiceMonitor")
    # kubernetes-validate has no schema for the Prometheus Operator's CRD: its fields are checked here.
    assert (monitor["apiVersion"], monitor["kind"]) == SERVICE_MONITOR
    assert DNS_LABEL.fullmatch(monitor["metadata"]["name"])
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["llm"]}
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = [d for d in documents if d["kind"] == "Service"]
    selected = [s for s in services if selector.items() <= s["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in selected] == ["jax-example-service"]  # not the headless one
    ports = service_ports(selected[0])
    assert monitor["spec"]["endpoints"] == [
        {"port": name, "path": "/metrics", "interval": "15s", "scrapeTimeout": "10s"}
        for name in ("metrics", "gen-metrics")]
    assert {"metrics", "gen-metrics"} <= set(ports)
    assert set(monitor["spec"]) == {"namespaceSelector", "selector", "endpoints"}
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump_all([d for d in documents if d["kind"] != "ServiceMonitor"]))
    validate([path])  # every other object, the API key's env and the new ports included


def test_service_monitor_leaves_the_scrape_timeout_to_prometheus_unless_set() -> None:
    monitor = find(render("single-node", values=("metrics.serviceMonitor.enabled=true",)), "ServiceMonitor")
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s"},
                                            {"port": "gen-metrics", "path": "/metrics", "interval": "30s"}]


@pytest.mark.parametrize("chart", SERVER_CHARTS)
def test_probes_stay_tritons_with_the_openai_api_enabled(chart: str) -> None:
    _, kind = SERVER_CHARTS[chart]
    enabled = server_container(render(chart, values=("openai.enabled=true",)), kind)
    disabled = server_container(render(chart, values=("openai.enabled=false",)), kind)
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert enabled[probe] == disabled[probe], probe


def render_notes(chart: str, values: tuple[str, ...], tmp_path: Path) -> str:
    """NOTES.txt as `helm install` prints it: `helm template` renders a copy of the chart in which it is a
    ConfigMap's value (helm template leaves NOTES.txt out, and helm install --dry-run wants a cluster)."""
    copy = tmp_path / chart
    shutil.copytree(KUBERNETES / chart, copy)
    notes = copy / "templates" / "NOTES.txt"
    (copy / "templates" / "_notes.tpl").write_text('{{- define "notes" -}}\n' + notes.read_text() + "\n{{- end }}\n")
    notes.unlink()
    (copy / "templates" / "notes.yaml").write_text(
        'apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n  notes: {{ include "notes" . | quote }}\n')
    result = helm("template", "jax-example", str(copy), "--namespace", "llm", "--show-only", "templates/notes.yaml",
                  *set_flags(values))
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)["data"]["notes"]


@pytest.mark.parametrize("chart", SERVER_CHARTS)
def test_notes_name_the_openai_base_url_its_health_and_the_metrics_ports(chart: str, tmp_path: Path) -> None:
    notes = render_notes(chart, ("openai.servedModelName=opt",), tmp_path)
    assert "http://jax-example-service.llm:9000/v1 " in notes
    assert "http://jax-example-service.llm:9000/health " in notes and "/health/ready" in notes
    for port in (8002, 8003):  # Triton's metrics, the generation metrics
        assert f"http://jax-example-service.llm:{port}/metrics" in notes
    (curl,) = [line for line in notes.splitlines() if "curl -s localhost:9000/v1/completions" in line]
    body = notes.split(curl, 1)[1].splitlines()[1].strip()
    assert body.startswith("-d '") and json.loads(body[4:-1]) == {
        "model": "opt", "prompt": "The capital of Poland is", "max_tokens": 16}
    assert "Authorization" not in curl  # no key, no header
    keyed = render_notes(chart, ("openai.apiKeySecret.name=opt-api-key",), tmp_path / "keyed")
    assert 'Authorization: Bearer $OPENAI_API_KEY' in keyed and "get secret opt-api-key" in keyed
    assert '"model": "facebook/opt-1.3b"' in keyed
    off = render_notes(chart, ("openai.enabled=false",), tmp_path / "off")
    assert "openai.enabled=false" in off and "9000/v1" not in off and "9000/health" not in off
    assert "/v1/completions -H" not in off and "--set openaiUrl= " in off


# ------------------------------------------------------------------------------------------------------------------
# The test chart's completion through the OpenAI-compatible API
# ------------------------------------------------------------------------------------------------------------------

COMPLETION_SCRIPT = KUBERNETES / "test" / "openai_completion.py"


def test_test_chart_sends_a_completion_after_the_client(tmp_path: Path) -> None:
    documents = render("test", "jax-example-test", README_VALUES["test"] + ("openaiModel=opt",))
    spec = pod_spec(documents, "Job")
    (container,) = spec["containers"]
    args = container["args"]
    # sh runs the client's words as "$@", then the script, only once the client has succeeded.
    assert args[:2] == ["sh", "-c"] and args[2].startswith('"$@" && exec python3 ') and args[3] == "sh"
    assert client_words(args)[:2] == ["python3", "client.py"]
    script = args[2].split("exec python3 ", 1)[1]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "openai-completion")
    assert script == mount["mountPath"] + "/openai_completion.py" and mount["readOnly"] is True
    volume = next(v for v in spec["volumes"] if v["name"] == "openai-completion")
    configmap = find(documents, "ConfigMap", volume["configMap"]["name"])
    assert configmap["data"]["openai_completion.py"] == COMPLETION_SCRIPT.read_text()
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["OPT_OPENAI_URL"] == "http://jax-example-service:9000"
    assert (env["OPT_OPENAI_MODEL"], env["OPT_OPENAI_PROMPT"], env["OPT_OPENAI_MAX_TOKENS"],
            env["OPT_OPENAI_TIMEOUT"]) == ("opt", "The capital of Poland is", "16", "1800")
    assert API_KEY_VARIABLE not in env
    (hook,) = hook_pods(documents)  # helm test does the same
    assert hook["spec"]["containers"][0]["args"] == args and hook["spec"]["containers"][0]["env"] == container["env"]
    assert hook["spec"]["volumes"] == spec["volumes"]
    path = tmp_path / "rendered.yaml"
    path.write_text(render_text("test", "jax-example-test", README_VALUES["test"] + ("openaiModel=opt",)))
    validate([path])


def test_test_chart_without_an_openai_url_runs_the_client_alone() -> None:
    documents = render("test", "jax-example-test", README_VALUES["test"] + ("openaiUrl=",))
    spec = pod_spec(documents, "Job")
    (container,) = spec["containers"]
    assert container["args"][:2] == ["python3", "client.py"]  # as before the API existed
    assert "volumes" not in spec and "volumeMounts" not in container
    assert [e["name"] for e in container["env"]] == ["PYTHONUNBUFFERED"]
    assert not [d for d in documents if d["kind"] == "ConfigMap"]


def test_test_chart_sends_the_api_key_from_a_secret(tmp_path: Path) -> None:
    values = README_VALUES["test"] + ("openaiApiKeySecret.name=opt-api-key",)
    documents = render("test", "jax-example-test", values)
    for pod in (pod_spec(documents, "Job"), hook_pods(documents)[0]["spec"]):
        (container,) = pod["containers"]
        (variable,) = [e for e in container["env"] if e["name"] == API_KEY_VARIABLE]
        assert variable["valueFrom"] == {"secretKeyRef": {"name": "opt-api-key", "key": "api-key"}}
        assert not [arg for arg in container["args"] if "api-key" in arg]
    path = tmp_path / "rendered.yaml"
    path.write_text(render_text("test", "jax-example-test", values))
    validate([path])


@pytest.mark.parametrize("chart", SERVER_CHARTS)
def test_test_charts_default_openai_url_reaches_either_server_charts_api(chart: str) -> None:
    (container,) = pod_spec(render("test", "jax-example-test", README_VALUES["test"]), "Job")["containers"]
    url = {e["name"]: e.get("value") for e in container["env"]}["OPT_OPENAI_URL"]
    host, port = re.fullmatch(r"http://([^:/]+):(\d+)", url).groups()
    service = find(render(chart, "jax-example", README_VALUES[chart]), "Service", host)
    assert service_ports(service)["openai"] == (int(port), "openai")


class OpenAIStub(http.server.ThreadingHTTPServer):
    """An OpenAI-compatible API whose answers the test sets: GET /v1/models, then POST /v1/completions answers
    `completions` in turn (status, body), the last one again once they run out; it keeps every request."""

    models: Any = {"object": "list", "data": [{"id": "facebook/opt-125m", "object": "model"}]}

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), OpenAIStubHandler)
        self.completions: list[tuple[int, Any]] = [(200, completion("Warsaw."))]
        self.requests: list[tuple[str, str, dict[str, str], Any]] = []


def completion(text: str, finish_reason: str = "length") -> dict[str, Any]:
    return {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "facebook/opt-125m",
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
            "usage": {"prompt_tokens": 6, "completion_tokens": 3, "total_tokens": 9}}


class OpenAIStubHandler(http.server.BaseHTTPRequestHandler):
    server: OpenAIStub

    def answer(self, status: int, body: Any) -> None:
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 (the handler's API)
        self.server.requests.append(("GET", self.path, dict(self.headers), None))
        self.answer(200, self.server.models) if self.path == "/v1/models" else self.answer(404, {})

    def do_POST(self) -> None:  # noqa: N802 (the handler's API)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(("POST", self.path, dict(self.headers), body))
        completions = self.server.completions
        self.answer(*(completions.pop(0) if len(completions) > 1 else completions[0]))

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture()
def openai_stub() -> Iterator[OpenAIStub]:
    server = OpenAIStub()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def run_completion(*args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {"PATH": os.environ["PATH"], **env}
    return subprocess.run([sys.executable, str(COMPLETION_SCRIPT), *args], env=environment, capture_output=True,
                          text=True, timeout=60)


def test_completion_script_asks_the_first_listed_model_with_the_key_and_passes(openai_stub: OpenAIStub) -> None:
    url = f"http://127.0.0.1:{openai_stub.server_address[1]}"
    result = run_completion(OPT_OPENAI_URL=url, OPT_OPENAI_PROMPT="The capital of Poland is",
                            OPT_OPENAI_MAX_TOKENS="5", OPT_SERVER_API_KEY="k3y")
    assert result.returncode == 0, result.stderr
    assert "'Warsaw.'" in result.stdout and "facebook/opt-125m" in result.stdout
    (get, post) = openai_stub.requests
    assert get[:2] == ("GET", "/v1/models")
    assert post[:2] == ("POST", "/v1/completions")
    assert post[3] == {"model": "facebook/opt-125m", "prompt": "The capital of Poland is", "max_tokens": 5}
    assert get[2]["Authorization"] == post[2]["Authorization"] == "Bearer k3y"


def test_completion_script_names_the_model_it_is_given_and_sends_no_key_without_one(openai_stub: OpenAIStub) -> None:
    result = run_completion("--url", f"http://127.0.0.1:{openai_stub.server_address[1]}/", "--model", "opt")
    assert result.returncode == 0, result.stderr
    ((method, path, headers, body),) = openai_stub.requests  # no GET /v1/models
    assert (method, path, body["model"], body["max_tokens"]) == ("POST", "/v1/completions", "opt", 16)
    assert "Authorization" not in headers


@pytest.mark.parametrize(("status", "answer", "complaint"), [
    (200, {"object": "list", "data": []}, "not a text completion"),
    (200, {**completion("x"), "choices": []}, "has no choices"),
    (200, {**completion("x"), "choices": [{"text": None, "finish_reason": "length"}]}, "no text"),
    (200, completion("x", finish_reason=None), "no finish_reason"),
    (200, "<html>hello</html>", "not JSON"),
    (404, {"error": {"message": "the model 'x' does not exist", "code": "model_not_found"}}, "HTTP 404"),
    (401, {"error": {"message": "a valid API key is required"}}, "HTTP 401"),
    (500, {"error": {"message": "the generation engine failed"}}, "HTTP 500"),
], ids=["models-list", "no-choices", "text-null", "no-finish-reason", "not-json", "404", "401", "500"])
def test_completion_script_fails_unless_a_text_completion_comes_back(openai_stub: OpenAIStub, status: int,
                                                                      answer: Any, complaint: str) -> None:
    openai_stub.completions = [(status, answer)]
    started = time.monotonic()
    result = run_completion("--url", f"http://127.0.0.1:{openai_stub.server_address[1]}", "--model", "x",
                            "--timeout", "30")
    assert result.returncode == 1 and complaint in result.stderr, result.stderr
    assert time.monotonic() - started < 10  # at once: only a refused connection or a 503 is tried again
    assert len(openai_stub.requests) == 1


def test_completion_script_tries_a_503_again_until_a_completion_comes(openai_stub: OpenAIStub) -> None:
    openai_stub.completions = [(503, {"error": {"message": "draining"}}), (200, completion(" Warsaw"))]
    result = run_completion("--url", f"http://127.0.0.1:{openai_stub.server_address[1]}", "--model", "x")
    assert result.returncode == 0, result.stderr
    assert "HTTP 503" in result.stderr and "' Warsaw'" in result.stdout
    assert len(openai_stub.requests) == 2


def test_completion_script_gives_up_on_a_refused_connection_after_its_timeout() -> None:
    with socket.socket() as unused:  # bound, never listening: connections to it are refused
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
        started = time.monotonic()
        result = run_completion("--url", f"http://127.0.0.1:{port}", "--model", "x", "--timeout", "3")
    assert result.returncode == 1, result.stderr
    assert "trying again" in result.stderr and f"127.0.0.1:{port}/v1/completions" in result.stderr
    assert 2 <= time.monotonic() - started < 20


def test_completion_script_wants_an_address() -> None:
    result = run_completion()
    assert result.returncode == 2 and "--url http://host:port, or OPT_OPENAI_URL" in result.stderr, result.stderr


def run_job_command(documents: list[dict[str, Any]], tmp_path: Path, url: str) -> subprocess.CompletedProcess:
    """The Job's container command under sh, as the kubelet would run it, with the script at the chart's path."""
    (container,) = pod_spec(documents, "Job")["containers"]
    args = list(container["args"])
    mount = next(m for m in container["volumeMounts"] if m["name"] == "openai-completion")["mountPath"]
    args[2] = args[2].replace(mount + "/", str(COMPLETION_SCRIPT.parent) + "/")
    bin_dir = tmp_path / "bin"  # the image's python3, here this interpreter
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    env.update(OPT_OPENAI_URL=url, PATH=f"{bin_dir}:{os.environ['PATH']}")
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("client", "code", "completions"), [("true", 0, 1), ("false", 1, 0)])
def test_test_jobs_command_runs_the_completion_only_after_the_client_succeeded(
        openai_stub: OpenAIStub, tmp_path: Path, client: str, code: int, completions: int) -> None:
    # `command` stands in for client.py: true succeeds and false fails, whatever flags follow.
    documents = render("test", "jax-example-test", README_VALUES["test"] + (f"command={{{shutil.which(client)}}}",
                                                                            "outputLength=3"))
    result = run_job_command(documents, tmp_path, f"http://127.0.0.1:{openai_stub.server_address[1]}")
    assert result.returncode == code, result.stderr
    posts = [r for r in openai_stub.requests if r[0] == "POST"]
    assert len(posts) == completions
    if completions:
        assert posts[0][3] == {"model": "facebook/opt-125m", "prompt": "The capital of Poland is", "max_tokens": 3}
        assert "'Warsaw.'" in result.stdout


def test_test_jobs_command_fails_when_the_answer_is_not_a_completion(openai_stub: OpenAIStub, tmp_path: Path) -> None:
    openai_stub.completions = [(200, {"object": "list", "data": []})]
    documents = render("test", "jax-example-test", README_VALUES["test"] + (f"command={{{shutil.which('true')}}}",))
    result = run_job_command(documents, tmp_path, f"http://127.0.0.1:{openai_stub.server_address[1]}")
    assert result.returncode == 1 and "not a text completion" in result.stderr, result.stderr


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
