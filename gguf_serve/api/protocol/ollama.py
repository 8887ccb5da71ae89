"""Ollama's API (/api/chat, /api/generate, /api/embed, /api/tags, /api/show, ...): request
schemas, their translation to engine requests, and the response shapes Ollama clients read.

Errors use Ollama's shape, {"error": message}, with the status Ollama gives.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gguf_serve.api.protocol.chat import normalise_tool_calls
from gguf_serve.api.protocol.common import SamplingFields
from gguf_serve.engine.requests import ChatMessage, ChatRequest, InvalidRequest, SamplingParams
from gguf_serve.settings import Limits, ModelSettings

if TYPE_CHECKING:  # plain data handed over by the engine; no llama.cpp import here
    from gguf_serve.engine.model_info import ModelInfo

# The Ollama API version these routes follow (clients compare it to enable features).
OLLAMA_API_VERSION = "0.12.0"
_DURATION = re.compile(r"(-?\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class Options(BaseModel):
    """The runtime `options` Ollama clients send; model-load ones (num_gpu, num_thread, ...)
    are ignored: the profile decides those."""

    model_config = ConfigDict(extra="ignore")

    num_predict: int | None = None
    temperature: float | None = Field(None, ge=0.0, le=5.0)
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    repeat_penalty: float | None = Field(None, gt=0.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    num_ctx: int | None = Field(None, ge=1)


class OllamaBase(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    options: Options | None = None
    keep_alive: float | str | None = None

    def keep_alive_s(self) -> float | None:
        return parse_duration(self.keep_alive)


def parse_duration(value: float | str | None) -> float | None:
    """Ollama's keep_alive: seconds as a number, or a Go duration ("5m", "1h30m", "0", "-1")."""
    if value is None or isinstance(value, int | float):
        return value
    text = value.strip()
    if re.fullmatch(r"-?\d+(?:\.\d+)?", text):
        return float(text)
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise InvalidRequest(f"keep_alive {value!r} is not a duration (e.g. 5m, 30s, 0, -1)", "keep_alive")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def sampling_params(
    options: Options | None,
    fmt: str | dict[str, Any] | None,
    ms: ModelSettings,
    limits: Limits,
    n_ctx: int,
) -> SamplingParams:
    """Ollama's options as the OpenAI routes' sampling fields, so profile defaults and limits
    apply the same way; `format` ("json" or a JSON schema) is enforced with a grammar."""
    o = options or Options()
    if o.num_ctx is not None and o.num_ctx > n_ctx:
        raise InvalidRequest(
            f"options.num_ctx={o.num_ctx} is more than the {n_ctx} tokens this server gives model "
            f"{ms.id!r} per request (n_ctx in the profile)",
            "options.num_ctx",
        )
    fields = SamplingFields(
        temperature=o.temperature,
        top_p=o.top_p if o.top_p else None,  # Ollama accepts 0; OpenAI's field needs > 0
        top_k=o.top_k,
        min_p=o.min_p,
        seed=o.seed,
        stop=o.stop,
        repeat_penalty=o.repeat_penalty,
        presence_penalty=o.presence_penalty,
        frequency_penalty=o.frequency_penalty,
        json_schema=format_schema(fmt),
    )
    # num_predict -1: until the end (or the context is full); -2: fill the context.
    max_tokens = o.num_predict if o.num_predict is not None and o.num_predict > 0 else None
    return fields.sampling_params(ms.sampling, limits, max_tokens, None)


def format_schema(fmt: str | dict[str, Any] | None) -> dict[str, Any] | None:
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return {"type": "object"}
    if isinstance(fmt, dict):
        return fmt
    raise InvalidRequest(f'format must be "json" or a JSON schema object, not {fmt!r}', "format")


class ToolCallIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    function: dict[str, Any]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | None = ""
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_name: str | None = None

    def to_engine(self, index: int) -> ChatMessage:
        if self.images:
            raise InvalidRequest(
                f"messages[{index}] has images; this server's models read text only",
                f"messages.{index}.images",
            )
        role = self.role if self.role in ("system", "user", "assistant", "tool") else "user"
        calls = None
        if self.tool_calls:
            calls = normalise_tool_calls(
                [
                    {"id": f"call_{index}_{i}", "type": "function", "function": c.function}
                    for i, c in enumerate(self.tool_calls)
                ]
            )
        return ChatMessage(
            role=role,
            content=self.content,
            name=self.tool_name,
            tool_calls=calls,
            reasoning_content=self.thinking,
        )


class ChatBody(OllamaBase):
    messages: list[Message] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    format: str | dict[str, Any] | None = None
    stream: bool = True
    think: bool | str | None = None

    def to_engine(self, ms: ModelSettings, limits: Limits, n_ctx: int) -> ChatRequest:
        if len(self.messages) > limits.max_messages:
            raise InvalidRequest(f"at most {limits.max_messages} messages per request", "messages")
        return ChatRequest(
            messages=[m.to_engine(i) for i, m in enumerate(self.messages)],
            params=sampling_params(self.options, self.format, ms, limits, n_ctx),
            tools=self.tools or None,
            template_kwargs=think_kwargs(self.think),
        )


def think_kwargs(think: bool | str | None) -> dict[str, Any]:
    """`think`: true/false, or gpt-oss's levels ("low", "medium", "high": on)."""
    if think is None:
        return {}
    if isinstance(think, str):
        return {"enable_thinking": think.lower() not in ("false", "none", "off", "")}
    return {"enable_thinking": think}


class GenerateBody(OllamaBase):
    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    format: str | dict[str, Any] | None = None
    stream: bool = True
    raw: bool = False
    think: bool | str | None = None
    images: list[str] | None = None

    def to_engine(self, ms: ModelSettings, limits: Limits, n_ctx: int) -> ChatRequest:
        """The prompt through the model's chat template, as Ollama's non-raw generate does."""
        if self.suffix:
            raise InvalidRequest("suffix (fill-in-the-middle) is not supported", "suffix")
        if self.images:
            raise InvalidRequest("images are not supported; this server's models read text only", "images")
        messages = [ChatMessage("system", self.system)] if self.system else []
        messages.append(ChatMessage("user", self.prompt or ""))
        return ChatRequest(
            messages=messages,
            params=sampling_params(self.options, self.format, ms, limits, n_ctx),
            template_kwargs=think_kwargs(self.think),
        )


class EmbedBody(OllamaBase):
    input: str | list[str] = ""
    truncate: bool = True
    dimensions: int | None = Field(None, ge=1)

    def texts(self, max_inputs: int) -> list[str]:
        items = [self.input] if isinstance(self.input, str) else list(self.input)
        if not items:
            raise InvalidRequest("input is an empty list; send at least one text", "input")
        if len(items) > max_inputs:
            raise InvalidRequest(
                f"input has {len(items)} items; this server takes at most {max_inputs} per request", "input"
            )
        return items


class EmbeddingsBody(OllamaBase):
    prompt: str = ""


class ShowBody(BaseModel):
    """Continue posts `name`, the others `model`."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    name: str | None = None
    verbose: bool = False

    @property
    def wanted(self) -> str:
        name = self.model or self.name
        if not name:
            raise InvalidRequest("missing required field 'model'", "model")
        return name


class RerankBody(OllamaBase):
    """Dify's Ollama plugin: {model, query, documents, top_n}."""

    query: str
    documents: list[str]
    top_n: int | None = Field(None, ge=1)

    @field_validator("documents")
    @classmethod
    def _some(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("documents is an empty list; send at least one document")
        return v


# --- responses -------------------------------------------------------------------------------


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")


def resolve_name(name: str, known: Iterable[str]) -> str:
    """Ollama clients append ":latest" to untagged names: both spellings find the model."""
    names = set(known)
    if name in names:
        return name
    base, sep, tag = name.rpartition(":")
    if sep and tag == "latest" and base in names:
        return base
    return name


def parameter_size(n_params: int) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n_params >= size:
            return f"{n_params / size:.{1 if n_params < 10 * size else 0}f}{unit}"
    return str(n_params)


def details(info: ModelInfo | None) -> dict[str, Any]:
    arch = info.architecture if info else ""
    return {
        "parent_model": "",
        "format": "gguf",
        "family": arch,
        "families": [arch] if arch else None,
        "parameter_size": parameter_size(info.n_params) if info else "",
        "quantization_level": info.file_type if info else "",
    }


def digest(ms: ModelSettings, info: ModelInfo | None) -> str:
    """A stable id of what is served (Ollama's is the manifest's sha256; ours names the
    profile entry and the weights' size, type and parameter count)."""
    key = json.dumps(
        [ms.id, ms.file, ms.source, info.size_bytes if info else None, info.file_type if info else None]
    )
    return hashlib.sha256(key.encode()).hexdigest()


def model_entry(name: str, ms: ModelSettings, info: ModelInfo | None, modified_at: str) -> dict[str, Any]:
    return {
        "name": name,
        "model": name,
        "modified_at": modified_at,
        "size": info.size_bytes if info else 0,
        "digest": digest(ms, info),
        "details": details(info),
    }


def capabilities(role: str, info: ModelInfo | None) -> list[str]:
    if role == "embedding":
        return ["embedding"]
    if role == "rerank":
        return ["rerank"]
    caps = ["completion"]
    template = (info.chat_template if info else None) or ""
    if "tools" in template:
        caps.append("tools")
    if "<think>" in template or "enable_thinking" in template:
        caps.append("thinking")
    return caps


def parameters_text(ms: ModelSettings) -> str:
    s = ms.sampling
    lines = [
        f"temperature {s.temperature:g}",
        f"top_k {s.top_k}",
        f"top_p {s.top_p:g}",
        f"min_p {s.min_p:g}",
        f"repeat_penalty {s.repeat_penalty:g}",
    ]
    if s.max_tokens is not None:
        lines.append(f"num_predict {s.max_tokens}")
    return "\n".join(lines)


def show_response(ms: ModelSettings, info: ModelInfo, modified_at: str) -> dict[str, Any]:
    arch = info.architecture
    model_info: dict[str, Any] = {
        "general.architecture": arch,
        "general.basename": info.name,
        "general.file_type": info.file_type,
        "general.parameter_count": info.n_params,
        # What a request may use here (n_ctx), not the training length: clients size prompts by it.
        f"{arch}.context_length": info.n_ctx,
        f"{arch}.embedding_length": info.n_embd,
        "tokenizer.ggml.bos_token": info.bos_token,
        "tokenizer.ggml.eos_token": info.eos_token,
        "tokenizer.ggml.vocab_size": info.n_vocab,
    }
    return {
        "license": "",
        "modelfile": f"# served by gguf-serve from profile entry {ms.id!r}\n",
        "parameters": parameters_text(ms),
        "template": info.chat_template or "",
        "details": details(info),
        "model_info": model_info,
        "capabilities": capabilities(ms.role, info),
        "modified_at": modified_at,
    }


def done_reason(reason: str) -> str:
    """Ollama says "stop" also when the answer is tool calls."""
    return "length" if reason == "length" else "stop"


def tool_calls_json(calls: Iterable[Any]) -> list[dict[str, Any]]:
    """Ollama's tool calls carry `arguments` as an object, not JSON text."""
    out = []
    for c in calls:
        try:
            args = json.loads(c.arguments) if c.arguments.strip() else {}
        except json.JSONDecodeError:
            args = {}
        out.append({"id": c.id, "function": {"index": c.index, "name": c.name, "arguments": args}})
    return out


def timings(
    started_ns: int, first_ns: int | None, end_ns: int, prompt: int, completion: int
) -> dict[str, Any]:
    first = first_ns if first_ns is not None else end_ns
    return {
        "total_duration": end_ns - started_ns,
        "load_duration": 0,
        "prompt_eval_count": prompt,
        "prompt_eval_duration": first - started_ns,
        "eval_count": completion,
        "eval_duration": end_ns - first,
    }
