"""Prometheus metrics of one server: the engine's load read at scrape time, request latencies as they end.

Each app has its own registry, so that several servers (tests) in one process do not collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from clex_serve.engine.outputs import RequestMetrics

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0, 120.0)


class _EngineCollector:
    def __init__(self, engine) -> None:
        self.engine = engine

    def collect(self):
        stats = self.engine.stats()
        yield GaugeMetricFamily("clex_serve_requests_running", "Sequences holding KV blocks", stats.num_running)
        yield GaugeMetricFamily("clex_serve_requests_waiting", "Sequences waiting for admission", stats.num_waiting)
        yield GaugeMetricFamily("clex_serve_kv_blocks_used", "KV cache blocks in use", stats.num_used_kv_blocks)
        yield GaugeMetricFamily("clex_serve_kv_blocks_total", "KV cache blocks", stats.num_kv_blocks)
        yield GaugeMetricFamily("clex_serve_kv_cache_usage", "Fraction of KV blocks in use", stats.kv_cache_usage)
        yield CounterMetricFamily("clex_serve_preemptions", "Sequences preempted", stats.num_preemptions)
        yield CounterMetricFamily(
            "clex_serve_prefix_cache_hit_tokens",
            "Prompt tokens served from the prefix cache",
            stats.prefix_cache_hit_tokens,
        )
        yield CounterMetricFamily(
            "clex_serve_prefix_cache_hit_blocks",
            "KV blocks reused from the prefix cache",
            stats.prefix_cache_hit_blocks,
        )
        yield CounterMetricFamily(
            "clex_serve_prefix_cache_queried_tokens",
            "Prompt tokens looked up in the prefix cache",
            stats.prefix_cache_queried_tokens,
        )
        yield GaugeMetricFamily(
            "clex_serve_prefix_cache_hit_rate",
            "Prompt tokens served from the prefix cache, of those looked up",
            stats.prefix_cache_hit_rate,
        )
        yield CounterMetricFamily(
            "clex_serve_spec_decode_num_draft_tokens", "Tokens drafted and verified", stats.spec_drafted_tokens
        )
        yield CounterMetricFamily(
            "clex_serve_spec_decode_num_accepted_tokens", "Drafted tokens accepted", stats.spec_accepted_tokens
        )
        yield CounterMetricFamily(
            "clex_serve_spec_decode_num_drafts",
            "Verifications: one sequence's drafts in one step",
            stats.spec_verifications,
        )
        yield GaugeMetricFamily(
            "clex_serve_spec_decode_acceptance_rate",
            "Drafted tokens accepted, of those drafted",
            stats.spec_acceptance_rate,
        )
        yield GaugeMetricFamily(
            "clex_serve_spec_decode_mean_accepted_length",
            "Tokens a verification yields on average (accepted drafts and one more)",
            stats.spec_mean_accepted_length,
        )


class ServerMetrics:
    def __init__(self, engine) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine))
        self.time_to_first_token = Histogram(
            "clex_serve_time_to_first_token_seconds",
            "Time to first token",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            "clex_serve_inter_token_latency_seconds",
            "Time between tokens",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.e2e_latency = Histogram(
            "clex_serve_e2e_request_latency_seconds",
            "Request latency, end to end",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter("clex_serve_prompt_tokens", "Prompt tokens", registry=self.registry)
        self.generation_tokens = Counter("clex_serve_generation_tokens", "Generated tokens", registry=self.registry)
        self.requests = Counter(
            "clex_serve_requests", "Requests that ended, by outcome", ["outcome"], registry=self.registry
        )

    def observe_tokens(self, metrics: RequestMetrics | None) -> None:
        """Called with every output's metrics: inter-token times arrive with the output that carries them."""
        if metrics is not None:
            for gap in metrics.inter_token_times:
                self.inter_token_latency.observe(gap)

    def request_ended(
        self, outcome: str, metrics: RequestMetrics | None = None, prompt_tokens: int = 0, generated_tokens: int = 0
    ) -> None:
        """``outcome``: finished, aborted, refused (429), invalid (4xx), failed."""
        self.requests.labels(outcome).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generated_tokens)
        if metrics is not None:
            if metrics.time_to_first_token is not None:
                self.time_to_first_token.observe(metrics.time_to_first_token)
            end = metrics.finished_time or metrics.last_token_time
            if end is not None:
                self.e2e_latency.observe(end - metrics.arrival_time)
