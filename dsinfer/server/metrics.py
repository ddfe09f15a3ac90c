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
        yield from prefix_cache_metrics(s)
        yield from spec_decode_metrics(s)
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


def prefix_cache_metrics(s):
    """Prefix-cache lookups in blocks by tier (memory; disk when prefix_cache_dir is set) and the disk tier's state."""
    tiers = [("memory", s.memory_hit_blocks, s.memory_miss_blocks)]
    if s.disk_enabled:
        tiers.append(("disk", s.disk_hit_blocks, s.disk_miss_blocks))
    hits = CounterMetricFamily("dsinfer_prefix_cache_hit_blocks", "full prompt blocks found cached", labels=["tier"])
    misses = CounterMetricFamily("dsinfer_prefix_cache_miss_blocks", "full prompt blocks looked up and not found",
                                 labels=["tier"])
    for tier, hit, miss in tiers:
        hits.add_metric([tier], hit)
        misses.add_metric([tier], miss)
    yield from (hits, misses)
    if s.disk_enabled:
        yield from disk_tier_metrics(s)


def spec_decode_metrics(s):
    """Speculative decoding's drafts and acceptance by draft position (1 = the first drafted token); none without."""
    if not s.spec_draft_tokens:
        return
    drafted = CounterMetricFamily("dsinfer_spec_decode_draft_tokens", "drafted tokens verified", labels=["position"])
    accepted = CounterMetricFamily("dsinfer_spec_decode_accepted_tokens", "drafted tokens accepted",
                                   labels=["position"])
    rate = GaugeMetricFamily("dsinfer_spec_decode_acceptance_rate", "accepted / drafted", labels=["position"])
    for i, (d, a, r) in enumerate(zip(s.spec_draft_tokens, s.spec_accepted_tokens, s.spec_acceptance_rate), 1):
        drafted.add_metric([str(i)], d)
        accepted.add_metric([str(i)], a)
        rate.add_metric([str(i)], r)
    yield from (drafted, accepted, rate)
    yield CounterMetricFamily("dsinfer_spec_decode_verify_steps", "steps that verified drafts, per sequence",
                              value=s.spec_verify_steps)
    yield GaugeMetricFamily("dsinfer_spec_decode_mean_accepted_length",
                            "tokens emitted per verify step (accepted drafts + 1)", value=s.spec_mean_accepted_length)


def disk_tier_metrics(s):
    for name, value, doc in [("blocks", s.disk_blocks, "block files in the disk tier"),
                             ("bytes", s.disk_bytes, "bytes of block files in the disk tier"),
                             ("store_seconds_mean", s.disk_store_seconds_mean, "mean time to write a block file"),
                             ("load_seconds_mean", s.disk_load_seconds_mean, "mean time to load a block")]:
        yield GaugeMetricFamily(f"dsinfer_prefix_cache_disk_{name}", doc, value=value)
    for name, value, doc in [("stored_blocks", s.disk_stored_blocks, "blocks written to disk"),
                             ("dropped_blocks", s.disk_dropped_blocks, "evicted blocks not written (writer behind)"),
                             ("discarded_blocks", s.disk_discarded_blocks, "bad block files deleted"),
                             ("evicted_blocks", s.disk_evicted_blocks, "block files deleted to stay under the limit")]:
        yield CounterMetricFamily(f"dsinfer_prefix_cache_disk_{name}", doc, value=value)


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
        self.e2e = Histogram("dsinfer_e2e_request_latency_seconds", "request start to its last token",
                             buckets=(.05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120), registry=self.registry)
        self.queue = Histogram("dsinfer_request_queue_time_seconds", "arrival to first scheduled, per request",
                               buckets=(.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30),
                               registry=self.registry)
        self.prompt_tokens = Counter("dsinfer_prompt_tokens", "prompt tokens of the requests served",
                                     registry=self.registry)
        self.finished = Counter("dsinfer_request_success", "choices finished, by reason", ["finished_reason"],
                                registry=self.registry)
        self.registry.register(EngineCollector(async_llm, cache, semantic))

    def count(self, path: str, status: int):
        self.requests.labels(path if path in ROUTES else "other", str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
