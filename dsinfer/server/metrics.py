"""Prometheus metrics: request counts by status, latency histograms, and engine state read at scrape time."""
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

ROUTES = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/ws", "/health", "/metrics"}


class EngineCollector:
    def __init__(self, async_llm, cache, semantic=None):
        self.llm, self.cache, self.semantic = async_llm, cache, semantic

    def collect(self):
        s = self.llm.stats()
        for name, value, doc in [("running_requests", s.running, "sequences running"),
                                 ("waiting_requests", s.waiting, "sequences waiting"),
                                 ("kv_blocks_used", s.kv_blocks_used, "latent cache blocks in use"),
                                 ("kv_blocks_total", s.kv_blocks_total, "latent cache blocks in all"),
                                 ("kv_cache_usage", s.kv_blocks_used / max(1, s.kv_blocks_total), "share in use"),
                                 ("prefix_cache_hit_rate", s.prefix_cache_hit_rate, "prompt tokens found cached")]:
            yield GaugeMetricFamily(f"dsinfer_{name}", doc, value=value)
        yield CounterMetricFamily("dsinfer_preemptions", "sequences preempted", value=s.num_preemptions)
        yield CounterMetricFamily("dsinfer_generated_tokens", "tokens generated", value=s.generated_tokens)
        experts = CounterMetricFamily("dsinfer_expert_tokens", "tokens routed to each expert",
                                      labels=["layer", "expert"])
        for layer, counts in s.expert_counts.items():
            for e, c in enumerate(counts):
                experts.add_metric([str(layer), str(e)], c)
        yield experts
        yield CounterMetricFamily("dsinfer_response_cache_hits", "response cache hits", value=self.cache.hits)
        yield CounterMetricFamily("dsinfer_response_cache_misses", "response cache misses", value=self.cache.misses)
        if self.semantic:
            yield CounterMetricFamily("dsinfer_semantic_cache_hits", "semantic cache hits", value=self.semantic.hits)
            yield CounterMetricFamily("dsinfer_semantic_cache_misses", "semantic cache misses",
                                      value=self.semantic.misses)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, async_llm, cache, semantic=None):
        self.registry = CollectorRegistry()
        self.requests = Counter("dsinfer_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.ttft = Histogram("dsinfer_time_to_first_token_seconds", "request start to first token",
                              buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30), registry=self.registry)
        self.tpot = Histogram("dsinfer_time_per_output_token_seconds", "mean gap between output tokens",
                              buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1), registry=self.registry)
        self.registry.register(EngineCollector(async_llm, cache, semantic))

    def count(self, path: str, status: int):
        self.requests.labels(path if path in ROUTES else "other", str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
