"""Metrics, /metrics, /stats, request ids and the access log, on a tiny app without llama.cpp."""

from __future__ import annotations

import json
import logging
import re
import sys
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from gguf_serve.api.observability import Metrics, _quantile, install_observability
from gguf_serve.api.security import install_security
from gguf_serve.settings import Settings

KEY = "sk-obs-secret"
PROMPT = "the secret prompt text"


def engine_stats() -> dict[str, dict[str, float]]:
    return {
        "chat-a": {
            "queue_depth": 3,
            "busy_slots": 2,
            "slots": 4,
            "kv_used_cells": 1024,
            "kv_total_cells": 4096,
            "loaded": 1,
            "decodes": 7,
            "decode_seconds": 1.5,
            "sample_seconds": 0.25,
        },
        "embed-b": {"queue_depth": 0, "busy_slots": 0, "slots": 8, "loaded": 0},
    }


def build(settings: Settings | None = None, stats: Any = engine_stats) -> tuple[FastAPI, Metrics]:
    settings = settings or Settings()
    app = FastAPI()
    metrics = Metrics(process_metrics=False)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict[str, Any]:
        body = await request.json()
        request.state.model = body["model"]
        m: Metrics = request.app.state.metrics
        m.observe_ttft(body["model"], 0.2)
        m.add_tokens(body["model"], prompt=7, generated=5)
        return {"id": request.state.request_id}

    @app.get("/v1/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"item": item_id}

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    @app.get("/v1/stream")
    async def stream(request: Request) -> StreamingResponse:
        request.state.model = "chat-a"

        async def gen() -> Any:
            for i in range(3):
                yield f"data: {i}\n\n".encode()

        return StreamingResponse(gen(), media_type="text/event-stream")

    install_security(app, settings)
    install_observability(app, settings, metrics, stats)
    return app, metrics


def scrape(c: TestClient, **headers: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = c.get("/metrics", headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_requests_counted_by_route_template_model_and_status() -> None:
    app, _ = build()
    c = TestClient(app)
    for i in range(3):
        assert c.get(f"/v1/items/{i}").status_code == 200
    assert c.get("/v1/items/notanint").status_code == 422
    assert c.post("/v1/chat/completions", json={"model": "chat-a", "messages": []}).status_code == 200
    assert c.get("/nowhere").status_code == 404
    m = scrape(c)
    req = "gguf_serve_requests_total"
    assert m[(req, (("model", ""), ("route", "/v1/items/{item_id}"), ("status", "200")))] == 3
    assert m[(req, (("model", ""), ("route", "/v1/items/{item_id}"), ("status", "422")))] == 1
    assert m[(req, (("model", "chat-a"), ("route", "/v1/chat/completions"), ("status", "200")))] == 1
    assert m[(req, (("model", ""), ("route", "unmatched"), ("status", "404")))] == 1
    # no raw paths as labels: cardinality stays bounded
    assert not any("/v1/items/1" in str(k) for k in m)
    lat = "gguf_serve_request_duration_seconds_count"
    assert m[(lat, (("model", ""), ("route", "/v1/items/{item_id}")))] == 4


def test_ttft_and_tokens_and_engine_gauges() -> None:
    app, _ = build()
    c = TestClient(app)
    for _ in range(2):
        c.post("/v1/chat/completions", json={"model": "chat-a"})
    m = scrape(c)
    assert m[("gguf_serve_prompt_tokens_total", (("model", "chat-a"),))] == 14
    assert m[("gguf_serve_generated_tokens_total", (("model", "chat-a"),))] == 10
    assert m[("gguf_serve_time_to_first_token_seconds_count", (("model", "chat-a"),))] == 2
    assert m[("gguf_serve_time_to_first_token_seconds_bucket", (("le", "0.25"), ("model", "chat-a")))] == 2
    assert m[("gguf_serve_time_to_first_token_seconds_bucket", (("le", "0.1"), ("model", "chat-a")))] == 0
    assert m[("gguf_serve_queue_depth", (("model", "chat-a"),))] == 3
    assert m[("gguf_serve_busy_slots", (("model", "chat-a"),))] == 2
    assert m[("gguf_serve_slots", (("model", "embed-b"),))] == 8
    assert m[("gguf_serve_kv_cache_usage_ratio", (("model", "chat-a"),))] == 0.25
    assert m[("gguf_serve_model_loaded", (("model", "chat-a"),))] == 1
    assert m[("gguf_serve_engine_decode_calls_total", (("model", "chat-a"),))] == 7
    assert m[("gguf_serve_engine_decode_seconds_total", (("model", "chat-a"),))] == 1.5
    assert m[("gguf_serve_engine_sample_seconds_total", (("model", "chat-a"),))] == 0.25
    assert ("gguf_serve_engine_decode_calls_total", (("model", "embed-b"),)) not in m
    assert m[("gguf_serve_model_loaded", (("model", "embed-b"),))] == 0
    # an embedding model without a KV cache gets no ratio rather than a division by zero
    assert ("gguf_serve_kv_cache_usage_ratio", (("model", "embed-b"),)) not in m


def test_stats_provider_read_at_scrape_time() -> None:
    state = {"queue_depth": 0.0}
    app, _ = build(stats=lambda: {"m": dict(state)})
    c = TestClient(app)
    assert scrape(c)[("gguf_serve_queue_depth", (("model", "m"),))] == 0
    state["queue_depth"] = 5
    assert scrape(c)[("gguf_serve_queue_depth", (("model", "m"),))] == 5


def test_failing_stats_provider_does_not_break_scrape() -> None:
    def broken() -> dict[str, dict[str, float]]:
        raise RuntimeError("engine not ready")

    app, _ = build(stats=broken)
    c = TestClient(app)
    c.get("/health")
    m = scrape(c)
    assert m[("gguf_serve_requests_total", (("model", ""), ("route", "/health"), ("status", "200")))] == 1
    assert not any(k[0] == "gguf_serve_queue_depth" for k in m)
    assert c.get("/stats").json()["models"] == {}


def test_own_registry_not_global() -> None:
    build()
    build()  # a second app in the same process must not collide
    assert REGISTRY.get_sample_value("gguf_serve_requests_total") is None
    assert not any(m.name.startswith("gguf_serve") for m in REGISTRY.collect())


def test_500_is_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    app, _ = build()
    c = TestClient(app, raise_server_exceptions=False)
    with caplog.at_level(logging.INFO, logger="gguf_serve.access"):
        assert c.get("/boom").status_code == 500
    m = scrape(c)
    assert m[("gguf_serve_requests_total", (("model", ""), ("route", "/boom"), ("status", "500")))] == 1
    line = json.loads(caplog.records[-1].getMessage())
    assert line["status"] == 500 and line["error"] == "unhandled exception"


def test_request_id_honored_generated_and_replaced() -> None:
    app, _ = build()
    c = TestClient(app)
    r = c.post("/v1/chat/completions", json={"model": "x"}, headers={"X-Request-ID": "ragflow-42.a:b_c"})
    assert r.headers["x-request-id"] == "ragflow-42.a:b_c"
    assert r.json()["id"] == "ragflow-42.a:b_c"  # routes can read it from request.state
    generated = c.get("/health").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    assert c.get("/health").headers["x-request-id"] != generated
    for bad in ["has space", "x" * 200, "<script>", "a\tb"]:
        rid = c.get("/health", headers={"X-Request-ID": bad}).headers["x-request-id"]
        assert rid != bad and re.fullmatch(r"[0-9a-f]{32}", rid)


def test_request_id_not_duplicated_when_route_sets_one() -> None:
    app, _ = build()

    @app.get("/sets-own")
    async def sets_own() -> Any:
        from fastapi.responses import JSONResponse

        return JSONResponse({}, headers={"X-Request-ID": "from-route"})

    r = TestClient(app).get("/sets-own", headers={"X-Request-ID": "from-client"})
    assert r.headers.get_list("x-request-id") == ["from-client"]


def test_access_log_is_json_without_prompt(caplog: pytest.LogCaptureFixture) -> None:
    app, _ = build()
    c = TestClient(app)
    with caplog.at_level(logging.INFO, logger="gguf_serve.access"):
        c.post(
            "/v1/chat/completions",
            json={"model": "chat-a", "messages": [{"role": "user", "content": PROMPT}]},
            headers={"X-Request-ID": "rid-1"},
        )
    records = [r for r in caplog.records if r.name == "gguf_serve.access"]
    assert len(records) == 1
    line = json.loads(records[0].getMessage())
    assert line["method"] == "POST"
    assert line["path"] == "/v1/chat/completions"
    assert line["status"] == 200
    assert line["request_id"] == "rid-1"
    assert line["model"] == "chat-a"
    assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0
    assert PROMPT not in caplog.text


def test_probes_logged_at_debug_only(caplog: pytest.LogCaptureFixture) -> None:
    app, _ = build()
    c = TestClient(app)
    with caplog.at_level(logging.INFO, logger="gguf_serve.access"):
        c.get("/health")
    assert not [r for r in caplog.records if r.name == "gguf_serve.access"]
    with caplog.at_level(logging.DEBUG, logger="gguf_serve.access"):
        c.get("/health")
    assert json.loads(caplog.records[-1].getMessage())["path"] == "/health"


def test_api_key_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    app, _ = build(Settings(api_keys=[KEY]))
    c = TestClient(app)
    with caplog.at_level(logging.DEBUG):
        c.get("/v1/items/1", headers={"Authorization": f"Bearer {KEY}"})
        c.get("/v1/items/1", headers={"Authorization": "Bearer wrong-key"})
    assert KEY not in caplog.text and "wrong-key" not in caplog.text
    statuses = [json.loads(r.getMessage())["status"] for r in caplog.records if r.name == "gguf_serve.access"]
    assert statuses == [200, 401]


def test_401_counted_when_security_installed_first() -> None:
    app, _ = build(Settings(api_keys=[KEY], metrics_public=True))
    c = TestClient(app)
    assert c.get("/v1/items/1").status_code == 401
    m = scrape(c)
    # The key check answers before routing, so the route is not known.
    assert m[("gguf_serve_requests_total", (("model", ""), ("route", "unmatched"), ("status", "401")))] == 1


def test_streaming_response_counted_once_with_model() -> None:
    app, _ = build()
    c = TestClient(app)
    r = c.get("/v1/stream")
    assert r.text == "data: 0\n\ndata: 1\n\ndata: 2\n\n"
    m = scrape(c)
    labels = (("model", "chat-a"), ("route", "/v1/stream"), ("status", "200"))
    assert m[("gguf_serve_requests_total", labels)] == 1


def test_stats_json() -> None:
    app, metrics = build()
    c = TestClient(app)
    c.post("/v1/chat/completions", json={"model": "chat-a"})
    for s in (0.05, 0.05, 0.05, 3.0):
        metrics.observe_ttft("chat-b", s)
    stats = c.get("/stats").json()
    assert stats["models"]["chat-a"]["queue_depth"] == 3
    assert stats["models"]["chat-a"]["kv_cache_usage_ratio"] == 0.25
    row = {"route": "/v1/chat/completions", "model": "chat-a", "status": "200", "count": 1}
    assert row in stats["requests"]
    assert stats["tokens"]["chat-a"]["prompt"] == 7
    assert stats["tokens"]["chat-a"]["generated"] == 5
    ttft = stats["time_to_first_token_s"]
    assert ttft["chat-a"]["count"] == 1 and ttft["chat-a"]["mean"] == pytest.approx(0.2)
    assert ttft["chat-b"]["count"] == 4
    assert 0.025 <= ttft["chat-b"]["p50"] <= 0.05
    assert 2.0 <= ttft["chat-b"]["p95"] <= 4.0
    assert stats["requests_in_flight"] == 1  # the /stats request itself
    assert stats["uptime_s"] >= 0


def test_quantile_interpolation() -> None:
    buckets = [(1.0, 0.0), (2.0, 10.0), (float("inf"), 10.0)]
    assert _quantile(buckets, 0.5) == pytest.approx(1.5)
    assert _quantile([(1.0, 0.0), (float("inf"), 4.0)], 0.5) == 1.0


def test_add_tokens_ignores_zero_and_negative() -> None:
    m = Metrics(process_metrics=False)
    m.add_tokens("a", 0, -1)
    m.add_tokens("a", 3, 0)
    assert m.registry.get_sample_value("gguf_serve_prompt_tokens_total", {"model": "a"}) == 3
    assert m.registry.get_sample_value("gguf_serve_generated_tokens_total", {"model": "a"}) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process metrics read /proc")
def test_process_metrics_optional() -> None:
    assert b"process_resident_memory_bytes" in Metrics().exposition()
    assert b"process_" not in Metrics(process_metrics=False).exposition()


def test_stats_provider_bound_once() -> None:
    m = Metrics(process_metrics=False)
    m.bind_stats(dict)
    with pytest.raises(RuntimeError):
        m.bind_stats(dict)
