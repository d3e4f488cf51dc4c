"""Prometheus metrics of one gateway (a registry of its own, so that apps do not share counts)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("lorastack_requests_total", "Requests answered, by route, "
                                "model and HTTP status.", ["route", "model", "status"],
                                registry=r)
        self.latency = Histogram("lorastack_request_seconds", "Time to the start of the "
                                 "response (the whole answer when not streamed), by route.",
                                 ["route"], registry=r,
                                 buckets=(.05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120))
        self.tokens = Counter("lorastack_tokens_total", "Tokens processed, by model and kind "
                              "(prompt or completion).", ["model", "kind"], registry=r)
        self.adapter_requests = Counter("lorastack_adapter_requests_total",
                                        "Requests per adapter (classify counts each member).",
                                        ["adapter"], registry=r)
        self.adapter_events = Counter("lorastack_adapter_events_total", "Adapter loads, "
                                      "unloads and evictions in vLLM.", ["event"], registry=r)
        self.adapters_served = Gauge("lorastack_adapters_served", "Adapters currently served.",
                                     registry=r)
        self.vllm_up = Gauge("lorastack_vllm_up", "1 when the vLLM engine answers health checks.",
                             ["engine"], registry=r)
        self.vllm_restarts = Counter("lorastack_vllm_restarts_total", "vLLM child restarts.",
                                     registry=r)
        self.engine_deaths = Counter("lorastack_engine_deaths_total", "vLLM engine deaths seen "
                                     "by requests in flight (serve/crashes.py).", registry=r)

    def adapter_event(self, event: str) -> None:
        self.adapter_events.labels(event).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
