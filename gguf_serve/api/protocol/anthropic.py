"""Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens): the request schema,
its translation to an engine ChatRequest, and the response and error shapes the anthropic
SDK reads. Errors: {"type": "error", "error": {"type": ..., "message": ...}}."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from gguf_serve.api.protocol.chat import normalise_tool_calls
from gguf_serve.api.protocol.common import SamplingFields
from gguf_serve.engine.requests import ChatMessage, ChatRequest, InvalidRequest, ToolCall
from gguf_serve.settings import Limits, ModelSettings

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "api_error",
}
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message}}


class Block(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None
    thinking: str | None = None
    id: str | None = None
    name: str | None = None
    input: Any = None
    tool_use_id: str | None = None
    content: str | list[Block] | None = None
    is_error: bool | None = None


class MessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[Block]


def _no_images(where: str) -> InvalidRequest:
    return InvalidRequest(
        f"{where}: image input is not supported (this server's models read text only)", where
    )


def _text_of(content: str | list[Block] | None, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for i, b in enumerate(content):
        if b.type == "text":
            parts.append(b.text or "")
        elif b.type in ("image", "document"):
            raise _no_images(f"{where}.{i}")
        else:
            raise InvalidRequest(
                f"{where}.{i}: content block of type {b.type!r} is not supported here", where
            )
    return "".join(parts)


def _translate(index: int, m: MessageIn) -> list[ChatMessage]:
    where = f"messages.{index}.content"
    if m.role not in ("user", "assistant"):
        raise InvalidRequest(f"messages.{index}.role must be 'user' or 'assistant'", f"messages.{index}.role")
    if isinstance(m.content, str):
        return [ChatMessage(m.role, m.content)]
    if m.role == "assistant":
        text, thinking, calls = [], [], []
        for i, b in enumerate(m.content):
            if b.type == "text":
                text.append(b.text or "")
            elif b.type == "thinking":
                thinking.append(b.thinking or "")
            elif b.type == "redacted_thinking":
                continue
            elif b.type == "tool_use":
                args = b.input if isinstance(b.input, dict) else {}
                calls.append(
                    {"id": b.id, "type": "function", "function": {"name": b.name, "arguments": args}}
                )
            else:
                raise InvalidRequest(f"{where}.{i}: block of type {b.type!r} is not supported", where)
        return [
            ChatMessage(
                "assistant",
                "".join(text),
                tool_calls=normalise_tool_calls(calls),
                reasoning_content="".join(thinking) or None,
            )
        ]
    # A user turn: tool results answer the assistant's calls, so they come first, then its text.
    out: list[ChatMessage] = []
    text_blocks: list[Block] = []
    for i, b in enumerate(m.content):
        if b.type == "tool_result":
            result = _text_of(b.content, f"{where}.{i}.content")
            if b.is_error:
                result = f"Error: {result}"
            out.append(ChatMessage("tool", result, tool_call_id=b.tool_use_id))
        else:
            text_blocks.append(b)
    if text_blocks or not out:
        out.append(ChatMessage("user", _text_of(text_blocks, where)))
    return out


def _tool(t: dict[str, Any], i: int) -> dict[str, Any]:
    if t.get("type") not in (None, "custom") or not isinstance(t.get("name"), str):
        raise InvalidRequest(
            f"tools.{i}: only client tools with name and input_schema are supported (not {t.get('type')!r})",
            f"tools.{i}",
        )
    fn: dict[str, Any] = {"name": t["name"], "parameters": t.get("input_schema") or {"type": "object"}}
    if t.get("description"):
        fn["description"] = t["description"]
    return {"type": "function", "function": fn}


def tool_choice(choice: dict[str, Any] | None) -> Any:
    """Anthropic's tool_choice as the engine's (OpenAI's): any -> required; a named tool is
    forced (the engine holds the answer to one call of it with a grammar)."""
    if choice is None:
        return None
    kind = choice.get("type")
    if kind == "auto":
        return "auto"
    if kind == "none":
        return "none"
    if kind == "any":
        return "required"
    if kind == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise InvalidRequest(f"unknown tool_choice {choice!r}", "tool_choice")


class MessagesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[MessageIn]
    max_tokens: int | None = Field(None, ge=1)
    system: str | list[Block] | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    # Structured output: {"format": {"type": "json_schema", "schema": {...}}} (output_format: the beta's).
    output_config: dict[str, Any] | None = None
    output_format: dict[str, Any] | None = None

    def json_schema(self) -> dict[str, Any] | None:
        fmt = (self.output_config or {}).get("format") or self.output_format
        if not fmt:
            return None
        if fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
            raise InvalidRequest(
                "output_config.format must be {type: json_schema, schema: {...}}", "output_config"
            )
        schema: dict[str, Any] = fmt["schema"]
        return schema

    def to_engine(self, ms: ModelSettings, limits: Limits) -> ChatRequest:
        if len(self.messages) > limits.max_messages:
            raise InvalidRequest(f"at most {limits.max_messages} messages per request", "messages")
        messages = []
        if self.system:
            messages.append(ChatMessage("system", _text_of(self.system, "system")))
        for i, m in enumerate(self.messages):
            messages.extend(_translate(i, m))
        fields = SamplingFields(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            stop=self.stop_sequences,
            json_schema=self.json_schema(),
        )
        kwargs: dict[str, Any] = {}
        if self.thinking is not None:
            kwargs["enable_thinking"] = self.thinking.get("type") != "disabled"
        tools = [_tool(t, i) for i, t in enumerate(self.tools or [])]
        return ChatRequest(
            messages=messages,
            params=fields.sampling_params(ms.sampling, limits, self.max_tokens, None),
            tools=tools or None,
            tool_choice=tool_choice(self.tool_choice),
            template_kwargs=kwargs,
        )


def usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt,
        "output_tokens": completion,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


def tool_use_block(call: ToolCall) -> dict[str, Any]:
    try:
        args = json.loads(call.arguments) if call.arguments.strip() else {}
    except json.JSONDecodeError:
        args = {}
    return {"type": "tool_use", "id": call.id.replace("call_", "toolu_", 1), "name": call.name, "input": args}


def message(
    mid: str, model: str, content: list[dict[str, Any]], stop: str | None, use: dict[str, Any]
) -> dict[str, Any]:
    return {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": use,
    }
