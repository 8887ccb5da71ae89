"""The FastAPI application: routes, error shapes, middleware, and the models' lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping

from fastapi import FastAPI
from sse_starlette.sse import AppStatus

from gguf_serve import __version__
from gguf_serve.api.disconnect import CancelOnDisconnect
from gguf_serve.api.errors import install_error_handlers
from gguf_serve.api.observability import Metrics, install_observability
from gguf_serve.api.routes import (
    anthropic,
    chat,
    completions,
    embeddings,
    llama_server,
    models,
    ollama,
    rerank,
    responses,
    tei,
)
from gguf_serve.api.security import install_security
from gguf_serve.engine.registry import ModelRegistry
from gguf_serve.settings import Settings

log = logging.getLogger("gguf_serve.app")

IDLE_CHECK_S = 5.0


def create_app(
    settings: Settings,
    registry: ModelRegistry,
    on_fatal: Callable[[], None] | None = None,
    runtime: Mapping[str, object] | None = None,
) -> FastAPI:
    """`on_fatal` is called when a model fails to load, so the process can exit non-zero.
    `runtime` describes the llama.cpp backend (CPU, kernels, devices) for GET /stats."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.draining = False

        async def load() -> None:
            # Loading runs off the event loop: /health answers 503 meanwhile.
            await asyncio.to_thread(registry.load_all)
            if registry.failures:
                for failure in registry.failures:
                    log.error("cannot serve %s", failure)
                if on_fatal is not None:
                    on_fatal()
            else:
                log.info("all models ready: %s", ", ".join(ms.id for ms in settings.models))

        async def unload_idle() -> None:
            while True:
                await asyncio.sleep(IDLE_CHECK_S)
                # Unloading joins threads and stops engine processes: never on the loop.
                await asyncio.to_thread(registry.unload_idle)

        tasks = [asyncio.create_task(load()), asyncio.create_task(metrics.watch_event_loop())]
        if any(ms.keep_alive for ms in settings.models):
            tasks.append(asyncio.create_task(unload_idle()))
        try:
            yield
        finally:
            app.state.draining = True
            AppStatus.should_exit = True
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.to_thread(registry.close)

    metrics = Metrics()

    # On SIGTERM, in-flight streams finish (uvicorn bounds the wait with shutdown_grace_s)
    # instead of being cut by sse-starlette the moment the signal arrives.
    AppStatus.disable_automatic_graceful_drain()
    app = FastAPI(title="gguf-serve", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.registry = registry
    install_error_handlers(app)
    for module in (
        chat,
        completions,
        embeddings,
        rerank,
        tei,
        models,
        ollama,
        anthropic,
        responses,
        llama_server,
    ):
        app.include_router(module.router)
    # Middleware added last runs first: the access log sees every request, 401 and 413 included.
    install_security(app, settings)
    app.add_middleware(CancelOnDisconnect)  # inside the access log, which records its 499s
    install_observability(app, settings, metrics, registry.stats, runtime, registry.health)
    return app
