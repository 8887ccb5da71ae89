"""A request whose client goes away is cancelled at once, streaming or not, on every route.

Starlette never cancels a handler whose client left: a non-streaming chat whose client gave
up after a second would generate for minutes, holding its slot (RAGFlow's clients time out
and retry, so abandoned work piles up exactly when the server is slowest). Here the app runs
in a child task; once it has read the whole body, this middleware alone reads the ASGI
`receive`, where only `http.disconnect` can come, and cancels the child when it does. The
routes' own `finally` blocks then cancel their generations, which free their slots or batch
seats at the engine's next step.
"""

from __future__ import annotations

import asyncio
import contextlib

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class CancelOnDisconnect:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        gone = asyncio.Event()
        watcher: asyncio.Task[None] | None = None
        inner: asyncio.Task[None] | None = None

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()
            if inner is not None:
                inner.cancel()

        async def app_receive() -> Message:
            nonlocal watcher
            if watcher is not None:  # the body is read: the watcher owns `receive` now
                await gone.wait()
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                watcher = asyncio.create_task(watch())
            elif message["type"] == "http.disconnect":
                gone.set()
            return message

        async def run_app() -> None:
            await self.app(scope, app_receive, send)

        inner = asyncio.create_task(run_app())
        try:
            await asyncio.shield(inner)
        except asyncio.CancelledError:
            if not gone.is_set():  # the server itself cancelled us (shutdown): pass it on
                inner.cancel()
                raise
            scope.setdefault("state", {})["client_gone"] = True
        finally:
            if watcher is not None:
                watcher.cancel()
            if not inner.done():
                inner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await inner
