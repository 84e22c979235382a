#!/usr/bin/env python3
"""Clients nobody here wrote: NVIDIA's aiperf over the OpenAI API, Triton's perf_analyzer over gRPC, beside load.py.

The two tools live in virtual environments of their own under /work/peers, never dependencies of this
project. Made once like this (Debian's libb64 and CUDA's runtime library are what perf_analyzer's binary
links against; it runs no CUDA code against a CPU-only server, but will not start without them):

    python3.11 -m venv /work/peers/aiperf && /work/peers/aiperf/bin/pip install aiperf==0.13.0
    python3.11 -m venv /work/peers/triton
    /work/peers/triton/bin/pip install "tritonclient[all]==2.51.0" nvidia-cuda-runtime-cu12==12.9.79
    apt-get install -y libb64-0d
    /work/peers/aiperf/bin/aiperf --version                          # 0.13.0
    LD_LIBRARY_PATH=$(echo /work/peers/triton/lib/python3.11/site-packages/nvidia/cuda_runtime/lib) \\
        /work/peers/triton/bin/perf_analyzer --version                # Perf Analyzer Version 2.51.0

The benchmark (about 15 minutes on 2 cores, more while it waits for a quiet machine; this project's venv):

    .venv/bin/python benchmarks/ecosystem.py --json benchmarks/results/ecosystem_125m_cpu.json

The OpenAI-off/on pair again in the other order (the order of --servers), load.py only:

    .venv/bin/python benchmarks/ecosystem.py --json benchmarks/results/ecosystem_125m_cpu_reversed.json \\
        --servers openai-on,openai-off --tools load_grpc,load_http

A smoke run (seconds of load per tool):

    .venv/bin/python benchmarks/ecosystem.py --json /tmp/ecosystem_smoke.json --duration 5 --concurrency 2

What it does. Two servers, one after the other, each `server.py --model-name random/125M
--number-of-gpus 1` (the original example's flags) on free loopback ports through tests/serving.py's
start_server (which adds --bind-address 127.0.0.1 and --exit-timeout 3), with OPT_SERVER_ACCESS_TOKEN set
to a fresh token so that perf_analyzer may read Triton's restricted statistics:

  openai-off  with --openai-port 0: load.py over gRPC streaming (`OPT_stream`), load.py over HTTP (`OPT`),
              aiperf over Triton's HTTP generate_stream;
  openai-on   the OpenAI-compatible API on (idle unless aiperf drives it): the same three runs, aiperf
              against /v1/completions, and perf_analyzer against `OPT` over gRPC.

Every run is the same fixed mix: --concurrency clients in a closed loop (each sends its next request when
its last is answered) for --duration seconds, every prompt --prompt-tokens tokens (OPT's BOS included, as
the server counts) and every output --output-tokens tokens, `ignore_eos` so that every request generates
exactly that many, greedy. The tools, as they are called:

  load.py        --server-url grpc://... (or http://...) --clients C --duration D --prompt-range P,P
                 --output-range O,O; its seeded prompts are random words, one token each.
  aiperf         `aiperf profile --streaming --concurrency C --benchmark-duration D --isl P --isl-stddev 0
                 --osl O --osl-stddev 0` with one worker and one record processor (the 2 cores are shared
                 with the server) and no server-metrics scraping, either against the OpenAI API
                 (`--endpoint-type completions --extra-inputs ignore_eos:true --use-server-token-count`)
                 or, the same client on the other front end, against Triton's own
                 /v2/models/OPT_stream/generate_stream (`--endpoint-type template`, a payload template
                 of input, output_length and ignore_eos; response field `output`). Its synthetic prompts
                 come from its own corpus, counted by a local copy of OPT's tokenizer (GPT-2's BPE with
                 OPT's special tokens, made by vllm_peer.make_tokenizer: the hub is out of reach here),
                 which counts BOS as the server does (the server's prompt-token counter checks it). The
                 numbers are taken from its per-request records with O tokens per request (over Triton
                 aiperf could only re-tokenize random text); its own headline numbers are kept beside.
                 HF_HUB_OFFLINE is left out of its environment: under it aiperf 0.13.0 takes the local
                 tokenizer folder for a hub repository id and fails.
  perf_analyzer  `-m OPT -i grpc --concurrency-range C -b 1 --shape input:1 --shape output_length:1
                 --input-data <json>` with one prompt of P tokens (load.py's builder), output_length O,
                 ignore_eos true; three windows of D/3 seconds, reported merged (-s 999 takes the first
                 three as stable). `-H triton-grpc-protocol-triton-access-token:<token>` carries the
                 token as gRPC metadata (its --help says -H is HTTP only; 2.51 sends it over gRPC too).

Output tokens/s: load.py and aiperf count every finished request's tokens over the run's wall time
(first send to last answer, requests in flight at the end finishing, aiperf's within a 300 s grace
period); perf_analyzer gives completed
requests per second within its windows, times O. Time per output token (TPOT): streaming,
(latency - TTFT) / (tokens - 1) per request (aiperf calls it inter-token latency); without streaming,
latency / tokens. Beside every run the server's own counters are read before and after: its generated
tokens (a check of the count) and its inter-token latency, sum over count (`opt_inter_token_latency_seconds`,
the time between a row's consecutive tokens: the engine's step as its rows see it). Also recorded: the
CPU seconds of the server's processes, of the client's and of the whole machine over the run (the
difference is anyone else's), and how quiet the machine was.

A quiet machine: before each run the script waits, up to --quiet-wait seconds, until no pytest of
anyone's runs and the two cores are under --busy-limit percent busy over a 3 s sample (the idle server
included), then touches --lock (/tmp/bench.lock; removed after the run) and checks for pytest once more;
the load average, that sample and the wait are recorded beside the run (and `quiet: false` if the wait
ran out). Every server is stopped
with SIGTERM; what outlives it is killed, reported, and its PyTriton /tmp/folder* model stores removed.

The summary JSON (--json) holds the machine (CPU model, avx512_bf16 / avx2 / amx_bf16, cores, memory),
the date, versions, every command as run, and each run's numbers; the tools' own outputs go to the
folder beside it named after it (aiperf's profile_export_aiperf.json and log, perf_analyzer's CSV and
stdout, load.py's JSON and log, the server logs).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import json
import os
import re
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import read_cpu  # noqa: E402

PEERS = Path("/work/peers")
TOOLS = ("load_grpc", "load_http", "aiperf_openai", "aiperf_triton", "perf_analyzer")
SERVERS = ("openai-off", "openai-on")
# Which runs each server gets: the OpenAI API is driven only where it is on.
RUNS_ON = {"openai-off": ("load_grpc", "load_http", "aiperf_triton"), "openai-on": TOOLS}
TOKEN_METADATA = "triton-grpc-protocol-triton-access-token"


@dataclasses.dataclass(frozen=True)
class Mix:
    """The fixed load every tool sends: C clients in a closed loop, P-token prompts, O-token outputs."""

    concurrency: int
    prompt_tokens: int  # BOS included, as the server counts
    output_tokens: int
    duration: float  # seconds of sending
    seed: int


@dataclasses.dataclass
class Target:
    """One started server as the tools see it."""

    name: str
    server: Any  # tests/serving.py's ServerProcess
    token: str  # Triton's access token for its restricted endpoints
    model: str  # the --model-name, which the OpenAI API's `model` names

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.server.generation_metrics_port}/metrics"


# ---------------------------------------------------------------------------------------------------
# The machine, and waiting for it to be quiet
# ---------------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """CPU model and the flags that matter to XLA:CPU, cores, memory, date."""
    cpu = read_cpu()
    model, flags = cpu.model, cpu.flags
    memory_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal:"))
    return {"cpu_model": model, **{flag: flag in flags for flag in ("avx512_bf16", "avx2", "avx512f", "amx_bf16")},
            "cores": os.cpu_count(), "memory_gib": round(memory_kib / 2**20, 1),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}


def cpu_ticks() -> tuple[int, int]:
    """(busy, all) clock ticks of every core so far, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def cpu_busy_percent(seconds: float = 3.0) -> float:
    """How busy all cores were over the next `seconds` (100 = every core all the time)."""
    busy0, total0 = cpu_ticks()
    time.sleep(seconds)
    busy1, total1 = cpu_ticks()
    return 100.0 * (busy1 - busy0) / max(total1 - total0, 1)


def foreign_pytests() -> list[str]:
    """Command lines of every pytest running on the machine (none is ours)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if "pytest" in cmdline:
            found.append(cmdline[:200])
    return found


@contextlib.contextmanager
def quiet_machine(lock: Path, wait_s: float, busy_limit: float) -> Iterator[dict[str, Any]]:
    """Holds `lock` for the block once the machine is quiet (or `wait_s` is spent); yields how quiet it was.
    The lock is taken only once the machine looks quiet, and a pytest that started meanwhile gives it
    back: tests that wait for the lock are never kept waiting by a benchmark that waits for them."""
    started = time.monotonic()
    try:
        while True:
            pytests, busy = foreign_pytests(), cpu_busy_percent()
            quiet = not pytests and busy < busy_limit
            if quiet:
                lock.touch()
                pytests = foreign_pytests()
                quiet = not pytests
            if quiet or time.monotonic() - started > wait_s:
                lock.touch()
                break
            lock.unlink(missing_ok=True)
            log(f"waiting for a quiet machine: busy {busy:.0f} %, pytest: {pytests[:1]}")
            time.sleep(15)
        yield {"quiet": quiet, "waited_s": round(time.monotonic() - started, 1), "busy_percent_before": round(busy, 1),
               "pytest_running": pytests, "loadavg_before": os.getloadavg()}
    finally:
        lock.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------
# The servers under test
# ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def serving(name: str, work: Path, cache_dir: Path, model: str, *extra: str) -> Iterator[Target]:
    """A ready `server.py` (the original example's flags, free loopback ports) for the block; then stopped
    with SIGTERM, whatever outlives it killed and reported, its model stores removed."""
    from reaper import stub_model_folders
    from serving import start_server, wait_ready

    token = secrets.token_urlsafe(24)
    os.environ["OPT_SERVER_ACCESS_TOKEN"] = token  # start_server passes our environment on
    server = start_server(work, cache_dir, "--number-of-gpus", "1", *extra, model=model, name=name)
    stores: set[Path] = set()
    try:
        begin = time.perf_counter()
        wait_ready(server, timeout=1800)
        stores = stub_model_folders(server.group())
        log(f"{name}: ready in {time.perf_counter() - begin:.0f} s (http {server.http_port}, grpc {server.grpc_port}, "
            f"openai {server.openai_port if '--openai-port' not in extra else 'off'})")
        yield Target(name, server, token, model)
    finally:
        stop_server(name, server, stores)
        os.environ.pop("OPT_SERVER_ACCESS_TOKEN", None)


def stop_server(name: str, server: Any, stores: set[Path]) -> None:
    """SIGTERM, a wait, then SIGKILL for anything of its session left; removes the model stores left."""
    with contextlib.suppress(AssertionError):
        log(f"{name}: stopped, exit status {server.stop(signal.SIGTERM, timeout=60)}")
    left = [f"{p.pid} {' '.join(p.cmdline())[:120]}" for p in server.group() if p.is_running()]
    if left:
        log(f"{name}: killing what outlived the server: {left}")
        server.kill_group()
    for store in stores:
        if store.exists():
            log(f"{name}: removing the model store it left, {store}")
            shutil.rmtree(store, ignore_errors=True)


def server_counters(url: str) -> dict[str, float]:
    """The server's generated tokens and inter-token latency sums and counts (Prometheus text), by name."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode("utf-8")
    wanted = ("opt_generated_tokens_total", "opt_prompt_tokens_total", "opt_inter_token_latency_seconds_sum",
              "opt_inter_token_latency_seconds_count")
    found = {}
    for line in text.splitlines():
        if line.startswith(wanted):
            key, value = line.rsplit(" ", 1)
            found[key] = float(value)
    return found


def server_cpu_seconds(server: Any) -> float:
    """User plus system CPU seconds of every live process of the server's session so far."""
    total = 0.0
    for process in server.group():
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def engine_view(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """What the server counted over one run: tokens generated, and per front end the prompt tokens
    prefilled and the mean inter-token latency."""
    view: dict[str, Any] = {"generated_tokens": after["opt_generated_tokens_total"]
                            - before["opt_generated_tokens_total"]}
    for api in ("triton", "openai"):
        count_key = f'opt_inter_token_latency_seconds_count{{api="{api}"}}'
        sum_key = f'opt_inter_token_latency_seconds_sum{{api="{api}"}}'
        count = after.get(count_key, 0.0) - before.get(count_key, 0.0)
        prompt_key = f'opt_prompt_tokens_total{{api="{api}"}}'
        if after.get(prompt_key, 0.0) - before.get(prompt_key, 0.0):
            view[f"prompt_tokens_{api}"] = after[prompt_key] - before[prompt_key]
        if count:
            view[f"inter_token_latency_mean_ms_{api}"] = 1e3 * (after[sum_key] - before[sum_key]) / count
    return view


# ---------------------------------------------------------------------------------------------------
# The tools: their command lines and what their outputs say
# ---------------------------------------------------------------------------------------------------


def load_command(target: Target, mix: Mix, protocol: str, out: Path) -> list[str]:
    port = target.server.grpc_port if protocol == "grpc" else target.server.http_port
    return [sys.executable, str(ROOT / "benchmarks" / "load.py"), "--server-url", f"{protocol}://127.0.0.1:{port}",
            "--clients", str(mix.concurrency), "--duration", str(mix.duration),
            "--prompt-range", f"{mix.prompt_tokens},{mix.prompt_tokens}",
            "--output-range", f"{mix.output_tokens},{mix.output_tokens}", "--seed", str(mix.seed), "--json", str(out)]


def load_summary(out: Path, mix: Mix) -> dict[str, Any]:
    run = json.loads(out.read_text())["runs"]["server"]
    ttft, latency = run["ttft"] or {}, run["latency"] or {}
    return {"requests": run["requests"], "errors": sum(run["errors"].values()),
            "output_tokens": run["output_tokens"], "output_tokens_per_s": run["output_tokens_per_s"],
            "ttft_ms_p50": ms(ttft.get("p50")), "ttft_ms_p99": ms(ttft.get("p99")),
            "tpot_ms_p50": ms(run["tpot_p50"]), "tpot_ms_p99": None,
            "latency_s_p50": latency.get("p50"), "latency_s_p99": latency.get("p99")}


# Triton's own HTTP streaming endpoint for aiperf's template endpoint type: the body OPT_stream takes, and
# each server-sent event's field that carries the text.
TRITON_GENERATE_STREAM = "/v2/models/OPT_stream/generate_stream"
TRITON_TEMPLATE = {"payload_template": '{"input": {{ text|tojson }}, "output_length": {{ max_tokens }}, '
                                       '"ignore_eos": true}',
                   "response_field": "output"}


def aiperf_command(target: Target, mix: Mix, tokenizer: Path, artifacts: Path, front_end: str) -> list[str]:
    """aiperf against the OpenAI API's /v1/completions, or (front_end "triton") Triton's generate_stream."""
    if front_end == "openai":
        endpoint = ["--url", f"http://127.0.0.1:{target.server.openai_port}", "--endpoint-type", "completions",
                    "--extra-inputs", "ignore_eos:true", "--use-server-token-count"]
    else:
        endpoint = ["--url", f"http://127.0.0.1:{target.server.http_port}", "--endpoint-type", "template",
                    "--custom-endpoint", TRITON_GENERATE_STREAM, "--extra-inputs", json.dumps(TRITON_TEMPLATE)]
    return [str(PEERS / "aiperf" / "bin" / "aiperf"), "profile", "--model", target.model, *endpoint, "--streaming",
            "--tokenizer", str(tokenizer), "--isl", str(mix.prompt_tokens), "--isl-stddev", "0",
            "--osl", str(mix.output_tokens), "--osl-stddev", "0",
            "--concurrency", str(mix.concurrency), "--benchmark-duration", str(mix.duration),
            "--benchmark-grace-period", "300", "--random-seed", str(mix.seed),
            "--workers-max", "1", "--record-processors", "1", "--ui-type", "none", "--no-server-metrics",
            "--no-gpu-telemetry", "--artifact-dir", str(artifacts)]


def aiperf_summary(artifacts: Path, mix: Mix) -> dict[str, Any]:
    """The run from aiperf's per-request records, tokens counted as O each (ignore_eos; the server's counter
    checks it): over Triton aiperf can only re-tokenize the text, which random weights do not give back.
    aiperf's own headline numbers are kept beside (over the OpenAI API they use the server's `usage`)."""
    found = json.loads((artifacts / "profile_export_aiperf.json").read_text())
    records = [json.loads(line) for line in (artifacts / "profile_export.jsonl").read_text().splitlines() if line]
    done = [r["metrics"] for r in records
            if r["metadata"].get("benchmark_phase") == "profiling" and not r.get("error")
            and "request_latency" in r["metrics"]]
    latency = [m["request_latency"]["value"] / 1e3 for m in done]
    ttft = [m["time_to_first_token"]["value"] / 1e3 for m in done if "time_to_first_token" in m]
    tpot = [(m["request_latency"]["value"] - m["time_to_first_token"]["value"]) / (mix.output_tokens - 1)
            for m in done if "time_to_first_token" in m]
    duration = found["benchmark_duration"]["avg"]

    def pick(metric: str, stat: str = "avg") -> float | None:
        return (found.get(metric) or {}).get(stat)

    return {"requests": len(done), "errors": len(records) - len(done),
            "output_tokens": len(done) * mix.output_tokens,
            "output_tokens_per_s": len(done) * mix.output_tokens / duration,
            **percentiles("ttft_ms", [1e3 * t for t in ttft]), **percentiles("tpot_ms", tpot),
            **percentiles("latency_s", latency), "duration_s": duration,
            "aiperf_own": {"output_token_throughput": pick("output_token_throughput"),
                           "request_throughput": pick("request_throughput"),
                           "inter_token_latency_p50_ms": pick("inter_token_latency", "p50"),
                           "time_to_second_token_p50_ms": pick("time_to_second_token", "p50"),
                           "input_sequence_length": pick("input_sequence_length"),
                           "output_sequence_length": pick("output_sequence_length")}}


def percentiles(name: str, values: Sequence[float]) -> dict[str, float | None]:
    """p50 and p99, linear between ranks (numpy's default, as load.py)."""
    import numpy as np

    if not values:
        return {f"{name}_p50": None, f"{name}_p99": None}
    p50, p99 = np.percentile(np.asarray(values, dtype=np.float64), [50, 99])
    return {f"{name}_p50": float(p50), f"{name}_p99": float(p99)}


def aiperf_env() -> dict[str, str]:
    """Our environment less HF_HUB_OFFLINE: under it aiperf 0.13.0 looks a local tokenizer folder up as a
    hub repository id in the cache ("Repo id must be in the form 'repo_name'"); without it, it reads the
    folder and asks the hub nothing."""
    return {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}


def perf_analyzer_input(path: Path, builder: Any, mix: Mix) -> str:
    """perf_analyzer's --input-data: one request of a P-token prompt, output_length O, ignore_eos true."""
    import random

    prompt = builder.prompt(random.Random(mix.seed), mix.prompt_tokens)
    request = {"input": {"content": [prompt], "shape": [1]},
               "output_length": {"content": [mix.output_tokens], "shape": [1]},
               "ignore_eos": {"content": [True], "shape": [1]}}
    path.write_text(json.dumps({"data": [request]}, indent=1) + "\n")
    return prompt


def perf_analyzer_command(target: Target, mix: Mix, data: Path, csv: Path) -> list[str]:
    window_ms = int(mix.duration * 1000 / 3)
    return [str(PEERS / "triton" / "bin" / "perf_analyzer"), "-m", "OPT", "-i", "grpc",
            "-u", f"127.0.0.1:{target.server.grpc_port}", "-H", f"{TOKEN_METADATA}:{target.token}",
            "-b", "1", "--shape", "input:1", "--shape", "output_length:1", "--input-data", str(data),
            "--concurrency-range", str(mix.concurrency), "--measurement-interval", str(window_ms),
            "--stability-percentage", "999", "--max-trials", "3", "-f", str(csv)]


def perf_analyzer_env() -> dict[str, str]:
    """perf_analyzer links CUDA's runtime: the copy in the nvidia-cuda-runtime-cu12 wheel."""
    (lib,) = PEERS.glob("triton/lib/python3*/site-packages/nvidia/cuda_runtime/lib")
    return {**os.environ, "LD_LIBRARY_PATH": ":".join(filter(None, [str(lib), os.environ.get("LD_LIBRARY_PATH")]))}


def perf_analyzer_summary(csv: Path, stdout: Path, mix: Mix) -> dict[str, Any]:
    header, row = csv.read_text().splitlines()[:2]
    values = dict(zip(header.split(","), (float(v) for v in row.split(","))))
    text = stdout.read_text()
    count = re.search(r"Client:\s+Request count: (\d+)", text)
    average = re.search(r"Avg latency: (\d+) usec", text)
    per_s = values["Inferences/Second"]
    return {"requests": int(count.group(1)) if count else None, "errors": None,
            "output_tokens": int(count.group(1)) * mix.output_tokens if count else None,
            "output_tokens_per_s": per_s * mix.output_tokens, "ttft_ms_p50": None, "ttft_ms_p99": None,
            "tpot_ms_p50": values["p50 latency"] / 1e3 / mix.output_tokens,
            "tpot_ms_p99": values["p99 latency"] / 1e3 / mix.output_tokens,
            "latency_s_p50": values["p50 latency"] / 1e6, "latency_s_p99": values["p99 latency"] / 1e6,
            "latency_s_avg": int(average.group(1)) / 1e6 if average else None, "inferences_per_s": per_s}


def ms(value: float | None) -> float | None:
    return None if value is None else value * 1e3


def seconds(value_ms: float | None) -> float | None:
    return None if value_ms is None else value_ms / 1e3


# ---------------------------------------------------------------------------------------------------
# Running one measurement
# ---------------------------------------------------------------------------------------------------


def run_child(command: Sequence[str], log_path: Path, timeout: float, env: dict[str, str] | None = None) -> int:
    """Runs a client to its end in a session of its own, output to `log_path`; killed (group) past `timeout`."""
    with open(log_path, "w") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=env, start_new_session=True)
        try:
            return child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log(f"{command[0]} ran past {timeout:.0f} s: killed")
            os.killpg(child.pid, signal.SIGKILL)
            return child.wait()
        finally:
            with contextlib.suppress(ProcessLookupError):  # what it left in its session (aiperf's services)
                os.killpg(child.pid, signal.SIGKILL)


def measure(name: str, target: Target, command: list[str], log_path: Path, summarize: Callable[[], dict[str, Any]],
            args: argparse.Namespace, env: dict[str, str] | None = None) -> dict[str, Any]:
    """One tool's run against `target` on a quiet machine: its numbers, the server's view, the CPU spent."""
    with quiet_machine(args.lock, args.quiet_wait, args.busy_limit) as quiet:
        log(f"{target.name} / {name}: load average {quiet['loadavg_before']}, busy {quiet['busy_percent_before']} %")
        counters, server_cpu = server_counters(target.metrics_url), server_cpu_seconds(target.server)
        children, (busy, _) = resource.getrusage(resource.RUSAGE_CHILDREN), cpu_ticks()
        begin = time.perf_counter()
        rc = run_child(command, log_path, timeout=args.duration * 4 + 600, env=env)
        wall = time.perf_counter() - begin
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        view = engine_view(counters, server_counters(target.metrics_url))
        used = {"client_cpu_s": round(after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime, 1),
                "server_cpu_s": round(server_cpu_seconds(target.server) - server_cpu, 1), "wall_s": round(wall, 1),
                "machine_cpu_s": round((cpu_ticks()[0] - busy) / os.sysconf("SC_CLK_TCK"), 1)}
    result = {"server": target.name, "tool": name, "exit_status": rc, "command": redact(command, target.token),
              **quiet, "loadavg_after": os.getloadavg(), "pytest_running_after": foreign_pytests(), **used,
              "server_view": view}
    if rc == 0:
        try:
            result.update(summarize())
        except (OSError, KeyError, ValueError) as error:  # an output not as expected: keep the other runs
            result["summary_error"] = repr(error)
            log(f"{name}: cannot read its output: {error!r}")
    else:
        log(f"{name} failed with exit status {rc}:\n{tail(log_path)}")
    log(f"{target.name} / {name}: {json.dumps({k: result.get(k) for k in SHOWN})}")
    return result


def redact(command: Sequence[str], token: str) -> list[str]:
    return [part.replace(token, "<token>") for part in command]


def tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


SHOWN = ("output_tokens_per_s", "ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50", "latency_s_p50", "latency_s_p99",
         "loadavg_before", "server_view")


def runs_against(target: Target, args: argparse.Namespace, mix: Mix, prepared: dict[str, Path]) -> list[dict]:
    """The tools chosen for this server, one after the other."""
    out = args.raw / target.name
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for tool in (t for t in RUNS_ON[target.name] if t in args.tools):
        if tool.startswith("load_"):
            protocol = tool.split("_")[1]
            path = out / f"{tool}.json"
            command, summarize = load_command(target, mix, protocol, path), lambda p=path: load_summary(p, mix)
            results.append(measure(tool, target, command, out / f"{tool}.log", summarize, args))
        elif tool.startswith("aiperf_"):
            artifacts = args.work / target.name / tool
            command = aiperf_command(target, mix, prepared["tokenizer"], artifacts, tool.split("_")[1])
            results.append(measure(tool, target, command, out / f"{tool}.log",
                                   lambda a=artifacts: aiperf_summary(a, mix), args, env=aiperf_env()))
            keep(artifacts / "profile_export_aiperf.json", out / f"{tool}_profile_export_aiperf.json")
        else:
            csv = out / "perf_analyzer.csv"
            command = perf_analyzer_command(target, mix, prepared["perf_analyzer_input"], csv)
            results.append(measure(tool, target, command, out / "perf_analyzer.txt",
                                   lambda: perf_analyzer_summary(csv, out / "perf_analyzer.txt", mix), args,
                                   env=perf_analyzer_env()))
    return results


def keep(source: Path, destination: Path) -> None:
    if source.exists():
        shutil.copyfile(source, destination)


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------


def subset(choices: Sequence[str], keep_order: bool = False) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated subset of `choices`, in their order or (keep_order) as given."""

    def parse(text: str) -> list[str]:
        names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
        if not names or set(names) - set(choices):
            raise argparse.ArgumentTypeError(f"a comma-separated subset of {','.join(choices)}, got {text!r}")
        return names if keep_order else [n for n in choices if n in names]

    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True,
                        help="the summary; the tools' own outputs go to the folder beside it of the same stem")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight (closed-loop clients)")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="every prompt's tokens, BOS included")
    parser.add_argument("--output-tokens", type=int, default=64, help="every request's generated tokens")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of sending, per tool")
    parser.add_argument("--seed", type=int, default=0, help="seed of load.py's and aiperf's prompts")
    parser.add_argument("--servers", type=subset(SERVERS, keep_order=True), default=list(SERVERS), metavar="NAMES",
                        help=f"which of {','.join(SERVERS)} to start, in the order given (default: both, so)")
    parser.add_argument("--tools", type=subset(TOOLS), default=list(TOOLS), metavar="NAMES",
                        help=f"which of {','.join(TOOLS)} to run (aiperf_openai and perf_analyzer on openai-on only)")
    parser.add_argument("--model-name", default="random/125M", help="the servers' --model-name")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "opt-jax",
                        help="the servers' --cache-dir (compiled programs)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "opt-ecosystem",
                        help="scratch: server logs, the tokenizer folder, aiperf's full artifacts")
    parser.add_argument("--lock", type=Path, default=Path("/tmp/bench.lock"),
                        help="touched during each measurement, so that others know a benchmark runs")
    parser.add_argument("--quiet-wait", type=float, default=600.0,
                        help="seconds to wait for a quiet machine before a run (then it runs anyway, marked)")
    parser.add_argument("--busy-limit", type=float, default=25.0,
                        help="a quiet machine's most CPU use, percent of all cores, over 3 s")
    args = parser.parse_args(argv)
    args.raw = args.json.with_suffix("")
    return args


def log(message: str) -> None:
    print(f"[ecosystem {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def versions() -> dict[str, str | None]:
    """The peers' versions, from their own venvs; ours from this one."""
    found = {}
    for venv, package in (("aiperf", "aiperf"), ("triton", "tritonclient"), ("triton", "nvidia-cuda-runtime-cu12")):
        python = PEERS / venv / "bin" / "python"
        if not python.exists():
            found[package] = None
            continue
        query = f"import importlib.metadata as m; print(m.version({package!r}))"
        done = subprocess.run([str(python), "-c", query], capture_output=True, text=True)
        found[package] = done.stdout.strip() or None
    for package in ("jax", "nvidia-pytriton", "transformers"):
        found[package] = importlib.metadata.version(package)
    return found


def prepare(args: argparse.Namespace, mix: Mix) -> dict[str, Path]:
    """The tokenizer folder aiperf counts with, and perf_analyzer's request."""
    from load import log as load_log, prepare_prompts
    from vllm_peer import make_tokenizer

    _, _, builder = prepare_prompts(args.model_name, str(args.cache_dir), 1, load_log)
    args.work.mkdir(parents=True, exist_ok=True)
    args.raw.mkdir(parents=True, exist_ok=True)
    tokenizer = args.work / "opt-tokenizer"
    make_tokenizer(tokenizer)
    data = args.raw / "perf_analyzer_input.json"
    perf_analyzer_input(data, builder, mix)
    return {"tokenizer": tokenizer, "perf_analyzer_input": data}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))  # so the servers stop too
    mix = Mix(args.concurrency, args.prompt_tokens, args.output_tokens, args.duration, args.seed)
    report: dict[str, Any] = {"benchmark": "ecosystem", "argv": sys.argv, "machine": machine_info(),
                              "versions": versions(), "mix": dataclasses.asdict(mix), "runs": []}
    prepared = prepare(args, mix)
    extra = {"openai-off": ("--openai-port", "0"), "openai-on": ()}
    for name in args.servers:
        with serving(name, args.work, args.cache_dir, args.model_name, *extra[name]) as target:
            report["runs"] += runs_against(target, args, mix, prepared)
        keep(target.server.log_path, args.raw / name / "server.log")
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(report["runs"]))
    return 0 if all(run["exit_status"] == 0 for run in report["runs"]) else 1


def markdown(runs: Sequence[dict[str, Any]]) -> str:
    def cell(value: Any, digits: int = 1) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    lines = ["| server | tool | output tokens/s | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | latency p50 / p99 (s) "
             "| server ITL (ms) | load avg before |", "|" + " --- |" * 8]
    for r in runs:
        itl = r["server_view"].get("inter_token_latency_mean_ms_openai" if r["tool"] == "aiperf_openai"
                                   else "inter_token_latency_mean_ms_triton")
        lines.append(f"| {r['server']} | {r['tool']} | {cell(r.get('output_tokens_per_s'))} | "
                     f"{cell(r.get('ttft_ms_p50'), 0)} / {cell(r.get('ttft_ms_p99'), 0)} | "
                     f"{cell(r.get('tpot_ms_p50'))} / {cell(r.get('tpot_ms_p99'))} | "
                     f"{cell(r.get('latency_s_p50'), 2)} / {cell(r.get('latency_s_p99'), 2)} | {cell(itl)} | "
                     f"{' '.join(f'{v:.2f}' for v in r['loadavg_before'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
