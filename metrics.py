"""The generation metrics (Prometheus text format on a port of their own): what the engine reports."""
from __future__ import annotations

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
