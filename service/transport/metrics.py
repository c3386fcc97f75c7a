"""Prometheus metrics for one server: request outcomes, latencies, step times, and live engine gauges."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from tokenwire.service.engine.engine import Engine
from tokenwire.service.engine.requests import ErrorCode, Failure, Finished, GenerationRequest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
_DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _EngineCollector(Collector):
    """Gauges read from the engine at scrape time (so they are never stale and cost nothing per step)."""

    def __init__(self, engine: Callable[[], Engine | None]) -> None:
        self._engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        engine = self._engine()
        if engine is None:  # still loading the model
            return
        yield GaugeMetricFamily("tokenwire_live_requests", "Requests waiting or running.", engine.num_live())
        yield GaugeMetricFamily(
            "tokenwire_waiting_requests", "Requests queued for a KV slot.", engine.num_waiting
        )
        yield GaugeMetricFamily(
            "tokenwire_running_requests", "Requests in prefill or decode.", engine.num_running
        )
        yield GaugeMetricFamily("tokenwire_kv_slots_in_use", "KV cache slots held.", engine.kv_slots_in_use)
        yield GaugeMetricFamily("tokenwire_kv_slots", "KV cache slots in all.", engine.kv_slots)
        yield GaugeMetricFamily(
            "tokenwire_session_cache_bytes",
            "Bytes of KV cache kept for sessions.",
            engine.session_cache_bytes,
        )
        yield GaugeMetricFamily(
            "tokenwire_prefix_cache_bytes",
            "Bytes of KV cache kept for automatic prefix reuse (what sessions leave of the budget).",
            engine.prefix_cache_bytes,
        )
        yield CounterMetricFamily(
            "tokenwire_prefix_cache_hits",
            "Requests that reused a kept prefix without a session.",
            engine.prefix_cache_hits,
        )
        # The same load under the names an inference gateway scrapes: the Gateway API Inference
        # Extension's endpoint picker reads these three (its model-server protocol names vLLM's). Our KV
        # cache is one row per sequence, and a request waits only for a free row, so the fraction of rows
        # held is what "KV cache usage" means here (0-1, as vLLM's).
        yield GaugeMetricFamily(
            "vllm:num_requests_waiting", "Requests queued (= tokenwire_waiting_requests).", engine.num_waiting
        )
        yield GaugeMetricFamily(
            "vllm:num_requests_running",
            "Requests running (= tokenwire_running_requests).",
            engine.num_running,
        )
        yield GaugeMetricFamily(
            "vllm:kv_cache_usage_perc",
            "Fraction of KV cache slots held, 0-1 (= tokenwire_kv_slots_in_use / tokenwire_kv_slots).",
            engine.kv_slots_in_use / engine.kv_slots if engine.kv_slots else 0.0,
        )


class ServerMetrics:
    """The metrics of one server, in a registry of its own (tests run several servers in one process)."""

    def __init__(self, engine: Callable[[], Engine | None]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "tokenwire_requests", "Finished generations, by stop reason.", ["reason"], registry=r
        )
        self.refused = Counter(
            "tokenwire_requests_refused",
            "Starts answered with an Error, by status code.",
            ["code"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "tokenwire_prompt_tokens", "Prompt tokens of finished requests.", registry=r
        )
        self.cached_tokens = Counter(
            "tokenwire_cached_prompt_tokens", "Prompt tokens served from session caches.", registry=r
        )
        self.generated_tokens = Counter("tokenwire_generated_tokens", "Tokens generated.", registry=r)
        self.ttft = Histogram(
            "tokenwire_time_to_first_token_seconds",
            "From Start received to the first token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "tokenwire_inter_token_seconds",
            "Mean time between tokens after the first, one observation per request.",
            buckets=_TOKEN_GAP_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "tokenwire_request_duration_seconds",
            "From Start received to the end.",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.step_seconds = Histogram(
            "tokenwire_step_seconds", "Duration of one engine step.", buckets=_TOKEN_GAP_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "tokenwire_batch_size", "Sequences decoded per engine step.", buckets=_BATCH_BUCKETS, registry=r
        )
        r.register(_EngineCollector(engine))
        self._http: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    # ---- engine hooks (called on the step thread) ----

    def on_finish(self, request: GenerationRequest, result: Finished | Failure) -> None:
        if isinstance(result, Failure):  # failed after it was accepted
            self.requests.labels("failed").inc()
            return
        self.requests.labels(result.reason.value).inc()
        usage, timings = result.usage, result.timings
        self.prompt_tokens.inc(usage.prompt_tokens)
        self.cached_tokens.inc(usage.cached_prompt_tokens)
        self.generated_tokens.inc(usage.completion_tokens)
        if usage.completion_tokens:
            self.ttft.observe(timings.time_to_first_token_s)
        if timings.decode_tokens_per_second > 0:
            self.inter_token.observe(1.0 / timings.decode_tokens_per_second)
        self.duration.observe(timings.total_s)

    def on_step(self, seconds: float, batch: int) -> None:
        self.step_seconds.observe(seconds)
        if batch:
            self.batch_size.observe(batch)

    def on_refused(self, code: ErrorCode) -> None:
        self.refused.labels(code.name).inc()

    # ---- exposition ----

    def serve(self, port: int, host: str) -> int:
        """Serve /metrics over HTTP on its own port (in a daemon thread); returns the bound port."""
        self._http, self._thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
