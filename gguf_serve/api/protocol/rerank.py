"""POST /v1/rerank: one request shape for Jina, Cohere (v1/v2) and Xinference clients."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from gguf_serve.engine.requests import InvalidRequest


class RerankDocument(BaseModel):
    model_config = ConfigDict(extra="ignore")

    text: str


class RerankRequest(BaseModel):
    """Unknown fields (max_chunks_per_doc, return_len, rank_fields, ...) are ignored. Booleans
    also come as the strings "true"/"false" (Xinference); pydantic's lax mode reads those."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    query: str
    documents: list[str | RerankDocument]
    top_n: int | None = Field(None, ge=1)
    return_documents: bool | None = None
    instruction: str | None = None

    def texts(self, max_documents: int) -> list[str]:
        if not self.documents:
            raise InvalidRequest("documents is an empty list; send at least one document", "documents")
        if len(self.documents) > max_documents:
            raise InvalidRequest(
                f"documents has {len(self.documents)} items; this server takes at most {max_documents} "
                "per request",
                "documents",
            )
        return [d if isinstance(d, str) else d.text for d in self.documents]


def rerank_response(
    model: str,
    texts: Sequence[str],
    scores: Sequence[float],
    prompt_tokens: int,
    top_n: int | None,
    return_documents: bool | None,
) -> dict[str, Any]:
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    if top_n is not None:
        order = order[:top_n]
    results: list[dict[str, Any]] = []
    for i in order:
        item: dict[str, Any] = {"index": i, "relevance_score": float(scores[i])}
        if return_documents:
            item["document"] = {"text": texts[i]}
        results.append(item)
    return {
        "id": f"rerank-{uuid.uuid4().hex[:24]}",
        "model": model,
        "results": results,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
