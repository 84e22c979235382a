#!/usr/bin/env python3
"""Serves a Meta OPT model from JAX behind NVIDIA Triton (PyTriton), on one node or many.

Rank 0 binds the Triton model `OPT` (input: prompt bytes and output_length; output: the prompt followed
by the generated text) and runs the generation; ranks 1..N-1 join the same JAX computation.

    python server.py --model-name random/125M --number-of-gpus 1
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import psutil

LOGGER = logging.getLogger("server")
MODEL_NAME = "OPT"
DEFAULT_CACHE_DIR = str(Path.home() / ".cache" / "opt-jax")
DEFAULT_MAX_QUEUE_SIZE = 1024  # rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head-url", default="localhost:12345",
                        help="host:port of rank 0's JAX coordinator (multi-node only)")
    parser.add_argument("--number-of-nodes", type=int, default=1, help="number of processes (one per node)")
    parser.add_argument("--rank", type=int, default=0, help="this process's rank; rank 0 serves Triton")
    parser.add_argument("--model-name", default="facebook/opt-125m",
                        help="facebook/opt-*, random/<size> (random weights), or a local checkpoint folder")
    parser.add_argument("--number-of-gpus", type=int, default=1,
                        help="local JAX devices this process uses (on the CPU: simulated host devices)")
    parser.add_argument("--max-batch-size", type=int, default=256, help="most rows generated at once")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR,
                        help="where hub downloads and compiled programs are kept")
    parser.add_argument("--tokenizer", default=None, help="tokenizer hub name or folder (default: the model's own)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float16", "bfloat16", "float32"),
                        help="dtype the parameters are stored and computed in; auto: float16 on GPUs, as the "
                             "original example, and float32 on CPUs, where XLA's FP16 matrix products are slow")
    parser.add_argument("--http-port", type=int, default=8000, help="Triton HTTP port")
    parser.add_argument("--grpc-port", type=int, default=8001, help="Triton gRPC port")
    parser.add_argument("--metrics-port", type=int, default=8002, help="Triton metrics port")
    parser.add_argument("--bind-address", default="0.0.0.0", help="address Triton's HTTP, gRPC and metrics bind to")
    parser.add_argument("--generation-metrics-port", type=int, default=8003,
                        help="port of the generation metrics (Prometheus text format, /metrics); 0: none")
    parser.add_argument("--model-instances", type=int, default=1,
                        help="Triton model instances (Python stub processes) of `OPT`; each hands any number of "
                             "requests to the engine at once, so one is enough (PyTriton's 1 s handshake fails with "
                             "many on few cores)")
    parser.add_argument("--decode-slots", type=int, default=16,
                        help="sequences decoded at once: the KV cache holds this many, allocated at start")
    parser.add_argument("--max-prefill-tokens", type=int, default=4096,
                        help="padded prompt tokens prefilled per engine step (and per prefill call): bounds how long "
                             "new prompts pause the running sequences")
    parser.add_argument("--max-queue-size", type=int, default=None,
                        help="most rows waiting for a decode slot; a request that would go past it is refused at once "
                             "with an 'overloaded' error (at least --max-batch-size; default: 1024 or --max-batch-size, "
                             "whichever is larger)")
    parser.add_argument("--request-timeout", type=float, default=0.0,
                        help="seconds a request may take from its arrival to its last token; one past it fails with a "
                             "'timed out' error and frees its slot (0: no limit). A request's optional input "
                             "timeout_seconds can only shorten it")
    parser.add_argument("--one-batch-at-a-time", action="store_true",
                        help="the original example's scheduling, for comparison: a batch runs to its end before the "
                             "next is admitted (default: continuous batching, a request joins at the next step)")
    parser.add_argument("--exit-timeout", type=int, default=30,
                        help="drain grace period: after SIGTERM no new request is taken and those in flight get this "
                             "many seconds to finish before they are ended; then Triton stops and every rank exits 0")
    parser.add_argument("--join-timeout", type=float, default=300.0,
                        help="seconds a rank waits for every other rank to join the group before it exits, naming "
                             "the ranks that never came (multi-node only)")
    parser.add_argument("--peer-timeout", type=float, default=10.0,
                        help="seconds without a heartbeat after which a rank is declared lost and the whole group "
                             "exits non-zero (multi-node only)")
    parser.add_argument("--health-file", default=None,
                        help="multi-node workers touch this file every second while ready and in a healthy group "
                             "(Kubernetes probes check its age; rank 0 has Triton's health endpoints)")
    parser.add_argument("--coordinator-bind-address", default=None,
                        help="address rank 0's JAX coordinator binds to, on the port of --head-url (multi-node only; "
                             "default: jax's own, every interface, [::])")
    parser.add_argument("--access-token", default=os.environ.get("OPT_SERVER_ACCESS_TOKEN") or None,
                        help="token that Triton's restricted endpoints (PyTriton's list: shared memory, model "
                             "repository, statistics, trace, logging) require in the header triton-access-token; "
                             "default: the environment variable OPT_SERVER_ACCESS_TOKEN, else a random token that is "
                             "never shown. Prefer the variable: a flag's value shows in ps")
    parser.add_argument("--verbose", action="store_true", help="debug logging, Triton's included")
    args = parser.parse_args(argv)
    if not 0 <= args.rank < args.number_of_nodes:
        parser.error(f"--rank {args.rank} is outside 0..{args.number_of_nodes - 1}")
    for flag in ("number_of_gpus", "max_batch_size", "model_instances", "number_of_nodes", "decode_slots",
                 "max_prefill_tokens"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    for flag in ("join_timeout", "peer_timeout"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag.replace('_', '-')} must be positive")
    if args.max_queue_size is None:
        args.max_queue_size = max(DEFAULT_MAX_QUEUE_SIZE, args.max_batch_size)
    if args.max_queue_size < args.max_batch_size:
        parser.error(f"--max-queue-size {args.max_queue_size} must be at least --max-batch-size {args.max_batch_size}: "
                     "a full batch could never be queued")
    if not (args.request_timeout >= 0 and np.isfinite(args.request_timeout)):
        parser.error(f"--request-timeout must be >= 0 seconds (0: no limit), got {args.request_timeout}")
    if args.exit_timeout < 0:
        parser.error(f"--exit-timeout must be >= 0 seconds, got {args.exit_timeout}")
    if args.number_of_nodes > 1 and not re.fullmatch(r"\[?[\w.:-]+\]?:\d+", args.head_url):
        parser.error(f"--head-url must be host:port, got {args.head_url!r}")
    if (args.coordinator_bind_address or "").count(":") == 1:  # IPv6 addresses have two or more
        parser.error("--coordinator-bind-address takes an address alone: the port is the one of --head-url")
    if args.access_token is not None and not re.fullmatch(r"[\w.~+/-]{16,}", args.access_token, flags=re.ASCII):
        parser.error("--access-token (or OPT_SERVER_ACCESS_TOKEN) must be 16 or more of A-Z a-z 0-9 . _ ~ + / -, "
                     "e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(32))'")
    return args


def ensure_libpython_on_path() -> None:
    """Puts this interpreter's libpython first on LD_LIBRARY_PATH for Triton's Python backend stub.

    The stub links libpython dynamically; with a pyenv (or other non-system) Python it otherwise loads
    the system's, and every model load fails ('_thread.RLock' object has no attribute
    '_recursion_count'). Triton and the stub inherit this process's environment.
    """
    libdir = sysconfig.get_config_var("LIBDIR")
    paths = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    if libdir and (not paths or paths[0] != libdir):
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *[p for p in paths if p != libdir]])


class StopRequested(Exception):
    """SIGTERM or SIGINT arrived before the server was serving: loading and compiling are abandoned."""


def install_signal_handlers(stop: threading.Event) -> None:
    """SIGTERM (what Kubernetes sends) and SIGINT both stop the server cleanly.

    While serving, the signal sets `stop` and the serving loop winds down; before that (weights loading,
    programs compiling, which can take minutes) it raises StopRequested so the process exits at once.
    """

    def handler(signum: int, _frame: Any) -> None:
        LOGGER.info("received %s, stopping", signal.Signals(signum).name)
        already = stop.is_set()
        stop.set()
        if not serving.is_set() and not already:
            raise StopRequested(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


serving = threading.Event()  # set once Triton is bound: from then on signals drain instead of interrupting


# ---------------------------------------------------------------------------------------------------
# The model on this process's devices
# ---------------------------------------------------------------------------------------------------


def build_runner(args: argparse.Namespace) -> tuple[Any, Any]:
    """Loads the config, the weights (sharded over every device of every rank) and compiles every program."""
    import jax
    import jax.numpy as jnp

    import opt_utils
    import program_cache

    opt_utils.keep_freed_memory()
    config = opt_utils.model_config(args.model_name, args.cache_dir)
    mesh = opt_utils.make_mesh(mesh_devices(args.number_of_gpus), config)
    platform = mesh.devices.flat[0].platform
    dtype = opt_utils.resolve_dtype(args.dtype, platform)
    LOGGER.info("parameters and computation in %s (--dtype %s on %s)", dtype.name, args.dtype, platform)
    model = opt_utils.build_model(config, dtype=dtype, mesh=mesh)
    shapes = opt_utils.SlotShapes.make(slots=args.decode_slots, max_positions=config.max_position_embeddings,
                                       prefill_tokens=args.max_prefill_tokens)
    programs = program_cache.ProgramCache.under(args.cache_dir, mesh=mesh, config=config, dtype=dtype, shapes=shapes)
    begin = time.perf_counter()
    if opt_utils.is_random(args.model_name):
        params = opt_utils.random_params(model, mesh, programs=programs)
    else:
        params = opt_utils.load_params(opt_utils.model_dir(args.model_name, args.cache_dir), model, mesh)
    jax.block_until_ready(params)
    LOGGER.info("weights of %s ready in %.1f s on a mesh of %d devices (%d per rank)", args.model_name,
                time.perf_counter() - begin, mesh.size, args.number_of_gpus)
    log_weight_bytes(params, mesh.size)
    runner = opt_utils.SlotRunner(model=model, params=params, mesh=mesh, shapes=shapes, programs=programs)
    runner.warm_up()
    return runner, config


def mesh_devices(number_of_gpus: int) -> list[Any]:
    """The first `number_of_gpus` devices of every rank, rank-major: one global mesh over the whole group.

    Each rank then holds only its devices' shards of the weights; neighbouring mesh positions share a node,
    so splitting a head group or a vocabulary range never straddles more nodes than it must.
    """
    import jax

    per_rank: dict[int, list[Any]] = {}
    for device in sorted(jax.devices(), key=lambda d: (d.process_index, d.id)):
        per_rank.setdefault(device.process_index, []).append(device)
    short = {rank: len(devices) for rank, devices in per_rank.items() if len(devices) < number_of_gpus}
    if short:
        raise SystemExit(f"--number-of-gpus {number_of_gpus} but these ranks see fewer devices: {short}")
    return [device for rank in sorted(per_rank) for device in per_rank[rank][:number_of_gpus]]


def log_weight_bytes(params: Any, mesh_size: int) -> None:
    """Logs the weight bytes each of this rank's devices holds beside the model's split and replicated totals."""
    import opt_utils

    split, replicated = opt_utils.split_and_replicated_bytes(params)
    LOGGER.info("weight bytes: %s on this rank's devices; the model has %d split over %d devices and %d replicated",
                json.dumps(opt_utils.per_device_bytes(params), sort_keys=True), split, mesh_size, replicated)


# ---------------------------------------------------------------------------------------------------
# Requests: validation, the Triton models' callables, streaming text, generation metrics
# ---------------------------------------------------------------------------------------------------

STREAM_MODEL_NAME = "OPT_stream"
MAX_TEMPERATURE = 100.0
MAX_TIMEOUT_S = 86400.0


class BadRequest(ValueError):
    """A request that cannot be served; its message goes back to the client."""


@dataclasses.dataclass(frozen=True)
class OptionalInput:
    """A per-row Triton input a request may leave out; `check` names what is wrong with a value, or None."""

    name: str
    dtype: Any
    default: Any
    check: Callable[[Any], str | None]


def _finite_between(lo: float, hi: float, *, lo_open: bool = False) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        low_ok = value > lo if lo_open else value >= lo
        if not (np.isfinite(value) and low_ok and value <= hi):
            return f"must be {'>' if lo_open else '>='} {lo:g} and <= {hi:g}"
        return None
    return check


def optional_inputs(vocab_size: int) -> tuple[OptionalInput, ...]:
    """The per-row optional inputs: sampling (none of them: greedy decoding) and the row's deadline."""
    return (
        OptionalInput("temperature", np.float32, 0.0, _finite_between(0.0, MAX_TEMPERATURE)),
        OptionalInput("top_k", np.int32, 0,
                      lambda v: None if 0 <= v <= vocab_size else f"must be >= 0 and <= {vocab_size} (0: off)"),
        OptionalInput("top_p", np.float32, 1.0, _finite_between(0.0, 1.0, lo_open=True)),
        OptionalInput("seed", np.int64, None, lambda v: None if v >= 0 else "must be >= 0"),
        OptionalInput("ignore_eos", np.bool_, False, lambda v: None),
        OptionalInput("timeout_seconds", np.float32, None, _finite_between(0.0, MAX_TIMEOUT_S, lo_open=True)),
    )


@dataclasses.dataclass(frozen=True)
class Row:
    """One prompt of a Triton request, validated and tokenized."""

    prompt: str
    request: Any  # opt_utils.Request
    timeout: float | None  # seconds from arrival, the flag's limit applied; None: no deadline


class RequestParser:
    """Decodes and checks every row of one Triton request; the first problem is a BadRequest naming the row."""

    def __init__(self, tokenizer: Any, max_positions: int, vocab_size: int, *, max_timeout: float | None = None):
        self.tokenizer = tokenizer
        self.max_timeout = max_timeout  # --request-timeout; None: no limit
        self.max_positions = max_positions
        self.optional = optional_inputs(vocab_size)
        self._seeds = np.random.default_rng()

    def parse(self, inputs: Any) -> list[Row]:
        # input: [B, 1] bytes; output_length and each optional input: [B, 1] (Triton checks dtypes and shapes).
        prompts, lengths = inputs["input"], inputs["output_length"]
        settings = {o.name: inputs[o.name] for o in self.optional if inputs.get(o.name) is not None}
        for name, array in {"output_length": lengths, **settings}.items():
            if array.shape[0] != prompts.shape[0]:
                raise BadRequest(f"input has {prompts.shape[0]} rows but {name} has {array.shape[0]}")
        if prompts.shape[0] == 0:
            raise BadRequest("the request has no rows")
        return [self._row(i, prompts.reshape(-1)[i], int(lengths.reshape(-1)[i]),
                          {name: array.reshape(-1)[i] for name, array in settings.items()})
                for i in range(prompts.shape[0])]

    def _row(self, i: int, raw: Any, length: int, given: dict[str, Any]) -> Row:
        import opt_utils

        raw = raw if isinstance(raw, bytes) else bytes(raw)
        try:
            prompt = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise BadRequest(f"row {i}: input is not valid UTF-8 ({error})") from None
        if not prompt:
            raise BadRequest(f"row {i}: input is empty")
        if length < 1:
            raise BadRequest(f"row {i}: output_length must be at least 1, got {length}")
        tokens = tuple(self.tokenizer.encode(prompt))
        if len(tokens) + length > self.max_positions:
            raise BadRequest(f"row {i}: prompt of {len(tokens)} tokens plus output_length {length} exceeds "
                             f"the model's {self.max_positions} positions")
        return Row(prompt, opt_utils.Request(tokens, length, self._sampling(i, given)), self._timeout(given))

    def _timeout(self, given: dict[str, Any]) -> float | None:
        """The row's deadline in seconds: its timeout_seconds (checked with the other inputs), at most the flag's."""
        limits = [float(v) for v in (given.get("timeout_seconds"), self.max_timeout) if v is not None]
        return min(limits) if limits else None

    def _sampling(self, i: int, given: dict[str, Any]) -> Any:
        import opt_utils

        values = {}
        for option in self.optional:
            value = given.get(option.name, option.default)
            problem = option.check(value) if value is not None else None
            if problem:
                raise BadRequest(f"row {i}: {option.name} {value} {problem}")
            values[option.name] = value
        if values["seed"] is None:  # unseeded sampling differs every time; rank 0 draws for every rank
            values["seed"] = int(self._seeds.integers(0, 2**63))
        return opt_utils.Sampling(temperature=float(values["temperature"]), top_k=int(values["top_k"]),
                                  top_p=float(values["top_p"]), seed=int(values["seed"]),
                                  ignore_eos=bool(values["ignore_eos"]))


class TextStream:
    """Turns a row's token ids into text pieces as they come, never splitting a multi-byte character.

    Byte-level BPE decodes a run of tokens to exactly the bytes of its tokens, so once the text of the
    tokens since the last piece ends in a whole character it is a piece of its own and those tokens are
    never decoded again; a text that ends in U+FFFD (an incomplete character) waits for more tokens.
    """

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self._held: list[int] = []

    def push(self, token: int) -> str:
        self._held.append(token)
        text = self._tokenizer.decode(self._held)
        if text.endswith("\ufffd"):
            return ""
        self._held = []
        return text

    def finish(self) -> str:
        """Whatever is held at the end (an incomplete character decodes as U+FFFD, as in the full text)."""
        text = self._tokenizer.decode(self._held) if self._held else ""
        self._held = []
        return text


def bytes_output(texts: Sequence[str]) -> dict[str, np.ndarray]:
    return {"output": np.array([[t.encode("utf-8")] for t in texts], dtype=object)}  # [B, 1] bytes


def rows_or_reject(parser: RequestParser, request: Any) -> list[Row]:
    """The rows of one PyTriton request; a BadRequest goes back to the client as PyTriton's bad-parameter error."""
    from pytriton.exceptions import PyTritonBadParameterError

    try:
        return parser.parse(dict(request.items()))
    except BadRequest as error:
        raise PyTritonBadParameterError(str(error)) from None


def submit_rows(scheduler: Any, rows: Sequence[Row], on_token: Callable[[int], None] | None = None) -> list[Any]:
    """Queues the rows in the engine; a full queue or a drain refuses them at once (engine.Overloaded or
    engine.Draining, which our stub model turns into Triton's UNAVAILABLE, HTTP 503)."""
    return scheduler.submit_all([row.request for row in rows], on_token, timeouts=[row.timeout for row in rows])


def cancel_when_gone(cancels: Any, request: Any, scheduler: Any, sequences: Sequence[Any]) -> Callable[[], None]:
    """Ends the request's rows, freeing their slots, once Triton reports its client gone; returns the unwatch."""
    import cancellation
    import engine

    def cancel() -> None:
        for sequence in sequences:
            scheduler.cancel(sequence, engine.Cancelled("cancelled: the client closed the request"))

    return cancels.watch(cancellation.cancel_key(request), cancel)


def make_infer_fn(scheduler: Any, parser: RequestParser, cancels: Any):
    """The callable of model `OPT` (one request at a time per model instance): prompt + generated text."""

    async def infer(requests: list[Any]) -> list[dict[str, np.ndarray]]:
        responses = []
        for request in requests:  # Triton passes one request at a time: the model has no dynamic batcher
            rows = rows_or_reject(parser, request)
            sequences = submit_rows(scheduler, rows)
            unwatch = cancel_when_gone(cancels, request, scheduler, sequences)
            try:
                tokens = await asyncio.gather(*(asyncio.wrap_future(s.future) for s in sequences))
            finally:
                unwatch()
            responses.append(bytes_output([row.prompt + parser.tokenizer.decode(t) for row, t in zip(rows, tokens)]))
        return responses

    return infer


def make_stream_fn(scheduler: Any, parser: RequestParser, cancels: Any):
    """The callable of the decoupled model `OPT_stream`: one response per new piece of text, then the end.

    It is a coroutine generator, so PyTriton's event loop serves any number of streams at once; the
    scheduler's thread hands each token over with call_soon_threadsafe and nothing blocks the loop.
    """
    from pytriton.exceptions import PyTritonBadParameterError

    async def stream(requests: list[Any]):
        if len(requests) != 1:
            raise PyTritonBadParameterError(f"{STREAM_MODEL_NAME} takes one request at a time, got {len(requests)}")
        rows = rows_or_reject(parser, requests[0])
        if len(rows) != 1:
            raise PyTritonBadParameterError(f"{STREAM_MODEL_NAME} streams one row per request, got {len(rows)}")
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue[int | None] = asyncio.Queue()
        (sequence,) = submit_rows(scheduler, rows, lambda t: loop.call_soon_threadsafe(tokens.put_nowait, t))
        sequence.future.add_done_callback(lambda _: call_soon_if_open(loop, tokens.put_nowait, None))
        unwatch = cancel_when_gone(cancels, requests[0], scheduler, [sequence])
        try:
            text = TextStream(parser.tokenizer)
            ended = False
            while not ended:
                # Whatever tokens came meanwhile make one piece: a loop that falls behind sends fewer responses.
                batch = [await tokens.get()]
                while not tokens.empty():
                    batch.append(tokens.get_nowait())
                ended = batch[-1] is None
                if piece := "".join(text.push(t) for t in batch if t is not None):
                    yield [bytes_output([piece])]
            sequence.future.result()  # raises the engine's error, if any
            yield [bytes_output([text.finish()])]
        finally:
            unwatch()

    return stream


def call_soon_if_open(loop: asyncio.AbstractEventLoop, callback: Callable[..., Any], *args: Any) -> None:
    """Hands `callback` to the loop's thread; a loop already closed (Triton stopped) has nobody left to tell."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        pass


class PrometheusMetrics:
    """The generation metrics, in their own registry, served in Prometheus text format on their own port."""

    def __init__(self, slots: int):
        import prometheus_client as prom

        self.registry = prom.CollectorRegistry()
        latency = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        per_token = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
        self._ttft = prom.Histogram("opt_time_to_first_token_seconds", "Time from a request's arrival to its first "
                                    "generated token", buckets=latency, registry=self.registry)
        self._tpot = prom.Histogram("opt_time_per_output_token_seconds", "Mean time between a request's generated "
                                    "tokens after the first", buckets=per_token, registry=self.registry)
        self._tokens = prom.Counter("opt_generated_tokens", "Tokens generated", registry=self.registry)
        self._requests = prom.Counter("opt_requests", "Rows finished, by outcome", ["outcome"], registry=self.registry)
        self._waiting = prom.Gauge("opt_queue_length", "Rows waiting for a decode slot", registry=self.registry)
        self._busy = prom.Gauge("opt_busy_slots", "Decode slots holding a row", registry=self.registry)
        self._refused = prom.Counter("opt_refused_rows", "Rows refused at once, by reason", ["reason"],
                                     registry=self.registry)
        prom.Gauge("opt_decode_slots", "Decode slots in all", registry=self.registry).set(slots)

    def serve(self, port: int, address: str) -> None:
        import prometheus_client as prom

        try:
            prom.start_http_server(port, addr=address, registry=self.registry)
        except OSError as error:
            raise SystemExit(f"--generation-metrics-port {port} on {address}: {error.strerror}") from None

    def first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def finished(self, tokens: int, seconds_per_token: float | None, outcome: str) -> None:
        self._requests.labels(outcome).inc()
        if seconds_per_token is not None:
            self._tpot.observe(seconds_per_token)

    def tokens(self, count: int) -> None:
        self._tokens.inc(count)

    def load(self, waiting: int, busy_slots: int) -> None:
        self._waiting.set(waiting)
        self._busy.set(busy_slots)

    def refused(self, rows: int, reason: str) -> None:
        self._refused.labels(reason).inc(rows)


# ---------------------------------------------------------------------------------------------------
# The group: one jax.distributed process per node; rank 0 sends each batch, every rank runs it
# ---------------------------------------------------------------------------------------------------

KEY_PREFIX = "opt-server/"  # every key this server keeps in the coordination service's key-value store
JOIN_GRACE_S = 30  # jax's own connect timeout runs this much past --join-timeout, so ours fires first
HEARTBEAT_INTERVAL_S = 1.0
EXIT_GRACE_S = 15.0  # after a lost peer, the most a rank spends stopping before it exits regardless
RECEIVE_POLL_MS = 500  # how often a waiting worker looks up from the channel to check for signals


class GroupError(RuntimeError):
    """The group cannot form, or lost a rank: every rank exits non-zero so that an orchestrator restarts it."""


WIRE_FORMAT = 4
KIND_STOP, KIND_STEP = 0, 1
HEADER_WORDS = 11  # format, kind, column, shift, moves, window, decode rows, sampling, groups, rows, tokens
GROUP_WORDS = 3  # compiled rows, prompt bucket, admissions
ROW_WORDS = 9  # slot, prompt length, max new tokens, temperature, top_k, top_p, seed low, seed high, ignore_eos


def encode_plan(plan: Any | None) -> bytes:
    """One channel message: an opt_utils.Plan, or None for "stop".

    Wire format, little-endian 32-bit words, nothing pickled:
        HEADER_WORDS: WIRE_FORMAT, kind (KIND_STEP or KIND_STOP), column, shift, moves (0 or 1), window,
            decode rows, sampling (0 or 1), G groups, R rows, N tokens
        G x GROUP_WORDS: each prefill group's compiled row count, prompt bucket and number of admissions
        R x ROW_WORDS: each admitted row, in group order: slot, prompt length, max new tokens, temperature
            (float32 bits), top_k, top_p (float32 bits), seed low and high words, ignore_eos
        N words: the rows' prompt token ids, concatenated in row order
    """
    if plan is None:
        return np.asarray([WIRE_FORMAT, KIND_STOP] + [0] * (HEADER_WORDS - 2), dtype="<i4").tobytes()
    import opt_utils

    admissions = [a for g in plan.groups for a in g.admissions]
    rows = np.zeros((len(admissions), ROW_WORDS), dtype="<i4")
    for i, a in enumerate(admissions):
        s = a.request.sampling
        lo, hi = opt_utils.split_seed(s.seed)
        rows[i] = [a.slot, len(a.request.tokens), a.request.max_new_tokens, _float_bits(s.temperature), s.top_k,
                   _float_bits(s.top_p), _signed(lo), _signed(hi), int(s.ignore_eos)]
    tokens = [t for a in admissions for t in a.request.tokens]
    header = [WIRE_FORMAT, KIND_STEP, plan.column, plan.shift, int(plan.moves), plan.window, plan.rows,
              int(plan.sampling), len(plan.groups), len(admissions), len(tokens)]
    groups = [w for g in plan.groups for w in (g.rows, g.prompt_bucket, len(g.admissions))]
    return np.concatenate([np.asarray(header + groups, "<i4"), rows.reshape(-1), np.asarray(tokens, "<i4")]).tobytes()


def _float_bits(value: float) -> int:
    return int(np.asarray(value, "<f4").view("<i4"))


def _signed(word: int) -> int:
    return int(np.asarray(word, "<u4").view("<i4"))


def decode_plan(message: bytes) -> Any | None:
    """The inverse of `encode_plan`; a message that does not follow the format is a GroupError."""
    import opt_utils

    words = np.frombuffer(message, dtype="<i4")
    if len(words) < HEADER_WORDS or words[0] != WIRE_FORMAT or words[1] not in (KIND_STOP, KIND_STEP):
        raise GroupError(f"malformed channel message (header {words[:HEADER_WORDS].tolist()}); "
                         "are all ranks the same version?")
    column, shift, moves, window, decode_rows, sampling, n_groups, n_rows, n_tokens = (
        int(w) for w in words[2:HEADER_WORDS])
    rows_at = HEADER_WORDS + GROUP_WORDS * n_groups
    tokens_at = rows_at + ROW_WORDS * n_rows
    if min(n_groups, n_rows, n_tokens) < 0 or len(words) != tokens_at + n_tokens:
        raise GroupError(f"channel message of {len(words)} words does not hold {n_groups} groups, {n_rows} rows "
                         f"and {n_tokens} tokens")
    if words[1] == KIND_STOP:
        return None
    groups_words = words[HEADER_WORDS:rows_at].reshape(n_groups, GROUP_WORDS)
    rows = words[rows_at:tokens_at].reshape(n_rows, ROW_WORDS)
    if int(groups_words[:, 2].sum()) != n_rows or int(rows[:, 1].sum()) != n_tokens:
        raise GroupError("channel message: its groups, rows and tokens do not add up")
    tokens, starts = words[tokens_at:], np.concatenate([[0], np.cumsum(rows[:, 1])])
    admissions = []
    for i, r in enumerate(rows):
        settings = opt_utils.Sampling(
            temperature=float(r[3:4].view("<f4")[0]), top_k=int(r[4]), top_p=float(r[5:6].view("<f4")[0]),
            seed=int(r[6:7].view("<u4")[0]) | int(r[7:8].view("<u4")[0]) << 32, ignore_eos=bool(r[8]))
        request = opt_utils.Request(tuple(int(t) for t in tokens[starts[i] : starts[i + 1]]), int(r[2]), settings)
        admissions.append(opt_utils.Admission(int(r[0]), request))
    groups, first = [], 0
    for b, bucket, count in groups_words.tolist():
        groups.append(opt_utils.PrefillGroup(b, bucket, tuple(admissions[first : first + count])))
        first += count
    return opt_utils.Plan(column=column, shift=shift, groups=tuple(groups), window=window, rows=decode_rows,
                          sampling=bool(sampling), moves=bool(moves))


INTERRUPTED = object()  # Channel.receive's answer when its wait was cut short, not a message


class Channel:
    """Rank 0 to every other rank, one message per engine step, in order: the only data that crosses ranks.

    Message i lives under the key `opt-server/step/<i>` of the coordination service that
    jax.distributed runs in rank 0's process; workers wait on it with a blocking get. A step's key is
    deleted when the one after next is sent: rank 0 has read that step's tokens by then, so every rank
    has run its collectives, and so every rank has read it.
    """

    def __init__(self, client: Any):
        self._client = client
        self._sent = 0
        self._received = 0

    def _key(self, index: int) -> str:
        return f"{KEY_PREFIX}step/{index}"

    def send(self, plan: Any | None) -> None:
        """Rank 0: the next step for every worker (None tells them to stop)."""
        self._client.key_value_set_bytes(self._key(self._sent), encode_plan(plan))
        if self._sent >= 2:
            self._client.key_value_delete(self._key(self._sent - 2))
        self._sent += 1

    def receive(self, stop: threading.Event) -> Any:
        """Workers: the next step; None when rank 0 says stop; INTERRUPTED once `stop` is set."""
        message = await_key(self._client, self._key(self._received), stop)
        if message is None:
            return INTERRUPTED
        self._received += 1
        return decode_plan(message)


def await_key(client: Any, key: str, stop: threading.Event | None = None) -> bytes | None:
    """Waits for `key` in the key-value store and returns its value; None once `stop` is set.

    The wait is cut into RECEIVE_POLL_MS slices so that `stop` and signals are seen. A store that does
    not answer at all (rank 0 gone) is retried at that pace too, not in a busy loop: the peer monitor
    ends the process then.
    """
    while stop is None or not stop.is_set():
        try:
            return client.blocking_key_value_get_bytes(key, RECEIVE_POLL_MS)
        except Exception as error:  # not there yet (the deadline passed), or the store is unreachable
            if "DEADLINE_EXCEEDED" not in str(error):
                time.sleep(RECEIVE_POLL_MS / 1000)
    return None


class PeerMonitor:
    """Heartbeats through the key-value store: a rank whose heartbeat stops for `timeout` seconds is lost.

    Keys under opt-server/peers/: `heartbeat/<rank>` (a counter each rank bumps every second),
    `leaving/<rank>` (why a worker stopped), `draining/<rank>` (a worker got SIGTERM and asks rank 0 to
    drain the group), `ended` (why rank 0 ended the group on a failure) and `stopped` (rank 0 was
    stopped before serving). Rank 0 watches every worker; a worker watches rank 0,
    whose process also holds the key-value store, so a dead rank 0 shows as the store not answering.
    `on_lost(message, status)` gets a message naming the lost rank and the exit status it calls for.
    """

    def __init__(self, client: Any, *, rank: int, size: int, timeout: float,
                 on_lost: Callable[[str, int], None], health_file: str | None = None):
        self._client = client
        self._rank = rank
        self._watched = list(range(1, size)) if rank == 0 else [0]
        self.timeout = timeout
        self._on_lost = on_lost
        self._health_file = Path(health_file) if health_file else None
        self.ready = threading.Event()  # set by a worker once it can run batches: then the file is touched
        self._seen: dict[int, tuple[str | None, float]] = {}  # rank -> (last heartbeat, when it last changed)
        self._unreachable_since: float | None = None
        self._finished = threading.Event()
        self.lost: str | None = None
        self.lost_event = threading.Event()
        self.drain_requested: str | None = None  # rank 0: why a worker asked the group to drain
        self._thread = threading.Thread(target=self._run, name="peer-monitor", daemon=True)

    def _key(self, name: str) -> str:
        return f"{KEY_PREFIX}peers/{name}"

    def start(self) -> None:
        now = time.monotonic()
        self._seen = {rank: (None, now) for rank in self._watched}
        self._thread.start()

    def stop(self) -> None:
        self._finished.set()

    def wait_lost(self, timeout: float) -> str | None:
        self.lost_event.wait(timeout)
        return self.lost

    def leave(self, reason: str, *, failed: bool) -> None:
        """This rank stops: rank 0 hears why a worker left; workers hear whether rank 0 stopped or failed."""
        self._finished.set()
        name = ("ended" if failed else "stopped") if self._rank == 0 else f"leaving/{self._rank}"
        try:
            self._client.key_value_set(self._key(name), reason, allow_overwrite=True)
        except Exception as error:  # the store is gone with rank 0: nobody is left to tell
            LOGGER.debug("could not announce leaving: %s", error)

    def request_drain(self, reason: str) -> None:
        """A worker: asks rank 0 to stop taking requests, finish those in flight and stop the group."""
        try:
            self._client.key_value_set(self._key(f"draining/{self._rank}"), reason, allow_overwrite=True)
        except Exception as error:  # the store is gone with rank 0: the monitor ends this rank
            LOGGER.debug("could not ask for a drain: %s", error)

    def _run(self) -> None:
        beat = 0
        while not self._finished.wait(HEARTBEAT_INTERVAL_S):
            beat += 1
            problem = self._check(beat)
            if problem and not self._finished.is_set():
                self.lost, status = problem
                self.lost_event.set()
                if self._rank == 0:  # the other workers hear it from the store, not from jax's abort
                    self.leave(self.lost, failed=True)
                self._on_lost(self.lost, status)
                return
            if self._health_file and self.ready.is_set():
                self._health_file.touch()

    def _check(self, beat: int) -> tuple[str, int] | None:
        now = time.monotonic()
        try:
            self._client.key_value_set(self._key(f"heartbeat/{self._rank}"), str(beat), allow_overwrite=True)
            entries = dict(self._client.key_value_dir_get(self._key("")))
        except Exception as error:
            self._unreachable_since = self._unreachable_since or now
            if now - self._unreachable_since >= self.timeout:
                return (f"lost rank 0: its key-value store has not answered for {self.timeout:g} s "
                        f"({str(error).splitlines()[0]})"), 1
            return None
        self._unreachable_since = None
        if self._rank and (reason := entries.get(self._key("ended"))):
            return f"rank 0 ended the group: {reason}", 1
        if self._rank and (reason := entries.get(self._key("stopped"))):
            return f"rank 0 stopped the group: {reason}", 0
        if not self._rank and self.drain_requested is None:
            self.drain_requested = next((f"rank {rank} asked for a drain ({reason})" for rank in self._watched
                                         if (reason := entries.get(self._key(f"draining/{rank}")))), None)
        lost = self._stale_or_leaving(entries, now)
        return (lost, 1) if lost else None

    def _stale_or_leaving(self, entries: dict[str, str], now: float) -> str | None:
        for rank in self._watched:
            if reason := entries.get(self._key(f"leaving/{rank}")):
                return f"lost rank {rank}: it left the group ({reason})"
            beat, since = self._seen[rank]
            current = entries.get(self._key(f"heartbeat/{rank}"))
            if current != beat:
                self._seen[rank] = (current, now)
            elif now - since >= self.timeout:
                return f"lost rank {rank}: no heartbeat for {now - since:.0f} s"
        return None


@dataclasses.dataclass
class Group:
    """This process's place in a multi-node group."""

    rank: int
    size: int
    client: Any  # jax.distributed's client: the key-value store of the coordination service
    channel: Channel
    monitor: PeerMonitor
    stopped_by_rank_0: bool = False  # a worker got rank 0's stop: every rank is leaving together

    def announce_ready(self) -> None:
        """A worker has its weights and programs: rank 0 may start taking requests."""
        self.client.key_value_set(f"{KEY_PREFIX}ready/{self.rank}", socket.gethostname())
        self.monitor.ready.set()

    def wait_until_ready(self) -> None:
        """Rank 0: blocks until every worker has its weights and programs (a signal still interrupts)."""
        for rank in range(1, self.size):
            LOGGER.info("waiting for rank %d to finish loading and compiling", rank)
            await_key(self.client, f"{KEY_PREFIX}ready/{rank}")  # a lost worker ends this process from the monitor
        LOGGER.info("all %d ranks are ready", self.size)


def join_group(args: argparse.Namespace, stop: threading.Event) -> Group:
    """Joins rank 0's jax.distributed group, waiting up to --join-timeout for every rank to come.

    jax's connect blocks until all ranks have registered and then ends the process without saying who
    was missing, so it runs in a thread while this one keeps the signals working, has each rank sign in
    to the key-value store (which answers before the group is complete) and names the missing ranks.
    """
    import jax
    from jax._src import distributed  # the client of jax.distributed: its key-value store is our channel

    failures: list[BaseException] = []
    connect = threading.Thread(target=_initialize_distributed, args=(args, failures), name="join", daemon=True)
    connect.start()
    deadline = time.monotonic() + args.join_timeout
    signed_in = False
    LOGGER.info("rank %d of %d: joining the group at %s", args.rank, args.number_of_nodes, args.head_url)
    while connect.is_alive():
        client = distributed.global_state.client
        if client is not None and not signed_in:
            signed_in = _try(lambda: client.key_value_set(f"{KEY_PREFIX}joined/{args.rank}", socket.gethostname()))
        if time.monotonic() > deadline:
            raise GroupError(f"gave up after {args.join_timeout:g} s (--join-timeout): {_never_joined(client, args)}")
        connect.join(0.5)
    if failures:
        raise GroupError(f"could not join the group at {args.head_url}: {failures[0]}")
    install_signal_handlers(stop)  # jax's preemption notifier took SIGTERM over: take it back
    if args.rank:
        report_abort_as_lost_rank_0(args.rank, args.head_url)
    LOGGER.info("joined: %d ranks, %d devices in all", jax.process_count(), jax.device_count())
    client = distributed.global_state.client
    monitor = PeerMonitor(client, rank=args.rank, size=args.number_of_nodes, timeout=args.peer_timeout,
                          on_lost=lambda reason, status: on_peer_lost(args.rank, reason, status),
                          health_file=args.health_file)
    monitor.start()
    return Group(args.rank, args.number_of_nodes, client, Channel(client), monitor)


def _initialize_distributed(args: argparse.Namespace, failures: list[BaseException]) -> None:
    import jax

    bind = None  # jax's default: every interface ([::]) at the port of --head-url
    if args.coordinator_bind_address:
        host = args.coordinator_bind_address
        host = f"[{host}]" if ":" in host and not host.startswith("[") else host
        bind = f"{host}:{args.head_url.rsplit(':', 1)[1]}"
    try:
        jax.distributed.initialize(
            coordinator_address=args.head_url, num_processes=args.number_of_nodes, process_id=args.rank,
            local_device_ids=list(range(args.number_of_gpus)),
            initialization_timeout=int(args.join_timeout) + JOIN_GRACE_S, coordinator_bind_address=bind,
        )
    except BaseException as error:
        failures.append(error)


def _try(action: Callable[[], Any]) -> bool:
    try:
        action()
        return True
    except Exception:
        return False


def _never_joined(client: Any, args: argparse.Namespace) -> str:
    """Which ranks never signed in, read from the key-value store; or that rank 0's store never answered."""
    try:
        entries = client.key_value_dir_get(f"{KEY_PREFIX}joined/") if client is not None else None
    except Exception:
        entries = None
    if entries is None:
        return f"rank 0 never came: nothing answered at --head-url {args.head_url}"
    joined = {int(key.rsplit("/", 1)[1]) for key, _ in entries}
    missing = sorted(set(range(args.number_of_nodes)) - joined)
    return f"rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} never joined"


_abort_handler: Any = None  # the ctypes callback must outlive the call that installs it


def report_abort_as_lost_rank_0(rank: int, head_url: str) -> None:
    """Workers: turns jax's abort on a vanished rank 0 into our log line and exit status 1.

    jax's coordination client polls rank 0's service; the moment that fails it ends the process with
    abort() from a C++ thread (its Python callback hook cannot be used: it fails with std::bad_cast), so
    this C-level SIGABRT handler checks whether anything still answers at the head and says so.
    """
    import ctypes

    global _abort_handler
    host, port = head_url.rsplit(":", 1)

    def head_gone() -> bool:
        # A killed rank 0's connections can close a moment before its listening socket: ask three times.
        for _ in range(3):
            try:
                socket.create_connection((host.strip("[]"), int(port)), timeout=1).close()
            except OSError:
                return True
            time.sleep(0.5)
        return False

    def on_abort(_signum: int) -> None:
        reason = (f"lost rank 0: its coordination service at {head_url} is gone" if head_gone()
                  else "jax ended this rank on the fatal error above")
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        os.write(2, f"{stamp} rank {rank} ERROR {LOGGER.name}: {reason}; ending this rank\n".encode())
        os._exit(1)

    _abort_handler = ctypes.CFUNCTYPE(None, ctypes.c_int)(on_abort)
    libc = ctypes.CDLL(None)
    libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.signal.restype = ctypes.c_void_p
    libc.signal(signal.SIGABRT, ctypes.cast(_abort_handler, ctypes.c_void_p))


def on_peer_lost(rank: int, reason: str, status: int) -> None:
    """The monitor's verdict: a worker exits at once; rank 0 fails its requests and stops Triton first."""
    LOGGER.log(logging.ERROR if status else logging.INFO, "%s; ending this rank", reason)
    threading.Timer(EXIT_GRACE_S, exit_now, args=(1,)).start()  # whatever stopping does, it ends in time
    if rank == 0 and not serving.is_set():
        let_workers_read_why()
    if rank != 0 or not serving.is_set():
        exit_now(status)
    # rank 0 while serving: wait_for_stop sees monitor.lost within a second and stops Triton


def let_workers_read_why() -> None:
    """Rank 0, before exiting on its own: the store goes with this process, so give the workers' monitors
    two heartbeats to read `ended` or `stopped` rather than learn of it from jax's abort."""
    time.sleep(2 * HEARTBEAT_INTERVAL_S)


def exit_now(status: int) -> None:
    """Ends the process without Python's exit handlers: jax's would wait on peers that may be gone."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def leave_group(group: Group | None, status: int, *, clean: bool) -> int:
    """Ends this rank's part in the group. `clean`: every rank is stopping together, so jax's shutdown
    barrier completes; otherwise the peers may be gone and the process exits without waiting for them."""
    if group is None:
        return status
    group.monitor.stop()
    if group.rank == 0 and not clean:
        let_workers_read_why()
    if clean:
        import jax

        done = threading.Thread(target=jax.distributed.shutdown, name="shutdown", daemon=True)
        done.start()
        done.join(EXIT_GRACE_S)
    exit_now(status)
    return status


# ---------------------------------------------------------------------------------------------------
# Rank roles
# ---------------------------------------------------------------------------------------------------


TRITON_START_ATTEMPTS = 3
# Triton's own wait for requests in flight when it stops. The drain (--exit-timeout) has answered every
# request by then, so this only bounds a stub that is slow to unload; a kill -9 of the server has the
# reaper instead.
TRITON_EXIT_TIMEOUT_S = 5


def start_loading_tokenizer(args: argparse.Namespace) -> concurrent.futures.Future:
    """Rank 0's tokenizer, loaded in a thread while the weights and programs load (importing transformers
    and building the BPE take seconds of a restart that is otherwise ready in a few)."""
    import opt_utils

    def load() -> Any:
        begin = time.perf_counter()
        tokenizer = opt_utils.load_tokenizer(args.model_name, args.tokenizer, args.cache_dir)
        LOGGER.info("tokenizer: %s (%.1f s, beside the weights and programs)", tokenizer.description,
                    time.perf_counter() - begin)
        return tokenizer

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")
    future = pool.submit(load)
    pool.shutdown(wait=False)
    return future


def serve(args: argparse.Namespace, runner: Any, config: Any, stop: threading.Event, group: Group | None,
          tokenizer: Any, started: float) -> int:
    """Rank 0: binds the Triton models and serves until SIGTERM/SIGINT (a drain), Triton's death or a lost peer.

    `started`: time.perf_counter() at the process's start, for the start-up's summary.
    """
    import cancellation

    if group:
        group.wait_until_ready()  # Triton reports ready only once every rank can run a step
    metrics = PrometheusMetrics(runner.shapes.slots)
    if args.generation_metrics_port:
        metrics.serve(args.generation_metrics_port, args.bind_address)
    engine_thread = EngineThread.start(args, runner, config, group, metrics)
    parser = RequestParser(tokenizer, config.max_position_embeddings, config.vocab_size,
                           max_timeout=args.request_timeout or None)
    serving.set()  # from here a signal drains instead of interrupting
    reaper = start_reaper()
    cancellation.install_stub_model()
    cancels = cancellation.CancelListener()  # before Triton starts: its stubs inherit the socket's path
    try:
        scheduler = engine_thread.scheduler
        begin = time.perf_counter()
        triton = start_triton(args, make_infer_fn(scheduler, parser, cancels),
                              make_stream_fn(scheduler, parser, cancels))
        LOGGER.info("ready %.1f s after the start (Triton's start and model loads: %.1f s)",
                    time.perf_counter() - started, time.perf_counter() - begin)
        LOGGER.info("serving %s as Triton models %r and %r on http :%d, grpc :%d, metrics :%d; generation metrics "
                    ":%s; %s", args.model_name, MODEL_NAME, STREAM_MODEL_NAME, args.http_port, args.grpc_port,
                    args.metrics_port, args.generation_metrics_port or "off",
                    "one batch at a time" if args.one_batch_at_a_time else f"{args.decode_slots} decode slots")
        problem = wait_for_stop(triton, scheduler, stop, group)
        if problem:  # nothing more will finish: fail what waits before Triton's stop waits for it
            LOGGER.error("stopping: %s", problem)
            scheduler.abort(GroupError(problem))
            if group:
                group.monitor.leave(problem, failed=True)
        else:
            drain(scheduler, args.exit_timeout)
        engine_thread.stop(timeout=2 if problem else 60)
        if group and not problem:
            group.channel.send(None)  # after the engine's last step: the workers stop while Triton stops
        reaper.kill()
        reaper.wait()
        stop_triton(triton)
    finally:
        cancels.close()
    LOGGER.info("stopped")
    return 1 if problem else 0


@dataclasses.dataclass
class EngineThread:
    """Rank 0's scheduler, stepping in a thread of its own."""

    scheduler: Any  # engine.Scheduler
    thread: threading.Thread
    stopping: threading.Event

    @classmethod
    def start(cls, args: argparse.Namespace, runner: Any, config: Any, group: Group | None,
              metrics: PrometheusMetrics) -> "EngineThread":
        import engine

        scheduler = engine.Scheduler(runner, eos_id=config.eos_token_id, one_batch_at_a_time=args.one_batch_at_a_time,
                                     publish=group.channel.send if group else lambda plan: None, metrics=metrics,
                                     max_waiting=args.max_queue_size)
        stopping = threading.Event()
        thread = threading.Thread(target=scheduler.run, args=(stopping,), name="engine", daemon=True)
        thread.start()
        return cls(scheduler, thread, stopping)

    def stop(self, timeout: float) -> None:
        """Returns once the scheduler ran its last step (it finishes what it holds first), or after `timeout`."""
        self.stopping.set()
        self.thread.join(timeout)


DRAIN_HANDOVER_S = 1.0  # after the engine's last token: time for the callables to hand their responses to Triton
DRAIN_MARGIN_S = 30.0  # a worker that asked for a drain waits this long past --exit-timeout for rank 0's stop


def drain(scheduler: Any, grace: float) -> None:
    """SIGTERM's way out: new requests are refused; those in flight get `grace` seconds, then are ended."""
    import engine

    scheduler.stop_accepting(engine.Draining("the server is shutting down (draining after SIGTERM) and takes no "
                                             "new requests: send it to another replica"))
    LOGGER.info("draining: %d rows in flight get up to %g s to finish (--exit-timeout)", scheduler.in_flight, grace)
    if not wait_idle(scheduler, grace):
        LOGGER.warning("drain: %d rows still in flight after %g s: ending them", scheduler.in_flight, grace)
        scheduler.cancel_all(engine.ShuttingDown(f"shutting down: the request did not finish within the drain's "
                                                 f"grace period of {grace:g} s (--exit-timeout)"))
        wait_idle(scheduler, 5.0)
    time.sleep(DRAIN_HANDOVER_S)
    LOGGER.info("drained")


def wait_idle(scheduler: Any, timeout: float) -> bool:
    """Whether the engine ran out of rows within `timeout` seconds (or failed: nothing more will finish)."""
    deadline = time.monotonic() + timeout
    while scheduler.in_flight and scheduler.failure is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return not scheduler.in_flight or scheduler.failure is not None


def process_age() -> float:
    """Seconds since this process started (its imports included).

    From /proc's clock ticks on Linux: psutil's create_time adds the boot time in whole seconds.
    """
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return max(0.0, time.time() - psutil.Process().create_time())


PYTRITON_POLL_S = 0.05  # how often PyTriton's start asks Triton whether the server and each model are ready


class _PollingClock:
    """`time` for PyTriton's readiness waits (pytriton.client.utils), polling every PYTRITON_POLL_S, not 1 s.

    PyTriton waits for the server and then for each model with `time.sleep(min(1.0, left))` between checks;
    on a restart that is otherwise ready in a few seconds, those sleeps were 2 to 3 of them.
    """

    time = staticmethod(time.time)

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(min(seconds, PYTRITON_POLL_S))


def start_triton(args: argparse.Namespace, infer: Any, stream: Any) -> Any:
    """Starts Triton with the models `OPT` and `OPT_stream` bound, trying again when a model fails to load.

    PyTriton 0.7's model instances race for a 1-second handshake with the first instance's stub;
    on a loaded machine the others can time out or be refused, and the load fails as a whole.
    """
    import pytriton.client.utils
    from pytriton.model_config import ModelConfig, Tensor
    from pytriton.triton import TRITON_ACCESS_HEADER, Triton, TritonConfig, TritonSecurityConfig

    pytriton.client.utils.time = _PollingClock  # its only uses of `time` are these waits (PyTriton 0.7)

    triton_config = TritonConfig(
        http_address=args.bind_address, http_port=args.http_port,
        grpc_address=args.bind_address, grpc_port=args.grpc_port,
        metrics_address=args.bind_address, metrics_port=args.metrics_port,
        exit_timeout_secs=TRITON_EXIT_TIMEOUT_S, log_verbose=1 if args.verbose else 0,
    )
    # PyTriton's restricted endpoints stay protected; an empty token would lift the protection, so it means "random".
    security = TritonSecurityConfig(access_token=args.access_token or None)
    LOGGER.info("Triton's restricted endpoints (%s) require the header %s: %s",
                ", ".join(security.restricted_endpoints), TRITON_ACCESS_HEADER,
                "the token given" if args.access_token else "a random token, not printed")
    inputs = [Tensor(name="input", dtype=bytes, shape=(1,)), Tensor(name="output_length", dtype=np.int64, shape=(1,)),
              *(Tensor(name=o.name, dtype=o.dtype, shape=(1,), optional=True) for o in optional_inputs(0))]
    outputs = [Tensor(name="output", dtype=bytes, shape=(1,))]
    for attempt in range(1, TRITON_START_ATTEMPTS + 1):
        triton = Triton(config=triton_config, security_config=security)
        try:
            triton.bind(model_name=MODEL_NAME, infer_func=[infer] * args.model_instances, inputs=inputs,
                        outputs=outputs, config=ModelConfig(max_batch_size=args.max_batch_size, batcher=None),
                        strict=True)
            # Decoupled: the stub hands each request over and returns at once, so one instance serves any
            # number of streams (the callable is a coroutine generator on PyTriton's event loop).
            triton.bind(model_name=STREAM_MODEL_NAME, infer_func=stream, inputs=inputs, outputs=outputs,
                        config=ModelConfig(max_batch_size=1, batcher=None, decoupled=True), strict=True)
            triton.run()
            return triton
        except Exception as error:  # PyTriton passes tritonclient's load error through
            stop_triton(triton)
            if attempt == TRITON_START_ATTEMPTS:
                raise
            LOGGER.warning("Triton could not load the model (attempt %d of %d), starting it again: %s",
                           attempt, TRITON_START_ATTEMPTS, str(error).splitlines()[0])
    raise AssertionError("unreachable")


def stop_triton(triton: Any) -> None:
    """Stops Triton, then ends whatever of it outlives the stop and removes its model copies."""
    processes = psutil.Process().children(recursive=True)
    folders = stub_model_folders(processes)
    triton.stop()
    reap_leftovers(processes, folders)


STUB_GRACE_S = 5.0  # how long the reaper lets Triton stop by itself after this process is killed
REAPER_TAG = "OPT_SERVER_PID"  # put in this process's environment: Triton and its stubs inherit it


def start_reaper() -> subprocess.Popen:
    """A watcher process that ends Triton's processes if this one is killed outright (kill -9, OOM).

    Triton itself follows this process (PyTriton starts it with a parent-death signal), but its Python
    stubs can hang in their finalize, talking to the dead proxy, and then stay orphaned for good. They
    are found by the environment variable they inherit, whoever their parent is by then.
    """
    os.environ[REAPER_TAG] = str(os.getpid())
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); import server; server.reap_when_gone()"
    return subprocess.Popen([sys.executable, "-c", code, str(os.getpid())], stdin=subprocess.DEVNULL)


def reap_when_gone() -> None:
    """The reaper's loop: once the server (argv[1]) is gone, ends the processes that carry its tag."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the server's to handle
    server_pid = sys.argv[1]
    watched = _existing_process(int(server_pid))
    while _alive(watched):
        time.sleep(0.5)
    processes = [p for p in psutil.process_iter() if p.pid != os.getpid() and _tag(p) == server_pid]
    folders = stub_model_folders(processes)
    time.sleep(STUB_GRACE_S)
    reap_leftovers(processes, folders)


def _tag(process: psutil.Process) -> str | None:
    try:
        return process.environ().get(REAPER_TAG)
    except psutil.Error:
        return None


def _alive(process: psutil.Process | None) -> bool:
    try:
        return process is not None and process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _existing_process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def wait_for_stop(triton: Any, engine: Any, stop: threading.Event, group: Group | None) -> str | None:
    """Blocks until a signal or a worker's drain request (None), or a failure: Triton died, the engine
    failed, or a peer was lost."""
    while not stop.wait(timeout=1.0):
        if group and group.monitor.lost:
            return group.monitor.lost
        if group and group.monitor.drain_requested:
            LOGGER.info("%s: draining the group", group.monitor.drain_requested)
            return None
        if not triton.is_alive():
            return "Triton stopped unexpectedly"
        if engine.failure is not None:
            # In a group a failed collective usually means a dead peer: let the monitor name it.
            lost = group.monitor.wait_lost(group.monitor.timeout + 2 * HEARTBEAT_INTERVAL_S) if group else None
            return lost or f"the generation engine failed: {engine.failure}"
    return None


def stub_model_folders(processes: Sequence[psutil.Process]) -> set[Path]:
    """The /tmp/folder* model copies Triton made for its Python stubs, read off their command lines."""
    folders: set[Path] = set()
    for process in processes:
        try:
            folders.update(Path(arg).parent.parent for arg in process.cmdline() if arg.startswith("/tmp/folder"))
        except psutil.Error:
            continue
    return folders


def reap_leftovers(processes: Sequence[psutil.Process], folders: set[Path]) -> None:
    """Ends Triton's processes that outlive the server and removes the stubs' model copies.

    PyTriton 0.7 can leave a stub running (reparented to init) and its /tmp/folder* copy behind.
    """
    _, alive = psutil.wait_procs(processes, timeout=3)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def work(runner: Any, group: Group, stop: threading.Event, grace: float) -> int:
    """Ranks 1..N-1: run every step rank 0 sends, until it says stop.

    SIGTERM asks rank 0 to drain the group (the group cannot serve without this rank): the steps of the
    requests in flight keep running until rank 0 says stop, or `grace` plus a margin has passed. A lost
    peer ends this process from the monitor's thread, wherever this loop is waiting.
    """
    import jax

    serving.set()  # from here a signal no longer interrupts: it starts a drain
    group.announce_ready()
    LOGGER.info("rank %d ready: running the steps rank 0 sends", group.rank)
    previous, draining, give_up = None, False, threading.Event()
    while (plan := group.channel.receive(give_up if draining else stop)) is not None:
        if plan is INTERRUPTED:
            if draining:  # give_up was set
                LOGGER.error("rank 0 did not stop the group within %g s of this rank's drain request; leaving",
                             grace + DRAIN_MARGIN_S)
                group.monitor.leave("its drain request went unanswered", failed=False)
                return 1
            LOGGER.info("asking rank 0 to drain the group; running its steps until it stops the group")
            group.monitor.request_drain("SIGTERM")
            draining = True
            timer = threading.Timer(grace + DRAIN_MARGIN_S, give_up.set)
            timer.daemon = True
            timer.start()
            continue
        try:
            output = runner.run(plan)
            if previous is not None:  # as rank 0 does: at most one step queued ahead on the devices
                jax.block_until_ready(previous.tokens)
            previous = output
        except Exception as error:  # a failed collective: usually a peer died, which the monitor names
            lost = group.monitor.wait_lost(group.monitor.timeout + 2 * HEARTBEAT_INTERVAL_S)
            LOGGER.error("stopping: %s", lost or f"generation failed: {error}")
            return 1
    LOGGER.info("rank 0 stopped the group")
    group.stopped_by_rank_0 = True
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter() - process_age()
    args = parse_args(argv)
    rank = f" rank {args.rank}" if args.number_of_nodes > 1 else ""
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format=f"%(asctime)s{rank} %(levelname)s %(name)s: %(message)s")
    ensure_libpython_on_path()
    stop = threading.Event()
    install_signal_handlers(stop)
    group = None
    try:
        group = join_group(args, stop) if args.number_of_nodes > 1 else None
        tokenizer = start_loading_tokenizer(args) if args.rank == 0 else None
        begin = time.perf_counter()
        runner, config = build_runner(args)
        LOGGER.info("model loaded and warmed up in %.1f s", time.perf_counter() - begin)
        if args.rank == 0:
            status = serve(args, runner, config, stop, group, tokenizer.result(), started)
        else:
            status = work(runner, group, stop, args.exit_timeout)
    except StopRequested as signal_name:
        LOGGER.info("stopped by %s before serving", signal_name)
        if group:
            group.monitor.leave(f"stopped by {signal_name} before serving", failed=False)
        return leave_group(group, 0, clean=False)
    except GroupError as error:  # the join failed: its thread may still wait inside jax, so no clean exit
        LOGGER.error("%s", error)
        exit_now(1)
    # Every rank reaches jax's shutdown barrier only when rank 0 stopped the group on purpose.
    return leave_group(group, status, clean=status == 0 and (args.rank == 0 or group.stopped_by_rank_0))


if __name__ == "__main__":
    sys.exit(main())
