"""GET /v1/models, /health and /ready."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from gguf_serve.api.strict_json import StrictJSONRoute
from gguf_serve.engine.registry import LoadState, ModelRegistry

router = APIRouter(route_class=StrictJSONRoute)
_CREATED = int(time.time())


@router.get("/v1/models")
@router.get("/models", include_in_schema=False)
async def list_models(request: Request) -> dict[str, Any]:
    data = []
    # The profile's order, not the load order: `models.list().data[0]` is the first model
    # the profile names (a chat model in the shipped ones), never an embedder loaded first.
    order = {m.id: i for i, m in enumerate(request.app.state.settings.models)}
    entries = sorted(request.app.state.registry.entries(), key=lambda e: order.get(e[0].id, len(order)))
    for ms, state, loaded in entries:
        n_ctx = getattr(loaded.engine, "n_ctx", None) if loaded is not None else None
        info: dict[str, Any] = {
            "object": "model",
            "created": _CREATED,
            "owned_by": "gguf-serve",
            "role": ms.role,
            "model_type": ms.role,  # RAGFlow's model discovery reads model_type
            "context_length": n_ctx or ms.n_ctx,
            "max_model_len": n_ctx or ms.n_ctx,
            "loaded": state is LoadState.READY,
            "state": state.value,
        }
        if ms.role == "rerank":
            info["scorer"] = getattr(loaded.engine, "kind", ms.scorer) if loaded is not None else ms.scorer
        for name in ms.listed_names:
            data.append({"id": name, **info, **({"alias_of": ms.id} if name != ms.id else {})})
    return {"object": "list", "data": data}


def _unhealthy(registry: ModelRegistry) -> dict[str, dict[str, Any]]:
    return {
        mid: {"status": h.status, "reason": h.reason, "restarts": h.restarts}
        for mid, h in registry.health().items()
        if h.status != "ok"
    }


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """Liveness: 503 while the models load (or if one failed, or cannot recover by itself), 200
    once serving. A model whose engine process is restarting leaves it 200 ("degraded"): the
    server is healing itself, and a liveness probe that killed it would undo that."""
    registry: ModelRegistry = request.app.state.registry
    if getattr(request.app.state, "draining", False):
        return JSONResponse({"status": "shutting down"}, status_code=503)
    if registry.failures:
        return JSONResponse({"status": "error", "errors": registry.failures}, status_code=503)
    if not registry.ready:
        return JSONResponse({"status": "loading"}, status_code=503)
    down = _unhealthy(registry)
    if any(h["status"] == "failed" for h in down.values()):
        return JSONResponse({"status": "error", "models": down}, status_code=503)
    if down:
        return JSONResponse({"status": "degraded", "models": down})
    return JSONResponse({"status": "ok"})


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """Readiness: every model that is not lazily loaded is ready, and every engine serves."""
    registry: ModelRegistry = request.app.state.registry
    states = {ms.id: state.value for ms, state, _ in registry.entries()}
    down = _unhealthy(registry)
    for mid, h in down.items():
        states[mid] = h["status"]
    ok = (
        registry.ready
        and not registry.failures
        and not down
        and not getattr(request.app.state, "draining", False)
    )
    body: dict[str, Any] = {"status": "ready" if ok else "not ready", "models": states}
    if down:
        body["down"] = down
    return JSONResponse(body, status_code=200 if ok else 503)
