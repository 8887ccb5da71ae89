"""API keys, body size limit and CORS middleware, on a tiny app without llama.cpp."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from starlette.testclient import TestClient

from gguf_serve.api.observability import Metrics, install_observability
from gguf_serve.api.security import install_security
from gguf_serve.settings import Limits, Settings, SettingsError

KEY = "sk-test-0123456789"
OTHER = "sk-other-abcdef"


def build_app(settings: Settings, release: threading.Event | None = None) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/v1/echo")
    async def echo(payload: dict[str, Any]) -> dict[str, int]:
        return {"keys": len(payload)}

    @app.post("/v1/raw")
    async def raw(request: Request) -> dict[str, int]:
        return {"bytes": len(await request.body())}

    @app.get("/v1/stream")
    async def stream() -> StreamingResponse:
        async def events() -> AsyncIterator[bytes]:
            yield b"data: first\n\n"
            # The second event waits until the client has seen the first one: a middleware that
            # buffered the response would make the client wait for the timeout instead.
            deadline = time.monotonic() + 5.0
            while release is not None and not release.is_set():
                if time.monotonic() > deadline:
                    yield b"data: timeout\n\n"
                    return
                await asyncio.sleep(0.01)
            yield b"data: second\n\n"
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    install_security(app, settings)
    install_observability(app, settings, Metrics(process_metrics=False), lambda: {})
    return app


def client(**kw: Any) -> TestClient:
    return TestClient(build_app(Settings(**kw)))


def assert_openai_401(r: httpx.Response, type_: str) -> None:
    assert r.status_code == 401
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == type_
    assert err["code"] == "invalid_api_key"
    assert err["param"] is None
    assert KEY not in r.text and OTHER not in r.text


def test_no_keys_means_open() -> None:
    c = client()
    assert c.post("/v1/echo", json={"a": 1}).json() == {"keys": 1}


def test_missing_key_is_401_invalid_request() -> None:
    c = client(api_keys=[KEY])
    r = c.post("/v1/echo", json={"a": 1})
    assert_openai_401(r, "invalid_request_error")
    assert r.headers["www-authenticate"].startswith("Bearer")


def test_wrong_key_is_401_authentication_error() -> None:
    c = client(api_keys=[KEY])
    for headers in (
        {"Authorization": f"Bearer {OTHER}"},
        {"x-api-key": OTHER},
        # a prefix of the right key is not the key
        {"Authorization": f"Bearer {KEY[:-1]}"},
    ):
        assert_openai_401(c.post("/v1/echo", json={}, headers=headers), "authentication_error")
    assert c.post("/v1/echo", json={}, headers={"Authorization": f"Basic {KEY}"}).status_code == 401


@pytest.mark.parametrize("header", ["authorization", "x-api-key"])
def test_both_header_styles_accepted(header: str) -> None:
    c = client(api_keys=[OTHER, KEY])
    value = f"Bearer {KEY}" if header == "authorization" else KEY
    r = c.post("/v1/echo", json={"a": 1, "b": 2}, headers={header: value})
    assert r.status_code == 200, r.text
    assert r.json() == {"keys": 2}
    # lower-case scheme, as some clients send it
    if header == "authorization":
        assert c.post("/v1/echo", json={}, headers={header: f"bearer {OTHER}"}).status_code == 200


def test_keys_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GGUF_SERVE_API_KEYS", f'["{KEY}", "{OTHER}"]')
    c = TestClient(build_app(Settings()))
    assert c.get("/v1/stream", headers={"x-api-key": OTHER}).status_code == 200
    assert c.get("/v1/stream").status_code == 401


def test_health_and_ready_open_with_keys() -> None:
    c = client(api_keys=[KEY])
    assert c.get("/health").status_code == 200
    assert c.get("/ready").status_code == 200
    assert c.get("/v1/stream").status_code == 401


def test_metrics_needs_key_unless_public() -> None:
    c = client(api_keys=[KEY])
    assert_openai_401(c.get("/metrics"), "invalid_request_error")
    assert c.get("/stats").status_code == 401
    r = c.get("/metrics", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200
    assert "gguf_serve_requests_total" in r.text

    public = client(api_keys=[KEY], metrics_public=True)
    assert public.get("/metrics").status_code == 200
    assert public.get("/stats").status_code == 200
    assert public.get("/v1/stream").status_code == 401


def test_key_file_and_rotation(tmp_path: Path) -> None:
    f = tmp_path / "keys"
    f.write_text(f"# team keys\n{KEY}\n\n")
    c = client(api_key_file=f)
    assert c.get("/v1/stream", headers={"x-api-key": KEY}).status_code == 200
    f.write_text(f"{OTHER}\n")
    st = f.stat()
    os.utime(f, (st.st_atime, st.st_mtime + 5))
    assert c.get("/v1/stream", headers={"x-api-key": KEY}).status_code == 401
    assert c.get("/v1/stream", headers={"x-api-key": OTHER}).status_code == 200


def test_unreadable_key_file_fails_at_install(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="api_key_file"):
        build_app(Settings(api_key_file=tmp_path / "missing"))


def test_413_by_content_length() -> None:
    c = client(limits=Limits(max_body_bytes=1024))
    r = c.post("/v1/raw", content=b"x" * 2048, headers={"content-type": "application/octet-stream"})
    assert r.status_code == 413
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and "1024" in err["message"]
    assert c.post("/v1/raw", content=b"x" * 1000).json() == {"bytes": 1000}


def test_bad_content_length_is_400() -> None:
    c = client()
    r = c.post("/v1/raw", content=b"abc", headers={"content-length": "abc"})
    assert r.status_code == 400


def test_auth_comes_before_body_limit() -> None:
    c = client(api_keys=[KEY], limits=Limits(max_body_bytes=1024))
    assert c.post("/v1/raw", content=b"x" * 4096).status_code == 401


async def _chunks(n: int, size: int) -> AsyncIterator[bytes]:
    for _ in range(n):
        yield b"x" * size


@pytest.mark.parametrize("path", ["/v1/raw", "/v1/echo"])
def test_413_by_streamed_body_without_content_length(path: str) -> None:
    # /v1/echo parses JSON: FastAPI would turn the failed read into a 400; it must stay a 413.
    app = build_app(Settings(limits=Limits(max_body_bytes=1024)))

    async def go() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as ac:
            r = await ac.post(path, content=_chunks(8, 512), headers={"content-type": "application/json"})
            assert "content-length" not in r.request.headers
            assert r.status_code == 413, r.text
            assert r.json()["error"]["message"].startswith("Request body too large")
            ok = await ac.post("/v1/raw", content=_chunks(2, 500))
            assert ok.json() == {"bytes": 1000}

    asyncio.run(go())


def test_cors_preflight_and_headers_on_401() -> None:
    c = client(api_keys=[KEY], cors_origins=["https://ragflow.example"])
    pre = c.options(
        "/v1/echo",
        headers={
            "Origin": "https://ragflow.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert pre.status_code == 200
    assert pre.headers["access-control-allow-origin"] == "https://ragflow.example"
    r = c.post("/v1/echo", json={}, headers={"Origin": "https://ragflow.example"})
    assert r.status_code == 401
    assert r.headers["access-control-allow-origin"] == "https://ragflow.example"
    other = c.post("/v1/echo", json={}, headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


def test_no_cors_headers_without_origins() -> None:
    c = client()
    r = c.get("/health", headers={"Origin": "https://ragflow.example"})
    assert "access-control-allow-origin" not in r.headers


@pytest.fixture
def live_server() -> Iterator[tuple[str, threading.Event]]:
    release = threading.Event()
    app = build_app(Settings(api_keys=[KEY], limits=Limits(max_body_bytes=1024)), release)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    yield f"http://127.0.0.1:{port}", release
    server.should_exit = True
    thread.join(timeout=5)
    sock.close()


def test_sse_streams_through_middleware(live_server: tuple[str, threading.Event]) -> None:
    base, release = live_server
    with (
        httpx.Client(base_url=base, timeout=10) as c,
        c.stream("GET", "/v1/stream", headers={"x-api-key": KEY, "x-request-id": "abc-123"}) as r,
    ):
        assert r.status_code == 200
        assert r.headers["x-request-id"] == "abc-123"
        lines = r.iter_lines()
        t0 = time.monotonic()
        first = next(line for line in lines if line)
        assert first == "data: first"
        assert time.monotonic() - t0 < 4, "the first event arrived only after the generator finished"
        release.set()
        rest = [line for line in lines if line]
    assert rest == ["data: second", "data: [DONE]"]


def test_live_server_413_and_401(live_server: tuple[str, threading.Event]) -> None:
    base, _ = live_server
    # One connection per request: a server that answers 401/413 without reading the body
    # closes the connection, and a pooled client could otherwise reuse the closed one.
    assert httpx.post(base + "/v1/raw", content=b"x" * 4096, timeout=10).status_code == 401
    r = httpx.post(base + "/v1/raw", content=b"x" * 4096, headers={"x-api-key": KEY}, timeout=10)
    assert r.status_code == 413
    assert httpx.get(base + "/health", timeout=10).status_code == 200


def test_401_and_413_come_in_the_route_familys_error_shape() -> None:
    c = client(api_keys=[KEY])
    ollama = c.post("/api/chat", json={})
    assert (
        ollama.status_code == 401 and set(ollama.json()) == {"error"} and "API key" in ollama.json()["error"]
    )
    anthropic = c.post("/v1/messages", json={}, headers={"x-api-key": OTHER})
    assert anthropic.status_code == 401
    assert anthropic.json() == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "Incorrect API key provided."},
    }
    assert_openai_401(c.post("/v1/echo", json={}), "invalid_request_error")
    big = client(limits=Limits(max_body_bytes=1024)).post("/api/embed", content=b"x" * 4096)
    assert big.status_code == 413 and set(big.json()) == {"error"}
