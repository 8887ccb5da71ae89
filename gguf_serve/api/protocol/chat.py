"""POST /v1/chat/completions: request schema, translation to the engine, response shapes."""

from __future__ import annotations

import contextlib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gguf_serve.api.protocol.common import SamplingFields
from gguf_serve.engine.requests import ChatMessage, ChatRequest, InvalidRequest, TokenLogprob, ToolCall
from gguf_serve.settings import Limits, ModelSettings


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class MessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    def text(self, index: int) -> str | None:
        if self.content is None or isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise InvalidRequest(
                    f"messages[{index}]: content part of type {part.type!r} is not supported (text only)",
                    f"messages.{index}.content",
                )
            parts.append(part.text)
        return "".join(parts)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatCompletionRequest(SamplingFields):
    messages: list[MessageIn] = Field(min_length=1)
    stream_options: StreamOptions | None = None
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # RAGFlow sends this at the top level for Qwen3 models.
    enable_thinking: bool | None = None
    # Assistant prefill, as vLLM and llama-server take it.
    continue_final_message: bool = False
    add_generation_prompt: bool | None = None

    def to_engine(self, ms: ModelSettings, limits: Limits) -> ChatRequest:
        if len(self.messages) > limits.max_messages:
            raise InvalidRequest(f"at most {limits.max_messages} messages per request", "messages")
        messages = []
        for i, m in enumerate(self.messages):
            role = "system" if m.role == "developer" else ("tool" if m.role == "function" else m.role)
            messages.append(
                ChatMessage(
                    role=role,
                    content=m.text(i),
                    name=m.name,
                    tool_calls=_normalise_tool_calls(m.tool_calls),
                    tool_call_id=m.tool_call_id,
                    reasoning_content=m.reasoning_content,
                )
            )
        kwargs = dict(self.chat_template_kwargs or {})
        if self.enable_thinking is not None:
            kwargs.setdefault("enable_thinking", self.enable_thinking)
        top = self.top_logprobs if self.logprobs else None
        params = self.sampling_params(
            ms.sampling,
            limits,
            self.max_completion_tokens or self.max_tokens,
            (top or 0) if self.logprobs else None,
        )
        if self.continue_final_message:
            if self.add_generation_prompt:
                raise InvalidRequest(
                    "continue_final_message and add_generation_prompt cannot both be true",
                    "continue_final_message",
                )
            if self.messages[-1].role != "assistant":
                raise InvalidRequest(
                    "continue_final_message needs an assistant message last (the text to continue)",
                    "messages",
                )
        custom = params.grammar is not None or params.json_schema is not None
        if custom and (self.response_format or {}).get("type") not in (None, "text"):
            raise InvalidRequest("send response_format or grammar/json_schema, not both", "response_format")
        return ChatRequest(
            messages=messages,
            params=params,
            tools=self.tools,
            tool_choice=self.tool_choice,
            template_kwargs=kwargs,
            response_format=self.response_format,
            continue_final_message=self.continue_final_message,
            add_generation_prompt=(
                not self.continue_final_message
                if self.add_generation_prompt is None
                else self.add_generation_prompt
            ),
        )


def _normalise_tool_calls(calls: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Templates expect arguments as an object (Qwen's renders `tool_call.arguments | tojson`)."""
    if not calls:
        return None
    import json

    out = []
    for call in calls:
        fn = dict(call.get("function") or {})
        args = fn.get("arguments")
        if isinstance(args, str):
            with contextlib.suppress(json.JSONDecodeError):
                fn["arguments"] = json.loads(args) if args.strip() else {}
        out.append({**call, "function": fn, "name": fn.get("name"), "arguments": fn.get("arguments")})
    return out


def tool_call_json(c: ToolCall) -> dict[str, Any]:
    return {
        "index": c.index,
        "id": c.id,
        "type": "function",
        "function": {"name": c.name, "arguments": c.arguments},
    }


def logprobs_json(items: list[TokenLogprob]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": lp.token,
                "logprob": lp.logprob,
                "bytes": lp.bytes,
                "top_logprobs": [{"token": t, "logprob": v, "bytes": b} for t, v, b in lp.top],
            }
            for lp in items
        ]
    }
