#!/usr/bin/env python3
"""Greedy decode at batch 1 against the bound that the card's memory bandwidth sets.

At batch 1 every decode step streams all the weights from memory once, so a card that moves
`bandwidth` bytes/s cannot decode faster than

    bound tokens/s = measured bandwidth / (2 bytes x parameter count)        (FP16)

The target is 60% of that bound. This script measures, on one device:

1. Memory bandwidth: `x + 1` over a large array (4 GiB on a GPU), donated so it runs in place;
   bytes read + bytes written per call, median over timed samples after warm-ups.
2. For each model (default random/1.3B and random/6.7B, FP16, random weights made on the device by
   random_params): a 32-token prompt is written into a batch-1 KV cache of
   32 + steps + 1 columns, then `--steps` greedy tokens are decoded two ways:
   a. per-step dispatch: one jitted one-token step (cache donated) called from Python per token;
   b. on-device loop: one jitted `lax.fori_loop` of `--loop-steps` tokens per call, so Python's
      dispatch cost is paid once per `--loop-steps` tokens.
   Each is reported as tokens/s, ms/token and % of the bound. A second bound divides the bandwidth by
   the bytes one step really reads: the weights it streams (the LM head and every layer, but only one
   row of each embedding table) plus the whole KV cache (attention reads all its columns, masked).

The parameter count is the params tree's, with the LM head left out when it is tied to the token
embedding (our tree keeps a transposed copy of it): that is the count OPT's model card gives.
The prompt is written one token at a time with the decode step itself: the same cache a T=32
prefill would write, for one compile fewer per model.

Results are printed as a markdown table and, with --json, written to a file (rewritten after every
model, so a run cut short keeps what it measured). On a GPU:

    python3 benchmarks/decode_bound.py --json /tmp/decode_bound.json

On the CPU, for a smoke test:

    python benchmarks/decode_bound.py --model-name random/tiny --steps 8 --loop-steps 4 --bandwidth-gib 0.25
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

# Before jax starts: allocate as needed, so that freeing the first model really frees its memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

try:
    import opt_utils  # noqa: E402
    from modeling_flax_opt import KVCache  # noqa: E402
    from plan import Request, Sampling, SlotShapes  # noqa: E402
    from runner import SlotRunner  # noqa: E402
    from sharding import make_mesh, path_name  # noqa: E402
    from weights import build_model, random_params  # noqa: E402
except ImportError as error:  # a package these need at import time is missing on this machine
    sys.exit(f"cannot import the engine's modules from {ROOT}: {error}")

DEFAULT_MODELS = ("random/1.3B", "random/6.7B")
DTYPE = jnp.float16
PROMPT_LENGTH = 32

# (params, cache, token [B], column [], first_valid [B]) -> (cache, next token [B], column + n)
StepFn = Callable[[Any, KVCache, jax.Array, jax.Array, jax.Array], tuple[KVCache, jax.Array, jax.Array]]


# ---------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-name", action="append", default=None,
                        help=f"a random/<size> model; repeat for several (default: {' '.join(DEFAULT_MODELS)})")
    parser.add_argument("--steps", type=int, default=256, help="greedy tokens decoded per timed run")
    parser.add_argument("--loop-steps", type=int, default=32, help="tokens per call of the on-device loop")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each way (median reported)")
    parser.add_argument("--bandwidth-gib", type=float, default=None,
                        help="size of the bandwidth test array (default: 4 GiB on a GPU, 0.25 GiB on the CPU)")
    parser.add_argument("--target", type=float, default=0.6, help="fraction of the bound to reach")
    parser.add_argument("--engine-positions", type=int, default=512,
                        help="also decode through the server's engine, compiled for this many positions (0: skip)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    args.model_name = args.model_name or list(DEFAULT_MODELS)
    if args.engine_positions and args.engine_positions < 64 + args.steps:
        parser.error(f"--engine-positions ({args.engine_positions}) must hold a 32-token prompt and --steps")
    if args.steps < 1 or args.loop_steps < 1 or args.steps % args.loop_steps:
        parser.error(f"--steps ({args.steps}) must be a positive multiple of --loop-steps ({args.loop_steps})")
    return args


# ---------------------------------------------------------------------------------------------------
# Timing helpers
# ---------------------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[decode_bound {time.strftime('%H:%M:%S')}] {message}", flush=True)


def block(tree: Any) -> None:
    for leaf in jax.tree_util.tree_leaves(tree):
        leaf.block_until_ready()


# ---------------------------------------------------------------------------------------------------
# 1. Memory bandwidth
# ---------------------------------------------------------------------------------------------------


def measure_bandwidth(gib: float, warmups: int = 3, samples: int = 10, calls_per_sample: int = 5) -> dict[str, float]:
    """Bytes/s of `x + 1` over a `gib` GiB uint32 array, in place (donated): n bytes read + n written per call.

    Each sample times `calls_per_sample` back-to-back calls, then waits for the last: the wait's cost is
    spread over several calls. Returns the median and the best sample, in bytes/s.
    """
    n = int(gib * 2**30) // 4
    bump = jax.jit(lambda x: x + jnp.uint32(1), donate_argnums=0)  # [n] uint32 -> [n] uint32
    x = jax.jit(lambda: jnp.zeros((n,), jnp.uint32))()
    for _ in range(warmups):
        x = bump(x)
    x.block_until_ready()
    moved = 2 * x.nbytes
    seconds: list[float] = []
    for _ in range(samples):
        begin = time.perf_counter()
        for _ in range(calls_per_sample):
            x = bump(x)
        x.block_until_ready()
        seconds.append((time.perf_counter() - begin) / calls_per_sample)
    x.delete()
    return {"array_bytes": float(moved // 2), "bytes_per_s": moved / statistics.median(seconds),
            "best_bytes_per_s": moved / min(seconds)}


# ---------------------------------------------------------------------------------------------------
# 2. Models: weights, sizes, programs
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Loaded:
    name: str
    model: Any  # OPTForCausalLM
    params: Any
    config: Any  # OPTConfig
    mesh: Any  # the one-device mesh the weights live on
    init_s: float


def load_random(name: str, device: jax.Device) -> Loaded:
    """The model on a one-device mesh with random FP16 weights made on the device."""
    config = opt_utils.model_config(name, None)
    mesh = make_mesh([device], config)
    model = build_model(config, dtype=DTYPE, mesh=mesh)
    begin = time.perf_counter()
    params = random_params(model, mesh)
    block(params)
    return Loaded(name, model, params, config, mesh, time.perf_counter() - begin)


def leaves_by_name(params: Any) -> dict[str, jax.Array]:
    return {path_name(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(params)}


def parameter_count(loaded: Loaded) -> int:
    """Parameters of the tree, the LM head left out when it is a copy of the tied token embedding."""
    leaves = leaves_by_name(loaded.params)
    total = sum(leaf.size for leaf in leaves.values())
    if loaded.config.tie_word_embeddings:
        total -= leaves["lm_head/kernel"].size
    return int(total)


EMBEDDING_TABLES = ("embed_tokens/embedding", "embed_positions/embedding")


def weight_bytes_read_per_token(params: Any) -> int:
    """Bytes of weights one batch-1 step reads: every leaf whole, except one row of each embedding table."""
    total = 0
    for name, leaf in leaves_by_name(params).items():
        if name in EMBEDDING_TABLES:
            total += leaf.shape[1] * leaf.dtype.itemsize  # [rows, D]: the one row looked up
        else:
            total += leaf.nbytes
    return int(total)


def tree_bytes(tree: Any) -> int:
    return int(sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(tree)))


def make_step(model: Any) -> StepFn:
    """One greedy token: feeds `token` [B] at `column`, returns the cache, the argmax [B] and column + 1."""

    def step(params: Any, cache: KVCache, token: jax.Array, column: jax.Array, first_valid: jax.Array):
        logits, cache = model.apply({"params": params}, token[:, None], cache, column, first_valid)  # [B, V]
        return cache, jnp.argmax(logits, axis=-1).astype(jnp.int32), column + 1

    return step


def make_loop(step: StepFn, count: int) -> StepFn:
    """`count` greedy tokens in one program (a lax.fori_loop over `step`)."""

    def loop(params: Any, cache: KVCache, token: jax.Array, column: jax.Array, first_valid: jax.Array):
        def body(_: jax.Array, carry: tuple[KVCache, jax.Array, jax.Array]):
            cache, token, column = carry
            return step(params, cache, token, column, first_valid)

        return jax.lax.fori_loop(0, count, body, (cache, token, column))

    return loop


def compile_programs(fns: dict[str, StepFn], example: tuple[Any, ...]) -> tuple[dict[str, Any], float]:
    """Compiles each function (cache donated) for `example`'s shapes, in parallel threads; returns them and seconds.

    XLA compiles without holding the GIL, so the programs compile side by side.
    """
    begin = time.perf_counter()

    def compile_one(fn: StepFn) -> Any:
        return jax.jit(fn, donate_argnums=1).lower(*example).compile()

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(fns)) as pool:
        futures = {name: pool.submit(compile_one, fn) for name, fn in fns.items()}
        programs = {name: future.result() for name, future in futures.items()}
    return programs, time.perf_counter() - begin


# ---------------------------------------------------------------------------------------------------
# 2. Models: the runs
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DecodeStart:
    """The state right after the prompt: decoding starts here on every run (it rewrites the same columns)."""

    token: jax.Array  # [1] int32: the token after the prompt
    column: jax.Array  # [] int32: PROMPT_LENGTH
    first_valid: jax.Array  # [1] int32: zeros (no padding)


def prompt_tokens(vocab_size: int, seed: int = 0) -> np.ndarray:
    """[1, PROMPT_LENGTH] int32 random ids (above OPT's special ids 0..2)."""
    return np.random.default_rng(seed).integers(3, vocab_size, size=(1, PROMPT_LENGTH), dtype=np.int32)


def write_prompt(step: Any, params: Any, cache: KVCache, prompt: np.ndarray) -> tuple[KVCache, DecodeStart]:
    """Writes prompt [1, T] into the cache one token at a time; returns the cache and where decoding starts."""
    first_valid = jnp.zeros((1,), jnp.int32)
    column = jnp.int32(0)
    token = None
    for t in range(prompt.shape[1]):
        cache, token, column = step(params, cache, jnp.asarray(prompt[:, t]), column, first_valid)
    block((cache, token))
    return cache, DecodeStart(token, column, first_valid)


def run_decode(program: Any, calls: int, params: Any, cache: KVCache, start: DecodeStart) -> tuple[KVCache, float]:
    """Calls `program` `calls` times from `start`, feeding each call's token to the next; returns the cache
    and the seconds until the last token is ready."""
    token, column = start.token, start.column
    begin = time.perf_counter()
    for _ in range(calls):
        cache, token, column = program(params, cache, token, column, start.first_valid)
    token.block_until_ready()
    return cache, time.perf_counter() - begin


def time_decode(program: Any, tokens_per_call: int, steps: int, repeats: int, params: Any, cache: KVCache,
                start: DecodeStart) -> tuple[KVCache, dict[str, float]]:
    """One untimed warm-up call, then `repeats` runs of `steps` tokens; median tokens/s and ms/token."""
    cache, _ = run_decode(program, 1, params, cache, start)
    runs: list[float] = []
    for _ in range(repeats):
        cache, seconds = run_decode(program, steps // tokens_per_call, params, cache, start)
        runs.append(seconds)
    median = statistics.median(runs)
    return cache, {"tokens_per_s": steps / median, "ms_per_token": 1e3 * median / steps,
                   "best_tokens_per_s": steps / min(runs)}


def measure_model(name: str, device: jax.Device, args: argparse.Namespace, bandwidth: float) -> dict[str, Any]:
    """Loads one model, decodes both ways, and returns its row of results (the model is freed on return)."""
    log(f"{name}: making random FP16 weights on {device}")
    loaded = load_random(name, device)
    params = loaded.params
    count = parameter_count(loaded)
    weights_read = weight_bytes_read_per_token(params)
    log(f"{name}: {count / 1e9:.3f} B parameters ({tree_bytes(params) / 1e9:.2f} GB in the tree), "
        f"made in {loaded.init_s:.1f} s")

    length = PROMPT_LENGTH + args.steps + 1
    cache = jax.device_put(KVCache.zeros(loaded.config, 1, length, DTYPE), device)  # L x [1, H, C, Dh] each of k, v
    kv_bytes = tree_bytes(cache)
    example = (params, cache, jnp.zeros((1,), jnp.int32), jnp.int32(0), jnp.zeros((1,), jnp.int32))
    step = make_step(loaded.model)
    programs, compile_s = compile_programs({"step": step, "loop": make_loop(step, args.loop_steps)}, example)
    log(f"{name}: step and {args.loop_steps}-step loop compiled in {compile_s:.1f} s")

    cache, start = write_prompt(programs["step"], params, cache, prompt_tokens(loaded.config.vocab_size))
    cache, per_step = time_decode(programs["step"], 1, args.steps, args.repeats, params, cache, start)
    log(f"{name}: per-step dispatch {per_step['tokens_per_s']:.1f} tokens/s")
    cache, on_device = time_decode(programs["loop"], args.loop_steps, args.steps, args.repeats, params, cache, start)
    log(f"{name}: on-device loop {on_device['tokens_per_s']:.1f} tokens/s")

    bound = bandwidth / (jnp.dtype(DTYPE).itemsize * count)
    bound_read = bandwidth / (weights_read + kv_bytes)
    for result in (per_step, on_device):
        result["fraction_of_bound"] = result["tokens_per_s"] / bound
        result["fraction_of_bytes_read_bound"] = result["tokens_per_s"] / bound_read
    free(cache, start)
    engine_row = measure_engine(loaded, args) if args.engine_positions else None
    if engine_row:
        engine_row["fraction_of_bound"] = engine_row["tokens_per_s"] / bound
        log(f"{name}: through the engine {engine_row['tokens_per_s']:.1f} tokens/s "
            f"({100 * engine_row['fraction_of_bound']:.1f}% of bound)")
    free(params)
    return {
        "engine": engine_row,
        "model": name, "dtype": "float16", "batch": 1, "prompt_tokens": PROMPT_LENGTH, "steps": args.steps,
        "cache_length": length, "parameters": count, "weight_bytes": jnp.dtype(DTYPE).itemsize * count,
        "weight_bytes_read_per_token": weights_read, "kv_bytes_read_per_token": kv_bytes,
        "bound_tokens_per_s": bound, "bytes_read_bound_tokens_per_s": bound_read,
        "per_step": per_step, "on_device_loop": {**on_device, "tokens_per_call": args.loop_steps},
        "init_s": loaded.init_s, "compile_s": compile_s,
    }


def measure_engine(loaded: Loaded, args: argparse.Namespace) -> dict[str, Any]:
    """Decode at batch 1 the way the server runs it: engine.Scheduler over SlotRunner (one slot).

    Shapes cover `--engine-positions` positions (fewer programs to compile than the model's 2048). The
    rate is the request's tokens after the first over the time after its first token (no prefill).
    """
    import engine

    shapes = SlotShapes.make(slots=1, max_positions=args.engine_positions)
    runner = SlotRunner(model=loaded.model, params=loaded.params, mesh=loaded.mesh, shapes=shapes)
    compile_s = runner.warm_up()
    scheduler = engine.Scheduler(runner, eos_id=loaded.config.eos_token_id)
    prompt = tuple(int(t) for t in np.asarray(prompt_tokens(loaded.config.vocab_size)).reshape(-1))
    request = Request(prompt, args.steps, Sampling(ignore_eos=True))
    scheduler.generate([dataclasses.replace(request, max_new_tokens=8)])  # first runs of every program
    runs = []
    for _ in range(args.repeats):
        sequence = scheduler.submit(request)
        while scheduler.step():
            pass
        done = time.monotonic()
        runs.append((done - sequence.first_token_at) / (len(sequence.future.result()) - 1))
    free(runner.cache, runner.state)
    seconds = statistics.median(runs)
    return {"tokens_per_s": 1 / seconds, "ms_per_token": 1e3 * seconds, "compile_s": compile_s,
            "slots": 1, "positions": args.engine_positions}


def free(*trees: Any) -> None:
    """Deletes the device buffers of `trees` now (not when Python gets round to it)."""
    for tree in trees:
        for leaf in jax.tree_util.tree_leaves(tree):
            if isinstance(leaf, jax.Array) and not leaf.is_deleted():
                leaf.delete()
    gc.collect()


# ---------------------------------------------------------------------------------------------------
# 3. Report
# ---------------------------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    """The results as a markdown table, one row per model."""
    card, gbs, target = report["device_kind"], report["bandwidth"]["bytes_per_s"] / 1e9, report["target"]
    head = ("| card | bandwidth GB/s | model | params (B) | bound tok/s | per-step tok/s | ms/tok | % bound "
            "| on-device tok/s | ms/tok | % bound | % of weights+KV bound (step / loop) | engine tok/s | % bound |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for m in report["models"]:
        s, d = m["per_step"], m["on_device_loop"]
        lines.append(
            f"| {card} | {gbs:.0f} | {m['model']} | {m['parameters'] / 1e9:.3f} | {m['bound_tokens_per_s']:.1f} "
            f"| {s['tokens_per_s']:.1f} | {s['ms_per_token']:.3f} | {100 * s['fraction_of_bound']:.1f}% "
            f"| {d['tokens_per_s']:.1f} | {d['ms_per_token']:.3f} | {100 * d['fraction_of_bound']:.1f}% "
            f"| {100 * s['fraction_of_bytes_read_bound']:.1f}% / {100 * d['fraction_of_bytes_read_bound']:.1f}% "
            + (f"| {m['engine']['tokens_per_s']:.1f} | {100 * m['engine']['fraction_of_bound']:.1f}% |"
               if m.get("engine") else "| - | - |")
        )
    verdicts = [f"{m['model']}: {'meets' if best_fraction(m) >= target else 'MISSES'} ({100 * best_fraction(m):.1f}%)"
                for m in report["models"]]
    lines.append("")
    lines.append(f"Target {100 * target:.0f}% of bound: " + ", ".join(verdicts))
    return "\n".join(lines)


def best_fraction(row: dict[str, Any]) -> float:
    """The better of the two ways' fraction of the bound."""
    return max(row["per_step"]["fraction_of_bound"], row["on_device_loop"]["fraction_of_bound"])


def write_json(path: str | None, report: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    device = jax.devices()[0]
    gib = args.bandwidth_gib if args.bandwidth_gib is not None else (0.25 if device.platform == "cpu" else 4.0)
    import flax

    report: dict[str, Any] = {
        "device_kind": device.device_kind, "platform": device.platform, "jax": jax.__version__,
        "flax": flax.__version__, "target": args.target, "models": [],
    }
    log(f"{device.device_kind} ({device.platform}), jax {jax.__version__}, flax {flax.__version__}; "
        f"bandwidth test over {gib} GiB")
    report["bandwidth"] = measure_bandwidth(gib)
    bandwidth = report["bandwidth"]["bytes_per_s"]
    log(f"bandwidth {bandwidth / 1e9:.1f} GB/s (best sample {report['bandwidth']['best_bytes_per_s'] / 1e9:.1f})")
    write_json(args.json, report)
    for name in args.model_name:
        report["models"].append(measure_model(name, device, args, bandwidth))
        write_json(args.json, report)
    report["total_s"] = time.perf_counter() - began
    write_json(args.json, report)
    print(markdown(report), flush=True)
    log(f"done in {report['total_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
