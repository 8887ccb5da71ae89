"""llama-server's extras: POST /tokenize, POST /detokenize, GET /props, GET /slots. Shapes as
llama-server answers them (llama.vscode, SillyTavern and llama.cpp's web UI read them), less
anything that names a file on this machine."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from gguf_serve import __version__
from gguf_serve.settings import ModelSettings

if TYPE_CHECKING:  # plain data handed over by the engine; no llama.cpp import here
    from gguf_serve.engine.model_info import ModelInfo


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    content: str
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int] = Field(default_factory=list)


def tokenize_response(tokens: Sequence[int], pieces: Sequence[bytes] | None) -> dict[str, Any]:
    """with_pieces: each token's text, or its bytes as a list where they are not valid UTF-8
    on their own (one piece of a multi-byte character)."""
    if pieces is None:
        return {"tokens": list(tokens)}
    out = []
    for tok, raw in zip(tokens, pieces, strict=True):
        try:
            piece: str | list[int] = raw.decode("utf-8")
        except UnicodeDecodeError:
            piece = list(raw)
        out.append({"id": tok, "piece": piece})
    return {"tokens": out}


def props_response(ms: ModelSettings, info: ModelInfo, model_name: str) -> dict[str, Any]:
    s = ms.sampling
    params = {
        "temperature": s.temperature,
        "top_k": s.top_k,
        "top_p": s.top_p,
        "min_p": s.min_p,
        "repeat_penalty": s.repeat_penalty,
        "presence_penalty": s.presence_penalty,
        "frequency_penalty": s.frequency_penalty,
        "repeat_last_n": s.penalty_last_n,
        "n_predict": s.max_tokens if s.max_tokens is not None else -1,
    }
    return {
        "default_generation_settings": {"n_ctx": info.n_ctx, "params": params},
        "total_slots": info.n_slots,
        "model_alias": model_name,
        "model_name": info.name,
        "chat_template": info.chat_template or "",
        "bos_token": info.bos_token,
        "eos_token": info.eos_token,
        "build_info": f"gguf-serve {__version__}",
        "modalities": {"vision": False, "audio": False},
        "role": ms.role,
    }


def slots_response(info: ModelInfo, stats: dict[str, float]) -> list[dict[str, Any]]:
    """What the Protocols tell of the slots: how many, and how many are busy (the scheduler
    fills the lowest free ones first only loosely, so is_processing counts, not places)."""
    busy = int(stats.get("busy_slots", 0))
    return [{"id": i, "n_ctx": info.n_ctx, "is_processing": i < busy} for i in range(info.n_slots)]
