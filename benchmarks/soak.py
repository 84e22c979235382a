#!/usr/bin/env python3
"""Load and soak test of a multi-node server: every request answered, none hung, memory and latency steady.

    python benchmarks/soak.py --clients 4 --duration 45
    python benchmarks/soak.py --soak --model-name random/125M --clients 8 --duration 600 --json soak.json
    python benchmarks/soak.py --server-url http://host:8000 --grpc-url grpc://host:8001 --server-pid 1234

Without --server-url/--grpc-url it starts a group of --nodes `server.py` processes (ranks) of
--gpus-per-node devices each on loopback (tests/serving.py's start_group: free ports, a session of their
own each), waits until rank 0 serves, runs the load, and at the end sends SIGTERM to rank 0 and reports
every rank's exit status (0 expected) and any process of theirs left behind.

The load is closed-loop, like benchmarks/load.py's (whose request mix, senders and statistics it uses):
--clients threads, each sending one request at a time for --duration seconds (those in flight at the
end still finish) or --requests-per-client requests. The clients are dealt round-robin over four classes
of traffic (--classes): HTTP and gRPC, each to the non-streaming model `OPT` and to the decoupled
`OPT_stream` (gRPC's bidirectional stream, HTTP's generate_stream). Client c's k-th request is the same in
every run: seeded prompt and output lengths, uniform in --prompt-range and --output-range, ignore_eos so
that each generates exactly its output length.

Every request ends in one of three ways. Answered: for `OPT`, the text must start with the prompt, or it
counts as a `wrong answer` error. An error: its message (the server's own words, as load.py's error_text
takes them) is classified into a kind: `overloaded` (the queue is full, --max-queue-size), `timed out`
(its deadline passed), `shutting down` (a drain), `cancelled`, `lost rank`, `bad request`, `connection`,
`wrong answer`, `other`, the first message of each kind kept. Hung: no answer within the client-side
--timeout (much longer than any expected latency), or none at all by the end of the run. Any hung request
fails the run; so does any error of a kind that is not expected: `timed out` is expected of the requests
sent with --timeout-fraction's short timeout_seconds, and --allow-error KIND allows a kind everywhere.

A canary checks the text: one seeded greedy request (a 12-token prompt, 16 new tokens) goes through each
class before and after the load, on an idle server; the streamed pieces after the prompt must equal
`OPT`'s text over both protocols, and the texts after the load those before it.

--soak (default --duration 600) also watches the server over time: the resident memory (RSS) of every
process of its sessions (each rank's server.py, tritonserver, the Python-backend stubs, the reaper) at
the start, every --sample-every seconds and at the end, and the median latency of the requests started
in each --window of the run: the run fails when the last window's median end-to-end latency is more than
--max-drift above the first's. The report gives RSS growth per process and in total.

It prints markdown tables (for the README); --json PATH writes everything, RSS samples included. The
exit status is 0 when the run passed (the last line says PASS, or FAIL and why).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load  # noqa: E402  (it puts the repository root and tests/ on the path as well)
from load import (HttpSender, LoadRun, Outcome, PromptBuilder, RequestSpec, ShortRequests,  # noqa: E402
                  StreamSender, Summary, client_requests, error_text, length_range, milliseconds, seconds, summarize)

from client import (MODEL_NAME, STREAM_MODEL_NAME, Sampling, http_stream, request_inputs, triton_url,  # noqa: E402
                    wait_until_ready)
from reaper import stub_model_folders  # noqa: E402

HUNG_SHARE = 0.95  # a call that fails after this share of --timeout failed because of it: hung
JOIN_GRACE_S = 30.0  # past duration + --timeout, a client thread still running is given up on
MODEL_READY_S = 60.0  # rank 0 reports ready with `OPT`; the other model and protocol follow within seconds
CANARY_PROMPT_TOKENS, CANARY_OUTPUT_TOKENS = 12, 16
MIB = 1024 * 1024


# ---------------------------------------------------------------------------------------------------
# Traffic classes and their senders
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Traffic:
    """One class of requests: a protocol, and the streaming model or not."""

    protocol: str  # "http" or "grpc"
    streaming: bool

    @property
    def name(self) -> str:
        return f"{self.protocol} {STREAM_MODEL_NAME if self.streaming else MODEL_NAME}"


TRAFFIC = {"http": Traffic("http", False), "http-stream": Traffic("http", True),
           "grpc": Traffic("grpc", False), "grpc-stream": Traffic("grpc", True)}


class GrpcSender:
    """One client's gRPC connection to the non-streaming model `OPT` (load.py's HttpSender over gRPC)."""

    def __init__(self, address: str, timeout: float):
        import tritonclient.grpc as triton

        self._triton = triton
        self._client = triton.InferenceServerClient(address)
        self._timeout = timeout

    def wait_until_ready(self, timeout: float) -> None:
        wait_until_ready(self._client, timeout)

    def send(self, spec: RequestSpec, outcome: Outcome, sampling: Sampling) -> str:
        """Times one request into `outcome`; returns the prompt and generated text, as `OPT` answers."""
        inputs = request_inputs(self._triton, [spec.prompt.encode("utf-8")], [spec.output_tokens], sampling=sampling)
        begin = time.perf_counter()
        result = self._client.infer(MODEL_NAME, inputs, client_timeout=self._timeout)
        outcome.latency = time.perf_counter() - begin
        return result.as_numpy("output").reshape(-1)[0].decode("utf-8")

    def close(self) -> None:
        self._client.close()


class HttpStreamSender:
    """One client's streams from `OPT_stream` over HTTP: Triton's generate_stream (server-sent events)."""

    def __init__(self, address: str, timeout: float):
        self._address = address
        self._timeout = timeout

    def wait_until_ready(self, timeout: float) -> None:
        import tritonclient.http as triton

        probe = triton.InferenceServerClient(self._address)
        try:
            wait_until_ready(probe, timeout, STREAM_MODEL_NAME)
        finally:
            probe.close()

    def send(self, spec: RequestSpec, outcome: Outcome, sampling: Sampling) -> str:
        """Times one request into `outcome`; returns the generated text. The socket's timeout bounds each
        read; the whole stream is bounded here, so that a trickle of events cannot outlive --timeout."""
        begin = time.perf_counter()
        pieces = []
        for piece in http_stream(self._address, spec.prompt, spec.output_tokens, self._timeout, sampling):
            elapsed = time.perf_counter() - begin
            if outcome.ttft is None:
                outcome.ttft = elapsed
            if elapsed > self._timeout:
                raise TimeoutError(f"no final event from {STREAM_MODEL_NAME!r} after {self._timeout:.0f} s")
            pieces.append(piece)
        outcome.latency = time.perf_counter() - begin
        return "".join(pieces)

    def close(self) -> None:
        pass  # one connection per request, closed with it


def sender_factory(traffic: Traffic, urls: dict[str, str], timeout: float) -> Callable[[], Any]:
    """Makes one sender of `traffic` per client thread (tritonclient's HTTP client works only in its thread)."""
    address = triton_url(urls[traffic.protocol])[1]
    if traffic.protocol == "http":
        return (lambda: HttpStreamSender(address, timeout)) if traffic.streaming else \
            (lambda: HttpSender(address, True, timeout))
    return (lambda: StreamSender(address, True, timeout)) if traffic.streaming else \
        (lambda: GrpcSender(address, timeout))


# ---------------------------------------------------------------------------------------------------
# Clients, outcomes and error kinds
# ---------------------------------------------------------------------------------------------------

# First match wins; the server's refusals (overloaded, shutting down) come as PyTriton bad-parameter errors.
ERROR_KINDS = (
    ("overloaded", re.compile(r"overloaded", re.I)),
    ("shutting down", re.compile(r"shutting down|draining", re.I)),
    ("timed out", re.compile(r"timed out|deadline", re.I)),
    ("cancelled", re.compile(r"cancel", re.I)),
    ("lost rank", re.compile(r"lost rank|generation engine failed|gloo", re.I)),
    ("bad request", re.compile(r"^row \d+:|bad ?parameter|unexpected inference input|takes one request|"
                               r"one row per request|invalid argument", re.I)),
    ("connection", re.compile(r"connect|unavailable|broken pipe|reset by peer|socket closed|remote end closed", re.I)),
)


EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*: \S")  # "engine.DeadlineExceeded: timed out: ...", not a frame


def full_message(error: BaseException) -> str:
    message = error.message() if hasattr(error, "message") and callable(error.message) else None
    return message or str(error)


def error_reason(error: BaseException) -> str:
    """The error's message as load.py's error_text takes it; for one that came back as a whole server
    traceback (one PyTriton did not wrap), the traceback's last exception line: its type and message.
    Triton's Python backend appends the stub's own frames after "At:", which are left out."""
    text = error_text(error)
    if "Traceback (most recent call last)" in text:
        lines = [line.strip() for line in full_message(error).split("\nAt:\n")[0].splitlines() if line.strip()]
        raised = [line for line in lines if EXCEPTION_LINE.match(line)]
        text = (raised or lines or [text])[-1][:300]
    return text or type(error).__name__


def error_kind(message: str) -> str:
    """The kind of an error, from the server's message: one of ERROR_KINDS' names or `other`."""
    return next((kind for kind, pattern in ERROR_KINDS if pattern.search(message)), "other")


@dataclasses.dataclass
class Attempt(Outcome):
    """One request of the load: load.py's outcome, its class, and how it ended."""

    traffic: str = ""
    timeout_seconds: float | None = None  # the short deadline it carried (--timeout-fraction), if any
    kind: str | None = None  # the error's kind; "hung" for a call that outlived --timeout
    detail: str | None = None  # the error's whole message (a server traceback), where it says more than `error`

    @property
    def hung(self) -> bool:
        return self.kind == "hung"

    @property
    def expected(self) -> bool:
        """An error the run allows: a short deadline that passed."""
        return self.kind == "timed out" and self.timeout_seconds is not None


@dataclasses.dataclass(frozen=True)
class SoakSettings:
    duration: float  # seconds the clients keep sending
    requests_per_client: int | None  # or this many each, whichever comes first
    timeout: float  # client-side seconds per request: past it, hung
    timeout_fraction: float  # share of requests sent with timeout_seconds = short_timeout
    short_timeout: float
    seed: int


def send_one(sender: Any, traffic: Traffic, attempt: Attempt, timeout: float) -> None:
    """Sends one request and records its ending in `attempt`: answered, an error of some kind, or hung."""
    sampling = Sampling(ignore_eos=True, timeout_seconds=attempt.timeout_seconds)
    begin = time.perf_counter()
    try:
        text = sender.send(attempt.spec, attempt, sampling)
    except Exception as error:  # counted by kind; the client goes on with its next request
        attempt.latency = None
        attempt.error = error_reason(error)
        whole = full_message(error)
        attempt.detail = whole[:3000] if whole.strip() != attempt.error else None
        attempt.kind = "hung" if time.perf_counter() - begin >= HUNG_SHARE * timeout else error_kind(attempt.error)
        return
    if not traffic.streaming and not text.startswith(attempt.spec.prompt):
        attempt.error, attempt.kind = f"wrong answer: {text[:100]!r} does not start with the prompt", "wrong answer"


def soak_client(index: int, traffic: Traffic, make_sender: Callable[[], Any], requests: Iterator[RequestSpec],
                settings: SoakSettings, run_start: float, attempts: list[Attempt]) -> None:
    """One client: sends requests back to back until the deadline or the count. Each attempt is listed
    before it is sent, so that a call that never returns is still counted."""
    deadline = run_start + settings.duration
    short = random.Random(f"short-deadlines/{settings.seed}/{index}")  # its own stream: the mix stays the same
    sender = make_sender()
    try:
        for spec in requests:
            if settings.requests_per_client is not None and spec.index >= settings.requests_per_client:
                return
            if time.perf_counter() >= deadline:
                return
            carries = settings.timeout_fraction > 0 and short.random() < settings.timeout_fraction
            attempt = Attempt(spec, start=time.perf_counter() - run_start, traffic=traffic.name,
                              timeout_seconds=settings.short_timeout if carries else None)
            attempts.append(attempt)
            send_one(sender, traffic, attempt, settings.timeout)
    finally:
        sender.close()


@dataclasses.dataclass
class SoakRun:
    attempts: list[Attempt]
    wall_s: float  # first send -> last answer
    crashed: list[str]  # clients that stopped on an error of their own (not a request's)
    stuck: list[str]  # client threads still running when given up on


def run_clients(plan: Sequence[Traffic], factories: dict[Traffic, Callable[[], Any]], settings: SoakSettings,
                mix: load.MixSettings, builder: PromptBuilder) -> SoakRun:
    """Runs client c (of class plan[c]) in its own thread; returns every attempt, hung ones marked."""
    per_client: list[list[Attempt]] = [[] for _ in plan]
    crashed: list[str] = []
    run_start = time.perf_counter()

    def client_thread(c: int) -> None:
        try:
            soak_client(c, plan[c], factories[plan[c]], client_requests(c, mix, builder), settings, run_start,
                        per_client[c])
        except Exception as error:
            crashed.append(f"client {c} ({plan[c].name}): {type(error).__name__}: {error}")

    threads = [threading.Thread(target=client_thread, args=(c,), name=f"client-{c}", daemon=True)
               for c in range(len(plan))]
    for thread in threads:
        thread.start()
    give_up = run_start + settings.duration + settings.timeout + JOIN_GRACE_S
    for thread in threads:
        thread.join(max(0.0, give_up - time.perf_counter()))
    wall = time.perf_counter() - run_start
    stuck = [thread.name for thread in threads if thread.is_alive()]
    attempts = sorted((a for found in per_client for a in list(found)), key=lambda a: (a.start, a.spec.client))
    for attempt in attempts:
        if attempt.latency is None and attempt.error is None:
            attempt.error, attempt.kind = "no answer by the end of the run", "hung"
    return SoakRun(attempts, wall, crashed, stuck)


# ---------------------------------------------------------------------------------------------------
# The canary: one greedy request through every class, before and after the load
# ---------------------------------------------------------------------------------------------------


def canary_prompt(builder: PromptBuilder, seed: int) -> str:
    return builder.prompt(random.Random(f"canary/{seed}"), CANARY_PROMPT_TOKENS)


def canary(factories: dict[Traffic, Callable[[], Any]], prompt: str) -> dict[str, str]:
    """Each class's full text (prompt + generated) for one greedy request, or "error: ..."."""
    spec = RequestSpec(-1, 0, prompt, CANARY_PROMPT_TOKENS, CANARY_OUTPUT_TOKENS)
    texts = {}
    for traffic, make_sender in factories.items():
        sender = make_sender()
        try:
            text = sender.send(spec, Outcome(spec, 0.0), Sampling(ignore_eos=True))
            texts[traffic.name] = prompt + text if traffic.streaming else text
        except Exception as error:
            texts[traffic.name] = f"error: {error_reason(error)}"
        finally:
            sender.close()
    return texts


def canary_problems(prompt: str, before: dict[str, str], after: dict[str, str]) -> list[str]:
    """What is wrong with the canary: a class that failed, a text that is not the prompt and more, or one that
    differs from the first class's text before the load."""
    first, reference = next(iter(before.items()), ("", ""))
    problems = []
    for when, texts in (("before", before), ("after", after)):
        for name, text in texts.items():
            if text.startswith("error: "):
                problems.append(f"canary {when}: {name}: {text}")
            elif not text.startswith(prompt) or len(text) == len(prompt):
                problems.append(f"canary {when}: {name} did not answer the prompt and more: {text!r}")
            elif text != reference:
                problems.append(f"canary {when}: {name} differs from {first} before: {text!r} vs {reference!r}")
    return problems


# ---------------------------------------------------------------------------------------------------
# The server's processes and their memory
# ---------------------------------------------------------------------------------------------------


def session_processes(session: int) -> list[psutil.Process]:
    """Every live process of a session (tests/serving.py's ServerProcess.group, for any session id)."""
    found = []
    for process in psutil.process_iter(["pid"]):
        try:
            if os.getsid(process.pid) == session and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return found


def process_role(process: psutil.Process, leader: int) -> str:
    """What a process of a server's session is, from its command line."""
    try:
        command = process.cmdline()
    except psutil.Error:
        return "gone"
    text = " ".join(command)
    if process.pid == leader:
        return "server.py"
    if "triton_python_backend_stub" in text:
        return f"stub {command[-2]}" if len(command) >= 2 else "stub"  # PyTriton passes the instance's name
    if command and command[0].endswith("tritonserver"):
        return "tritonserver"
    if "reap_when_gone" in text:
        return "reaper"
    if "multiprocessing" in text:  # a helper process: named after what started it
        with contextlib.suppress(psutil.Error):
            parent = process.parent()
            if parent is not None and parent.pid != process.pid:
                return f"python child of {process_role(parent, leader)} ({parent.pid})"
        return "python (multiprocessing)"
    return process.name()


class RssSampler:
    """Samples the resident memory of every process of the server's sessions, on demand and every
    `every` seconds in a thread of its own. `sessions`: a label (rank 0, rank 1, ...) -> session id."""

    def __init__(self, sessions: dict[str, int], every: float):
        self._sessions = sessions
        self._every = every
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.samples: list[dict[str, Any]] = []  # {"t": seconds from origin, "rss": {process: bytes}}

    def sample(self, at: float) -> None:
        rss = {}
        for label, session in self._sessions.items():
            for process in session_processes(session):
                try:
                    rss[f"{label} {process_role(process, session)} [{process.pid}]"] = process.memory_info().rss
                except psutil.Error:
                    continue
        self.samples.append({"t": round(at, 1), "rss": rss})

    def start(self, origin: float) -> None:
        def loop() -> None:
            while not self._stop.wait(self._every):
                self.sample(time.perf_counter() - origin)

        if self._sessions:
            self._thread = threading.Thread(target=loop, name="rss-sampler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def rss_growth(samples: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Each process's RSS at the first and last sample and the growth, in bytes; and the total's."""
    if len(samples) < 2 or not samples[0]["rss"]:
        return None
    first, last = samples[0]["rss"], samples[-1]["rss"]
    processes = {name: {"start": first.get(name), "end": last.get(name),
                        "growth": last[name] - first[name] if name in first and name in last else None}
                 for name in sorted(set(first) | set(last))}
    totals = [sum(s["rss"].values()) for s in samples]
    minutes = (samples[-1]["t"] - samples[0]["t"]) / 60
    total = {"start": totals[0], "end": totals[-1], "growth": totals[-1] - totals[0], "peak": max(totals),
             "growth_per_minute": (totals[-1] - totals[0]) / minutes if minutes > 0 else None}
    return {"processes": processes, "total": total}


# ---------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float | None:
    return float(np.median(values)) if values else None


def class_report(name: str, attempts: Sequence[Attempt], wall_s: float, clients: int) -> dict[str, Any]:
    """Counts and load.py's summary (tokens/s, latency and TTFT percentiles) of one class, or of all."""
    summary: Summary = summarize(name, LoadRun(list(attempts), wall_s), ShortRequests(0, 0))
    hung = sum(a.hung for a in attempts)
    errors = [a for a in attempts if a.error is not None and not a.hung]
    return {"clients": clients, "sent": len(attempts), "answered": len(attempts) - hung, "ok": summary.requests,
            "errors": len(errors), "expected_errors": sum(a.expected for a in errors), "hung": hung,
            "summary": dataclasses.asdict(summary)}


def errors_by_kind(attempts: Sequence[Attempt]) -> dict[str, dict[str, Any]]:
    """Every kind of error (hung included) with its count, how many were expected, and its first message."""
    kinds: dict[str, dict[str, Any]] = {}
    for attempt in attempts:
        if attempt.error is None:
            continue
        found = kinds.setdefault(attempt.kind or "other", {"count": 0, "expected": 0, "first": attempt.error,
                                                           "first_class": attempt.traffic,
                                                           "first_detail": attempt.detail})
        found["count"] += 1
        found["expected"] += attempt.expected
    return dict(sorted(kinds.items(), key=lambda item: -item[1]["count"]))


def windows(attempts: Sequence[Attempt], duration: float, width: float) -> list[dict[str, Any]]:
    """The requests started in each `width`-second window of the run (the remainder joins the last one)."""
    count = max(1, int(duration // width))
    rows = []
    for k in range(count):
        low, high = k * width, ((k + 1) * width if k < count - 1 else float("inf"))
        inside = [a for a in attempts if low <= a.start < high]
        done = [a for a in inside if a.ok]
        tokens = sum(a.spec.output_tokens for a in done)
        span = (high if k < count - 1 else duration) - low
        rows.append({
            "start_s": low, "requests": len(inside), "ok": len(done), "errors": len(inside) - len(done),
            "latency_p50_s": median([a.latency for a in done]),
            "per_token_p50_s": median([a.latency / a.spec.output_tokens for a in done]),
            "ttft_p50_s": median([a.ttft for a in done if a.ttft is not None]),
            "output_tokens_per_s": tokens / span,
        })
    return rows


def drift(rows: Sequence[dict[str, Any]], limit: float) -> dict[str, Any] | None:
    """The last window's median end-to-end latency against the first's (and per output token, for reading)."""
    usable = [r for r in rows if r["latency_p50_s"]]
    if len(usable) < 2:
        return None
    first, last = usable[0], usable[-1]
    change = last["latency_p50_s"] / first["latency_p50_s"] - 1
    return {"first_window_s": first["start_s"], "last_window_s": last["start_s"],
            "first_p50_s": first["latency_p50_s"], "last_p50_s": last["latency_p50_s"], "change": change,
            "per_token_change": last["per_token_p50_s"] / first["per_token_p50_s"] - 1, "limit": limit,
            "ok": change <= limit}


# ---------------------------------------------------------------------------------------------------
# The servers
# ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def started_group(args: argparse.Namespace) -> Iterator[list[Any]]:
    """--nodes ranks of `server.py` on loopback (tests/serving.py's start_group), rank 0 ready. On the way out
    (normally after `stop_group`: nothing is left) ranks still running get SIGTERM, so that they clean up
    after themselves, then whatever is left of them is killed."""
    from serving import start_group, wait_ready

    with contextlib.ExitStack() as stack:
        logs = Path(args.log_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="opt-soak-")))
        logs.mkdir(parents=True, exist_ok=True)
        begin = time.perf_counter()
        ranks = start_group(logs, Path(args.cache_dir), args.nodes, "--dtype", args.dtype, *args.server_arg,
                            model=args.model_name, gpus=args.gpus_per_node)
        try:
            wait_ready(ranks[0], timeout=args.ready_timeout)
            log(f"{args.nodes} ranks ready in {time.perf_counter() - begin:.1f} s ({ranks[0].http_url}, "
                f"{ranks[0].grpc_url})")
            yield ranks
        finally:
            if any(rank.process.poll() is None for rank in ranks):  # an error or an interrupt on the way
                stop_group(ranks, timeout=30)
            for rank in ranks:
                rank.kill_group()


def leftovers(ranks: Sequence[Any], folders: set[Path]) -> list[str]:
    """The ranks' processes still alive (command lines) and stub folders still there."""
    behind = []
    for process in (p for rank in ranks for p in session_processes(rank.process.pid)):
        with contextlib.suppress(psutil.Error):
            behind.append(" ".join(process.cmdline()))
    return behind + [f"folder {folder}" for folder in sorted(folders) if folder.exists()]


def stop_group(ranks: Sequence[Any], timeout: float) -> dict[str, Any]:
    """SIGTERM to rank 0 (which stops every rank); each rank's exit status (None: still running after
    `timeout` s) and what of theirs is left 10 s later: processes, and the stubs' /tmp/folder* copies."""
    folders = stub_model_folders([p for rank in ranks for p in session_processes(rank.process.pid)])
    begin = time.perf_counter()
    if ranks[0].process.poll() is None:
        ranks[0].process.send_signal(signal.SIGTERM)
    statuses = []
    for rank in ranks:
        try:
            statuses.append(rank.process.wait(timeout=max(1.0, begin + timeout - time.perf_counter())))
        except subprocess.TimeoutExpired:
            statuses.append(None)
    stopped = time.perf_counter() - begin
    behind = leftovers(ranks, folders)
    while behind and time.perf_counter() < begin + stopped + 10:
        time.sleep(0.2)
        behind = leftovers(ranks, folders)
    logs = {f"rank {r}": rank.log()[-3000:] for r, rank in enumerate(ranks) if statuses[r] != 0}
    return {"signal": "SIGTERM to rank 0", "exit_statuses": statuses, "stopped_in_s": stopped,
            "stub_folders": [str(f) for f in sorted(folders)], "left_behind": behind,
            "logs": [str(rank.log_path) for rank in ranks], "logs_of_failed_ranks": logs}


def server_inputs(http_url: str | None) -> list[str] | None:
    """The names of `OPT`'s inputs, from its Triton config (None when there is no HTTP URL to ask)."""
    if http_url is None:
        return None
    import tritonclient.http as triton

    probe = triton.InferenceServerClient(triton_url(http_url)[1])
    try:
        return [tensor["name"] for tensor in probe.get_model_config(MODEL_NAME).get("input", [])]
    finally:
        probe.close()


# ---------------------------------------------------------------------------------------------------
# One whole run
# ---------------------------------------------------------------------------------------------------


def soak_settings(args: argparse.Namespace) -> SoakSettings:
    return SoakSettings(args.duration, args.requests_per_client, args.timeout, args.timeout_fraction,
                        args.short_timeout, args.seed)


def measure(args: argparse.Namespace, urls: dict[str, str], builder: PromptBuilder, sessions: dict[str, int],
            ready_timeout: float, metrics_url: str | None = None) -> dict[str, Any]:
    """Canary, load (with RSS samples), canary again, against the server at `urls`; the results."""
    classes = [TRAFFIC[name] for name in args.classes]
    factories = {traffic: sender_factory(traffic, urls, args.timeout) for traffic in classes}
    for make_sender in factories.values():
        load.wait_for_model(make_sender, ready_timeout)
    inputs = server_inputs(urls.get("http"))
    if args.timeout_fraction > 0 and inputs is not None and "timeout_seconds" not in inputs:
        log("the server's OPT has no input timeout_seconds: --timeout-fraction is ignored")
        args.timeout_fraction = 0.0
    prompt = canary_prompt(builder, args.seed)
    before = canary(factories, prompt)
    plan = [classes[c % len(classes)] for c in range(args.clients)]
    sampler = RssSampler(sessions, args.sample_every)
    log(f"{args.clients} clients over {', '.join(t.name for t in classes)}, "
        + (f"{args.requests_per_client} requests each or " if args.requests_per_client else "")
        + f"{args.duration:g} s")
    origin = time.perf_counter()
    sampler.sample(0.0)
    sampler.start(origin)
    served_before = load.generated_tokens(metrics_url)
    run = run_clients(plan, factories, soak_settings(args), load.mix_settings(args), builder)
    served_after = load.generated_tokens(metrics_url)
    sampler.stop()
    sampler.sample(time.perf_counter() - origin)
    after = canary(factories, prompt)
    per_class = {t.name: class_report(t.name, [a for a in run.attempts if a.traffic == t.name], run.wall_s,
                                      plan.count(t)) for t in classes}
    rows = windows(run.attempts, args.duration, args.window)
    return {
        "wall_s": run.wall_s, "crashed_clients": run.crashed, "stuck_clients": run.stuck,
        "timeout_input": None if inputs is None else "timeout_seconds" in inputs,
        "classes": per_class, "all": class_report("all", run.attempts, run.wall_s, len(plan)),
        "errors": errors_by_kind(run.attempts),
        "server_counted_tokens": (served_after - served_before
                                  if served_before is not None and served_after is not None else None),
        "canary": {"prompt": prompt, "prompt_tokens": CANARY_PROMPT_TOKENS, "output_tokens": CANARY_OUTPUT_TOKENS,
                   "before": before, "after": after, "problems": canary_problems(prompt, before, after)},
        "windows": rows, "drift": drift(rows, args.max_drift) if args.soak else None,
        "rss": {"samples": sampler.samples, "growth": rss_growth(sampler.samples)},
    }


def measure_started(args: argparse.Namespace, builder: PromptBuilder) -> dict[str, Any]:
    """Starts the group, measures, stops it with SIGTERM; the results with the ranks' exit statuses."""
    with started_group(args) as ranks:
        urls = {"http": ranks[0].http_url, "grpc": ranks[0].grpc_url}
        sessions = {f"rank {r}": rank.process.pid for r, rank in enumerate(ranks)}
        result = measure(args, urls, builder, sessions, MODEL_READY_S, load.metrics_url_of(ranks[0]))
        result["server"] = stop_group(ranks, args.stop_timeout)
    return result


def measure_external(args: argparse.Namespace, builder: PromptBuilder) -> dict[str, Any]:
    """Measures a server started elsewhere (--server-url, --grpc-url); RSS of --server-pid's sessions."""
    urls = {k: v for k, v in (("http", args.server_url), ("grpc", args.grpc_url)) if v}
    sessions = {f"pid {pid}": os.getsid(pid) for pid in args.server_pid}
    result = measure(args, urls, builder, sessions, args.ready_timeout)
    result["server"] = None
    return result


def problems(args: argparse.Namespace, result: dict[str, Any]) -> list[str]:
    """Why the run failed; empty when it passed."""
    found = list(result["crashed_clients"]) + [f"{name} still running at the end" for name in result["stuck_clients"]]
    for kind, errors in result["errors"].items():
        unexpected = errors["count"] - errors["expected"]
        if kind == "hung":
            found.append(f"{errors['count']} hung (no answer within --timeout {args.timeout:g} s): {errors['first']}")
        elif unexpected and kind not in args.allow_error:
            found.append(f"{unexpected} unexpected errors of kind {kind!r}, first: {errors['first']}")
    found += [f"{name}: no request succeeded" for name, c in result["classes"].items() if c["ok"] == 0]
    found += result["canary"]["problems"]
    if result["drift"] is not None and not result["drift"]["ok"]:
        found.append(f"latency drifted: median {result['drift']['first_p50_s']:.3f} s in the first window, "
                     f"{result['drift']['last_p50_s']:.3f} s in the last (limit +{args.max_drift:.0%})")
    server = result["server"]
    if server is not None:
        found += [f"rank {r} " + (f"exited with {s}" if s is not None else f"still ran {args.stop_timeout:g} s")
                  + " after SIGTERM" for r, s in enumerate(server["exit_statuses"]) if s != 0]
        found += [f"left behind: {command}" for command in server["left_behind"]]
    return found


# ---------------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------------


def mib(value: int | None, sign: bool = False) -> str:
    return "—" if value is None else (f"{value / MIB:+.1f}" if sign else f"{value / MIB:.1f}")


def load_table(result: dict[str, Any]) -> list[str]:
    lines = ["| class | clients | sent | answered | ok | errors (expected) | hung | output tokens/s | "
             "end-to-end p50 / p90 / p99 (s) | TTFT p50 / p90 / p99 (ms) |", "|" + " --- |" * 10]
    for name, c in [*result["classes"].items(), ("all", result["all"])]:
        s = c["summary"]
        latency = load.Percentiles(**s["latency"]) if s["latency"] else None
        ttft = load.Percentiles(**s["ttft"]) if s["ttft"] else None
        lines.append(f"| {name} | {c['clients']} | {c['sent']} | {c['answered']} | {c['ok']} | {c['errors']} "
                     f"({c['expected_errors']}) | {c['hung']} | {s['output_tokens_per_s']:.1f} | {seconds(latency)} | "
                     f"{milliseconds(ttft)} |")
    return lines


def window_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    def ms(value: float | None) -> str:
        return "n/a" if value is None else f"{value * 1e3:.0f}"

    lines = ["| window from (s) | requests | errors | end-to-end p50 (s) | per output token p50 (ms) | TTFT p50 (ms) "
             "| output tokens/s |", "|" + " --- |" * 7]
    for r in rows:
        latency = "n/a" if r["latency_p50_s"] is None else f"{r['latency_p50_s']:.2f}"
        lines.append(f"| {r['start_s']:g} | {r['requests']} | {r['errors']} | {latency} | {ms(r['per_token_p50_s'])} "
                     f"| {ms(r['ttft_p50_s'])} | {r['output_tokens_per_s']:.1f} |")
    return lines


def rss_table(growth: dict[str, Any]) -> list[str]:
    lines = ["| process | RSS at start (MiB) | at end (MiB) | growth (MiB) |", "| --- | --- | --- | --- |"]
    for name, p in growth["processes"].items():
        lines.append(f"| {name} | {mib(p['start'])} | {mib(p['end'])} | {mib(p['growth'], sign=True)} |")
    total = growth["total"]
    per_minute = total["growth_per_minute"]
    lines.append(f"| **total** | {mib(total['start'])} | {mib(total['end'])} | {mib(total['growth'], sign=True)}"
                 + ("" if per_minute is None else f" ({per_minute / MIB:+.2f} per minute)") + " |")
    return lines


def summary_lines(args: argparse.Namespace, result: dict[str, Any]) -> list[str]:
    lines = [f"- {kind}: {e['count']}" + (f" ({e['expected']} expected)" if e["expected"] else "")
             + f", first ({e['first_class']}): {e['first']}" for kind, e in result["errors"].items()]
    canary_state = "; ".join(result["canary"]["problems"]) or "every class gave the same text, before and after"
    lines.append(f"- canary (a {CANARY_PROMPT_TOKENS}-token prompt, {CANARY_OUTPUT_TOKENS} greedy tokens): "
                 f"{canary_state}")
    if result["server_counted_tokens"] is not None:
        lines.append(f"- the server counted {result['server_counted_tokens']} generated tokens, the clients "
                     f"{result['all']['summary']['output_tokens']} in answered requests")
    server = result["server"]
    if server is not None:
        statuses = ", ".join(f"rank {r}: {s}" for r, s in enumerate(server["exit_statuses"]))
        lines.append(f"- SIGTERM to rank 0: exit statuses {statuses}, all gone in {server['stopped_in_s']:.1f} s; "
                     + (f"left behind: {server['left_behind']}" if server["left_behind"] else "nothing left behind"))
    d = result["drift"]
    if d is not None:
        lines.append(f"- drift: median end-to-end latency {d['first_p50_s']:.3f} s in the first window, "
                     f"{d['last_p50_s']:.3f} s in the last ({d['change']:+.1%}; per output token "
                     f"{d['per_token_change']:+.1%}; limit +{d['limit']:.0%})")
    return lines


def report(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """Prints the tables and the verdict."""
    devices = f"{args.gpus_per_node} device" + "s" * (args.gpus_per_node > 1)
    print(f"{args.model_name} {args.dtype}, " + (f"{args.nodes} ranks x {devices}, " if result["server"] else "")
          + f"{args.clients} clients, {args.duration:g} s, prompts {args.prompt_range[0]}-{args.prompt_range[1]} "
          f"tokens, outputs {args.output_range[0]}-{args.output_range[1]} tokens, seed {args.seed}"
          + (f", {args.timeout_fraction:.0%} with timeout_seconds {args.short_timeout:g}"
             if args.timeout_fraction else "") + f", run {result['wall_s']:.1f} s\n")
    lines = [*load_table(result), "", *summary_lines(args, result)]
    if args.soak:
        lines += ["", *window_table(result["windows"])]
        if result["rss"]["growth"] is not None:
            samples = result["rss"]["samples"]
            lines += ["", f"RSS over {samples[-1]['t']:.0f} s ({len(samples)} samples):", "",
                      *rss_table(result["rss"]["growth"])]
    failures = result["verdict"]["failures"]
    lines += ["", "PASS" if not failures else "FAIL: " + "; ".join(failures)]
    print("\n".join(lines))


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------


class_names = load.subset_of(list(TRAFFIC), "classes")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--soak", action="store_true",
                        help="soak mode: RSS samples, per-window latency and the drift check (default --duration 600)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients, dealt round-robin over --classes")
    parser.add_argument("--classes", type=class_names, default=list(TRAFFIC), metavar="NAMES",
                        help=f"traffic classes, a subset of {','.join(TRAFFIC)} (default: all)")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds the clients keep sending (default 60, with --soak 600)")
    parser.add_argument("--requests-per-client", type=int, default=None, help="also stop after this many each")
    parser.add_argument("--window", type=float, default=60.0, help="seconds per latency window (drift check)")
    parser.add_argument("--sample-every", type=float, default=30.0, help="seconds between RSS samples")
    parser.add_argument("--max-drift", type=float, default=0.5,
                        help="most the last window's median end-to-end latency may exceed the first's (0.5: +50%%)")
    parser.add_argument("--prompt-range", type=length_range, default=(8, 128), metavar="LOW,HIGH",
                        help="prompt tokens (BOS included), uniform, inclusive")
    parser.add_argument("--output-range", type=length_range, default=(8, 64), metavar="LOW,HIGH",
                        help="output tokens, uniform, inclusive")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request mix and of the canary")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="client-side seconds per request: a request without an answer by then is hung")
    parser.add_argument("--timeout-fraction", type=float, default=0.0,
                        help="share of requests sent with timeout_seconds = --short-timeout (their 'timed out' "
                             "errors are expected)")
    parser.add_argument("--short-timeout", type=float, default=0.1, help="their timeout_seconds")
    parser.add_argument("--allow-error", action="append", default=[], metavar="KIND",
                        help="an error kind that does not fail the run (repeatable), e.g. --allow-error overloaded")
    parser.add_argument("--json", default=None, metavar="PATH", help="write every result here (RSS samples too)")
    target = parser.add_argument_group("an already running server (instead of starting one)")
    target.add_argument("--server-url", default=None, help="http://host:port (give --model-name for its tokenizer)")
    target.add_argument("--grpc-url", default=None, help="grpc://host:port")
    target.add_argument("--server-pid", type=int, action="append", default=[], metavar="PID",
                        help="a process of the server: its session's processes are sampled for RSS (repeatable)")
    server = parser.add_argument_group("the servers this script starts")
    load.add_started_server_flags(server, model_name="random/tiny")
    server.add_argument("--nodes", type=int, default=2, help="ranks of the group, on loopback")
    server.add_argument("--gpus-per-node", type=int, default=1, help="each rank's --number-of-gpus")
    server.add_argument("--log-dir", default=None,
                        help="keep the ranks' logs here (rank0-PORT.log, ...); default: a temporary folder, deleted")
    server.add_argument("--stop-timeout", type=float, default=60.0, help="seconds every rank may take to exit")
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    args.duration = args.duration if args.duration is not None else (600.0 if args.soak else 60.0)
    for flag in ("duration", "window", "sample_every", "timeout", "short_timeout"):
        if not getattr(args, flag) > 0:
            parser.error(f"--{flag.replace('_', '-')} must be positive")
    if args.clients < len(args.classes):
        parser.error(f"--clients {args.clients}: at least one per class ({len(args.classes)})")
    if args.nodes < 1 or args.gpus_per_node < 1:
        parser.error("--nodes and --gpus-per-node must be at least 1")
    if not 0 <= args.timeout_fraction <= 1:
        parser.error("--timeout-fraction must be in [0, 1]")
    if args.prompt_range[0] < 2:
        parser.error("--prompt-range: a prompt has BOS and at least one word, so LOW >= 2")
    known = {kind for kind, _ in ERROR_KINDS} | {"wrong answer", "other"}
    if set(args.allow_error) - known:
        parser.error(f"--allow-error: kinds are {', '.join(sorted(known))}")
    for flag, scheme in (("server_url", "http"), ("grpc_url", "grpc")):
        url = getattr(args, flag)
        if url and triton_url(url)[0] != scheme:
            parser.error(f"--{flag.replace('_', '-')} must be {scheme}://host:port")
    if args.server_url or args.grpc_url:
        given = {scheme for scheme, url in (("http", args.server_url), ("grpc", args.grpc_url)) if url}
        missing = sorted({TRAFFIC[n].protocol for n in args.classes} - given)
        if missing:
            parser.error(f"--classes need a {' and '.join(missing)} URL: give --server-url/--grpc-url or fewer classes")


def log(message: str) -> None:
    print(f"[soak] {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load.stop_on_sigterm()  # SIGTERM ends this script through SystemExit: the servers it started are stopped
    _, tokenizer, builder = load.prepare_prompts(args.model_name, args.cache_dir, args.gpus_per_node, log)
    try:
        external = bool(args.server_url or args.grpc_url)
        result = measure_external(args, builder) if external else measure_started(args, builder)
    except (TimeoutError, AssertionError) as error:  # a model never ready, a server that exited (its log)
        print(f"error: {error}", file=sys.stderr)
        return 1
    failures = problems(args, result)
    result = {"settings": {k: v for k, v in vars(args).items() if k != "json"}, "tokenizer": tokenizer.description,
              **result, "verdict": {"ok": not failures, "failures": failures}}
    report(args, result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
