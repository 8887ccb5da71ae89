"""Plain request and event objects passed between the API layer and the engine.

No HTTP and no llama.cpp types here: the API translates protocol shapes into these, and
the engine answers with these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from gguf_serve.settings import SamplingDefaults

FinishReason = Literal["stop", "length", "tool_calls", "cancelled", "error"]


class EngineError(Exception):
    """Base of the errors the engine reports to callers. `status` is the HTTP-ish class."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(EngineError):
    status = 400
    code = "invalid_request"


class ContextOverflow(InvalidRequest):
    code = "context_length_exceeded"


class ModelNotFound(EngineError):
    status = 404
    code = "model_not_found"


class QueueFull(EngineError):
    status = 429
    code = "queue_full"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotReady(EngineError):
    status = 503
    code = "model_not_ready"


class EngineUnavailable(NotReady):
    """The engine process serving this model died (its requests fail) or is restarting."""

    code = "engine_unavailable"


_DEFAULTS = SamplingDefaults()  # settings.py declares each sampling default, once


@dataclass
class SamplingParams:
    temperature: float = _DEFAULTS.temperature
    top_p: float = _DEFAULTS.top_p
    top_k: int = _DEFAULTS.top_k
    min_p: float = _DEFAULTS.min_p
    repeat_penalty: float = _DEFAULTS.repeat_penalty
    presence_penalty: float = _DEFAULTS.presence_penalty
    frequency_penalty: float = _DEFAULTS.frequency_penalty
    penalty_last_n: int = _DEFAULTS.penalty_last_n
    seed: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    grammar: str | None = None  # GBNF, root rule "root"
    json_schema: dict[str, Any] | None = None  # compiled into `grammar` by the engine
    max_tokens: int | None = None  # None: until EOS or the context is full
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    bytes: list[int]
    top: list[tuple[str, float, list[int]]]


@dataclass
class TextChunk:
    """Newly generated text (never a partial UTF-8 character) and its tokens' logprobs."""

    text: str
    n_tokens: int
    logprobs: list[TokenLogprob] | None = None

    def merged(self, later: TextChunk) -> TextChunk:
        logprobs = (self.logprobs or []) + (later.logprobs or [])
        return TextChunk(self.text + later.text, self.n_tokens + later.n_tokens, logprobs or None)


@dataclass
class Finished:
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    error: str | None = None
    # 400: the request itself made the generation fail (its grammar); 503: the engine process
    # died under it (retry); else 500.
    error_status: int = 500


GenerationEvent = TextChunk | Finished


@dataclass(frozen=True)
class EngineHealth:
    """ok; restarting (its engine process died: its requests failed, a new one is starting);
    or failed (it cannot serve and will not recover by itself: the process needs a restart)."""

    status: Literal["ok", "restarting", "failed"] = "ok"
    reason: str | None = None
    restarts: int = 0


HEALTHY = EngineHealth()


@dataclass
class ChatMessage:
    role: str
    content: str | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    def as_template_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"role": self.role, "content": self.content if self.content is not None else ""}
        for key in ("name", "tool_calls", "tool_call_id", "reasoning_content"):
            value = getattr(self, key)
            if value is not None:
                d[key] = value
        return d


@dataclass
class ChatRequest:
    messages: list[ChatMessage]
    params: SamplingParams
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    parse_reasoning: bool = True
    # Assistant prefill (vLLM's and llama-server's fields): the answer continues the last
    # (assistant) message instead of starting a new one.
    continue_final_message: bool = False
    add_generation_prompt: bool = True

    @property
    def tools_enabled(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"


@dataclass
class ToolCall:
    index: int
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it


@dataclass
class ChatDelta:
    """One step of a chat answer: reasoning, content and tool calls kept apart."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls or self.logprobs)
