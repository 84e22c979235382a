"""The benchmark script runs end to end (on the tiny model, through a real server and a two-process group)."""
from __future__ import annotations

import json
import subprocess
import sys

from serving import ROOT


def test_benchmark_reports_generation_alone_through_the_server_and_through_a_two_process_group():
    command = [sys.executable, str(ROOT / "benchmarks" / "benchmark.py"), "--model-name", "random/tiny",
               "--dtype", "float32", "--batch-size", "2", "--prompt-length", "8", "--output-length", "6",
               "--repeats", "1", "--number-of-nodes", "2", "--number-of-gpus", "1", "--decode-slots", "2",
               "--transformers", "--json"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    alone, server, group = report["alone"], report["server"], report["group"]
    assert alone["tokens"] == 2 * 6  # every row ignores EOS: exactly its output length
    assert alone["tokens_per_s"] > 0 and 0 < alone["ttft_s"] <= alone["latency_s"]
    assert server["latency_s"] > 0 and server["tokens_per_s"] > 0
    assert (server["processes"], server["devices_per_process"]) == (1, 2)
    assert (group["processes"], group["devices_per_process"]) == (2, 1)
    assert group["latency_s"] > 0 and group["tokens_per_s"] > 0
    assert report["transformers"]["tokens_per_s"] > 0 and report["transformers"]["latency_s"] > 0
    assert report["decode_slots"] == 2 and report["cpu"]
