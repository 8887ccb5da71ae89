"""POST /v1/chat/completions: request schema, translation to the engine, response shapes."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gguf_serve.api.protocol.common import SamplingFields
from gguf_serve.engine.chat_template import check_template_kwargs
from gguf_serve.engine.grammar_check import GrammarError, check_json_schema
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
    tool_calls: list[ToolCallIn] | None = None
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


class ToolCallFunctionIn(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    arguments: str | dict[str, Any] | None = None


class ToolCallIn(BaseModel):
    """An assistant message's earlier tool call, as OpenAI sends it back."""

    model_config = ConfigDict(extra="allow")
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunctionIn


class JsonSchemaFormat(BaseModel):
    """response_format.json_schema: {name, description, strict, schema}."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: str | None = None
    description: str | None = None
    strict: bool | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")


class ResponseFormat(BaseModel):
    """OpenAI's response_format; `schema` beside json_object is llama-server's extension."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"] | None = None
    json_schema: JsonSchemaFormat | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")

    def json_schema_dict(self) -> dict[str, Any] | None:
        """The JSON schema the output must match (None: free text); the engine compiles it."""
        if self.type in (None, "text"):
            return None
        if self.type == "json_object":
            return self.schema_ or {"type": "object"}  # any JSON object
        spec = self.json_schema
        if spec is not None and spec.schema_ is not None:
            return spec.schema_
        extra = (spec.model_extra or {}) if spec is not None else {}
        if "properties" in extra or "type" in extra:  # the schema written in place of the spec
            return dict(extra)
        raise InvalidRequest(
            "response_format.json_schema.schema must be a JSON schema object", "response_format.json_schema"
        )


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatCompletionRequest(SamplingFields):
    messages: list[MessageIn] = Field(min_length=1)
    stream_options: StreamOptions | None = None
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
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
                    tool_calls=normalise_tool_calls(m.tool_calls),
                    tool_call_id=m.tool_call_id,
                    reasoning_content=m.reasoning_content,
                )
            )
        kwargs = dict(self.chat_template_kwargs or {})
        check_template_kwargs(kwargs)
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
        fmt_schema = self.response_format.json_schema_dict() if self.response_format else None
        if fmt_schema is not None:
            if params.grammar is not None or params.json_schema is not None:
                raise InvalidRequest(
                    "send response_format or grammar/json_schema, not both", "response_format"
                )
            params.json_schema = fmt_schema
        for i, tool in enumerate(self.tools or []):
            fn = tool.get("function")
            parameters = fn.get("parameters") if isinstance(fn, dict) else None
            if parameters is not None:
                try:
                    check_json_schema(parameters, "tool's parameters schema")
                except GrammarError as e:
                    raise InvalidRequest(str(e), f"tools.{i}.function.parameters") from None
        return ChatRequest(
            messages=messages,
            params=params,
            tools=self.tools,
            tool_choice=self.tool_choice,
            template_kwargs=kwargs,
            continue_final_message=self.continue_final_message,
            add_generation_prompt=(
                not self.continue_final_message
                if self.add_generation_prompt is None
                else self.add_generation_prompt
            ),
        )


def normalise_tool_calls(
    calls: Sequence[ToolCallIn | dict[str, Any]] | None, param: str = "messages"
) -> list[dict[str, Any]] | None:
    """Earlier tool calls as chat templates take them: arguments as an object (Qwen's renders
    `tool_call.arguments | tojson`). Other APIs' routes pass plain dicts in OpenAI's shape;
    one that is not a tool call is a 400."""
    if not calls:
        return None
    import json

    out = []
    for item in calls:
        try:
            typed = item if isinstance(item, ToolCallIn) else ToolCallIn.model_validate(item)
        except ValidationError as e:
            raise InvalidRequest(f"invalid tool call: {e.errors()[0]['msg']}", param) from None
        call = typed.model_dump(exclude_none=True)
        fn = call["function"]
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
