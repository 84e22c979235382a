"""Reliability under load: benchmarks/soak.py's load mode against a real two-rank group of random/tiny on
loopback, four clients over HTTP and gRPC, to `OPT` and to `OPT_stream`, then SIGTERM to rank 0."""
from __future__ import annotations

import collections
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tritonclient.utils import InferenceServerException

from serving import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import soak  # noqa: E402

LOAD_S = 35  # seconds of load; starting the group (programs not yet stored) and stopping it take the rest
MIN_OK_PER_CLASS = 10  # random/tiny answers a request of these lengths in about a second on 2 cores
CLASSES = ("http OPT", "http OPT_stream", "grpc OPT", "grpc OPT_stream")


def run_soak(tmp_path: Path, cache_dir: Path, *flags: str, timeout: float = 400) -> tuple[int, str, dict]:
    """Runs benchmarks/soak.py; returns its status, output and JSON report. Past `timeout` it is sent SIGTERM,
    which stops the servers it started (they run in sessions of their own: a SIGKILL would orphan them)."""
    report = tmp_path / "soak.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--cache-dir", str(cache_dir),
               "--json", str(report), *flags]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=90)
        raise AssertionError(f"soak.py still running after {timeout} s:\n{output[-5000:]}") from None
    assert report.exists(), output[-5000:]
    return process.returncode, output, json.loads(report.read_text())


def test_a_two_rank_group_answers_every_request_of_every_class_and_both_ranks_exit_0_after_sigterm(
    tmp_path: Path, cache_dir: Path
):
    status, output, found = run_soak(
        tmp_path, cache_dir, "--model-name", "random/tiny", "--nodes", "2", "--gpus-per-node", "1",
        "--clients", "4", "--duration", str(LOAD_S), "--prompt-range", "8,96", "--output-range", "4,48",
        "--timeout", "60",  # a request takes about a second: one without an answer after 60 s is hung
        "--timeout-fraction", "0.1", "--short-timeout", "0.2",  # some requests end 'timed out', as they should
        "--server-arg=--decode-slots=4", "--server-arg=--max-batch-size=4", "--server-arg=--model-instances=2",
    )
    print(output)
    assert status == 0, output[-5000:]
    assert found["verdict"] == {"ok": True, "failures": []}
    assert not found["crashed_clients"] and not found["stuck_clients"]

    assert list(found["classes"]) == list(CLASSES)
    for name, c in found["classes"].items():
        assert c["clients"] == 1, (name, c)
        assert c["hung"] == 0 and c["answered"] == c["sent"], (name, c)
        assert c["ok"] + c["errors"] == c["sent"], (name, c)  # none lost
        assert c["ok"] >= MIN_OK_PER_CLASS, (name, c)
    for kind, errors in found["errors"].items():  # only the short deadlines' errors, each saying why
        assert kind == "timed out" and errors["expected"] == errors["count"], found["errors"]
        assert "timed out" in errors["first"], errors

    canary = found["canary"]
    prompt, text = canary["prompt"], canary["before"]["http OPT"]
    assert text.startswith(prompt) and len(text) > len(prompt), canary
    assert canary["before"] == canary["after"] == {name: text for name in CLASSES}, canary  # streams: prompt + pieces

    server = found["server"]
    assert server["exit_statuses"] == [0, 0], server["logs_of_failed_ranks"]
    assert len(server["stub_folders"]) == 2  # OPT's and OPT_stream's copies, checked gone with the processes
    assert server["left_behind"] == []


# --- without a server: what the report is made of ------------------------------------------------

DEADLINE_TRACEBACK = ("Failed to process the request(s) for model 'OPT_0_1', message: TritonModelException: Model "
                      "execute error: Traceback (most recent call last):\n  File \"/work/engine.py\", line 1, in "
                      "step\n    raise DeadlineExceeded(...)\nengine.DeadlineExceeded: timed out: the request's "
                      "deadline of 0.2 s passed after 4 of 36 tokens\n\nAt:\n  /tmp/folderX/1/model.py(157): execute\n")


@pytest.mark.parametrize("message, kind", [
    ("PyTritonBadParameterError: overloaded: 9 rows already wait for a decode slot", "overloaded"),
    ("PyTritonBadParameterError: shutting down: no new requests", "shutting down"),
    (DEADLINE_TRACEBACK, "timed out"),
    ("PyTritonBadParameterError: row 0: output_length must be at least 1, got 0", "bad request"),
    ("[StatusCode.INVALID_ARGUMENT] unexpected inference input 'colour' for model 'OPT'", "bad request"),
    ("lost rank 1: no heartbeat for 10 s", "lost rank"),
    ("[StatusCode.UNAVAILABLE] failed to connect to all addresses", "connection"),
    ("something nobody planned for", "other"),
])
def test_an_error_is_sorted_into_a_kind_by_the_words_the_server_used(message: str, kind: str):
    reason = soak.error_reason(InferenceServerException(msg=message))
    assert soak.error_kind(reason) == kind
    assert "Traceback" not in reason and reason  # a traceback's last line: the exception and its message


def attempt(start: float, latency: float | None, tokens: int = 10, **fields) -> soak.Attempt:
    spec = soak.RequestSpec(client=0, index=0, prompt="a b", prompt_tokens=3, output_tokens=tokens)
    return soak.Attempt(spec, start=start, latency=latency, **fields)


def test_windows_take_the_requests_started_in_them_and_drift_compares_the_first_and_last_medians():
    attempts = [attempt(1, 1.0), attempt(2, 3.0), attempt(70, 2.0), attempt(130, 2.0), attempt(150, 4.0),
                attempt(170, None, error="timed out: ...", kind="timed out", timeout_seconds=0.1)]
    rows = soak.windows(attempts, duration=180, width=60)
    assert [(r["start_s"], r["requests"], r["ok"], r["errors"]) for r in rows] == [(0, 2, 2, 0), (60, 1, 1, 0),
                                                                                  (120, 3, 2, 1)]
    assert [r["latency_p50_s"] for r in rows] == [2.0, 2.0, 3.0]
    assert rows[0]["output_tokens_per_s"] == pytest.approx(20 / 60)
    found = soak.drift(rows, limit=0.25)
    assert found["change"] == pytest.approx(0.5) and not found["ok"]
    assert soak.drift(rows, limit=0.5)["ok"]
    assert attempts[-1].expected and not attempts[-1].ok


def test_rss_growth_is_per_process_and_in_total_over_the_first_and_last_samples():
    samples = [{"t": 0.0, "rss": {"a": 100, "b": 50}}, {"t": 30.0, "rss": {"a": 130, "b": 50, "c": 7}},
               {"t": 60.0, "rss": {"a": 160, "c": 9}}]
    growth = soak.rss_growth(samples)
    assert growth["processes"] == {"a": {"start": 100, "end": 160, "growth": 60},
                                   "b": {"start": 50, "end": None, "growth": None},
                                   "c": {"start": None, "end": 9, "growth": None}}
    assert growth["total"] == {"start": 150, "end": 169, "growth": 19, "peak": 187, "growth_per_minute": 19}


def test_the_canary_fails_on_an_error_a_missing_prompt_or_a_text_that_differs():
    good = {"http OPT": "Hi there", "grpc OPT_stream": "Hi there"}
    assert soak.canary_problems("Hi", good, good) == []
    problems = soak.canary_problems("Hi", good, {"http OPT": "error: overloaded", "grpc OPT_stream": "Hi here"})
    assert [p.split(":")[0] for p in problems] == ["canary after", "canary after"]
    assert "differs from http OPT" in problems[1]
    assert soak.canary_problems("Hi", {"http OPT": "Hi"}, {})  # the prompt alone: nothing generated


class WordTokenizer:
    """BOS and one token per word: what PromptBuilder needs, without a vocabulary."""

    description = "one token per word"

    def encode(self, text: str) -> list[int]:
        return [2] + [7] * len(text.split())


class FakeSender:
    """Answers, fails, outlives the client's timeout, or never returns, as told."""

    def __init__(self, behaviour: str, release: threading.Event):
        self.behaviour, self.release = behaviour, release

    def send(self, spec: soak.RequestSpec, outcome: soak.Outcome, sampling: soak.Sampling) -> str:
        if self.behaviour == "overloaded":
            raise InferenceServerException(msg="PyTritonBadParameterError: overloaded: 4 rows already wait")
        if self.behaviour == "slow":
            time.sleep(0.3)
            raise TimeoutError("no final response after 0.3 s")
        if self.behaviour == "stuck":
            self.release.wait()
        outcome.latency = 0.01
        return spec.prompt + " more" if self.behaviour == "answers" else "something else"

    def close(self) -> None:
        pass


def run_fakes(behaviours: dict[soak.Traffic, str], release: threading.Event, duration: float = 5) -> soak.SoakRun:
    """Up to two requests per client, one client per class, each class's sender behaving as told."""
    factories = {t: (lambda b=b: FakeSender(b, release)) for t, b in behaviours.items()}
    settings = soak.SoakSettings(duration=duration, requests_per_client=2, timeout=0.3, timeout_fraction=0.0,
                                 short_timeout=0.1, seed=0)
    mix = soak.load.MixSettings(seed=0, prompt_range=(3, 6), output_range=(1, 4))
    return soak.run_clients(list(behaviours), factories, settings, mix, soak.PromptBuilder(WordTokenizer()))


def test_every_request_sent_is_counted_as_answered_failed_or_hung():
    run = run_fakes({soak.TRAFFIC["http"]: "answers", soak.TRAFFIC["grpc"]: "wrong",
                     soak.TRAFFIC["http-stream"]: "overloaded", soak.TRAFFIC["grpc-stream"]: "slow"},
                    threading.Event())
    kinds = collections.Counter((a.traffic, a.kind) for a in run.attempts)
    assert kinds == {("http OPT", None): 2, ("grpc OPT", "wrong answer"): 2, ("http OPT_stream", "overloaded"): 2,
                     ("grpc OPT_stream", "hung"): 2}  # slow: failed only when the client's timeout did
    assert not run.stuck and not run.crashed
    assert soak.errors_by_kind(run.attempts)["overloaded"]["first"] == "overloaded: 4 rows already wait"


def test_a_call_that_never_returns_is_counted_hung_not_lost(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(soak, "JOIN_GRACE_S", 0.2)
    release = threading.Event()
    try:
        run = run_fakes({soak.TRAFFIC["http"]: "stuck"}, release, duration=0.2)
    finally:
        release.set()
    assert run.stuck == ["client-0"]
    assert [(a.kind, a.error) for a in run.attempts] == [("hung", "no answer by the end of the run")]
