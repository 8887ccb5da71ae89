"""POST /v1/messages (Anthropic's Messages API, streamed as named SSE events or whole) and
POST /v1/messages/count_tokens, over the chat engine."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse

from gguf_serve.api.errors import describe_validation
from gguf_serve.api.protocol.anthropic import (
    STOP_REASONS,
    MessagesRequest,
    error_body,
    message,
    tool_use_block,
    usage,
)
from gguf_serve.api.serving import ChatAnswer, ServingContext
from gguf_serve.api.strict_json import StrictJSONRoute
from gguf_serve.engine.interfaces import ChatEvents, ChatModel
from gguf_serve.engine.requests import ChatRequest, EngineError


class AnthropicRoute(StrictJSONRoute):
    """Errors in Anthropic's shape, which the anthropic SDK turns into its exceptions."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def anthropic_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return JSONResponse(error_body(400, describe_validation(exc)[0]), status_code=400)
            except EngineError as exc:
                return JSONResponse(error_body(exc.status, exc.message), status_code=exc.status)

        return anthropic_handler


router = APIRouter(route_class=AnthropicRoute)


async def _prompt_tokens(engine: ChatModel, req: ChatRequest) -> int:
    """What the request's prompt counts, as the engine will tokenize it."""
    prompt = await engine.render(req)
    bos = engine.info.bos_token
    tokens = await engine.tokenize(
        prompt, add_special=not (bos and prompt.startswith(bos)), parse_special=True
    )
    return len(tokens)


@router.post("/v1/messages/count_tokens")
async def count_tokens(body: MessagesRequest, request: Request) -> dict[str, int]:
    ctx = await ServingContext.for_request(request, body.model, "chat")
    req = body.to_engine(ctx.loaded.settings, ctx.limits)
    return {"input_tokens": await _prompt_tokens(ctx.loaded.engine, req)}


@router.post("/v1/messages")
async def create_message(body: MessagesRequest, request: Request) -> Response:
    ctx = await ServingContext.for_request(request, body.model, "chat")
    req = body.to_engine(ctx.loaded.settings, ctx.limits)
    mid = f"msg_{uuid.uuid4().hex[:24]}"
    if body.stream:
        prompt_tokens = await _prompt_tokens(ctx.loaded.engine, req)
        chat = (await ctx.loaded.engine.start_chats(req, 1))[0]
        return EventSourceResponse(_stream(ctx, chat, mid, prompt_tokens), ping=15)
    chat = (await ctx.loaded.engine.start_chats(req, 1))[0]
    return JSONResponse(await _collect(ctx, chat, mid))


async def _collect(ctx: ServingContext[ChatModel], chat: ChatEvents, mid: str) -> dict[str, Any]:
    blocks: list[dict[str, Any]] = []

    def append(kind: str, key: str, text: str) -> None:
        if blocks and blocks[-1]["type"] == kind:
            blocks[-1][key] += text
        else:
            blocks.append({"type": kind, key: text, **({"signature": ""} if kind == "thinking" else {})})

    answer = ChatAnswer(ctx, chat, "message")
    try:
        async for ev in answer:
            if ev.reasoning:
                append("thinking", "thinking", ev.reasoning)
            if ev.content:
                append("text", "text", ev.content)
            blocks.extend(tool_use_block(c) for c in ev.tool_calls)
    finally:
        chat.cancel()
    done = ctx.finished(answer.finished)
    if not any(b["type"] in ("text", "tool_use") for b in blocks):
        blocks.append({"type": "text", "text": ""})
    stop = "tool_use" if any(b["type"] == "tool_use" for b in blocks) else STOP_REASONS.get(done.reason)
    return message(
        mid,
        ctx.model_name,
        blocks,
        stop,
        usage(done.prompt_tokens, done.completion_tokens, done.cached_tokens),
    )


def _event(kind: str, data: dict[str, Any]) -> dict[str, str]:
    """Every event with its `event:` line: the SDK ignores events without one."""
    return {"event": kind, "data": json.dumps({"type": kind, **data}, ensure_ascii=False)}


async def _stream(
    ctx: ServingContext[ChatModel], chat: ChatEvents, mid: str, prompt_tokens: int
) -> AsyncIterator[dict[str, str]]:
    index = -1
    open_kind: str | None = None
    made_call = False

    def start(kind: str, block: dict[str, Any]) -> list[dict[str, str]]:
        nonlocal index, open_kind
        out = stop()
        index += 1
        open_kind = kind
        out.append(_event("content_block_start", {"index": index, "content_block": block}))
        return out

    def stop() -> list[dict[str, str]]:
        nonlocal open_kind
        if open_kind is None:
            return []
        open_kind = None
        return [_event("content_block_stop", {"index": index})]

    def delta(d: dict[str, Any]) -> dict[str, str]:
        return _event("content_block_delta", {"index": index, "delta": d})

    yield _event(
        "message_start", {"message": message(mid, ctx.model_name, [], None, usage(prompt_tokens, 0, 0))}
    )
    answer = ChatAnswer(ctx, chat, "message")
    try:
        async for ev in answer:
            if ev.reasoning:
                if open_kind != "thinking":
                    for e in start("thinking", {"type": "thinking", "thinking": "", "signature": ""}):
                        yield e
                yield delta({"type": "thinking_delta", "thinking": ev.reasoning})
            if ev.content:
                if open_kind != "text":
                    for e in start("text", {"type": "text", "text": ""}):
                        yield e
                yield delta({"type": "text_delta", "text": ev.content})
            for call in ev.tool_calls:
                made_call = True
                block = tool_use_block(call)
                for e in start("tool_use", {**block, "input": {}}):
                    yield e
                yield delta({"type": "input_json_delta", "partial_json": json.dumps(block["input"])})
        done = ctx.finished(answer.finished)
        if index < 0:
            for e in start("text", {"type": "text", "text": ""}):
                yield e
        for e in stop():
            yield e
        reason = "tool_use" if made_call else STOP_REASONS.get(done.reason)
        yield _event(
            "message_delta",
            {
                "delta": {"stop_reason": reason, "stop_sequence": None},
                "usage": usage(done.prompt_tokens, done.completion_tokens, done.cached_tokens),
            },
        )
        yield _event("message_stop", {})
    except EngineError as e:  # after the 200 went out: Anthropic's error event ends the stream
        yield {"event": "error", "data": json.dumps(error_body(e.status, e.message))}
    finally:
        chat.cancel()
