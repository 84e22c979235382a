"""End to end: a real `python server.py` (PyTriton + Triton) on loopback, called by client.py and tritonclient."""
from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from pathlib import Path
from typing import Iterator

import pytest
from tritonclient.utils import InferenceServerException

import server as server_module
from serving import (MIXED_LENGTHS, MIXED_PROMPTS, ServerProcess, infer, run_client, running_server, start_server,
                     wait_ready)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path):
    with running_server(tmp_path_factory.mktemp("server"), cache_dir, "--max-batch-size", "8",
                        "--model-instances", "3", "--decode-slots", "8") as srv:
        yield srv


def test_client_prints_the_prompt_followed_by_generated_text(server: ServerProcess):
    result = run_client("--server-url", server.http_url, "--input", "The capital of Poland is", "--output-length", "16")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("output: ['The capital of Poland is"), result.stdout
    text = eval(result.stdout[len("output: "):])[0]  # the printed Python list literal
    assert len(text) > len("The capital of Poland is")


def test_client_over_grpc_gives_the_same_text_as_over_http(server: ServerProcess):
    args = ("--input", "Once upon a time", "--output-length", "12")
    over_http = run_client("--server-url", server.http_url, *args)
    over_grpc = run_client("--server-url", server.grpc_url, *args)
    assert over_http.returncode == 0 and over_grpc.returncode == 0, over_http.stderr + over_grpc.stderr
    assert over_http.stdout == over_grpc.stdout


def test_mixed_batch_rows_equal_the_single_requests(server: ServerProcess):
    batched = infer(server.http_url, MIXED_PROMPTS, MIXED_LENGTHS)
    singles = [infer(server.grpc_url, [p], [n])[0] for p, n in zip(MIXED_PROMPTS, MIXED_LENGTHS)]
    assert batched == singles
    for prompt, text in zip(MIXED_PROMPTS, batched):
        assert text.startswith(prompt)


def test_concurrent_requests_are_batched_without_changing_their_text(server: ServerProcess):
    singles = [infer(server.http_url, [p], [n])[0] for p, n in zip(MIXED_PROMPTS, MIXED_LENGTHS)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        url = lambda i: server.grpc_url if i % 2 else server.http_url
        futures = [pool.submit(infer, url(i), [p], [n]) for i, (p, n) in enumerate(zip(MIXED_PROMPTS, MIXED_LENGTHS))]
        concurrent_texts = [f.result()[0] for f in futures]
    assert concurrent_texts == singles


@pytest.mark.parametrize(
    "prompt, length, message",
    [
        (b"", 4, "input is empty"),
        (b"\xff\xfe not utf-8", 4, "not valid UTF-8"),
        (b"Hello", 0, "output_length must be at least 1, got 0"),
        (b"Hello", -5, "output_length must be at least 1, got -5"),
        (b"Hello", 2048, "exceeds the model's 2048 positions"),
        (b"Hello", 10**12, "exceeds the model's 2048 positions"),
    ],
)
def test_bad_request_gets_an_error_naming_the_problem_and_the_server_keeps_serving(
    server: ServerProcess, prompt: bytes, length: int, message: str
):
    for url in (server.http_url, server.grpc_url):
        with pytest.raises(InferenceServerException, match=message):
            infer(url, [prompt], [length])
    assert infer(server.http_url, ["Still serving"], [3])[0].startswith("Still serving")


def test_a_bad_row_fails_its_own_request_while_a_concurrent_good_request_succeeds(server: ServerProcess):
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        good = pool.submit(infer, server.http_url, ["Good request"], [20])
        bad = pool.submit(infer, server.grpc_url, ["fine row", ""], [4, 4])
        with pytest.raises(InferenceServerException, match="row 1: input is empty"):
            bad.result()
        assert good.result()[0].startswith("Good request")


def test_client_reports_a_bad_request_as_an_error(server: ServerProcess):
    result = run_client("--server-url", server.http_url, "--input", "Hello", "--output-length", "0")
    assert result.returncode == 1
    assert "output_length must be at least 1" in result.stderr


def test_sigterm_stops_the_server_cleanly_leaving_no_process(tmp_path: Path, cache_dir: Path):
    srv = start_server(tmp_path, cache_dir, "--max-batch-size", "2", "--model-instances", "2", "--decode-slots", "4")
    try:
        wait_ready(srv)
        assert infer(srv.http_url, ["Before stopping"], [2])[0].startswith("Before stopping")
        assert srv.stop(signal.SIGTERM, timeout=60) == 0
        assert srv.group() == [], f"left behind: {[p.cmdline() for p in srv.group()]}"
        log = srv.log()
        assert "stopped" in log
        # The stub reaper outlives Triton's stop: a kill -9 during that stop still has it to end the stubs.
        assert log.index("Triton stopped") < log.index("stub reaper stopped"), log
    finally:
        srv.kill_group()


def test_sigterm_while_compiling_stops_the_server_at_once(tmp_path: Path):
    srv = start_server(tmp_path, tmp_path / "empty-cache", "--max-batch-size", "8", "--model-instances", "2")
    try:
        deadline = time.monotonic() + 120
        while "weights of random/tiny ready" not in srv.log():
            assert srv.process.poll() is None and time.monotonic() < deadline, srv.log()[-3000:]
            time.sleep(0.2)
        assert srv.stop(signal.SIGTERM, timeout=60) == 0
        assert "runner: programs:" not in srv.log(), "the server finished compiling before it stopped"
        assert "stopped by SIGTERM before serving" in srv.log()
        assert srv.group() == []
    finally:
        srv.kill_group()


@pytest.fixture
def life() -> Iterator[server_module.Lifecycle]:
    """A Lifecycle whose handlers are this process's for the test; pytest's own are put back afterwards."""
    kept = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    lifecycle = server_module.Lifecycle()
    lifecycle.install_signal_handlers()
    try:
        yield lifecycle
    finally:
        for sig, handler in kept.items():
            signal.signal(sig, handler)


def _signal_inside(catch: type[BaseException]) -> bool:
    """Sends SIGTERM to this process inside `try ... except catch`; True if that except took it."""
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # the handler runs on this (the main) thread at once: the sleep is interrupted
    except catch:
        return True
    return False


def test_a_signal_before_serving_escapes_an_except_exception_on_its_way_out(life: server_module.Lifecycle):
    """CI once saw a SIGTERM during compilation end in a server that compiled on, served and then drained:
    StopRequested was an Exception, which an `except Exception` on the main thread's path can swallow."""
    with pytest.raises(server_module.StopRequested, match="SIGTERM"):
        _signal_inside(Exception)


def test_a_stop_swallowed_before_serving_still_stops_the_process_before_it_serves(life: server_module.Lifecycle):
    assert _signal_inside(BaseException)
    with pytest.raises(server_module.StopRequested, match="SIGTERM"):
        life.start_serving()


def test_a_stop_swallowed_while_loading_ends_it_at_the_next_checkpoint(life: server_module.Lifecycle):
    """CI saw the handler run inside jax's gc callback, where Python only prints what is raised: the server
    compiled on for 24 s. load_model's checkpoint (after the weights, after each program) is this."""
    assert _signal_inside(BaseException)
    with pytest.raises(server_module.StopRequested, match="SIGTERM"):
        life.raise_if_stopped()
    assert not life.serving.is_set()


def test_a_signal_once_serving_drains_instead_of_interrupting(life: server_module.Lifecycle):
    life.start_serving()
    assert not _signal_inside(BaseException)  # the sleep ran out: nothing was raised
    assert life.stop.is_set() and life.signals == ["SIGTERM"]


def test_ipv6_serves_on_bind_address_any_and_the_client_reaches_it_at_its_brackets(tmp_path: Path, cache_dir: Path):
    """--bind-address :: once died at start with PyTriton's "Invalid url http://:::<port>"; client.py
    --server-url http://[::1]:8000 connected to "::1:8000"."""
    srv = start_server(tmp_path, cache_dir, "--bind-address", "::")
    try:
        wait_ready(srv, host="[::1]")
        for url in (f"http://[::1]:{srv.http_port}", f"grpc://[::1]:{srv.grpc_port}"):
            for stream in ([], ["--stream"]):
                result = run_client("--server-url", url, "--input", "Over IPv6", "--output-length", "3", *stream)
                assert result.returncode == 0, result.stderr
                assert "Over IPv6" in result.stdout
        assert srv.stop(signal.SIGTERM, timeout=60) == 0
    finally:
        srv.kill_group()


@pytest.mark.parametrize("flag, listener, timeout", [
    ("--http-port", "Triton", 420),  # Triton fails its three starts first
    ("--openai-port", "the OpenAI API", 300),
])
def test_a_listener_that_cannot_start_winds_everything_down(tmp_path: Path, cache_dir: Path, flag: str,
                                                              listener: str, timeout: float):
    """Its port taken: the server says which listener failed and exits 1, its engine, reaper, Triton and
    stubs gone with it (the reaper used to outlive it, and a group's workers to wait)."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        srv = start_server(tmp_path, cache_dir, flag, str(taken.getsockname()[1]))
        try:
            assert srv.process.wait(timeout=timeout) == 1
            assert srv.group() == [], f"left behind: {[p.cmdline() for p in srv.group()]}"
            log = srv.log()
            assert f"stopping: {listener} did not start" in log and "stub reaper stopped" in log, log[-3000:]
        finally:
            srv.kill_group()
