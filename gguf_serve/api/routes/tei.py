"""Hugging Face text-embeddings-inference's routes: POST /embed, POST /rerank (`texts`), GET /info.

/rerank is shared with the Jina/Cohere shape (`documents`): the body decides which one
answers, and which error shape a failure gets.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from fastapi import APIRouter, Body, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from gguf_serve import __version__
from gguf_serve.api.errors import describe_validation
from gguf_serve.api.protocol.rerank import RerankRequest
from gguf_serve.api.protocol.tei import (
    TEIEmbedRequest,
    TEIRerankRequest,
    embed_response,
    info_response,
    is_tei_rerank,
    rerank_response,
    tei_error,
    tei_model,
)
from gguf_serve.api.routes import rerank as jina
from gguf_serve.api.serving import ServingContext
from gguf_serve.api.strict_json import StrictJSONRoute, strict_request
from gguf_serve.engine.requests import EngineError
from gguf_serve.settings import Settings

M = TypeVar("M", bound=BaseModel)


async def _speaks_tei(request: Request) -> bool:
    if request.url.path != "/rerank":
        return True
    try:
        return is_tei_rerank(json.loads(await request.body()))
    except ValueError:
        return False


class TEIRoute(StrictJSONRoute):
    """Errors of a TEI request in TEI's shape; other requests (Jina's /rerank) keep OpenAI's."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def tei_handler(request: Request) -> Response:
            request = strict_request(request)  # one object, so the body read below is cached
            try:
                return await handler(request)
            except (RequestValidationError, EngineError) as exc:
                if not await _speaks_tei(request):
                    raise
                if isinstance(exc, RequestValidationError):
                    status, body = tei_error(None, describe_validation(exc)[0])
                else:
                    status, body = tei_error(exc, exc.message)
                return JSONResponse(body, status_code=status)

        return tei_handler


router = APIRouter(route_class=TEIRoute)


def _parse(model: type[M], body: dict[str, Any]) -> M:
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None


@router.post("/embed")
async def tei_embed(body: TEIEmbedRequest, request: Request) -> JSONResponse:
    settings: Settings = request.app.state.settings
    ctx = await ServingContext.for_request(request, tei_model(settings, "embedding"), "embedding")
    inputs = body.input_list(ctx.limits.max_inputs)
    ms = ctx.loaded.settings
    result = await ctx.within_deadline(
        "embedding",
        ctx.loaded.engine.embed(
            inputs,
            instruction=body.instruction(ms, settings.models),
            dimensions=body.dimensions,
            normalize=body.normalize,
            truncate=body.truncate,
            cut_left=body.truncation_direction == "left",
        ),
    )
    if ctx.metrics is not None:
        ctx.metrics.add_tokens(ms.id, result.prompt_tokens, 0)
    return JSONResponse(
        embed_response(result.vectors), headers={"x-compute-tokens": str(result.prompt_tokens)}
    )


async def tei_rerank(body: TEIRerankRequest, request: Request) -> JSONResponse:
    settings: Settings = request.app.state.settings
    ctx = await ServingContext.for_request(request, tei_model(settings, "rerank"), "rerank")
    texts = body.text_list(ctx.limits.max_documents)
    result = await ctx.within_deadline(
        "rerank", ctx.loaded.engine.score(body.query, texts, truncate=body.truncate)
    )
    if ctx.metrics is not None:
        ctx.metrics.add_tokens(ctx.loaded.settings.id, result.prompt_tokens, 0)
    return JSONResponse(
        rerank_response(texts, result.scores, result.raw_scores, body.raw_scores, body.return_text),
        headers={"x-compute-tokens": str(result.prompt_tokens)},
    )


@router.post("/rerank", include_in_schema=False)
async def rerank_either(request: Request, body: dict[str, Any] = Body(...)) -> Response:
    """TEI's body has `texts`, Jina's and Cohere's `documents`."""
    if is_tei_rerank(body):
        return await tei_rerank(_parse(TEIRerankRequest, body), request)
    return await jina.rerank(_parse(RerankRequest, body), request)


@router.get("/info")
async def tei_info(request: Request) -> JSONResponse:
    """TEI's /info for the model /embed serves (else the /rerank one, else the first chat model)."""
    settings: Settings = request.app.state.settings
    name = tei_model(settings, "embedding") or tei_model(settings, "rerank")
    named = [m for m in settings.models if name in m.names]
    ms = named[0] if named else (settings.models[0] if settings.models else None)
    if ms is None:
        return JSONResponse(
            {"error": "this server has no models", "error_type": "Unhealthy"}, status_code=503
        )
    n_ctx: int | None = None
    pooling: str | None = None
    for entry, _state, loaded in request.app.state.registry.entries():
        if entry.id == ms.id and loaded is not None:
            n_ctx = getattr(loaded.engine, "n_ctx", None)
            pooling = getattr(loaded.engine, "pooling", None)
    return JSONResponse(info_response(ms, settings, __version__, n_ctx, pooling))
