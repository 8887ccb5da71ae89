"""OpenAI's Responses API (/v1/responses, /v1/responses/input_tokens): the request schema,
its translation to an engine ChatRequest, and the output items and response object.

Responses are not stored: `previous_response_id` is refused with a 400 that says to send the
conversation in `input` (the server keeps no per-user state)."""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from gguf_serve.api.protocol.chat import normalise_tool_calls
from gguf_serve.api.protocol.common import SamplingFields
from gguf_serve.engine.requests import ChatMessage, ChatRequest, Finished, InvalidRequest, ToolCall
from gguf_serve.settings import Limits, ModelSettings

THINKING_OFF = ("none", "minimal")


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def _text(content: Any, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text", "reasoning_text", "summary_text"):
            parts.append(part.get("text") or "")
        elif kind == "refusal":
            parts.append(part.get("refusal") or "")
        else:
            raise InvalidRequest(
                f"{where}.{i}: content of type {kind!r} is not supported (this server's models read text only)",
                where,
            )
    return "".join(parts)


def input_messages(items: str | list[dict[str, Any]], instructions: str | None) -> list[ChatMessage]:
    """Input items as chat messages: a reasoning item, the function calls and the assistant
    message that follow it are one assistant turn; function_call_output items are tool messages."""
    out: list[ChatMessage] = [ChatMessage("system", instructions)] if instructions else []
    if isinstance(items, str):
        return [*out, ChatMessage("user", items)]
    turn: ChatMessage | None = None

    def assistant() -> ChatMessage:
        nonlocal turn
        if turn is None:
            turn = ChatMessage("assistant", "")
            out.append(turn)
        return turn

    for i, item in enumerate(items):
        where = f"input.{i}"
        kind = item.get("type", "message")
        if kind == "reasoning":
            a = assistant()
            if a.content or a.tool_calls:  # reasoning starts a new turn
                turn = None
                a = assistant()
            text = _text(item.get("content") or item.get("summary") or [], where)
            a.reasoning_content = (a.reasoning_content or "") + text
        elif kind == "function_call":
            args = item.get("arguments") or "{}"
            call = {
                "id": item.get("call_id"),
                "type": "function",
                "function": {"name": item.get("name"), "arguments": args},
            }
            a = assistant()
            a.tool_calls = [*(a.tool_calls or []), *(normalise_tool_calls([call]) or [])]
        elif kind == "function_call_output":
            turn = None
            output = item.get("output")
            out.append(ChatMessage("tool", _text(output, where), tool_call_id=item.get("call_id")))
        elif kind == "message":
            role = item.get("role")
            text = _text(item.get("content"), f"{where}.content")
            if role == "assistant":
                a = assistant()
                if a.content or a.tool_calls:
                    turn = None
                    a = assistant()
                a.content = text
                turn = None if text else turn
            elif role in ("user", "system", "developer"):
                turn = None
                out.append(ChatMessage("system" if role == "developer" else role, text))
            else:
                raise InvalidRequest(f"{where}.role {role!r} is not supported", f"{where}.role")
        else:
            raise InvalidRequest(f"{where}: input items of type {kind!r} are not supported", where)
    return out


def _tool(t: dict[str, Any], i: int) -> dict[str, Any]:
    if t.get("type") != "function" or not isinstance(t.get("name"), str):
        raise InvalidRequest(
            f"tools.{i}: only function tools are supported (not {t.get('type')!r})", f"tools.{i}"
        )
    fn = {"name": t["name"], "parameters": t.get("parameters") or {"type": "object"}}
    if t.get("description"):
        fn["description"] = t["description"]
    return {"type": "function", "function": fn}


def tool_choice(choice: str | dict[str, Any] | None) -> Any:
    if isinstance(choice, dict):
        if choice.get("type") == "function" and isinstance(choice.get("name"), str):
            return {"type": "function", "function": {"name": choice["name"]}}
        raise InvalidRequest(f"unsupported tool_choice {choice!r}", "tool_choice")
    return choice


def text_schema(text: dict[str, Any] | None) -> dict[str, Any] | None:
    fmt = (text or {}).get("format") or {}
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema" and isinstance(fmt.get("schema"), dict):
        schema: dict[str, Any] = fmt["schema"]
        return schema
    raise InvalidRequest(f"unsupported text.format {fmt!r}", "text.format")


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    input: str | list[dict[str, Any]] = ""
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    stream: bool = False
    previous_response_id: str | None = None
    metadata: dict[str, Any] | None = None

    def to_engine(self, ms: ModelSettings, limits: Limits) -> ChatRequest:
        if self.previous_response_id:
            raise InvalidRequest(
                "previous_response_id is not supported: this server does not store responses; "
                "send the conversation so far in `input`",
                "previous_response_id",
            )
        messages = input_messages(self.input, self.instructions)
        if len(messages) > limits.max_messages:
            raise InvalidRequest(f"at most {limits.max_messages} messages per request", "input")
        fields = SamplingFields(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            seed=self.seed,
            stop=self.stop,
            json_schema=text_schema(self.text),
        )
        kwargs: dict[str, Any] = {}
        effort = (self.reasoning or {}).get("effort")
        if effort is not None:
            kwargs["enable_thinking"] = effort not in THINKING_OFF
        tools = [_tool(t, i) for i, t in enumerate(self.tools or [])]
        return ChatRequest(
            messages=messages,
            params=fields.sampling_params(ms.sampling, limits, self.max_output_tokens, None),
            tools=tools or None,
            tool_choice=tool_choice(self.tool_choice),
            template_kwargs=kwargs,
        )

    def echo(self) -> dict[str, Any]:
        """The request fields a response object repeats."""
        return {
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "parallel_tool_calls": self.parallel_tool_calls if self.parallel_tool_calls is not None else True,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "tool_choice": self.tool_choice or "auto",
            "tools": self.tools or [],
            "text": self.text or {"format": {"type": "text"}},
            "reasoning": self.reasoning or {"effort": None, "summary": None},
            "metadata": self.metadata or {},
            "previous_response_id": None,
            "store": False,
        }


# --- output items -----------------------------------------------------------------------------


def message_item(iid: str, text: str, status: str = "completed") -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status else []
    return {"type": "message", "id": iid, "status": status, "role": "assistant", "content": content}


def reasoning_item(iid: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {
        "type": "reasoning",
        "id": iid,
        "status": status,
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
    }


def function_call_item(iid: str, call: ToolCall, status: str = "completed") -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": iid,
        "call_id": call.id,
        "name": call.name,
        "arguments": call.arguments if status == "completed" else "",
        "status": status,
    }


def response_object(
    rid: str,
    model: str,
    created: float,
    body: ResponsesRequest,
    output: list[dict[str, Any]],
    fin: Finished | None,
) -> dict[str, Any]:
    """`fin` None: the response is still in progress (the stream's first events)."""
    status = "in_progress"
    incomplete = None
    use = None
    if fin is not None:
        status = "incomplete" if fin.reason == "length" else "completed"
        if status == "incomplete":
            incomplete = {"reason": "max_output_tokens"}
        use = {
            "input_tokens": fin.prompt_tokens,
            "input_tokens_details": {"cached_tokens": fin.cached_tokens},
            "output_tokens": fin.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": fin.prompt_tokens + fin.completion_tokens,
        }
    return {
        "id": rid,
        "object": "response",
        "created_at": int(created),
        "status": status,
        "error": None,
        "incomplete_details": incomplete,
        "model": model,
        "output": output,
        "usage": use,
        **body.echo(),
    }
