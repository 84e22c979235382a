"""What the server accepts from the network, and where it listens.

Our modules are read with `ast` for what turns received bytes into code or objects (pickle and its relatives,
eval/exec, yaml.load, a torch.load that may unpickle); the scanner is shown a file that does all of these, so that
its silence on ours means something. One real server (random/tiny, `--bind-address 127.0.0.1`, the token from
OPT_SERVER_ACCESS_TOKEN) then shows that every socket its process tree listens on is on loopback at a port its flags
gave, and that Triton's restricted endpoints refuse a request without the token and answer one with it, over HTTP and
gRPC. The JAX coordinator's bind address is checked on a group of one, which is all it takes to start the service.
"""
from __future__ import annotations

import ast
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest

from serving import ServerProcess, free_ports, running_server

ROOT = Path(__file__).resolve().parent.parent
# Every module of ours at the top of the repository: the served code, and whatever joins it later.
MODULES = sorted({"server.py", "client.py", "engine.py", "opt_utils.py", "modeling_flax_opt.py",
                  *(path.name for path in ROOT.glob("*.py"))})
TOKEN_VARIABLE = "OPT_SERVER_ACCESS_TOKEN"
# Every character --access-token allows, so the test shows they all survive Triton's option parsing and the header.
TOKEN = "opt-Test_token.with~every+allowed/character-0123456789"
ACCESS_HEADER = "triton-access-token"  # PyTriton's TRITON_ACCESS_HEADER; gRPC prefixes it as below
GRPC_ACCESS_HEADER = "triton-grpc-protocol-triton-access-token"
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1"}  # an IPv4 address bound by a dual-stack socket reads as the second

# ------------------------------------------------------------------------------------------------------------------
# Nothing received is unpickled or evaluated
# ------------------------------------------------------------------------------------------------------------------

UNSAFE_MODULES = {"pickle", "_pickle", "cPickle", "marshal", "dill", "cloudpickle", "shelve", "joblib"}
UNSAFE_BUILTINS = {"eval", "exec", "__import__"}
YAML_LOADERS = {"load", "load_all", "unsafe_load", "unsafe_load_all", "full_load", "full_load_all"}

UNSAFE_SAMPLE = '''
import pickle
import marshal as m
from dill import loads
from cloudpickle import dumps
import yaml
import numpy as np
import torch

eval(request)
exec(request)
yaml.load(request)
np.load(path, allow_pickle=True)
torch.load(path)
torch.load(path, weights_only=False)
frame = pd.read_pickle(path)
compiled = serialize_executable.deserialize_and_load(data, in_tree, out_tree)
class Mine(serialize_executable._JaxPjrtUnpickler):
    pass
'''
# The one unpickler we run, and why it is safe: program_cache.py reads the compiled programs it stored
# under --cache-dir with an unpickler that resolves only jax's and numpy's own classes
# (tests/test_program_cache.py shows a payload naming anything else refused before it runs).
ALLOWED_UNPICKLERS = {"program_cache.py": ["serialize_executable._JaxPjrtUnpickler (an unpickler)"]}


def _name(node: ast.AST) -> str:
    """`a.b.c` for an attribute chain or name, "" for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and (base := _name(node.value)):
        return f"{base}.{node.attr}"
    return ""


def _keyword_is_true(call: ast.Call, name: str) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords)


def unsafe_uses(source: str, filename: str) -> list[str]:
    """Each place in `source` that can turn bytes into objects or code, as `file:line: what`."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        what = None
        if isinstance(node, ast.Import):
            names = [alias.name.split(".")[0] for alias in node.names]
            what = next((f"import {n}" for n in names if n in UNSAFE_MODULES), None)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in UNSAFE_MODULES:
            what = f"from {node.module} import"
        elif isinstance(node, ast.Call):
            called = _name(node.func)
            module, _, function = called.rpartition(".")
            if called in UNSAFE_BUILTINS:
                what = f"{called}()"
            elif module == "yaml" and function in YAML_LOADERS:
                what = f"{called}()"
            elif function == "read_pickle":
                what = f"{called}()"
            elif function == "load" and _keyword_is_true(node, "allow_pickle"):
                what = f"{called}(allow_pickle=True)"
            elif called == "torch.load" and not _keyword_is_true(node, "weights_only"):
                what = "torch.load() without weights_only=True (a full unpickler)"
        elif isinstance(node, ast.Attribute) and (node.attr.endswith("Unpickler") or node.attr == "deserialize_and_load"):
            what = f"{_name(node)} (an unpickler)"  # jax's serialize_executable unpickles what it loads
        if what:
            found.append(f"{filename}:{node.lineno}: {what}")
    return found


def test_scanner_finds_every_kind_of_unsafe_use_in_a_sample() -> None:
    found = [line.split(": ", 1)[1] for line in unsafe_uses(UNSAFE_SAMPLE, "sample.py")]
    assert found == ["import pickle", "import marshal", "from dill import", "from cloudpickle import", "eval()",
                     "exec()", "yaml.load()", "np.load(allow_pickle=True)",
                     "torch.load() without weights_only=True (a full unpickler)",
                     "torch.load() without weights_only=True (a full unpickler)", "pd.read_pickle()",
                     "serialize_executable._JaxPjrtUnpickler (an unpickler)",
                     "serialize_executable.deserialize_and_load (an unpickler)"], found


@pytest.mark.parametrize("module", MODULES)
def test_module_never_unpickles_or_evaluates_what_it_reads(module: str) -> None:
    path = ROOT / module
    found = [line.split(": ", 1)[1] for line in unsafe_uses(path.read_text(), module)]
    assert found == ALLOWED_UNPICKLERS.get(module, [])


def test_the_one_unpickler_resolves_only_jax_and_numpy() -> None:
    import program_cache

    assert all(prefix.startswith(("jax.", "jaxlib.")) for prefix in program_cache._ALLOWED_PREFIXES)
    assert {module.split(".")[0] for module, _ in program_cache._ALLOWED_OTHERS} == {"collections", "numpy"}


# ------------------------------------------------------------------------------------------------------------------
# Flags
# ------------------------------------------------------------------------------------------------------------------


def test_access_token_comes_from_the_environment_and_an_empty_one_means_random(monkeypatch: pytest.MonkeyPatch) -> None:
    import server

    monkeypatch.setenv(TOKEN_VARIABLE, TOKEN)
    assert server.parse_args([]).access_token == TOKEN
    assert server.parse_args(["--access-token", TOKEN[::-1]]).access_token == TOKEN[::-1]
    # An empty token would lift PyTriton's protection altogether: it counts as none, and PyTriton makes one.
    monkeypatch.setenv(TOKEN_VARIABLE, "")
    assert server.parse_args([]).access_token is None
    monkeypatch.delenv(TOKEN_VARIABLE)
    assert server.parse_args([]).access_token is None


@pytest.mark.parametrize("token", ["short-token", "has:a-colon-in-the-token", "has,a,comma,in,the,token",
                                   "ends-with-base64-padding=", "has a space in the token",
                                   "ünïcödé-token-ünïcödé"])
def test_access_token_that_triton_could_misread_is_refused_without_being_shown(
        token: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import server

    monkeypatch.setenv(TOKEN_VARIABLE, token)
    with pytest.raises(SystemExit) as exit_:
        server.parse_args([])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert "must be 16 or more of" in error and token not in error, error


@pytest.mark.parametrize(("address", "bind"), [
    (None, None), ("127.0.0.1", "127.0.0.1:23456"), ("10.1.2.3", "10.1.2.3:23456"),
    ("node0.example.org", "node0.example.org:23456"), ("::1", "[::1]:23456"), ("[fd00::7]", "[fd00::7]:23456"),
])
def test_coordinator_bind_address_gets_the_port_of_head_url(address: str | None, bind: str | None,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import jax

    import group
    import server

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    flags = ["--coordinator-bind-address", address] if address else []
    args = server.parse_args(["--head-url", "opt-0.opt-headless:23456", "--number-of-nodes", "2", *flags])
    failures: list[BaseException] = []
    group._initialize_distributed(args, failures)
    assert failures == [] and len(calls) == 1
    assert calls[0]["coordinator_bind_address"] == bind  # None: jax's default, [::]:23456


def test_coordinator_bind_address_refuses_a_port(capsys: pytest.CaptureFixture[str]) -> None:
    import server

    with pytest.raises(SystemExit):
        server.parse_args(["--coordinator-bind-address", "127.0.0.1:23456"])
    assert "the port is the one of --head-url" in capsys.readouterr().err


COORDINATOR = """
import sys
sys.path.insert(0, sys.argv[1])
import psutil
import group
import server
args = server.parse_args(["--number-of-nodes", "1", "--head-url", "127.0.0.1:" + sys.argv[2], *sys.argv[3:]])
failures = []
group._initialize_distributed(args, failures)
assert not failures, failures
print(sorted({(c.laddr.ip, c.laddr.port) for c in psutil.Process().net_connections("inet") if c.status == "LISTEN"}))
"""


@pytest.mark.parametrize(("flags", "addresses"), [
    ((), {"::"}), (("--coordinator-bind-address", "127.0.0.1"), LOOPBACK),
], ids=["jax-default-every-interface", "loopback"])
def test_coordinator_listens_where_the_flag_says(flags: tuple[str, ...], addresses: set[str]) -> None:
    """jax.distributed with a group of one: rank 0 starts the coordination service, as in any group."""
    (port,) = free_ports(1)
    result = subprocess.run([sys.executable, "-c", COORDINATOR, str(ROOT), str(port), *flags], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    (listening,) = [line for line in result.stdout.splitlines() if line.startswith("[")]
    listening = ast.literal_eval(listening)
    assert listening and all(ip in addresses and p == port for ip, p in listening), listening


# ------------------------------------------------------------------------------------------------------------------
# One real server
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Iterator[ServerProcess]:
    """A server on loopback whose token comes from the environment, as the charts give it."""
    with contextlib.ExitStack() as stack:
        environment = stack.enter_context(pytest.MonkeyPatch.context())
        environment.setenv(TOKEN_VARIABLE, TOKEN)
        srv = stack.enter_context(running_server(tmp_path_factory.mktemp("security"), cache_dir, "--decode-slots",
                                                 "2", "--max-batch-size", "2", "--model-instances", "1"))
        environment.undo()  # the token was read at the start; the tests' own requests must not see it
        wait_until_ready(srv)
        yield srv


def wait_until_ready(srv: ServerProcess, timeout: float = 60) -> None:
    """Until Triton is ready as a whole: running_server waits for `OPT` only, and `OPT_stream` loads after it."""
    deadline = time.monotonic() + timeout
    for path in ("/v2/models/OPT_stream/ready", "/v2/health/ready"):  # between the two loads Triton reads ready
        while request(srv, "GET", path, token=None)[0] != 200:
            assert time.monotonic() < deadline and srv.process.poll() is None, srv.log()[-3000:]
            time.sleep(0.5)


def listening_sockets(srv: ServerProcess) -> list[tuple[str, str, int, str]]:
    """(process name, kind, ip, port) of every socket a process of the server's tree listens on or has bound
    (TCP in LISTEN, UDP without a peer)."""
    found = []
    for process in srv.group():
        with contextlib.suppress(psutil.Error):
            name = process.name()
            for connection in process.net_connections("inet"):
                tcp = connection.type == socket.SOCK_STREAM
                if (tcp and connection.status == psutil.CONN_LISTEN) or (not tcp and not connection.raddr):
                    found.append((name, "tcp" if tcp else "udp", connection.laddr.ip, connection.laddr.port))
    return found


def test_every_listening_socket_is_on_the_bind_address_at_a_port_the_flags_gave(server: ServerProcess) -> None:
    ports = {server.http_port, server.grpc_port, server.metrics_port, server.generation_metrics_port,
             server.openai_port}
    sockets = listening_sockets(server)
    strays = [s for s in sockets if s[1] != "tcp" or s[2] not in LOOPBACK or s[3] not in ports]
    assert not strays, f"listening elsewhere than 127.0.0.1 on {sorted(ports)}: {strays}"
    # and every one of those ports is there: the scan saw the server's sockets, not an empty list
    assert {port for *_, port in sockets} == ports, sockets


def request(server: ServerProcess, method: str, path: str, token: str | None) -> tuple[int, str]:
    """The HTTP status and body of one request to Triton, with the token's header when given."""
    headers = {"Content-Type": "application/json", **({ACCESS_HEADER: token} if token is not None else {})}
    data = b"{}" if method == "POST" else None
    req = urllib.request.Request(f"{server.http_url}{path}", data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            body = response.read().decode()
            json.loads(body or "null")  # a real answer, not an error page
            return response.status, body
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


# One request per endpoint group PyTriton 0.7 restricts by default (its DEFAULT_PROTECTED_ENDPOINTS).
RESTRICTED_HTTP = {
    "model-repository": ("POST", "/v2/repository/index"),
    "logging": ("GET", "/v2/logging"),
    "trace": ("GET", "/v2/trace/setting"),
    "statistics": ("GET", "/v2/models/stats"),
    "shared-memory": ("GET", "/v2/systemsharedmemory/status"),
}


def test_pytritons_restricted_endpoints_are_exactly_those_checked_here() -> None:
    from pytriton.triton import DEFAULT_PROTECTED_ENDPOINTS, TRITON_ACCESS_HEADER

    assert sorted(DEFAULT_PROTECTED_ENDPOINTS) == sorted(RESTRICTED_HTTP)
    assert TRITON_ACCESS_HEADER == ACCESS_HEADER


@pytest.mark.parametrize("endpoint", RESTRICTED_HTTP)
def test_restricted_http_endpoint_answers_only_with_the_token(server: ServerProcess, endpoint: str) -> None:
    method, path = RESTRICTED_HTTP[endpoint]
    for token in (None, TOKEN[:-1] + "x", TOKEN.upper()):
        status, body = request(server, method, path, token=token)
        assert status == 403 and "restricted" in body and ACCESS_HEADER in body, (token, status, body)
    assert request(server, method, path, token=TOKEN)[0] == 200


def test_health_metadata_and_inference_need_no_token(server: ServerProcess) -> None:
    from serving import infer

    for path in ("/v2/health/live", "/v2/health/ready", "/v2", "/v2/models/OPT", "/v2/models/OPT/config"):
        assert request(server, "GET", path, token=None)[0] == 200, path
    assert len(infer(server.http_url, ["Hello"], [2])) == 1


def test_restricted_grpc_calls_answer_only_with_the_token(server: ServerProcess) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    try:
        calls = [client.get_model_repository_index, client.get_log_settings, client.get_trace_settings,
                 client.get_inference_statistics, client.get_system_shared_memory_status]
        for call in calls:
            with pytest.raises(InferenceServerException, match=f"restricted.*{GRPC_ACCESS_HEADER}"):
                call()
            call(headers={GRPC_ACCESS_HEADER: TOKEN})
        assert client.is_server_ready()
    finally:
        client.close()


def test_server_says_whose_token_it_uses_and_never_logs_it(server: ServerProcess) -> None:
    log = server.log()
    assert "restricted endpoints" in log and "the token given" in log, log[-3000:]
    assert TOKEN not in log
    # The flag was not used: the token is in the server's environment, not on its command line.
    assert TOKEN not in " ".join(psutil.Process(server.process.pid).cmdline())
