"""Prometheus metrics, /metrics and /stats, and the access log with request ids.

Metrics live in their own CollectorRegistry, so that tests and several apps in one
process never collide in prometheus-client's global one. Engine state (queues, slots,
KV cache, load state) is read at scrape time from a `stats_provider` callable, so the
engine never has to push anything.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gguf_serve.engine.requests import EngineHealth
from gguf_serve.settings import Settings

StatsProvider = Callable[[], dict[str, dict[str, float]]]
HealthProvider = Callable[[], dict[str, EngineHealth]]

access_log = logging.getLogger("gguf_serve.access")
log = logging.getLogger("gguf_serve.observability")

PREFIX = "gguf_serve"
LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
LOOP_LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LOOP_LAG_PERIOD_S = 0.25
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0)
# Probes and scrapes every few seconds would drown the access log: they are logged at DEBUG.
QUIET_PATHS = frozenset({"/health", "/ready", "/metrics"})
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")

# stats_provider key -> (metric suffix, help)
_ENGINE_GAUGES = {
    "queue_depth": ("queue_depth", "Requests waiting for a slot"),
    "busy_slots": ("busy_slots", "Sequence slots generating or decoding a prompt"),
    "slots": ("slots", "Sequence slots of the model's context"),
    "kv_used_cells": ("kv_cache_used_cells", "KV cache cells in use"),
    "kv_total_cells": ("kv_cache_total_cells", "KV cache cells in the context"),
    "loaded": ("model_loaded", "1 when the model is loaded, 0 when not (lazy load or idle unload)"),
    "engine_up": ("engine_up", "1 while the model's engine process serves, 0 while it restarts"),
    "prompt_cache_bytes": (
        "prompt_cache_bytes",
        "Host RAM held by the prompt cache: saved KV states and free buffers kept for the next saves",
    ),
    "prompt_cache_spare_bytes": (
        "prompt_cache_spare_bytes",
        "Part of prompt_cache_bytes held as free buffers (a save into touched memory skips page faults)",
    ),
    "prompt_cache_limit_bytes": ("prompt_cache_limit_bytes", "The prompt cache's bound (prompt_cache_mib)"),
    "prompt_cache_entries": ("prompt_cache_entries", "Prompts (token prefixes) in the prompt cache"),
    "threads": (
        "engine_threads",
        "Threads the model's last decode ran with: its share of the CPU budget the models share (cpu_threads)",
    ),
}
# stats_provider key -> (counter name without _total, help): where each model's worker thread spends its time.
_ENGINE_COUNTERS = {
    "engine_restarts": ("engine_restarts", "Engine processes started again after one died"),
    "decodes": ("engine_decode_calls", "llama_decode calls (one per scheduler step or embedding batch)"),
    "decode_seconds": ("engine_decode_seconds", "Seconds spent inside llama_decode"),
    "sample_seconds": ("engine_sample_seconds", "Seconds spent sampling tokens and handling their text"),
    "prompt_cache_hits": ("prompt_cache_hits", "Requests whose prefix was restored from the prompt cache"),
    "prompt_cache_misses": (
        "prompt_cache_misses",
        "Requests for which the prompt cache held no longer prefix than their slot",
    ),
    "prompt_cache_restored_tokens": (
        "prompt_cache_restored_tokens",
        "Prompt tokens restored from the prompt cache instead of prefilled",
    ),
    "prompt_cache_saves": (
        "prompt_cache_saves",
        "Sequences saved to the prompt cache before their slot was reused",
    ),
    "prompt_cache_evictions": (
        "prompt_cache_evictions",
        "Prompt cache entries dropped to stay within its bound",
    ),
}


class EngineCollector(Collector):
    """Gauges read from the engine at scrape time."""

    def __init__(self, stats_provider: StatsProvider) -> None:
        self.stats_provider = stats_provider

    def describe(self) -> Iterable[Metric]:
        return list(self._families({}))

    def collect(self) -> Iterable[Metric]:
        try:
            stats = self.stats_provider()
        except Exception:  # a scrape must not fail because the engine is busy or half-loaded
            log.exception("stats_provider failed; engine gauges left out of this scrape")
            return []
        return list(self._families(stats))

    @staticmethod
    def _families(stats: dict[str, dict[str, float]]) -> Iterator[Metric]:
        families = [(GaugeMetricFamily, _ENGINE_GAUGES), (CounterMetricFamily, _ENGINE_COUNTERS)]
        for family, table in families:
            for key, (name, help_) in table.items():
                fam = family(f"{PREFIX}_{name}", help_, labels=["model"])
                for model, values in stats.items():
                    if key in values:
                        fam.add_metric([model], float(values[key]))
                yield fam
        ratio = GaugeMetricFamily(
            f"{PREFIX}_kv_cache_usage_ratio", "KV cache cells in use / total", labels=["model"]
        )
        for model, values in stats.items():
            total = float(values.get("kv_total_cells", 0.0))
            if total > 0:
                ratio.add_metric([model], float(values.get("kv_used_cells", 0.0)) / total)
        yield ratio


class Metrics:
    """The server's metrics. Routes call observe_ttft and add_tokens; the middleware observe_request."""

    def __init__(self, registry: CollectorRegistry | None = None, process_metrics: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.started_at = time.time()
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests",
            "HTTP requests by route, model and status",
            ["route", "model", "status"],
            registry=r,
        )
        self.latency = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Time from request to the last byte of the response",
            ["route", "model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "Time from request to the first generated token",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens", "Prompt tokens processed", ["model"], registry=r
        )
        self.generated_tokens = Counter(
            f"{PREFIX}_generated_tokens", "Tokens generated", ["model"], registry=r
        )
        self.in_flight = Gauge(f"{PREFIX}_requests_in_flight", "HTTP requests being served", registry=r)
        self.loop_lag = Histogram(
            f"{PREFIX}_event_loop_lag_seconds",
            "How late the API process's event loop ran a timer (work that blocked it)",
            buckets=LOOP_LAG_BUCKETS,
            registry=r,
        )
        if process_metrics:
            # RSS, CPU seconds, open fds of this process (Linux only; a no-op elsewhere).
            ProcessCollector(registry=r)
        self._stats_provider: StatsProvider | None = None

    async def watch_event_loop(self, period_s: float = LOOP_LAG_PERIOD_S) -> None:
        """Sleep `period_s` over and over; how much later than asked each wake-up comes is the
        time something held the loop (a decode, a render, a big tokenization on it)."""
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            await asyncio.sleep(period_s)
            self.loop_lag.observe(max(0.0, loop.time() - t0 - period_s))

    def observe_request(self, route: str, model: str, status: int | str, seconds: float) -> None:
        self.requests.labels(route, model, str(status)).inc()
        self.latency.labels(route, model).observe(max(seconds, 0.0))

    def observe_ttft(self, model: str, seconds: float) -> None:
        self.ttft.labels(model).observe(max(seconds, 0.0))

    def add_tokens(self, model: str, prompt: int, generated: int) -> None:
        if prompt > 0:
            self.prompt_tokens.labels(model).inc(prompt)
        if generated > 0:
            self.generated_tokens.labels(model).inc(generated)

    def bind_stats(self, stats_provider: StatsProvider) -> None:
        if self._stats_provider is not None:
            raise RuntimeError("Metrics already has a stats_provider")
        self._stats_provider = stats_provider
        self.registry.register(EngineCollector(stats_provider))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def snapshot(self) -> dict[str, Any]:
        """The metrics as JSON for people: /stats."""
        engine: dict[str, dict[str, float]] = {}
        if self._stats_provider is not None:
            try:
                engine = {m: dict(v) for m, v in self._stats_provider().items()}
            except Exception:
                log.exception("stats_provider failed")
        for values in engine.values():
            total = values.get("kv_total_cells", 0.0)
            if total:
                values["kv_cache_usage_ratio"] = round(values.get("kv_used_cells", 0.0) / total, 4)

        requests: list[dict[str, Any]] = []
        tokens: dict[str, dict[str, float]] = {}
        for fam in self.registry.collect():
            for s in fam.samples:
                if s.name == f"{PREFIX}_requests_total":
                    requests.append({**s.labels, "count": int(s.value)})
                elif s.name in (f"{PREFIX}_prompt_tokens_total", f"{PREFIX}_generated_tokens_total"):
                    kind = "prompt" if "prompt" in s.name else "generated"
                    tokens.setdefault(s.labels["model"], {"prompt": 0, "generated": 0})[kind] = int(s.value)
        requests.sort(key=lambda r: (r["route"], r["model"], r["status"]))
        uptime = time.time() - self.started_at
        for t in tokens.values():
            t["generated_per_s_since_start"] = round(t["generated"] / uptime, 3) if uptime > 0 else 0.0
        in_flight = self.registry.get_sample_value(f"{PREFIX}_requests_in_flight") or 0.0
        return {
            "uptime_s": round(uptime, 1),
            "requests_in_flight": int(in_flight),
            "models": engine,
            "requests": requests,
            "tokens": tokens,
            "latency_s": _histogram_summary(self.latency),
            "time_to_first_token_s": _histogram_summary(self.ttft),
            "event_loop_lag_s": _histogram_summary(self.loop_lag),
        }


def _histogram_summary(hist: Histogram) -> dict[str, dict[str, float]]:
    """count, mean and bucket-interpolated p50/p95 per label set (label values joined by ' ')."""
    counts: dict[str, list[tuple[float, float]]] = {}
    sums: dict[str, float] = {}
    for fam in hist.collect():
        for s in fam.samples:
            labels = {k: v for k, v in s.labels.items() if k != "le"}
            key = " ".join(labels.values()) or "all"
            if s.name.endswith("_bucket"):
                counts.setdefault(key, []).append((float(s.labels["le"]), s.value))
            elif s.name.endswith("_sum"):
                sums[key] = s.value
    out: dict[str, dict[str, float]] = {}
    for key, buckets in counts.items():
        buckets.sort()
        n = buckets[-1][1]
        if n == 0:
            continue
        out[key] = {
            "count": int(n),
            "mean": round(sums.get(key, 0.0) / n, 4),
            "p50": round(_quantile(buckets, 0.5), 4),
            "p95": round(_quantile(buckets, 0.95), 4),
        }
    return out


def _quantile(buckets: list[tuple[float, float]], q: float) -> float:
    # Linear interpolation inside the bucket, as PromQL's histogram_quantile does.
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, cum in buckets:
        if cum >= rank:
            if math.isinf(upper):
                return lower
            width = cum - below
            return lower + (upper - lower) * ((rank - below) / width if width else 1.0)
        lower, below = upper, cum
    return lower


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            try:
                candidate = value.decode("ascii")
            except UnicodeDecodeError:
                break
            if _SANE_REQUEST_ID.fullmatch(candidate):
                return candidate
            break
    return uuid.uuid4().hex


class AccessLogMiddleware:
    """Request id in and out, one JSON access log line, and the request metrics."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = _request_id(scope)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        rid_header = (b"x-request-id", request_id.encode())
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, rid_header]}
            await send(message)

        self.metrics.in_flight.inc()
        failed = True
        try:
            await self.app(scope, receive, send_with_id)
            # CancelOnDisconnect ended it because the client left: nginx's 499, not a success.
            failed = bool(state.get("client_gone")) and not response_started
            if failed:
                status = 499
        except asyncio.CancelledError:
            if not response_started:
                status = 499  # the client went away before an answer (nginx's code for it)
            raise
        finally:
            self.metrics.in_flight.dec()
            seconds = time.perf_counter() - start
            route_obj = scope.get("route")
            route = getattr(route_obj, "path", None) or "unmatched"
            model = str(state.get("model") or "")
            self.metrics.observe_request(route, model, status, seconds)
            record: dict[str, Any] = {
                "method": scope.get("method"),
                "path": scope.get("path"),
                "status": status,
                "duration_ms": round(seconds * 1000, 2),
                "request_id": request_id,
            }
            if model:
                record["model"] = model
            client = scope.get("client")
            if client:
                record["client"] = client[0]
            if failed:
                record["error"] = "cancelled" if status == 499 else "unhandled exception"
            level = logging.DEBUG if scope.get("path") in QUIET_PATHS and status < 400 else logging.INFO
            access_log.log(level, json.dumps(record, separators=(",", ":")))


def install_observability(
    app: FastAPI,
    settings: Settings,
    metrics: Metrics,
    stats_provider: StatsProvider,
    runtime: Mapping[str, object] | None = None,
    health_provider: HealthProvider | None = None,
) -> None:
    """Add the access log + request id middleware, GET /metrics and GET /stats.

    Call after install_security, so that this middleware is the outermost and logs 401s
    and 413s too. Routes reach the Metrics as `request.app.state.metrics` and name their
    model for the log and the labels with `request.state.model = model_id`.
    """
    metrics.bind_stats(stats_provider)
    app.state.metrics = metrics
    # What llama.cpp runs on (CPU, variant, AMX, repack, GPUs): a bug report's first question.
    runtime = dict(runtime or {})
    if runtime:
        keys: tuple[str, ...] = ("build", "cpu_model", "cpu_variant", "amx", "repack")
        labels = {k: str(runtime[k]) for k in keys if k in runtime}
        Info(f"{PREFIX}_runtime", "llama.cpp backend of this process", registry=metrics.registry).info(labels)

    async def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    async def stats() -> JSONResponse:
        engines = {m: asdict(h) for m, h in (health_provider() if health_provider else {}).items()}
        return JSONResponse({**metrics.snapshot(), "engines": engines, "runtime": runtime})

    app.add_api_route("/metrics", prometheus_metrics, methods=["GET"], include_in_schema=False)
    app.add_api_route("/stats", stats, methods=["GET"], include_in_schema=False)
    app.add_middleware(AccessLogMiddleware, metrics=metrics)
    log.info(
        "/metrics and /stats %s",
        "are public" if settings.metrics_public else "need an API key when keys are set",
    )
