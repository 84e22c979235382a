#!/usr/bin/env python3
"""Generated tokens/s and time to first token, for the generation alone and through the server.

    python benchmarks/benchmark.py --model-name random/125M --batch-size 8 --prompt-length 32 --output-length 64

With --number-of-nodes N > 1 the same batch also goes through a group of N server processes of
--number-of-gpus devices each, beside one server process holding all N x --number-of-gpus devices, so
that the cost of crossing processes is measured on the same model, devices and batch. On the CPU the
devices are simulated (XLA_FLAGS=--xla_force_host_platform_device_count, set here when missing).

"Generation alone" runs the engine in this process: an SlotRunner with the server's shapes
(--decode-slots, default the server's 16) stepped by an engine.Scheduler, the whole batch submitted at
once. "Through the server" starts `server.py` with the original example's flags (`--model-name`,
`--number-of-gpus`; `--dtype` and `--decode-slots` only when given here) on loopback ports (after the
direct runs, so the two never share the CPU), sends the same batch as one Triton request to `OPT` and
compares its latency with the direct generation of the same tokens. --transformers adds transformers'
PyTorch `generate` (float32, greedy, EOS ignored) on the same prompts with random weights of the same
shape, in this process, as the plain alternative a user would measure us against.
Every prompt is `prompt-length` tokens (OPT's BOS included) and every row ignores EOS, so each
generates exactly `output-length` tokens; the script counts the tokens actually generated.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from machine import read_cpu  # noqa: E402  (beside this file)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-name", default="random/125M")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float16", "bfloat16", "float32"),
                        help="as server.py's --dtype (auto: float16 on GPUs, float32 on CPUs)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=32, help="prompt tokens per row, BOS included")
    parser.add_argument("--output-length", type=int, default=64, help="tokens generated per row")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (after one untimed run)")
    parser.add_argument("--number-of-gpus", type=int, default=1, help="devices per server process")
    parser.add_argument("--number-of-nodes", type=int, default=1,
                        help="also serve the batch from this many processes (a multi-node group on loopback)")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "opt-jax"))
    parser.add_argument("--skip-server", action="store_true", help="measure the generation alone")
    parser.add_argument("--time-to-ready", action="store_true",
                        help="only measure the time from the server's start to its first answer, with an empty "
                             "--cache-dir (cold) then with the cache that start left (warm)")
    parser.add_argument("--decode-slots", type=int, default=DEFAULT_DECODE_SLOTS,
                        help="the engine's decode slots, alone and through the server (default: the server's)")
    parser.add_argument("--transformers", action="store_true",
                        help="also time transformers' generate (PyTorch, float32) on the same batch")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    return parser.parse_args()


DEFAULT_DECODE_SLOTS = 16  # server.py's --decode-slots default


def server_flags(args: argparse.Namespace) -> list[str]:
    """What a server leg adds to the original example's flags: only what was asked for here."""
    flags = [] if args.dtype == "auto" else ["--dtype", args.dtype]
    if args.decode_slots != DEFAULT_DECODE_SLOTS:
        flags += ["--decode-slots", str(args.decode_slots)]
    return flags


def prompt_text(prompt_length: int) -> str:
    # " hello" is one token in GPT-2's and OPT's byte-level BPE; the tokenizer adds BOS in front.
    return "hello" + " hello" * (prompt_length - 2)


def direct(args: argparse.Namespace) -> dict:
    """Times the engine on the batch, one slot per row; returns tokens/s, time to first token and the token count."""
    import jax

    import engine
    import opt_utils
    from plan import Request, Sampling
    from runner import build_runner

    # The server's shapes: every program it would compile.
    served = build_runner(args.model_name, devices=jax.local_devices()[: args.number_of_gpus * args.number_of_nodes],
                          dtype=args.dtype, slots=args.decode_slots, cache_dir=args.cache_dir)
    model, config = served.model, served.config
    tokenizer = opt_utils.load_tokenizer(args.model_name, None, args.cache_dir)
    tokens = tuple(tokenizer.encode(prompt_text(args.prompt_length)))
    assert len(tokens) == args.prompt_length, (len(tokens), args.prompt_length)
    compile_s = served.compile_s
    scheduler = engine.Scheduler(served.runner, eos_id=config.eos_token_id)
    requests = [Request(tokens, args.output_length, Sampling(ignore_eos=True))] * args.batch_size
    timed_batch(scheduler, requests)
    runs = [timed_batch(scheduler, requests) for _ in range(args.repeats)]
    generated = sum(len(row) for row in runs[0]["tokens"])
    total = statistics.median(r["total_s"] for r in runs)
    return {
        "tokens": generated,
        "tokens_per_s": generated / total,
        "ttft_s": statistics.median(r["ttft_s"] for r in runs),
        "latency_s": total,
        "compile_s": compile_s,
        "device": str(jax.devices()[0].device_kind),
        "dtype": str(model.dtype.name if hasattr(model.dtype, "name") else model.dtype),
    }


def with_transformers(args: argparse.Namespace) -> dict:
    """transformers' generate on the same batch (float32, random weights of the same shape): median of the runs."""
    import torch

    import opt_utils
    from load import hf_batch, hf_model

    config = opt_utils.model_config(args.model_name, args.cache_dir)
    tokenizer = opt_utils.load_tokenizer(args.model_name, None, args.cache_dir)
    batch = [tokenizer.encode(prompt_text(args.prompt_length))] * args.batch_size
    model = hf_model(config, "float32", seed=0)
    hf_batch(model, batch, args.output_length, config.pad_token_id)  # untimed: PyTorch's one-time costs
    runs = [hf_batch(model, batch, args.output_length, config.pad_token_id) for _ in range(args.repeats)]
    total = statistics.median(total for _, total in runs)
    return {"tokens_per_s": args.batch_size * args.output_length / total, "latency_s": total,
            "ttft_s": statistics.median(ttft for ttft, _ in runs), "threads": torch.get_num_threads()}


def timed_batch(scheduler: Any, requests: list) -> dict:
    """Submits every request at once and steps the engine until all are done: the tokens, the time to the
    batch's first token (as the host reads it) and the time to its last."""
    begin = time.monotonic()
    sequences = [scheduler.submit(r) for r in requests]
    while scheduler.step():
        pass
    end = time.monotonic()
    return {"tokens": [s.future.result() for s in sequences], "total_s": end - begin,
            "ttft_s": min(s.first_token_at for s in sequences) - begin}


def through_server(args: argparse.Namespace, generated: int, *, nodes: int, gpus: int) -> dict:
    """Starts server.py as `nodes` processes of `gpus` devices, sends the batch as one request `repeats`
    times; returns latency and tokens/s."""
    from client import Sampling
    from serving import infer, start_group, start_server, wait_ready

    extra = (*server_flags(args), "--generation-metrics-port", "0")
    with tempfile.TemporaryDirectory() as tmp:
        if nodes == 1:
            ranks = [start_server(Path(tmp), Path(args.cache_dir), *extra, "--number-of-gpus", str(gpus),
                                  model=args.model_name)]
        else:
            ranks = start_group(Path(tmp), Path(args.cache_dir), nodes, *extra, gpus=gpus, model=args.model_name)
        server = ranks[0]
        try:
            begin = time.perf_counter()
            wait_ready(server, timeout=1800)
            ready_s = time.perf_counter() - begin
            prompts = [prompt_text(args.prompt_length)] * args.batch_size
            lengths = [args.output_length] * args.batch_size
            exact = Sampling(ignore_eos=True)  # every row generates its output length, as in the direct runs
            infer(server.http_url, prompts, lengths, timeout=600, sampling=exact)
            latencies = []
            for _ in range(args.repeats):
                begin = time.perf_counter()
                infer(server.http_url, prompts, lengths, timeout=600, sampling=exact)
                latencies.append(time.perf_counter() - begin)
        finally:
            for rank in ranks:
                rank.stop()
                rank.kill_group()
    latency = statistics.median(latencies)
    return {"latency_s": latency, "tokens_per_s": generated / latency, "ready_s": ready_s,
            "processes": nodes, "devices_per_process": gpus}


def first_answer(url: str, deadline: float, ranks: list) -> str:
    """Sends one 8-token request every 0.1 s until one is answered (the way a waiting client sees the start)."""
    from serving import infer

    while True:
        for rank in ranks:
            if rank.process.poll() is not None:
                raise SystemExit(f"a server exited with {rank.process.returncode}:\n{rank.log()[-3000:]}")
        try:
            return infer(url, ["Hello"], [8], timeout=60)[0]
        except Exception:
            if time.perf_counter() > deadline:
                raise
            time.sleep(0.1)


def time_to_first_answer(args: argparse.Namespace) -> dict:
    """Seconds from starting the server (a group of --number-of-nodes processes) to its first answer: with an
    empty --cache-dir, then again with the cache that the first start left."""
    from serving import start_group, start_server

    flags = [*server_flags(args), "--generation-metrics-port", "0"]
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        for kind in ("cold", "warm"):
            begin = time.perf_counter()
            if args.number_of_nodes == 1:
                ranks = [start_server(Path(tmp), cache, *flags, "--number-of-gpus", str(args.number_of_gpus),
                                      model=args.model_name)]
            else:
                ranks = start_group(Path(tmp), cache, args.number_of_nodes, *flags, gpus=args.number_of_gpus,
                                    model=args.model_name, gap=0.0)
            try:
                first_answer(ranks[0].http_url, begin + 3600, ranks)
                result[kind] = time.perf_counter() - begin
                result[f"{kind}_log"] = [line for line in ranks[0].log().splitlines()
                                         if "programs:" in line or "ready " in line or "weights of" in line]
            finally:
                for rank in ranks:
                    rank.stop()
                    rank.kill_group()
    return result


def main() -> int:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    simulate_cpu_devices(args.number_of_gpus * args.number_of_nodes)
    if args.time_to_ready:
        ready = time_to_first_answer(args)
        if args.json:
            print(json.dumps({"model": args.model_name, "nodes": args.number_of_nodes, "gpus": args.number_of_gpus,
                              "cpu": cpu_line(), **ready}))
            return 0
        print(f"{args.model_name}, {args.number_of_nodes} x {args.number_of_gpus} devices: first answer "
              f"{ready['cold']:.1f} s after the start with an empty --cache-dir, {ready['warm']:.1f} s with the "
              f"cache the first start left ({cpu_line()})")
        for kind in ("cold", "warm"):
            for line in ready[f"{kind}_log"]:
                print(f"  {kind}: {line}")
        return 0
    alone = direct(args)
    result = {"model": args.model_name, "dtype": args.dtype, "batch": args.batch_size, "decode_slots": args.decode_slots,
              "prompt": args.prompt_length, "output": args.output_length, "alone": alone, "cpu": cpu_line()}
    if args.transformers:
        result["transformers"] = with_transformers(args)
    if not args.skip_server:
        devices = args.number_of_gpus * args.number_of_nodes
        served = through_server(args, alone["tokens"], nodes=1, gpus=devices)
        served["overhead"] = served["latency_s"] / alone["latency_s"] - 1
        result["server"] = served
        if args.number_of_nodes > 1:
            grouped = through_server(args, alone["tokens"], nodes=args.number_of_nodes, gpus=args.number_of_gpus)
            grouped["overhead"] = grouped["latency_s"] / served["latency_s"] - 1
            result["group"] = grouped
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{args.model_name} {alone['dtype']} (--dtype {args.dtype}) on {alone['device']}, {args.decode_slots} "
          f"decode slots: batch {args.batch_size}, prompt {args.prompt_length}, output {args.output_length}")
    print(f"  cpu: {result['cpu']}")
    print(f"  generation alone : {alone['tokens_per_s']:8.1f} tokens/s, first token {alone['ttft_s'] * 1e3:7.1f} ms, "
          f"batch {alone['latency_s']:.3f} s (compile {alone['compile_s']:.1f} s)")
    if "server" in result:
        s = result["server"]
        print(f"  through server   : {s['tokens_per_s']:8.1f} tokens/s, request {s['latency_s']:.3f} s "
              f"({s['overhead'] * 100:+.1f}% over the generation alone; server ready in {s['ready_s']:.1f} s)")
    if "group" in result:
        g = result["group"]
        print(f"  {g['processes']} processes x {g['devices_per_process']} devices: {g['tokens_per_s']:8.1f} tokens/s, "
              f"request {g['latency_s']:.3f} s ({g['overhead'] * 100:+.1f}% over 1 process x "
              f"{args.number_of_gpus * args.number_of_nodes} devices; ready in {g['ready_s']:.1f} s)")
    if "transformers" in result:
        t = result["transformers"]
        print(f"  transformers     : {t['tokens_per_s']:8.1f} tokens/s, first token {t['ttft_s'] * 1e3:7.1f} ms "
              f"(float32, {t['threads']} threads); ours alone {alone['tokens_per_s'] / t['tokens_per_s']:.2f}x"
              + (f", through the server {result['server']['tokens_per_s'] / t['tokens_per_s']:.2f}x"
                 if "server" in result else ""))
    return 0


def cpu_line() -> str:
    """The CPU's model name, core count and whether it has AVX-512 BF16 (numbers depend on them)."""
    try:
        cpu = read_cpu()
    except OSError:
        return "unknown"
    flags = cpu.flags
    simd = "avx512_bf16" if "avx512_bf16" in flags else "avx512f" if "avx512f" in flags else \
        "avx2" if "avx2" in flags else "no avx2"
    return f"{cpu.model or 'unknown'} x {cpu.logical_cpus} ({simd})"


def simulate_cpu_devices(count: int) -> None:
    """On the CPU, asks XLA for `count` host devices (before jax starts) unless XLA_FLAGS already says."""
    flags = os.environ.get("XLA_FLAGS", "")
    if os.environ.get("JAX_PLATFORMS", "cpu") == "cpu" and "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


if __name__ == "__main__":
    sys.exit(main())
