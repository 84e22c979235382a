"""The generation-metrics exporter on its own: what a step's reports become in Prometheus text, and the
README's table of our names against vLLM's."""
from __future__ import annotations

import re
from pathlib import Path

import prometheus_client

from engine import Ended
from metrics import APIS, VLLM_EQUIVALENTS, PrometheusMetrics

ROOT = Path(__file__).resolve().parent.parent


def samples(metrics: PrometheusMetrics) -> dict[str, float]:
    """Sample name (labels included) -> value, from the exporter's text."""
    text = prometheus_client.generate_latest(metrics.registry).decode()
    return {m[1]: float(m[2]) for m in re.finditer(r"^([^#\s]\S*) (\S+)$", text, re.MULTILINE)}


def test_load_sets_the_gauges_per_front_end_and_the_kv_cache_usage_as_a_fraction() -> None:
    metrics = PrometheusMetrics(slots=8)
    metrics.load({"openai": 3}, {"triton": 2, "openai": 4})
    got = samples(metrics)
    assert got['opt_num_requests_waiting{api="openai"}'] == 3 and got['opt_num_requests_waiting{api="triton"}'] == 0
    assert got['opt_num_requests_running{api="openai"}'] == 4 and got['opt_num_requests_running{api="triton"}'] == 2
    assert (got["opt_kv_cache_usage_perc"], got["opt_busy_slots"], got["opt_queue_length"]) == (0.75, 6, 3)


def test_a_rows_tokens_and_end_are_counted_under_its_front_end_only() -> None:
    metrics = PrometheusMetrics(slots=2)
    metrics.admitted("openai", 9)
    for gap in (None, 0.02, 0.03):
        metrics.token("openai", gap)
    metrics.finished(Ended("openai", "ok", 3, 0.4, 0.025, "stop"))
    metrics.finished(Ended("triton", "timeout", 1, 2.0))  # not whole: counted by outcome only
    got = samples(metrics)
    assert got['opt_prompt_tokens_total{api="openai"}'] == 9 and got['opt_prompt_tokens_total{api="triton"}'] == 0
    assert got['opt_generation_tokens_total{api="openai"}'] == 3 and got["opt_generated_tokens_total"] == 3
    assert got['opt_inter_token_latency_seconds_count{api="openai"}'] == 2
    assert got['opt_inter_token_latency_seconds_sum{api="openai"}'] == 0.05
    assert got['opt_request_success_total{api="openai",finished_reason="stop"}'] == 1
    assert got['opt_request_success_total{api="triton",finished_reason="length"}'] == 0
    assert got['opt_e2e_request_latency_seconds_count{api="openai"}'] == 1
    assert got['opt_e2e_request_latency_seconds_count{api="triton"}'] == 0
    assert got['opt_requests_total{outcome="timeout"}'] == 1 and got['opt_requests_total{outcome="ok"}'] == 1


def test_every_vllm_equivalent_is_exported_and_in_the_readmes_table() -> None:
    got = samples(PrometheusMetrics(slots=1))
    readme = (ROOT / "README.md").read_text()
    for ours, theirs in VLLM_EQUIVALENTS.items():
        assert any(name.startswith(ours) for name in got), ours
        assert re.search(rf"`{re.escape(ours)}[^`]*` .*`{re.escape(theirs)}`", readme), (ours, theirs)
    assert APIS == ("triton", "openai")
