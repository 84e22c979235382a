#!/usr/bin/env python3
"""Serves a Meta OPT model from JAX behind NVIDIA Triton (PyTriton), on one node or many.

Rank 0 binds the Triton model `OPT` (input: prompt bytes and output_length; output: the prompt followed
by the generated text) and runs the generation; ranks 1..N-1 join the same JAX computation.

    python server.py --model-name random/125M --number-of-gpus 1

This file is the composition root: the flags become a `ServerConfig`, and `main` states the two rank
roles and the lifecycle (join, load, serve or work, drain, leave); every job it composes has a module
of its own (see README's "Code layout").
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import logging
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import psutil

import engine
from channel import INTERRUPTED, GroupError
from group import HEARTBEAT_INTERVAL_S, Group, exit_now, join_group, leave_group
from metrics import PrometheusMetrics
from protocol import MODEL_NAME, STREAM_MODEL_NAME
from reaper import start_reaper, stop_reaper
from triton_models import (RequestParser, ensure_libpython_on_path, make_infer_fn, make_stream_fn, start_triton,
                           stop_triton)

LOGGER = logging.getLogger("server")
DEFAULT_CACHE_DIR = str(Path.home() / ".cache" / "opt-jax")
DEFAULT_MAX_QUEUE_SIZE = 1024  # rows
DRAIN_MARGIN_S = 30.0  # a worker that asked for a drain waits this long past --exit-timeout for rank 0's stop


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Every flag, checked (see `parse_args` for what each means)."""

    head_url: str
    number_of_nodes: int
    rank: int
    model_name: str
    number_of_gpus: int
    max_batch_size: int
    cache_dir: str
    tokenizer: str | None
    dtype: str
    http_port: int
    grpc_port: int
    metrics_port: int
    bind_address: str
    generation_metrics_port: int
    openai_port: int
    served_model_name: str | None
    api_key: str | None
    model_instances: int
    decode_slots: int
    max_prefill_tokens: int
    max_queue_size: int
    request_timeout: float
    one_batch_at_a_time: bool
    exit_timeout: int
    join_timeout: float
    peer_timeout: float
    health_file: str | None
    coordinator_bind_address: str | None
    access_token: str | None
    verbose: bool


def _add_original_flags(parser: argparse.ArgumentParser) -> None:
    """The original example's flags (and the model's own options)."""
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


def _add_serving_flags(parser: argparse.ArgumentParser) -> None:
    """Rank 0's ports, scheduling, limits and drain."""
    parser.add_argument("--http-port", type=int, default=8000, help="Triton HTTP port")
    parser.add_argument("--grpc-port", type=int, default=8001, help="Triton gRPC port")
    parser.add_argument("--metrics-port", type=int, default=8002, help="Triton metrics port")
    parser.add_argument("--bind-address", default="0.0.0.0", help="address Triton's HTTP, gRPC and metrics bind to")
    parser.add_argument("--generation-metrics-port", type=int, default=8003,
                        help="port of the generation metrics (Prometheus text format, /metrics); 0: none")
    parser.add_argument("--openai-port", type=int, default=9000,
                        help="port of the OpenAI-compatible API (/v1/completions, /v1/models, /health); 0: none")
    parser.add_argument("--served-model-name", default=None,
                        help="a second name the OpenAI API serves the model under (besides --model-name)")
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


def _add_group_flags(parser: argparse.ArgumentParser) -> None:
    """The multi-node group's timeouts and probes, and the server's security and logging."""
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
    parser.add_argument("--api-key", default=os.environ.get("OPT_SERVER_API_KEY") or None,
                        help="key the OpenAI API requires as Authorization: Bearer <key> (default: the environment "
                             "variable OPT_SERVER_API_KEY; none: open)")
    parser.add_argument("--verbose", action="store_true", help="debug logging, Triton's included")


def parse_args(argv: Sequence[str] | None = None) -> ServerConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for add in (_add_original_flags, _add_serving_flags, _add_group_flags):
        add(parser)
    ns = parser.parse_args(argv)
    check_flags(parser, ns)
    return ServerConfig(**vars(ns))


def check_flags(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> None:
    """Ends the process with argparse's usage error when a flag is out of its range; fills in defaults."""
    if not 0 <= ns.rank < ns.number_of_nodes:
        parser.error(f"--rank {ns.rank} is outside 0..{ns.number_of_nodes - 1}")
    for flag in ("number_of_gpus", "max_batch_size", "model_instances", "number_of_nodes", "decode_slots",
                 "max_prefill_tokens"):
        if getattr(ns, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    for flag in ("join_timeout", "peer_timeout"):
        if getattr(ns, flag) <= 0:
            parser.error(f"--{flag.replace('_', '-')} must be positive")
    if ns.max_queue_size is None:
        ns.max_queue_size = max(DEFAULT_MAX_QUEUE_SIZE, ns.max_batch_size)
    if ns.max_queue_size < ns.max_batch_size:
        parser.error(f"--max-queue-size {ns.max_queue_size} must be at least --max-batch-size {ns.max_batch_size}: "
                     "a full batch could never be queued")
    if not (ns.request_timeout >= 0 and np.isfinite(ns.request_timeout)):
        parser.error(f"--request-timeout must be >= 0 seconds (0: no limit), got {ns.request_timeout}")
    if ns.exit_timeout < 0:
        parser.error(f"--exit-timeout must be >= 0 seconds, got {ns.exit_timeout}")
    if ns.number_of_nodes > 1 and not re.fullmatch(r"\[?[\w.:-]+\]?:\d+", ns.head_url):
        parser.error(f"--head-url must be host:port, got {ns.head_url!r}")
    if (ns.coordinator_bind_address or "").count(":") == 1:  # IPv6 addresses have two or more
        parser.error("--coordinator-bind-address takes an address alone: the port is the one of --head-url")
    if ns.access_token is not None and not re.fullmatch(r"[\w.~+/-]{16,}", ns.access_token, flags=re.ASCII):
        parser.error("--access-token (or OPT_SERVER_ACCESS_TOKEN) must be 16 or more of A-Z a-z 0-9 . _ ~ + / -, "
                     "e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(32))'")


class StopRequested(BaseException):
    """SIGTERM or SIGINT arrived before the server was serving: loading and compiling are abandoned.

    A BaseException, as KeyboardInterrupt is: the signal handler raises it wherever the main thread is, and
    an `except Exception` there (logging's emit, a library's fallback) would otherwise swallow it and the
    server would compile on and serve (seen once in CI). Where Python itself swallows it (a gc callback,
    a `__del__`: it only prints them, also seen in CI), Lifecycle.raise_if_stopped raises it again at the
    loading's next checkpoint.
    """


@dataclasses.dataclass(frozen=True)
class Lifecycle:
    """Where this process is: `stop` once a signal came; `serving` once it serves (rank 0: Triton is bound;
    workers: running steps), from when a signal drains instead of interrupting."""

    stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    serving: threading.Event = dataclasses.field(default_factory=threading.Event)
    signals: list[str] = dataclasses.field(default_factory=list)  # the names of those received, in order

    def install_signal_handlers(self) -> None:
        """SIGTERM (what Kubernetes sends) and SIGINT both stop the server cleanly.

        While serving, the signal sets `stop` and the serving loop winds down; before that (weights loading,
        programs compiling, which can take minutes) it raises StopRequested so the process exits at once.
        """
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        LOGGER.info("received %s, stopping", name)
        already = self.stop.is_set()
        self.signals.append(name)
        self.stop.set()
        if not self.serving.is_set() and not already:
            raise StopRequested(name)

    def raise_if_stopped(self) -> None:
        """A checkpoint of the phases before serving: a stop whose StopRequested was swallowed where the
        signal landed ends them here (after the weights, after each program built), not once they are done."""
        if self.stop.is_set():
            raise StopRequested(self.signals[0] if self.signals else "a stop")

    def start_serving(self) -> None:
        """From here a signal drains instead of interrupting; a stop that came before still stops the
        process here, before it serves."""
        self.serving.set()
        self.raise_if_stopped()


def start_loading_tokenizer(config: ServerConfig) -> concurrent.futures.Future:
    """Rank 0's tokenizer, loaded in a thread while the weights and programs load (importing transformers
    and building the BPE take seconds of a restart that is otherwise ready in a few)."""
    import opt_utils

    def load() -> Any:
        begin = time.perf_counter()
        tokenizer = opt_utils.load_tokenizer(config.model_name, config.tokenizer, config.cache_dir)
        LOGGER.info("tokenizer: %s (%.1f s, beside the weights and programs)", tokenizer.description,
                    time.perf_counter() - begin)
        return tokenizer

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")
    future = pool.submit(load)
    pool.shutdown(wait=False)
    return future


def serve(config: ServerConfig, runner: Any, model_config: Any, life: Lifecycle, group: Group | None,
          tokenizer: Any, started: float) -> int:
    """Rank 0: binds the Triton models and serves until SIGTERM/SIGINT (a drain), Triton's death or a lost peer.

    `started`: time.perf_counter() at the process's start, for the start-up's summary.
    """
    import cancellation
    import openai_api

    if group:
        group.wait_until_ready()  # Triton reports ready only once every rank can run a step
    metrics = PrometheusMetrics(runner.shapes.slots)
    if config.generation_metrics_port:
        metrics.serve(config.generation_metrics_port, config.bind_address)
    scheduler = engine.Scheduler(runner, eos_id=model_config.eos_token_id,
                                 one_batch_at_a_time=config.one_batch_at_a_time,
                                 publish=group.channel.send if group else lambda plan: None, metrics=metrics,
                                 max_waiting=config.max_queue_size)
    engine_thread = engine.EngineThread.start(scheduler)
    parser = RequestParser(tokenizer, model_config.max_position_embeddings, model_config.vocab_size,
                           max_timeout=config.request_timeout or None)
    life.start_serving()
    reaper = start_reaper()
    cancellation.install_stub_model()
    cancels = cancellation.CancelListener()  # before Triton starts: its stubs inherit the socket's path
    openai = triton = None
    try:
        begin = time.perf_counter()
        try:
            # The OpenAI API is bound before Triton loads its models: Triton's readiness, which the charts'
            # probes and client.py wait for, then means that this API answers too.
            what = "the OpenAI API"
            openai = openai_api.start(config, scheduler, parser, model_config.max_position_embeddings)
            what = "Triton"
            triton = start_triton(config, make_infer_fn(scheduler, parser, cancels),
                                  make_stream_fn(scheduler, parser, cancels))
        except Exception as error:  # a port taken, Triton's retries spent: the rest still winds down
            problem = f"{what} did not start: {str(error).splitlines()[0]}"
        else:
            log_ready(config, started, begin)
            problem = wait_for_stop(triton, scheduler, life.stop, group)
        wind_down(config, engine_thread, group, problem)
        if openai is not None:
            openai.stop()
        if triton is not None:
            stop_triton(triton, spare=[reaper.pid])
    finally:  # the reaper last: until Triton has stopped, a kill -9 of this process still has it
        stop_reaper(reaper)
        cancels.close()
    LOGGER.info("stopped")
    return 1 if problem else 0


def log_ready(config: ServerConfig, started: float, triton_began: float) -> None:
    now = time.perf_counter()
    LOGGER.info("ready %.1f s after the start (Triton's start and model loads: %.1f s)", now - started,
                now - triton_began)
    LOGGER.info("serving %s as Triton models %r and %r on http :%d, grpc :%d, metrics :%d; generation metrics "
                ":%s; %s", config.model_name, MODEL_NAME, STREAM_MODEL_NAME, config.http_port, config.grpc_port,
                config.metrics_port, config.generation_metrics_port or "off",
                "one batch at a time" if config.one_batch_at_a_time else f"{config.decode_slots} decode slots")


def wind_down(config: ServerConfig, engine_thread: engine.EngineThread, group: Group | None,
              problem: str | None) -> None:
    """After serving: a drain (no problem), or every request failed at once (nothing more will finish);
    then the engine's last step, and the workers told to stop."""
    scheduler = engine_thread.scheduler
    if problem:  # fail what waits before Triton's stop waits for it
        LOGGER.error("stopping: %s", problem)
        scheduler.abort(GroupError(problem))
        if group:
            group.monitor.leave(problem, failed=True)
    else:
        engine.drain(scheduler, config.exit_timeout)
    engine_thread.stop(timeout=2 if problem else 60)
    if group and not problem:
        group.channel.send(None)  # after the engine's last step: the workers stop while Triton stops


def wait_for_stop(triton: Any, scheduler: engine.Scheduler, stop: threading.Event, group: Group | None) -> str | None:
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
        if scheduler.failure is not None:
            # In a group a failed collective usually means a dead peer: let the monitor name it.
            lost = group.monitor.wait_lost(group.monitor.timeout + 2 * HEARTBEAT_INTERVAL_S) if group else None
            return lost or f"the generation engine failed: {scheduler.failure}"
    return None


def work(runner: Any, group: Group, life: Lifecycle, grace: float) -> int:
    """Ranks 1..N-1: run every step rank 0 sends, until it says stop.

    SIGTERM asks rank 0 to drain the group (the group cannot serve without this rank): the steps of the
    requests in flight keep running until rank 0 says stop, or `grace` plus a margin has passed. A lost
    peer ends this process from the monitor's thread, wherever this loop is waiting.
    """
    life.start_serving()  # from here a signal no longer interrupts: it starts a drain
    group.announce_ready()
    LOGGER.info("rank %d ready: running the steps rank 0 sends", group.rank)
    previous, give_up = None, threading.Event()
    draining = False
    while (plan := group.channel.receive(give_up if draining else life.stop)) is not None:
        if plan is INTERRUPTED:
            if draining:  # give_up was set
                LOGGER.error("rank 0 did not stop the group within %g s of this rank's drain request; leaving",
                             grace + DRAIN_MARGIN_S)
                group.monitor.leave("its drain request went unanswered", failed=False)
                return 1
            draining = ask_for_drain(group, grace, give_up)
            continue
        try:
            output = runner.run(plan)
            if previous is not None:  # as rank 0 does: at most one step queued ahead on the devices
                runner.read(previous)
            previous = output
        except Exception as error:  # a failed collective: usually a peer died, which the monitor names
            lost = group.monitor.wait_lost(group.monitor.timeout + 2 * HEARTBEAT_INTERVAL_S)
            LOGGER.error("stopping: %s", lost or f"generation failed: {error}")
            return 1
    LOGGER.info("rank 0 stopped the group")
    group.stopped_by_rank_0 = True
    return 0


def ask_for_drain(group: Group, grace: float, give_up: threading.Event) -> bool:
    """A worker's SIGTERM: rank 0 is asked to drain the group; `give_up` is set if it has not after the grace."""
    LOGGER.info("asking rank 0 to drain the group; running its steps until it stops the group")
    group.monitor.request_drain("SIGTERM")
    timer = threading.Timer(grace + DRAIN_MARGIN_S, give_up.set)
    timer.daemon = True
    timer.start()
    return True


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


def main(argv: Sequence[str] | None = None) -> int:
    """Rank 0 serves (Triton, the scheduler, the generation); every other rank works (runs the steps rank 0
    sends). Both join the group, load the model, do their role, then leave the group together."""
    started = time.perf_counter() - process_age()
    config = parse_args(argv)
    role: Callable[..., int] = serve_role if config.rank == 0 else work_role
    setup_logging(config)
    ensure_libpython_on_path()
    life = Lifecycle()
    life.install_signal_handlers()
    return run(config, life, role, started)


def serve_role(config: ServerConfig, life: Lifecycle, group: Group | None, load: Callable[[], Any],
               started: float) -> int:
    tokenizer = start_loading_tokenizer(config)  # beside the weights and programs
    served = load()
    return serve(config, served.runner, served.config, life, group, tokenizer.result(), started)


def work_role(config: ServerConfig, life: Lifecycle, group: Group | None, load: Callable[[], Any],
              started: float) -> int:
    assert group is not None, "a worker is always in a group"
    return work(load().runner, group, life, config.exit_timeout)


def run(config: ServerConfig, life: Lifecycle, role: Callable[..., int], started: float) -> int:
    """The lifecycle: join the group, load the model, play the role, leave the group."""
    group = None
    try:
        if config.number_of_nodes > 1:
            group = join_group(config, serving=life.serving, take_signals_back=life.install_signal_handlers)
        status = role(config, life, group, lambda: load_model(config, life.raise_if_stopped), started)
    except StopRequested as signal_name:
        LOGGER.info("stopped by %s before serving", signal_name)
        if group:
            group.monitor.leave(f"stopped by {signal_name} before serving", failed=False)
        return leave_group(group, 0, clean=False)
    except GroupError as error:  # the join failed: its thread may still wait inside jax, so no clean exit
        LOGGER.error("%s", error)
        exit_now(1)
    # Every rank reaches jax's shutdown barrier only when rank 0 stopped the group on purpose.
    return leave_group(group, status, clean=status == 0 and (config.rank == 0 or group.stopped_by_rank_0))


def load_model(config: ServerConfig, checkpoint: Callable[[], None]) -> Any:
    """This rank's part of the model: weights on its devices, every program compiled or loaded.
    `checkpoint` runs between the steps on this (the main) thread and raises to abandon the loading."""
    from runner import build_runner  # jax and the device side: imported once the signal handlers are in
    from sharding import mesh_devices

    begin = time.perf_counter()
    served = build_runner(config.model_name, devices=mesh_devices(config.number_of_gpus), dtype=config.dtype,
                          slots=config.decode_slots, prefill_tokens=config.max_prefill_tokens,
                          cache_dir=config.cache_dir, checkpoint=checkpoint)
    LOGGER.info("model loaded and warmed up in %.1f s", time.perf_counter() - begin)
    return served


def setup_logging(config: ServerConfig) -> None:
    rank = f" rank {config.rank}" if config.number_of_nodes > 1 else ""
    logging.basicConfig(level=logging.DEBUG if config.verbose else logging.INFO,
                        format=f"%(asctime)s{rank} %(levelname)s %(name)s: %(message)s")


if __name__ == "__main__":
    sys.exit(main())
