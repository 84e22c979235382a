"""The generation metrics (Prometheus text format on a port of their own): what the engine reports.

Two families. The `opt_*` metrics of the first releases count every row whatever its front end. Beside
them, the metrics that inference gateways and dashboards read from vLLM, under our prefix and labelled
by `api` ("triton": the models `OPT` and `OPT_stream`; "openai": the OpenAI-compatible API), with the
vLLM metric each stands for in VLLM_EQUIVALENTS (the README's table is written from it).
"""
from __future__ import annotations

from typing import Mapping

from engine import Ended

APIS = ("triton", "openai")

# Ours -> vLLM's (V1 engine names). A gateway that routes on vLLM's gauges takes ours by these names.
VLLM_EQUIVALENTS = {
    "opt_num_requests_running": "vllm:num_requests_running",
    "opt_num_requests_waiting": "vllm:num_requests_waiting",
    "opt_kv_cache_usage_perc": "vllm:kv_cache_usage_perc",
    "opt_prompt_tokens_total": "vllm:prompt_tokens_total",
    "opt_generation_tokens_total": "vllm:generation_tokens_total",
    "opt_request_success_total": "vllm:request_success_total",
    "opt_e2e_request_latency_seconds": "vllm:e2e_request_latency_seconds",
    "opt_inter_token_latency_seconds": "vllm:inter_token_latency_seconds",
    "opt_time_to_first_token_seconds": "vllm:time_to_first_token_seconds",
}

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
REQUEST_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)


class PrometheusMetrics:
    """The generation metrics, in their own registry, served in Prometheus text format on their own port.

    Called from the engine's thread (tokens, ends, load) and the front ends' (refusals): each call is a
    few counter or histogram updates on children made here once, so a step pays no label lookups.
    """

    def __init__(self, slots: int, apis: tuple[str, ...] = APIS):
        import prometheus_client as prom

        self.registry = registry = prom.CollectorRegistry()
        self._slots = slots
        self._ttft = prom.Histogram("opt_time_to_first_token_seconds", "Time from a request's arrival to its first "
                                    "generated token", buckets=LATENCY_BUCKETS, registry=registry)
        self._tpot = prom.Histogram("opt_time_per_output_token_seconds", "Mean time between a request's generated "
                                    "tokens after the first", buckets=PER_TOKEN_BUCKETS, registry=registry)
        self._tokens = prom.Counter("opt_generated_tokens", "Tokens generated", registry=registry)
        self._requests = prom.Counter("opt_requests", "Rows finished, by outcome", ["outcome"], registry=registry)
        self._waiting = prom.Gauge("opt_queue_length", "Rows waiting for a decode slot", registry=registry)
        self._busy = prom.Gauge("opt_busy_slots", "Decode slots holding a row", registry=registry)
        self._refused = prom.Counter("opt_refused_rows", "Rows refused at once, by reason", ["reason"],
                                     registry=registry)
        prom.Gauge("opt_decode_slots", "Decode slots in all", registry=registry).set(slots)
        self._usage = prom.Gauge("opt_kv_cache_usage_perc", "Fraction of the KV cache in use (0 to 1): each decode "
                                 "slot holds its own cache of the model's positions", registry=registry)
        families = _labelled_families(prom, registry)
        self._per_api = {api: _ApiMetrics(families, api) for api in apis}

    def serve(self, port: int, address: str) -> None:
        import prometheus_client as prom

        try:
            prom.start_http_server(port, addr=address, registry=self.registry)
        except OSError as error:
            raise SystemExit(f"--generation-metrics-port {port} on {address}: {error.strerror}") from None

    def first_token(self, api: str, seconds: float) -> None:
        self._ttft.observe(seconds)

    def token(self, api: str, gap: float | None) -> None:
        self._tokens.inc()
        self._per_api[api].token(gap)

    def finished(self, ended: Ended) -> None:
        self._requests.labels(ended.outcome).inc()
        if ended.seconds_per_token is not None:
            self._tpot.observe(ended.seconds_per_token)
        if ended.outcome == "ok":
            self._per_api[ended.api].succeeded(ended)

    def admitted(self, api: str, prompt_tokens: int) -> None:
        self._per_api[api].prompt_tokens.inc(prompt_tokens)

    def load(self, waiting: Mapping[str, int], running: Mapping[str, int]) -> None:
        busy = sum(running.values())
        self._waiting.set(sum(waiting.values()))
        self._busy.set(busy)
        self._usage.set(busy / self._slots)
        for api, metrics in self._per_api.items():
            metrics.waiting.set(waiting.get(api, 0))
            metrics.running.set(running.get(api, 0))

    def refused(self, api: str, rows: int, reason: str) -> None:
        self._refused.labels(reason).inc(rows)


def _labelled_families(prom, registry) -> dict:
    """The metric families labelled by front end (`api`), whose children _ApiMetrics holds."""
    def labelled(kind, name: str, doc: str, labels: tuple[str, ...] = (), **kwargs):
        return kind(name, doc, ["api", *labels], registry=registry, **kwargs)

    return {
        "running": labelled(prom.Gauge, "opt_num_requests_running", "Rows in a decode slot, by front end"),
        "waiting": labelled(prom.Gauge, "opt_num_requests_waiting", "Rows waiting for a decode slot, by front end"),
        "prompt": labelled(prom.Counter, "opt_prompt_tokens", "Prompt tokens prefilled, by front end"),
        "generation": labelled(prom.Counter, "opt_generation_tokens", "Tokens generated, by front end"),
        "success": labelled(prom.Counter, "opt_request_success", "Rows finished whole, by front end and why they "
                            "ended: stop (EOS) or length", ("finished_reason",)),
        "latency": labelled(prom.Histogram, "opt_e2e_request_latency_seconds", "Time from a row's arrival to its "
                            "last token, rows finished whole, by front end", buckets=REQUEST_BUCKETS),
        "inter_token": labelled(prom.Histogram, "opt_inter_token_latency_seconds", "Time between a row's "
                                "consecutive generated tokens, by front end", buckets=PER_TOKEN_BUCKETS),
    }


class _ApiMetrics:
    """One front end's children of the labelled families."""

    def __init__(self, families: dict, api: str):
        self.running = families["running"].labels(api)
        self.waiting = families["waiting"].labels(api)
        self.prompt_tokens = families["prompt"].labels(api)
        self.generation_tokens = families["generation"].labels(api)
        self.latency = families["latency"].labels(api)
        self.inter_token = families["inter_token"].labels(api)
        self.success = {reason: families["success"].labels(api, reason) for reason in ("stop", "length")}

    def token(self, gap: float | None) -> None:
        self.generation_tokens.inc()
        if gap is not None:
            self.inter_token.observe(gap)

    def succeeded(self, ended: Ended) -> None:
        self.latency.observe(ended.seconds)
        self.success[ended.reason].inc()
