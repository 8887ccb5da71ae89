"""API keys, request body limit and CORS, as pure ASGI middleware.

Pure ASGI (not BaseHTTPMiddleware) so that SSE responses pass through chunk by chunk
and a client that goes away is seen by the route at once.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Iterable
from pathlib import Path

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gguf_serve.api.errors import error_body
from gguf_serve.api.protocol.anthropic import error_body as anthropic_error_body
from gguf_serve.settings import Settings

log = logging.getLogger("gguf_serve.security")

# Liveness and readiness probes must work without a key (kubelet and docker send none).
OPEN_PATHS = frozenset({"/health", "/ready"})
# Open too when settings.metrics_public: the Prometheus text and the same numbers as JSON.
METRICS_PATHS = frozenset({"/metrics", "/stats"})


def openai_error_body(status: int, message: str, code: str | None, type_: str | None = None) -> bytes:
    return json.dumps(error_body(status, message, None, code, type_)).encode()


def family_error_body(
    path: str, status: int, message: str, code: str | None, type_: str | None = None
) -> bytes:
    """The error shape of the route family a path belongs to, so that each client reads its
    own: Ollama's {"error": message}, Anthropic's {"type": "error", ...}, else OpenAI's."""
    if path.startswith("/api/"):
        return json.dumps({"error": message}).encode()
    if path.startswith("/v1/messages"):
        return json.dumps(anthropic_error_body(status, message)).encode()
    return openai_error_body(status, message, code, type_)


async def send_json_error(
    send: Send, status: int, body: bytes, extra_headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *extra_headers,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _digest(key: str | bytes) -> bytes:
    # Hashing first gives equal-length inputs, so compare_digest leaks not even the key length.
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


class APIKeyStore:
    """The accepted keys; a key file is re-read when its mtime changes (rotation without restart)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._file: Path | None = settings.api_key_file
        self._mtime = self._stat()
        # SettingsError at install time when the key file is unreadable: fail at start, not per request.
        self._digests = [_digest(k) for k in settings.all_api_keys()]

    def _stat(self) -> float | None:
        if self._file is None:
            return None
        try:
            return self._file.stat().st_mtime
        except OSError:
            return None

    def _refresh(self) -> None:
        if self._file is None:
            return
        mtime = self._stat()
        if mtime is None or mtime == self._mtime:
            return
        try:
            keys = self._settings.all_api_keys()
        except Exception as e:  # keep serving with the keys we had
            log.warning("api_key_file: cannot re-read it (%s); keeping the previous keys", e)
            return
        self._mtime = mtime
        self._digests = [_digest(k) for k in keys]
        log.info("api_key_file: reloaded (%d keys)", len(keys))

    @property
    def count(self) -> int:
        return len(self._digests)

    @property
    def enabled(self) -> bool:
        self._refresh()
        return bool(self._digests)

    def check(self, candidate: bytes) -> bool:
        self._refresh()
        d = _digest(candidate)
        ok = False
        for known in self._digests:  # no early exit: time does not depend on which key matched
            ok |= hmac.compare_digest(d, known)
        return ok


def _presented_key(scope: Scope) -> bytes | None:
    bearer: bytes | None = None
    x_api_key: bytes | None = None
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                bearer = token.strip()
        elif name == b"x-api-key" and value.strip():
            x_api_key = value.strip()
    return bearer if bearer is not None else x_api_key


class _BodyTooLarge(Exception):
    pass


class SecurityMiddleware:
    """API key check, then the request body size limit (by Content-Length and by counting chunks)."""

    def __init__(self, app: ASGIApp, keys: APIKeyStore, max_body_bytes: int, metrics_public: bool) -> None:
        self.app = app
        self.keys = keys
        self.max_body_bytes = max_body_bytes
        self.open_paths = OPEN_PATHS | METRICS_PATHS if metrics_public else OPEN_PATHS

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if scope["path"] not in self.open_paths and self.keys.enabled:
            key = _presented_key(scope)
            if key is None or not self.keys.check(key):
                await self._reject_key(scope, receive, send, missing=key is None)
                return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self._limit_body(scope, receive, send)

    async def _reject_key(self, scope: Scope, receive: Receive, send: Send, missing: bool) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        path = scope["path"]
        if missing:
            body = family_error_body(
                path,
                401,
                "You didn't provide an API key. Send it as 'Authorization: Bearer KEY' or 'x-api-key: KEY'.",
                "invalid_api_key",
                "invalid_request_error",  # as OpenAI answers a missing key
            )
        else:
            body = family_error_body(path, 401, "Incorrect API key provided.", "invalid_api_key")
        await send_json_error(send, 401, body, [(b"www-authenticate", b'Bearer realm="gguf-serve"')])

    async def _too_large(self, scope: Scope, send: Send) -> None:
        body = family_error_body(
            scope["path"],
            413,
            f"Request body too large: the limit is {self.max_body_bytes} bytes (limits.max_body_bytes).",
            "request_too_large",
        )
        # The unread rest of the body would be parsed as the next request: close the connection.
        await send_json_error(send, 413, body, [(b"connection", b"close")])

    async def _limit_body(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.max_body_bytes
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    body = openai_error_body(400, "Invalid Content-Length header.", None)
                    await send_json_error(send, 400, body, [(b"connection", b"close")])
                    return
                if declared > limit:
                    await self._too_large(scope, send)
                    return

        received = 0
        too_large = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, too_large
            if too_large:
                raise _BodyTooLarge
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    too_large = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            # Once the body overflowed, whatever the app answers (FastAPI turns the error into
            # a 400 "error parsing the body") is replaced by our 413.
            if too_large and not started:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            if started:
                raise
        if too_large and not started:
            await self._too_large(scope, send)


def install_security(app: FastAPI, settings: Settings) -> None:
    """Add API key auth, the body size limit and CORS. Call before install_observability,
    so that the access log (outermost) also sees the 401s and 413s."""
    keys = APIKeyStore(settings)
    app.add_middleware(
        SecurityMiddleware,
        keys=keys,
        max_body_bytes=settings.limits.max_body_bytes,
        metrics_public=settings.metrics_public,
    )
    if settings.cors_origins:
        # Outside the key check: preflight requests carry no key, and 401s need CORS headers
        # for a browser to read them.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["x-request-id"],
            allow_credentials=False,
        )
    if keys.enabled:
        log.info("API keys: %d configured; /health and /ready are open", keys.count)
    elif settings.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("no API key configured and host is %s: every route is open to the network", settings.host)
