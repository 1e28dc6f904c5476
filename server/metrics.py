"""Prometheus metrics. Where llama.cpp's llama-server has a metric with the same meaning, its
``llamacpp:*`` name is reused (with a ``model`` label) so existing dashboards work; the rest are
``codeserve_*``. One registry per app, so two servers in one process never collide.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from server.engine.base import Finished

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.prompt_tokens = Counter(
            "llamacpp:prompt_tokens",
            "Number of prompt tokens processed, excluding cached tokens",
            ["model"],
            registry=r,
        )
        self.prompt_tokens_cached = Counter(
            "llamacpp:prompt_tokens_cached",
            "Number of prompt tokens reused from the cache",
            ["model"],
            registry=r,
        )
        self.prompt_seconds = Counter(
            "llamacpp:prompt_seconds", "Total time spent processing prompts", ["model"], registry=r
        )
        self.tokens_predicted = Counter(
            "llamacpp:tokens_predicted",
            "Number of generation tokens processed",
            ["model"],
            registry=r,
        )
        self.tokens_predicted_seconds = Counter(
            "llamacpp:tokens_predicted_seconds",
            "Total time spent generating tokens",
            ["model"],
            registry=r,
        )
        self.spec_drafted = Counter(
            "llamacpp:spec_decode_num_draft_tokens",
            "Speculative: Total draft tokens generated",
            ["model"],
            registry=r,
        )
        self.spec_accepted = Counter(
            "llamacpp:spec_decode_num_accepted_tokens",
            "Speculative: Total draft tokens accepted by the target model",
            ["model"],
            registry=r,
        )
        self.target_passes = Counter(
            "codeserve_decode_target_passes",
            "Target-model forward passes while decoding (tokens predicted / passes = tokens per "
            "pass)",
            ["model"],
            registry=r,
        )
        self.requests = Counter(
            "codeserve_requests",
            "HTTP requests by endpoint, model and status code",
            ["endpoint", "model", "status"],
            registry=r,
        )
        self.ttft = Histogram(
            "codeserve_time_to_first_token_seconds",
            "Request arrival (queueing included) to its first generated text",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "codeserve_inter_token_latency_seconds",
            "Time between consecutive streamed tokens",
            ["model"],
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.loads = Counter(
            "codeserve_model_loads",
            "Times a model was loaded into memory",
            ["model"],
            registry=r,
        )
        self.unloads = Counter(
            "codeserve_model_unloads",
            "Times a model was unloaded, by reason: idle (keep_alive ran out), memory (room for "
            "another model), request (unload asked for), shutdown",
            ["model", "reason"],
            registry=r,
        )
        self.load_seconds = Gauge(
            "codeserve_model_load_seconds",
            "Time the last load of a model took (fetch excluded)",
            ["model"],
            registry=r,
        )

    def record_generation(
        self,
        model: str,
        finished: list[Finished],
        ttft_s: float | None,
        token_gaps_s: Iterable[float],
    ) -> None:
        for f in finished:
            t = f.timings
            self.prompt_tokens.labels(model).inc(t.prompt_tokens - t.cached_tokens)
            self.prompt_tokens_cached.labels(model).inc(t.cached_tokens)
            self.prompt_seconds.labels(model).inc(t.prompt_ms / 1e3)
            self.tokens_predicted.labels(model).inc(t.completion_tokens)
            self.tokens_predicted_seconds.labels(model).inc(t.decode_ms / 1e3)
            self.spec_drafted.labels(model).inc(t.drafted)
            self.spec_accepted.labels(model).inc(t.accepted)
            self.target_passes.labels(model).inc(t.target_passes)
        if ttft_s is not None:
            self.ttft.labels(model).observe(ttft_s)
        histogram = self.inter_token.labels(model)
        for gap in token_gaps_s:
            histogram.observe(gap)

    def watch(self, state: Callable[[], list[dict[str, Any]]]) -> None:
        """Gauges read live at scrape time from `state()`: one dict per resident model."""
        self.registry.register(_LiveState(state))


class _LiveState(Collector):
    _GAUGES = (
        ("llamacpp:requests_processing", "Number of requests processing", "processing"),
        (
            "llamacpp:requests_deferred",
            "Number of requests deferred (waiting in the queue)",
            "deferred",
        ),
        ("codeserve_kv_cache_tokens", "Tokens held in the model's KV cache", "kv_tokens"),
        (
            "codeserve_kv_cache_usage_ratio",
            "KV cache cells in use / all cells (n_ctx per slot, every slot)",
            "kv_ratio",
        ),
        ("codeserve_model_memory_bytes", "Weights plus KV cache at n_ctx", "memory_bytes"),
        ("codeserve_model_resident", "1 for each model loaded in memory", "resident"),
        (
            "codeserve_model_keep_alive_seconds",
            "How long the model stays loaded once idle (+Inf: never unloaded when idle)",
            "keep_alive_s",
        ),
        (
            "codeserve_cpu_threads",
            "CPU threads llama.cpp runs a one-token step with now: fewer than configured while "
            "other processes keep the cores busy (adapt_threads)",
            "cpu_threads",
        ),
        (
            "codeserve_prompt_cache_bytes",
            "Host RAM held by saved prompt states (bounded by prompt_cache_mb)",
            "prompt_cache_bytes",
        ),
    )

    _COUNTERS = (
        (
            "codeserve_prompt_cache_hits",
            "Prompts that restored a saved prompt state instead of evaluating its prefix",
            "prompt_cache_hits",
        ),
        (
            "codeserve_prompt_cache_misses",
            "Long prompts evaluated cold: no slot and no saved state shared a long prefix",
            "prompt_cache_misses",
        ),
        (
            "codeserve_kv_packs",
            "Times the batched engine packed its KV buffer into one run of cells per sequence "
            "(after a burst, and between steps once many cells were decoded side by side)",
            "kv_packs",
        ),
    )

    def __init__(self, state: Callable[[], list[dict[str, Any]]]):
        self._state = state

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        rows = self._state()
        for name, help_, key in self._GAUGES:
            family = GaugeMetricFamily(name, help_, labels=["model"])
            for row in rows:
                family.add_metric([row["model"]], row[key])
            yield family
        for name, help_, key in self._COUNTERS:
            counter = CounterMetricFamily(name, help_, labels=["model"])
            for row in rows:
                counter.add_metric([row["model"]], row[key])
            yield counter
