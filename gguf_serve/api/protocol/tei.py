"""Hugging Face text-embeddings-inference (TEI): POST /embed, POST /rerank with `texts`, GET /info.

RAGFlow's HuggingFace provider and other TEI clients speak this. TEI serves one model per
process, so these requests name none: the profile's `tei` settings (or the first model of
the role) decide. Errors use TEI's shape, {"error": message, "error_type": kind}.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, field_validator

from gguf_serve.api.protocol.embeddings import TooManyInputs, check_input_shape, input_list
from gguf_serve.engine.requests import (
    ContextOverflow,
    EngineError,
    InvalidRequest,
    ModelNotFound,
    NotReady,
    QueueFull,
)
from gguf_serve.settings import ModelSettings, Role, Settings

TruncationDirection = Literal["left", "right"]
# Names Sentence Transformers configs give the prompt of passages (no instruction).
DOCUMENT_PROMPTS = frozenset({"document", "passage", "doc", "corpus"})
GGUF_TYPE = re.compile(r"(?:^|[-_.])(F32|F16|BF16|I?Q\d[A-Z0-9_]*)$", re.IGNORECASE)


class EmptyInput(InvalidRequest):
    code = "empty"


def _direction(v: Any) -> Any:
    # TEI's enum is spelled Left/Right; accept any case.
    return v.lower() if isinstance(v, str) else v


class TEIEmbedRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    inputs: str | list[str] | list[int] | list[list[int]]
    normalize: bool = True
    truncate: bool | None = Field(None, description="None: the model's `truncate` setting")
    truncation_direction: TruncationDirection = "right"
    prompt_name: str | None = None
    dimensions: int | None = Field(None, ge=1)

    @field_validator("inputs", mode="before")
    @classmethod
    def _inputs_shape(cls, v: Any) -> Any:
        return check_input_shape(v, "inputs")

    @field_validator("truncation_direction", mode="before")
    @classmethod
    def _direction_case(cls, v: Any) -> Any:
        return _direction(v)

    def input_list(self, max_inputs: int) -> list[str] | list[list[int]]:
        if self.inputs == [] or self.inputs == "":
            raise EmptyInput("`inputs` cannot be empty", "inputs")
        return input_list(self.inputs, max_inputs, "inputs")

    def instruction(self, ms: ModelSettings, models: Sequence[ModelSettings]) -> str | None:
        """prompt_name -> the query instruction of this model's weights (Qwen3-Embedding's
        "query" prompt); a document prompt -> none; no prompt_name -> the id's own setting."""
        if self.prompt_name is None:
            return ms.query_instruction
        name = self.prompt_name.strip().lower()
        if name in DOCUMENT_PROMPTS:
            return None
        base = ms.same_weights_as or ms.id
        family = [m for m in models if m.role == "embedding" and base in (m.id, m.same_weights_as)]
        query = next((m.query_instruction for m in [ms, *family] if m.query_instruction), None)
        if name == "query" and query is not None:
            return query
        known = "query, document" if query is not None else "document"
        raise InvalidRequest(
            f"prompt_name {self.prompt_name!r} is not a prompt of model {ms.id!r} (it has: {known}); "
            "a query prompt comes from the profile's query_instruction",
            "prompt_name",
        )


class TEIRerankRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    query: str
    texts: list[str]
    truncate: bool | None = Field(None, description="None: the model's `truncate` setting")
    truncation_direction: TruncationDirection = "right"
    raw_scores: bool = False
    return_text: bool = False

    @field_validator("truncation_direction", mode="before")
    @classmethod
    def _direction_case(cls, v: Any) -> Any:
        return _direction(v)

    def text_list(self, max_documents: int) -> list[str]:
        if not self.texts:
            raise EmptyInput("`texts` cannot be empty", "texts")
        if len(self.texts) > max_documents:
            raise TooManyInputs(
                f"texts has {len(self.texts)} items; this server takes at most {max_documents} per request",
                "texts",
            )
        if self.truncation_direction == "left":
            raise InvalidRequest(
                "truncation_direction 'left' is not supported for rerank", "truncation_direction"
            )
        return self.texts


def is_tei_rerank(body: Any) -> bool:
    """/rerank serves TEI (`texts`) and Jina/Cohere (`documents`) bodies; told apart here."""
    return isinstance(body, dict) and "texts" in body and "documents" not in body


def embed_response(vectors: Sequence[npt.NDArray[np.float32]]) -> list[list[float]]:
    return [np.asarray(v, dtype=np.float32).tolist() for v in vectors]


def rerank_response(
    texts: Sequence[str], scores: Sequence[float], raw: Sequence[float], raw_scores: bool, return_text: bool
) -> list[dict[str, Any]]:
    values = raw if raw_scores and len(raw) == len(scores) else scores
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    out: list[dict[str, Any]] = []
    for i in order:
        item: dict[str, Any] = {"index": i, "score": float(values[i])}
        if return_text:
            item["text"] = texts[i]
        out.append(item)
    return out


def tei_model(settings: Settings, role: Role) -> str | None:
    """The model a TEI route uses: the `tei` setting, else the profile's first of the role."""
    chosen = settings.tei.embedding_model if role == "embedding" else settings.tei.rerank_model
    if chosen is not None:
        return chosen
    return next((m.id for m in settings.models if m.role == role), None)


def _dtype(file: str | None) -> str:
    stem = (file or "").rsplit("/", 1)[-1].removesuffix(".gguf")
    m = GGUF_TYPE.search(stem)
    return (
        {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(m.group(1).upper(), m.group(1))
        if m
        else "gguf"
    )


def info_response(
    ms: ModelSettings,
    settings: Settings,
    version: str,
    n_ctx: int | None,
    pooling: str | None,
) -> dict[str, Any]:
    """TEI's /info for an embedding or rerank model; TGI's fields for a chat model."""
    model_type: dict[str, Any] | str
    if ms.role == "embedding":
        model_type = {"embedding": {"pooling": pooling or ms.pooling or "mean"}}
    elif ms.role == "rerank":
        model_type = {"reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}}
    else:
        model_type = "text-generation"
    limit = n_ctx or ms.n_ctx
    return {
        "model_id": ms.id,
        "model_sha": None,
        "model_dtype": _dtype(ms.file),
        "model_type": model_type,
        "max_concurrent_requests": ms.parallel + settings.limits.max_queue,
        "max_input_length": limit,
        "max_batch_tokens": max(ms.n_batch, limit) if ms.role != "chat" else ms.n_batch,
        "max_batch_requests": ms.parallel,
        "max_client_batch_size": settings.limits.max_documents
        if ms.role == "rerank"
        else settings.limits.max_inputs,
        "auto_truncate": ms.truncate,
        "tokenization_workers": 1,
        "version": version,
        "sha": None,
        "docker_label": None,
    }


def tei_error(exc: EngineError | None, message: str) -> tuple[int, dict[str, str]]:
    """An error as TEI answers it: (status, {"error", "error_type"}). `exc` None: the body
    did not match the schema (TEI answers 422 there too)."""
    if exc is None:
        status, kind = 422, "Validation"
    elif isinstance(exc, EmptyInput):
        status, kind = 400, "Empty"
    elif isinstance(exc, ContextOverflow | TooManyInputs):
        status, kind = 413, "Validation"
    elif isinstance(exc, QueueFull):
        status, kind = 429, "Overloaded"
    elif isinstance(exc, NotReady):
        status, kind = 503, "Unhealthy"
    elif isinstance(exc, ModelNotFound):
        status, kind = 404, "Validation"
    elif exc.status < 500:
        status, kind = 422, "Validation"
    else:
        status, kind = 424, "Backend"
    return status, {"error": message, "error_type": kind}
