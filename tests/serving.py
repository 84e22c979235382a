"""Starting and stopping real `python server.py` processes for end-to-end tests (loopback only)."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Sequence

import psutil

ROOT = Path(__file__).resolve().parent.parent

# Eight prompts of different lengths (the longest spans two 64-token prefill chunks) and output lengths.
MIXED_PROMPTS = [
    "The capital of Poland is",
    "Hi",
    "Once upon a time, in a land far away, there lived a",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32 33 34 35 36 37 38 39 40",
    "Zażółć gęślą jaźń — unicode works",
    "def fibonacci(n):",
    "A",
    "The quick brown fox jumps over the lazy dog. " * 3,
]
MIXED_LENGTHS = [16, 1, 7, 24, 3, 12, 30, 5]


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@dataclasses.dataclass
class ServerProcess:
    process: subprocess.Popen
    http_port: int
    grpc_port: int
    metrics_port: int
    log_path: Path
    generation_metrics_port: int = 0
    openai_port: int = 0

    @property
    def openai_url(self) -> str:
        return f"http://127.0.0.1:{self.openai_port}/v1"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://127.0.0.1:{self.grpc_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def group(self) -> list[psutil.Process]:
        """Every live process of the server's session (it runs in a session of its own)."""
        found = []
        for p in psutil.process_iter(["pid"]):
            try:
                if os.getsid(p.pid) == self.process.pid:
                    found.append(p)
            except (ProcessLookupError, PermissionError, psutil.Error):
                continue
        return found

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Sends `sig`, waits for the exit status; whatever outlives it is killed (and reported by `group`)."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
            raise AssertionError(f"server did not stop within {timeout} s after {signal.Signals(sig).name}")

    def kill_group(self) -> None:
        for p in self.group():
            try:
                p.kill()
            except psutil.Error:
                pass


def start_server(tmp: Path, cache_dir: Path, *extra: str, model: str = "random/tiny", name: str = "server") -> ServerProcess:
    http, grpc, metrics, generation_metrics, openai = free_ports(5)
    log_path = tmp / f"{name}-{http}.log"
    command = [
        sys.executable, str(ROOT / "server.py"), "--model-name", model, "--cache-dir", str(cache_dir),
        "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
        "--generation-metrics-port", str(generation_metrics), "--openai-port", str(openai),
        "--bind-address", "127.0.0.1", "--exit-timeout", "3", *extra,
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
    return ServerProcess(process, http, grpc, metrics, log_path, generation_metrics, openai)


@contextlib.contextmanager
def running_server(tmp: Path, cache_dir: Path, *extra: str) -> Iterator[ServerProcess]:
    """A ready server (random/tiny) for the block; stopped, and whatever is left of it killed, afterwards."""
    srv = start_server(tmp, cache_dir, *extra)
    try:
        wait_ready(srv)
        yield srv
    finally:
        srv.stop()
        srv.kill_group()


def start_group(tmp: Path, cache_dir: Path, nodes: int, *extra: str, order: Sequence[int] | None = None,
                model: str = "random/tiny", gap: float = 1.0, gpus: int = 2) -> list[ServerProcess]:
    """`nodes` processes of one multi-node group on loopback, `gpus` devices each, started in `order`
    (`gap` seconds apart; all ranks by default); returned in rank order. Each runs in a session of its own,
    as on its own node."""
    (head_port,) = free_ports(1)
    started: dict[int, ServerProcess] = {}
    for rank in order if order is not None else range(nodes):
        started[rank] = start_server(
            tmp, cache_dir, "--head-url", f"127.0.0.1:{head_port}", "--number-of-nodes", str(nodes),
            "--rank", str(rank), "--number-of-gpus", str(gpus), *extra, model=model, name=f"rank{rank}",
        )
        time.sleep(gap)
    return [started[rank] for rank in sorted(started)]


def wait_exit(server: ServerProcess, timeout: float) -> int:
    """The exit status of a process expected to end by itself within `timeout` seconds."""
    try:
        return server.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running after {timeout} s:\n{server.log()[-3000:]}") from None


def wait_ready(server: ServerProcess, timeout: float = 300, host: str = "127.0.0.1",
               models: Sequence[str] = ("OPT", "OPT_stream"), poll: float = 0.5) -> None:
    """Waits until Triton reports `models` ready, asking every `poll` seconds; fails with the log if the
    server dies first. OPT_stream loads a moment after OPT: by default a test may then use either."""
    import tritonclient.http as httpclient

    deadline = time.monotonic() + timeout
    client = httpclient.InferenceServerClient(f"{host}:{server.http_port}")
    try:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise AssertionError(f"server exited with {server.process.returncode}:\n{server.log()[-5000:]}")
            try:
                if all(client.is_model_ready(model) for model in models):
                    return
            except Exception:  # not listening yet
                pass
            time.sleep(poll)
    finally:
        client.close()
    raise AssertionError(f"server not ready after {timeout} s:\n{server.log()[-5000:]}")


def infer(url: str, prompts: Sequence[bytes | str], lengths: Sequence[int], timeout: float = 120,
          sampling: Any = None) -> list[str]:
    """One Triton request (HTTP or gRPC by the URL's scheme) with one row per prompt; no readiness wait.

    Unlike client.py it sends prompts as given, bytes that are not UTF-8 included. `sampling`: a
    client.Sampling, the same settings on every row.
    """
    from client import MODEL_NAME, Sampling, request_inputs, triton_url

    protocol, address = triton_url(url)
    if protocol == "grpc":
        import tritonclient.grpc as client_lib
    else:
        import tritonclient.http as client_lib
    inputs = request_inputs(client_lib, [p.encode("utf-8") if isinstance(p, str) else p for p in prompts], lengths,
                            sampling=sampling or Sampling())
    if protocol == "grpc":
        client = client_lib.InferenceServerClient(address)
        result = client.infer(MODEL_NAME, inputs, client_timeout=timeout)
    else:
        client = client_lib.InferenceServerClient(address, network_timeout=timeout)
        result = client.infer(MODEL_NAME, inputs)
    client.close()
    return [row[0].decode("utf-8") for row in result.as_numpy("output")]


def openai_texts(server: ServerProcess, prompts: Sequence[str], lengths: Sequence[int], api_key: str = "none",
                 **settings: Any) -> list[str]:
    """The prompt + completion of each prompt over the OpenAI API (the `openai` package), one request each."""
    import openai

    api = openai.OpenAI(base_url=server.openai_url, api_key=api_key, max_retries=0, timeout=120)
    model = api.models.list().data[0].id
    return [prompt + api.completions.create(model=model, prompt=prompt, max_tokens=length, **settings).choices[0].text
            for prompt, length in zip(prompts, lengths)]


def run_client(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "client.py"), *args], capture_output=True, text=True, timeout=120)


def tool(name: str) -> str:
    """A command installed beside this interpreter (the venv's bin), else on PATH; fails the test without either."""
    import shutil

    import pytest

    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is neither next to {sys.executable} nor on PATH: ./install.sh --test installs it")
    return found


def metric(server: ServerProcess, name: str, default: float | None = None) -> float:
    """One sample of the server's generation metrics, e.g. 'opt_busy_slots' or
    'opt_requests_total{outcome="cancelled"}'; `default` for a labelled counter not counted yet."""
    url = f"http://127.0.0.1:{server.generation_metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert found or default is not None, name
    return float(found[1]) if found else default


def wait_metric(server: ServerProcess, name: str, value: float, timeout: float, why: str = "") -> float:
    """Seconds until the sample reads `value`; an AssertionError (saying `why`) after `timeout`."""
    begin = time.monotonic()
    while (now := time.monotonic()) - begin < timeout:
        if metric(server, name) == value:
            return now - begin
        time.sleep(0.1)
    raise AssertionError(f"{name} is {metric(server, name)}, not {value}, after {timeout} s {why}".rstrip())

