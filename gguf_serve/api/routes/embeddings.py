"""POST /v1/embeddings (and /embeddings)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from gguf_serve.api.protocol.embeddings import EmbeddingRequest, embedding_response
from gguf_serve.api.serving import ServingContext
from gguf_serve.api.strict_json import StrictJSONRoute

router = APIRouter(route_class=StrictJSONRoute)


@router.post("/v1/embeddings")
@router.post("/embeddings", include_in_schema=False)
async def create_embeddings(body: EmbeddingRequest, request: Request) -> JSONResponse:
    ctx = await ServingContext.for_request(request, body.model, "embedding")
    inputs = body.inputs(ctx.limits.max_inputs)
    ms = ctx.loaded.settings
    # An id with same_weights_as shares the engine but brings its own query instruction.
    result = await ctx.within_deadline(
        "embedding",
        ctx.loaded.engine.embed(inputs, instruction=ms.query_instruction, dimensions=body.dimensions),
    )
    if ctx.metrics is not None:
        ctx.metrics.add_tokens(ms.id, result.prompt_tokens, 0)
    return JSONResponse(
        embedding_response(ctx.model_name, result.vectors, result.prompt_tokens, body.encoding_format)
    )
