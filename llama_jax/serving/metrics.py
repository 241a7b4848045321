"""Prometheus metrics of the server (`GET /metrics`), in a registry of their own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        p = "llama_jax_"
        self.running = Gauge(p + "requests_running", "Sequences in the running batch", registry=r)
        self.waiting = Gauge(p + "requests_waiting", "Sequences waiting for a slot or pages", registry=r)
        self.pages_used = Gauge(p + "kv_pages_used", "KV cache pages referenced by sequences", registry=r)
        self.pages_cached = Gauge(p + "kv_pages_cached", "Unreferenced KV pages kept for the prefix cache", registry=r)
        self.pages_total = Gauge(p + "kv_pages_total", "KV cache pages (the null page excluded)", registry=r)
        self.hit_rate = Gauge(p + "prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / looked up",
                              registry=r)  # fmt: skip
        self.prefix_queries = Counter(p + "prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      registry=r)  # fmt: skip
        self.prefix_hits = Counter(p + "prefix_cache_hits", "Prompt tokens found in the prefix cache", registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens of admitted sequences", registry=r)
        self.prefill_tokens = Counter(p + "prefill_tokens", "Prompt tokens computed (not found in the cache)",
                                      registry=r)  # fmt: skip
        self.generation_tokens = Counter(p + "generation_tokens", "Tokens generated", registry=r)
        self.finished = Counter(p + "requests_finished", "Sequences finished", ["reason"], registry=r)
        self.steps = Counter(p + "engine_steps", "Engine steps run", registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Time from arrival to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.itl = Histogram(p + "inter_token_latency_seconds", "Time between a sequence's tokens",
                             buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip

    def pages(self, stats: dict[str, int]) -> None:
        self.pages_used.set(stats["pages_in_use"])
        self.pages_cached.set(stats["pages_cached"])
        self.pages_total.set(stats["pages_total"])
        queried = stats["prefix_queried_tokens"]
        self.hit_rate.set(stats["prefix_hit_tokens"] / queried if queried else 0.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
