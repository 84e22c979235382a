"""Deadlines, the bounded queue and the SIGTERM drain, through a real server (random/tiny on loopback)."""
from __future__ import annotations

import concurrent.futures
import re
import signal
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

import client
from serving import ServerProcess, infer, metric, running_server, start_server, wait_metric, wait_ready

# Sampled rows: every such step sorts the 50272-token vocabulary (15 ms for random/tiny here, where a greedy
# step takes 1 ms), so a row of LONG tokens runs for about 30 s and outlives every deadline and grace below.
LONG = 1900  # tokens
FOREVER = client.Sampling(ignore_eos=True, temperature=1.0, seed=5)


def stream(server: ServerProcess, prompt: str, length: int, sampling: client.Sampling = client.Sampling(),
           timeout: float = 120) -> Iterator[str]:
    return client.stream_pieces(server.grpc_url, prompt, length, timeout, sampling)


def error_of(call) -> str:
    with pytest.raises(Exception) as caught:
        call()
    return str(caught.value)


# --- deadlines and the bounded queue --------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("reliability"), cache_dir, "--decode-slots", "2",
                        "--request-timeout", "3") as srv:
        yield srv


def test_the_request_timeout_flag_bounds_every_request_and_a_longer_input_cannot_lift_it(server: ServerProcess):
    begin = time.monotonic()
    message = error_of(lambda: infer(server.http_url, ["No limit of its own"], [LONG], sampling=client.Sampling(
        ignore_eos=True, temperature=1.0, seed=5, timeout_seconds=100)))
    assert "timed out: the request's deadline of 3 s passed" in message, message
    assert 3 <= time.monotonic() - begin < 8


def test_a_grpc_request_whose_client_gives_up_is_cancelled_too(server: ServerProcess):
    import tritonclient.grpc as grpc

    cancelled = metric(server, 'opt_requests_total{outcome="cancelled"}', 0)
    triton = grpc.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    inputs = client.request_inputs(grpc, [b"The client waits one second"], [LONG], sampling=FOREVER)
    with pytest.raises(Exception, match="Deadline Exceeded"):
        triton.infer(client.MODEL_NAME, inputs, client_timeout=1.0)
    triton.close()
    assert wait_metric(server, "opt_busy_slots", 0, timeout=5) < 1.5  # well before the server's own 3 s deadline
    assert metric(server, 'opt_requests_total{outcome="cancelled"}', 0) == cancelled + 1


# --- the drain ------------------------------------------------------------------------------------


def test_sigterm_refuses_new_requests_lets_those_in_flight_finish_ends_those_past_the_grace_and_exits_0(
    tmp_path: Path, cache_dir: Path,
):
    srv = start_server(tmp_path, cache_dir, "--exit-timeout", "6", "--decode-slots", "4")
    try:
        wait_ready(srv)
        expected = infer(srv.http_url, ["Finishes in the drain"], [60], sampling=FOREVER)[0]
        pieces: dict[str, list[str]] = {"short": [], "long": []}
        started = {name: threading.Event() for name in pieces}

        def run(name: str, prompt: str, length: int) -> None:
            for piece in stream(srv, prompt, length, FOREVER):
                pieces[name].append(piece)
                started[name].set()

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            short = pool.submit(run, "short", "Finishes in the drain", 60)
            long = pool.submit(run, "long", "Outlives the grace period", LONG)
            assert all(event.wait(60) for event in started.values())
            srv.process.send_signal(signal.SIGTERM)
            time.sleep(1.0)
            refused = error_of(lambda: infer(srv.http_url, ["Too late"], [4]))
            assert "the server is shutting down (draining after SIGTERM) and takes no new requests" in refused, refused
            assert metric(srv, 'opt_refused_rows_total{reason="draining"}') == 1
            short.result(timeout=60)
            assert "Finishes in the drain" + "".join(pieces["short"]) == expected
            ended = error_of(lambda: long.result(timeout=60))
            assert "did not finish within the drain's grace period of 6 s (--exit-timeout)" in ended, ended
        assert srv.process.wait(timeout=60) == 0
        log = srv.log()
        assert re.search(r"draining: 2 rows in flight get up to 6 s to finish", log), log[-3000:]
        assert "drain: 1 rows still in flight after 6 s: ending them" in log
    finally:
        srv.stop()
        srv.kill_group()
    assert not srv.group()


# --- the flags ------------------------------------------------------------------------------------


def test_the_queue_bound_defaults_to_1024_rows_or_the_batch_size_and_is_never_smaller_than_a_batch(capsys):
    import server

    assert server.parse_args([]).max_queue_size == 1024
    assert server.parse_args(["--max-batch-size", "4096"]).max_queue_size == 4096  # the original's flags still work
    with pytest.raises(SystemExit):
        server.parse_args(["--max-batch-size", "8", "--max-queue-size", "4"])
    assert "--max-queue-size 4 must be at least --max-batch-size 8" in capsys.readouterr().err
