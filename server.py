#!/usr/bin/env python3
"""Serves a Meta OPT model from JAX behind NVIDIA Triton (PyTriton), on one node or many.

Rank 0 binds the Triton model `OPT` (input: prompt bytes and output_length; output: the prompt followed
by the generated text) and runs the generation; ranks 1..N-1 join the same JAX computation.

    python server.py --model-name random/125M --number-of-gpus 1
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import logging
import os
import queue
import shutil
import signal
import sys
import sysconfig
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import psutil

LOGGER = logging.getLogger("server")
MODEL_NAME = "OPT"
DEFAULT_CACHE_DIR = str(Path.home() / ".cache" / "opt-jax")


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
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"),
                        help="dtype the parameters are stored and computed in")
    parser.add_argument("--http-port", type=int, default=8000, help="Triton HTTP port")
    parser.add_argument("--grpc-port", type=int, default=8001, help="Triton gRPC port")
    parser.add_argument("--metrics-port", type=int, default=8002, help="Triton metrics port")
    parser.add_argument("--bind-address", default="0.0.0.0", help="address Triton's HTTP, gRPC and metrics bind to")
    parser.add_argument("--model-instances", type=int, default=4,
                        help="Triton model instances: how many requests are taken at once and batched together "
                             "(each is a Python stub process; PyTriton's 1 s handshake fails with many on few cores)")
    parser.add_argument("--max-cache-tokens", type=int, default=65536,
                        help="bound on batch rows x cache length of one generation batch (KV-cache memory)")
    parser.add_argument("--exit-timeout", type=int, default=30,
                        help="seconds Triton waits for requests in flight when stopping")
    parser.add_argument("--verbose", action="store_true", help="debug logging, Triton's included")
    args = parser.parse_args(argv)
    if not 0 <= args.rank < args.number_of_nodes:
        parser.error(f"--rank {args.rank} is outside 0..{args.number_of_nodes - 1}")
    for flag in ("number_of_gpus", "max_batch_size", "model_instances", "number_of_nodes"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
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


def build_generator(args: argparse.Namespace) -> tuple[Any, Any]:
    """Loads the config, the weights (sharded over the mesh) and compiles every bucket's programs."""
    import jax
    import jax.numpy as jnp

    import opt_utils
    from modeling_flax_opt import OPTForCausalLM

    opt_utils.enable_compilation_cache(args.cache_dir)
    devices = jax.local_devices()
    if len(devices) < args.number_of_gpus:
        raise SystemExit(f"--number-of-gpus {args.number_of_gpus} but this process sees {len(devices)} devices: {devices}")
    config = opt_utils.model_config(args.model_name, args.cache_dir)
    mesh = opt_utils.make_mesh(devices[: args.number_of_gpus], config)
    model = OPTForCausalLM(config, jnp.dtype(args.dtype))
    begin = time.perf_counter()
    if opt_utils.is_random(args.model_name):
        params = opt_utils.random_params(model, mesh)
    else:
        params = opt_utils.load_params(opt_utils.model_dir(args.model_name, args.cache_dir), model, mesh)
    jax.block_until_ready(params)
    LOGGER.info("weights of %s ready in %.1f s on %s", args.model_name, time.perf_counter() - begin, mesh.devices.tolist())
    buckets = opt_utils.Buckets.make(max_batch_size=args.max_batch_size, max_positions=config.max_position_embeddings,
                                     max_cache_tokens=args.max_cache_tokens)
    generator = opt_utils.Generator(model=model, params=params, mesh=mesh, buckets=buckets)
    generator.warm_up()
    return generator, config


# ---------------------------------------------------------------------------------------------------
# Requests: validation and batching across concurrent Triton requests
# ---------------------------------------------------------------------------------------------------


class BadRequest(ValueError):
    """A request that cannot be served; its message goes back to the client."""


@dataclasses.dataclass(frozen=True)
class Row:
    """One prompt of a Triton request, validated and tokenized."""

    prompt: str
    tokens: tuple[int, ...]
    output_length: int


def parse_rows(inputs: dict[str, np.ndarray], tokenizer: Any, max_positions: int) -> list[Row]:
    """Decodes and checks every row of one Triton request; the first problem is a BadRequest naming the row."""
    prompts, lengths = inputs["input"], inputs["output_length"]
    # input: [B, 1] bytes; output_length: [B, 1] int64 (Triton checks dtypes and that B matches).
    if prompts.shape[0] != lengths.shape[0]:
        raise BadRequest(f"input has {prompts.shape[0]} rows but output_length has {lengths.shape[0]}")
    rows = []
    for i, (raw, length) in enumerate(zip(prompts.reshape(-1), lengths.reshape(-1))):
        raw = raw if isinstance(raw, bytes) else bytes(raw)
        try:
            prompt = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise BadRequest(f"row {i}: input is not valid UTF-8 ({error})") from None
        if not prompt:
            raise BadRequest(f"row {i}: input is empty")
        if length < 1:
            raise BadRequest(f"row {i}: output_length must be at least 1, got {int(length)}")
        tokens = tuple(tokenizer.encode(prompt))
        if len(tokens) + int(length) > max_positions:
            raise BadRequest(
                f"row {i}: prompt of {len(tokens)} tokens plus output_length {int(length)} exceeds "
                f"the model's {max_positions} positions"
            )
        rows.append(Row(prompt, tokens, int(length)))
    return rows


@dataclasses.dataclass
class Job:
    row: Row
    future: concurrent.futures.Future


class BatchingEngine:
    """Merges the rows of concurrent Triton requests into generation batches of up to `max_rows` rows.

    Triton hands each request to one of several model instances (threads here) without merging
    them, so that one bad request fails alone; this loop does the dynamic batching instead.
    """

    def __init__(self, generator: Any, max_rows: int):
        self._generator = generator
        self._max_rows = max_rows
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="generation", daemon=True)
        self.failure: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=60)

    def submit(self, rows: Sequence[Row]) -> list[concurrent.futures.Future]:
        if self.failure is not None:
            raise RuntimeError(f"the generation engine failed: {self.failure}")
        jobs = [Job(row, concurrent.futures.Future()) for row in rows]
        for job in jobs:
            self._queue.put(job)
        return [job.future for job in jobs]

    def _next_batch(self) -> list[Job] | None:
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        while len(batch) < self._max_rows:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._queue.put(None)  # stop after this batch
                break
            batch.append(job)
        return batch

    def _loop(self) -> None:
        import opt_utils

        while (batch := self._next_batch()) is not None:
            requests = [opt_utils.Request(job.row.tokens, job.row.output_length) for job in batch]
            try:
                result = self._generator.generate(requests)
            except Exception as error:  # a device failure: every waiting request hears of it
                LOGGER.exception("generation failed")
                self.failure = error
                for job in batch:
                    job.future.set_exception(error)
                continue
            LOGGER.debug("batch of %d rows in %.3f s (first token %.3f s)", len(batch), result.total_time,
                         result.time_to_first_token)
            for job, tokens in zip(batch, result.tokens):
                job.future.set_result(tokens)


def make_infer_fn(engine: BatchingEngine, tokenizer: Any, max_positions: int):
    """The callable PyTriton runs for each request (in each model instance's thread)."""
    from pytriton.exceptions import PyTritonBadParameterError

    def infer(requests: list[Any]) -> list[dict[str, np.ndarray]]:
        responses = []
        for request in requests:  # Triton passes one request at a time: the model has no dynamic batcher
            try:
                rows = parse_rows(request.data, tokenizer, max_positions)
            except BadRequest as error:
                raise PyTritonBadParameterError(str(error)) from None
            futures = engine.submit(rows)
            texts = [row.prompt + tokenizer.decode(future.result()) for row, future in zip(rows, futures)]
            responses.append({"output": np.array([[t.encode("utf-8")] for t in texts], dtype=object)})
        return responses

    return infer


# ---------------------------------------------------------------------------------------------------
# Rank roles
# ---------------------------------------------------------------------------------------------------


TRITON_START_ATTEMPTS = 3


def serve(args: argparse.Namespace, generator: Any, config: Any, stop: threading.Event) -> int:
    """Rank 0: binds the Triton model and serves until SIGTERM/SIGINT or until Triton dies."""
    import opt_utils

    tokenizer = opt_utils.load_tokenizer(args.model_name, args.tokenizer, args.cache_dir, config)
    LOGGER.info("tokenizer: %s", tokenizer.description)
    engine = BatchingEngine(generator, args.max_batch_size)
    engine.start()
    infer = make_infer_fn(engine, tokenizer, config.max_position_embeddings)
    serving.set()  # from here a signal lets Triton stop cleanly instead of interrupting it
    triton = start_triton(args, infer)
    LOGGER.info("serving %s as Triton model %r on http :%d, grpc :%d, metrics :%d", args.model_name, MODEL_NAME,
                args.http_port, args.grpc_port, args.metrics_port)
    try:
        status = wait_for_stop(triton, engine, stop)
    finally:
        stop_triton(triton)
        engine.stop()
    LOGGER.info("stopped")
    return status


def start_triton(args: argparse.Namespace, infer: Any) -> Any:
    """Starts Triton with the model `OPT` bound, trying again when the model fails to load.

    PyTriton 0.7's model instances race for a 1-second handshake with the first instance's stub;
    on a loaded machine the others can time out or be refused, and the load fails as a whole.
    """
    from pytriton.model_config import ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    triton_config = TritonConfig(
        http_address=args.bind_address, http_port=args.http_port,
        grpc_address=args.bind_address, grpc_port=args.grpc_port,
        metrics_address=args.bind_address, metrics_port=args.metrics_port,
        exit_timeout_secs=args.exit_timeout, log_verbose=1 if args.verbose else 0,
    )
    for attempt in range(1, TRITON_START_ATTEMPTS + 1):
        triton = Triton(config=triton_config)
        try:
            triton.bind(
                model_name=MODEL_NAME,
                infer_func=[infer] * args.model_instances,
                inputs=[Tensor(name="input", dtype=bytes, shape=(1,)),
                        Tensor(name="output_length", dtype=np.int64, shape=(1,))],
                outputs=[Tensor(name="output", dtype=bytes, shape=(1,))],
                config=ModelConfig(max_batch_size=args.max_batch_size, batcher=None),
                strict=True,
            )
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


def wait_for_stop(triton: Any, engine: BatchingEngine, stop: threading.Event) -> int:
    """Blocks until a signal (status 0), Triton's death or an engine failure (status 1)."""
    while not stop.wait(timeout=1.0):
        if not triton.is_alive():
            LOGGER.error("Triton stopped unexpectedly")
            return 1
        if engine.failure is not None:
            LOGGER.error("stopping: the generation engine failed: %s", engine.failure)
            return 1
    return 0


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


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ensure_libpython_on_path()
    stop = threading.Event()
    install_signal_handlers(stop)
    if args.number_of_nodes > 1:
        raise SystemExit("--number-of-nodes > 1: multi-node serving is not available in this version")
    begin = time.perf_counter()
    try:
        generator, config = build_generator(args)
        LOGGER.info("model loaded and warmed up in %.1f s", time.perf_counter() - begin)
        return serve(args, generator, config, stop)
    except StopRequested as signal_name:
        LOGGER.info("stopped by %s before serving", signal_name)
        return 0


if __name__ == "__main__":
    sys.exit(main())
