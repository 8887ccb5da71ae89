"""llama-server's extra routes: /tokenize, /detokenize, /props and (behind slots_endpoint)
/slots, for the clients built on llama-server (llama.vscode, SillyTavern, its web UI)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from gguf_serve.api.errors import error_response
from gguf_serve.api.protocol.llama_server import (
    DetokenizeRequest,
    TokenizeRequest,
    props_response,
    slots_response,
    tokenize_response,
)
from gguf_serve.api.serving import ServingContext
from gguf_serve.api.strict_json import StrictJSONRoute
from gguf_serve.engine.requests import ModelNotFound
from gguf_serve.settings import Role, Settings

router = APIRouter(route_class=StrictJSONRoute)


def _role(request: Request, model: str | None) -> Role:
    """Any model tokenizes: the named one's role, else the first chat model's."""
    settings: Settings = request.app.state.settings
    if model:
        for ms in settings.models:
            if model in ms.names:
                return ms.role
        raise ModelNotFound(f"The model {model!r} does not exist", "model")
    return "chat" if any(m.role == "chat" for m in settings.models) else settings.models[0].role


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
    ctx: ServingContext[Any] = await ServingContext.for_request(
        request, body.model, _role(request, body.model)
    )
    engine = ctx.loaded.engine
    tokens = await engine.tokenize(
        body.content, add_special=body.add_special, parse_special=body.parse_special
    )
    pieces = await engine.detokenize(tokens) if body.with_pieces else None
    return tokenize_response(tokens, pieces)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, Any]:
    ctx: ServingContext[Any] = await ServingContext.for_request(
        request, body.model, _role(request, body.model)
    )
    pieces = await ctx.loaded.engine.detokenize(body.tokens)
    return {"content": b"".join(pieces).decode("utf-8", errors="replace")}


@router.get("/props")
async def props(request: Request, model: str | None = None) -> dict[str, Any]:
    ctx: ServingContext[Any] = await ServingContext.for_request(request, model, _role(request, model))
    return props_response(ctx.loaded.settings, ctx.loaded.engine.info, ctx.model_name)


@router.get("/slots")
async def slots(request: Request, model: str | None = None) -> Any:
    settings: Settings = request.app.state.settings
    if not settings.slots_endpoint:
        # llama-server answers 501 without --slots; a 404 says the same without looking like a
        # server failure (no 5xx for a request the server chose not to serve).
        return error_response(404, "the slots endpoint is off on this server (setting slots_endpoint)")
    ctx: ServingContext[Any] = await ServingContext.for_request(request, model, "chat")
    return JSONResponse(slots_response(ctx.loaded.engine.info, ctx.loaded.engine.stats()))
