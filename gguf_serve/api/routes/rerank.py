"""POST /v1/rerank, with the aliases Jina, Cohere and Xinference clients call (/rerank: routes/tei.py)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from gguf_serve.api.protocol.rerank import RerankRequest, rerank_response
from gguf_serve.api.serving import ServingContext
from gguf_serve.api.strict_json import StrictJSONRoute

router = APIRouter(route_class=StrictJSONRoute)


@router.post("/v1/rerank")
@router.post("/v1/reranking", include_in_schema=False)
@router.post("/v2/rerank", include_in_schema=False)
async def rerank(body: RerankRequest, request: Request) -> JSONResponse:
    ctx = await ServingContext.for_request(request, body.model, "rerank")
    texts = body.texts(ctx.limits.max_documents)
    result = await ctx.within_deadline(
        "rerank", ctx.loaded.engine.score(body.query, texts, instruction=body.instruction)
    )
    if ctx.metrics is not None:
        ctx.metrics.add_tokens(ctx.loaded.settings.id, result.prompt_tokens, 0)
    return JSONResponse(
        rerank_response(
            ctx.model_name, texts, result.scores, result.prompt_tokens, body.top_n, body.return_documents
        )
    )
