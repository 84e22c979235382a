"""Multi-node serving on loopback: several real `server.py` processes, two simulated CPU devices each, form
one jax.distributed group; rank 0 serves Triton. Faults are real: kill -9 and SIGTERM of whole processes."""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import re
import signal
import time
from pathlib import Path
from typing import Iterator, Sequence

import psutil
import pytest
import tritonclient.http as httpclient

import client
import channel
from plan import Admission, Plan, PrefillGroup, Request, Sampling
from serving import (MIXED_LENGTHS, MIXED_PROMPTS, ServerProcess, infer, openai_texts, run_client, running_server,
                     start_group, wait_exit, wait_ready)

# float32 so that 1, 2, 4 and 6 devices sum the split matmuls to the same greedy tokens.
SERVER_ARGS = ("--max-batch-size", "8", "--model-instances", "2", "--decode-slots", "4", "--dtype", "float32",
               "--peer-timeout", "5")
FAULT_DEADLINE_S = 30  # the bound: a lost node turns into errors and exits within this


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> list[str]:
    """The single-process server's text for the mixed batch: what every group must answer."""
    with running_server(tmp_path_factory.mktemp("single"), cache_dir, *SERVER_ARGS, "--number-of-gpus", "2") as srv:
        return [*infer(srv.http_url, MIXED_PROMPTS, MIXED_LENGTHS),
                infer(srv.http_url, [SAMPLED_PROMPT], [12], sampling=SAMPLED)[0]]


def stop_all(ranks: list[ServerProcess]) -> None:
    for rank in ranks:
        rank.kill_group()


@contextlib.contextmanager
def serving_group(tmp: Path, cache_dir: Path, nodes: int, *extra: str, order: Sequence[int] | None = None
                  ) -> Iterator[list[ServerProcess]]:
    """A ready group of `nodes` ranks, by rank; whatever is left of it is killed afterwards."""
    ranks = start_group(tmp, cache_dir, nodes, *SERVER_ARGS, *extra, order=order)
    try:
        wait_ready(ranks[0])
        yield ranks
    finally:
        stop_all(ranks)


def running(ranks: list[ServerProcess]) -> list[str]:
    """Command lines of the live processes of the ranks' sessions (a zombie has exited: it is not counted)."""
    found = []
    for process in (p for r in ranks for p in r.group()):
        try:
            if process.status() != psutil.STATUS_ZOMBIE:
                found.append(" ".join(process.cmdline()))
        except psutil.Error:
            continue
    return found


def assert_nothing_left(ranks: list[ServerProcess], timeout: float = 10) -> None:
    """No process of any rank's session (Triton and its stubs included) outlives the rank."""
    deadline = time.monotonic() + timeout
    while running(ranks) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running(ranks) == [], "left behind"


SAMPLED_PROMPT, SAMPLED = "Tell me a story", client.Sampling(temperature=0.9, top_k=40, seed=5)


def assert_group_serves(head: ServerProcess, reference: list[str]) -> None:
    """The mixed batch (HTTP, gRPC, the OpenAI API, client.py), a seeded sampled row and a stream: the single
    process's text."""
    mixed, sampled = reference[:-1], reference[-1]
    assert infer(head.http_url, MIXED_PROMPTS, MIXED_LENGTHS) == mixed
    assert infer(head.grpc_url, MIXED_PROMPTS, MIXED_LENGTHS) == mixed
    assert infer(head.http_url, [SAMPLED_PROMPT], [12], sampling=SAMPLED)[0] == sampled
    assert openai_texts(head, MIXED_PROMPTS, MIXED_LENGTHS) == mixed  # the OpenAI API, the same text
    streamed = "".join(client.stream_pieces(head.grpc_url, MIXED_PROMPTS[3], MIXED_LENGTHS[3], 120))
    assert MIXED_PROMPTS[3] + streamed == mixed[3]
    result = run_client("--server-url", head.http_url, "--input", MIXED_PROMPTS[0], "--output-length",
                        str(MIXED_LENGTHS[0]))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"output: {[reference[0]]}"


def is_live(head: ServerProcess) -> bool:
    try:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{head.http_port}", connection_timeout=2,
                                                  network_timeout=2)
        return client.is_server_live()
    except Exception:
        return False


# --- the wire format ------------------------------------------------------------------------------


def a_plan() -> Plan:
    """Two prefill groups (greedy, and sampling with every setting), a right shift, a sampling step."""
    # Float settings arrive from Triton as float32, so they are float32 values here too: they travel exactly.
    sampled = Sampling(temperature=0.75, top_k=40, top_p=0.875, seed=2**63 - 5, ignore_eos=True)
    return Plan(column=12, shift=-52, window=256, rows=4, sampling=True, groups=(
        PrefillGroup(2, 64, (Admission(3, Request((2, 100, 7), 16)), Admission(0, Request((2,), 1)))),
        PrefillGroup(1, 512, (Admission(1, Request(tuple(range(2, 300)), 1700, sampled)),)),
    ))


def test_a_plan_crosses_the_channel_as_plain_integers_and_comes_back_equal():
    message = channel.encode_plan(a_plan())
    assert len(message) == 4 * (11 + 2 * 3 + 3 * 9 + 3 + 1 + 298)  # header, groups, rows, tokens
    assert channel.decode_plan(message) == a_plan()
    assert channel.decode_plan(channel.encode_plan(None)) is None
    greedy_step = dataclasses.replace(a_plan(), sampling=False)  # the rows' settings do not leak into the step's
    assert channel.decode_plan(channel.encode_plan(greedy_step)) == greedy_step
    nothing_to_move = dataclasses.replace(a_plan(), moves=False)  # a shift over an empty cache
    assert channel.decode_plan(channel.encode_plan(nothing_to_move)) == nothing_to_move


def test_a_malformed_channel_message_is_an_error_not_a_guess():
    good = channel.encode_plan(a_plan())
    with pytest.raises(channel.GroupError, match="malformed"):
        channel.decode_plan(b"\x07\x00\x00\x00" + good[4:])  # another wire format version
    with pytest.raises(channel.GroupError, match="does not hold 2 groups, 3 rows and 302 tokens"):
        channel.decode_plan(good[:-4])


# --- joining --------------------------------------------------------------------------------------


def test_ranks_wait_for_their_peers_and_name_the_one_that_never_joined(tmp_path: Path, cache_dir: Path):
    ranks = start_group(tmp_path, cache_dir, 3, "--join-timeout", "6", order=[1, 0], gap=0.5)  # rank 2 never starts
    try:
        for rank in ranks:
            assert wait_exit(rank, 60) == 1
            assert "gave up after 6 s (--join-timeout): rank 2 never joined" in rank.log(), rank.log()[-2000:]
        assert_nothing_left(ranks)
    finally:
        stop_all(ranks)


def test_a_worker_alone_says_rank_0_never_came(tmp_path: Path, cache_dir: Path):
    (worker,) = start_group(tmp_path, cache_dir, 2, "--join-timeout", "4", order=[1], gap=0)
    try:
        assert wait_exit(worker, 60) == 1
        assert re.search(r"gave up after 4 s .*rank 0 never came: nothing answered at --head-url 127\.0\.0\.1:\d+",
                         worker.log()), worker.log()[-2000:]
    finally:
        worker.kill_group()


# --- serving --------------------------------------------------------------------------------------


def test_two_ranks_started_worker_first_answer_the_single_process_text_and_stop_together(
    tmp_path: Path, cache_dir: Path, reference: list[str]
):
    health = tmp_path / "worker-health"
    with serving_group(tmp_path, cache_dir, 2, "--health-file", str(health), order=[1, 0]) as ranks:
        assert_group_serves(ranks[0], reference)
        assert time.time() - health.stat().st_mtime < 3  # the ready worker touches it every second
        begin = time.monotonic()
        assert ranks[0].stop(signal.SIGTERM, timeout=30) == 0
        assert wait_exit(ranks[1], 15) == 0
        assert time.monotonic() - begin < 20
        assert "rank 0 stopped the group" in ranks[1].log()
        assert_nothing_left(ranks)


def weight_bytes(log: str) -> tuple[dict[str, int], int, int, int]:
    """(bytes per device of this rank, split bytes, devices, replicated bytes) from a rank's log."""
    found = re.search(r"weight bytes: (\{.*?\}) on this rank's devices; the model has (\d+) split over (\d+) "
                      r"devices and (\d+) replicated", log)
    assert found, log[-2000:]
    return json.loads(found[1]), int(found[2]), int(found[3]), int(found[4])


def test_three_ranks_hold_a_sixth_of_the_split_weights_each_and_a_worker_sigterm_drains_the_group(
    tmp_path: Path, cache_dir: Path, reference: list[str]
):
    with serving_group(tmp_path, cache_dir, 3, order=[0, 2, 1]) as ranks:
        assert_group_serves(ranks[0], reference)
        for rank in ranks:
            held, split, devices, replicated = weight_bytes(rank.log())
            assert devices == 6 and len(held) == 2 and split > 10 * replicated
            assert all(b == replicated + split // 6 for b in held.values()), (held, split, replicated)

        # A worker's SIGTERM (a rolling update) drains the whole group: it cannot serve without that
        # rank, so the stream in flight finishes, then every rank exits 0.
        forever = client.Sampling(ignore_eos=True)
        expected = infer(ranks[0].http_url, [MIXED_PROMPTS[0]], [40], sampling=forever)[0]
        pieces = client.stream_pieces(ranks[0].grpc_url, MIXED_PROMPTS[0], 40, 120, forever)
        text = [next(pieces)]
        ranks[2].process.send_signal(signal.SIGTERM)
        text.extend(pieces)
        assert MIXED_PROMPTS[0] + "".join(text) == expected
        for rank in ranks:
            assert wait_exit(rank, FAULT_DEADLINE_S + 20) == 0, rank.log()[-3000:]
        assert "rank 2 asked for a drain (SIGTERM): draining the group" in ranks[0].log()
        assert "rank 0 stopped the group" in ranks[2].log()
        assert_nothing_left(ranks)


# --- faults ---------------------------------------------------------------------------------------


def test_a_worker_killed_while_idle_fails_new_requests_and_ends_every_rank_in_time(
    tmp_path: Path, cache_dir: Path
):
    with serving_group(tmp_path, cache_dir, 3) as ranks:
        killed = time.monotonic()
        ranks[1].kill_group()  # kill -9, as a node that vanishes
        with pytest.raises(Exception):
            infer(ranks[0].http_url, ["After the loss"], [8], timeout=FAULT_DEADLINE_S)
        print(f"worker killed idle: a new request failed {time.monotonic() - killed:.1f} s later")
        assert time.monotonic() - killed < FAULT_DEADLINE_S
        assert wait_exit(ranks[0], FAULT_DEADLINE_S) == 1
        assert not is_live(ranks[0])
        assert wait_exit(ranks[2], 10) == 1
        print(f"worker killed idle: every rank gone {time.monotonic() - killed:.1f} s later")
        assert time.monotonic() - killed < FAULT_DEADLINE_S
        assert "lost rank 1: no heartbeat" in ranks[0].log()
        assert "lost rank 1" in ranks[2].log()
        assert_nothing_left(ranks)


def test_a_worker_killed_during_a_long_request_fails_that_request_in_time(tmp_path: Path, cache_dir: Path):
    with serving_group(tmp_path, cache_dir, 2) as ranks:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            long = pool.submit(infer, ranks[0].grpc_url, ["A long story"], [2000], 120)
            time.sleep(2)
            assert not long.done(), "the request ended before the worker was killed"
            killed = time.monotonic()
            ranks[1].kill_group()
            with pytest.raises(Exception, match="lost rank 1|Gloo|generation engine failed"):
                long.result(timeout=FAULT_DEADLINE_S)
            print(f"worker killed mid-request: the request failed {time.monotonic() - killed:.1f} s later")
        assert time.monotonic() - killed < FAULT_DEADLINE_S
        assert wait_exit(ranks[0], FAULT_DEADLINE_S) == 1
        print(f"worker killed mid-request: rank 0 gone {time.monotonic() - killed:.1f} s later")
        assert "lost rank 1" in ranks[0].log()
        assert_nothing_left(ranks)


def test_rank_0_killed_ends_every_worker_and_leaves_no_triton_behind(tmp_path: Path, cache_dir: Path):
    with serving_group(tmp_path, cache_dir, 2) as ranks:
        killed = time.monotonic()
        ranks[0].process.send_signal(signal.SIGKILL)  # the server process alone: Triton must follow it
        assert wait_exit(ranks[1], FAULT_DEADLINE_S) == 1
        print(f"rank 0 killed: the worker gone {time.monotonic() - killed:.1f} s later")
        assert time.monotonic() - killed < FAULT_DEADLINE_S
        assert "lost rank 0: its coordination service" in ranks[1].log()
        assert_nothing_left(ranks)
