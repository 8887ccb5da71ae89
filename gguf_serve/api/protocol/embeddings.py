"""POST /v1/embeddings: the OpenAI request and response shapes."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, field_validator

from gguf_serve.engine.requests import InvalidRequest


class EmbeddingRequest(BaseModel):
    """OpenAI's fields; unknown ones (RAGFlow's drop_params, user, ...) are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(None, description="Matryoshka: keep the first N dimensions, re-normalized")

    @field_validator("input", mode="before")
    @classmethod
    def _input_shape(cls, v: Any) -> Any:
        return check_input_shape(v, "input")

    def inputs(self, max_inputs: int) -> list[str] | list[list[int]]:
        """The input as a list of texts or a list of token lists, checked against the limits."""
        return input_list(self.input, max_inputs, "input")


def check_input_shape(v: Any, name: str) -> Any:
    """One clear message instead of one per union member; ints stay ints (bools are not tokens)."""

    def is_tok(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    ok = (
        isinstance(v, str)
        or (isinstance(v, list) and all(isinstance(x, str) for x in v))
        or (isinstance(v, list) and all(is_tok(x) for x in v))
        or (isinstance(v, list) and all(isinstance(x, list) and all(is_tok(t) for t in x) for x in v))
    )
    if not ok:
        raise ValueError(
            f"{name} must be a string, a list of strings, a list of token ids or a list of token-id lists"
        )
    return v


class TooManyInputs(InvalidRequest):
    code = "too_many_inputs"


def input_list(
    raw: str | list[str] | list[int] | list[list[int]], max_inputs: int, name: str
) -> list[str] | list[list[int]]:
    items: list[Any]
    if isinstance(raw, str):
        items = [raw]
    elif raw and all(isinstance(x, int) for x in raw):
        items = [raw]  # one list of token ids
    else:
        items = list(raw)
    if not items:
        raise InvalidRequest(f"{name} is an empty list; send at least one string or token list", name)
    if len(items) > max_inputs:
        raise TooManyInputs(
            f"{name} has {len(items)} items; this server takes at most {max_inputs} per request", name
        )
    return items


def encode_vector(v: npt.NDArray[np.float32], fmt: str | None) -> list[float] | str:
    if fmt == "base64":  # little-endian float32 bytes, as OpenAI sends them
        return base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode("ascii")
    return [float(x) for x in v.tolist()]


def embedding_response(
    model: str, vectors: Sequence[npt.NDArray[np.float32]], prompt_tokens: int, fmt: str | None
) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encode_vector(v, fmt)}
            for i, v in enumerate(vectors)
        ],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
