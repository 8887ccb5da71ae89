"""What crosses between the API process and an engine process (engine_client.py <->
engine_core.py): pickled tuples over a Unix socket pair, and engine errors as plain fields.

API -> engine:
  ("stream", rid, method, args)   start_chats / start_completions: ("started", rid) or ("error", ...)
                                  answers, then ("event", rid, choice, event) until each choice's Finished
  ("call", rid, method, args, kwargs)   embed, score, tokenize, detokenize, render: ("result", rid, value)
  ("cancel", rid)                 a request (every choice of it) whose client went away
  ("close",)                      free everything and exit
engine -> API:
  ("ready", handshake) | ("failed", message)   once, after loading
  ("batch", [message, ...])       what one turn of the engine's event loop produced, in order
  ("stats", dict, EngineHealth)   the engine's counters and health, about once a second
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf_serve.engine.cpu_budget import CpuSlot
from gguf_serve.engine.model_info import ModelInfo
from gguf_serve.engine.requests import (
    ContextOverflow,
    EngineError,
    EngineUnavailable,
    InvalidRequest,
    ModelNotFound,
    NotReady,
    QueueFull,
)
from gguf_serve.settings import Limits, ModelSettings

# The engine methods a client may call or stream by name, and nothing else.
STREAM_METHODS = frozenset({"start_chats", "start_completions"})
CALL_METHODS = frozenset({"embed", "score", "tokenize", "detokenize", "render"})

_ERRORS: dict[str, type[EngineError]] = {
    cls.__name__: cls
    for cls in (
        EngineError,
        InvalidRequest,
        ContextOverflow,
        ModelNotFound,
        QueueFull,
        NotReady,
        EngineUnavailable,
    )
}


@dataclass(frozen=True)
class EngineSpec:
    """What the API process tells a new engine process: the one model it serves."""

    settings: ModelSettings
    path: Path
    limits: Limits
    allow_amx: bool
    log_level: str
    cpu: CpuSlot | None = None  # its place in the server's CPU budget (the fd is passed along)


@dataclass(frozen=True)
class Handshake:
    """What the engine process tells the API once its model is loaded."""

    info: ModelInfo
    n_ctx: int
    n_embd: int = 0
    query_instruction: str | None = None
    kind: str = ""  # a reranker's scorer: head | causal


def error_fields(e: BaseException) -> tuple[str, str, str | None, float | None]:
    """An exception as (class, message, param, retry_after_s); anything not an EngineError is an
    internal error whose message names its type (the traceback stays in the engine's log)."""
    if isinstance(e, EngineError):
        return type(e).__name__, e.message, e.param, getattr(e, "retry_after_s", None)
    return "EngineError", f"internal error in the engine: {type(e).__name__}: {e}", None, None


def error_from(fields: tuple[Any, ...]) -> EngineError:
    name, message, param, retry_after_s = fields
    cls = _ERRORS.get(name, EngineError)
    if cls is QueueFull:
        return QueueFull(message, retry_after_s=retry_after_s or 1.0)
    return cls(message, param)
