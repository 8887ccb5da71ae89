"""POST /v1/chat/completions, streamed over SSE or answered whole."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse

from gguf_serve.api.protocol.chat import ChatCompletionRequest, logprobs_json, tool_call_json
from gguf_serve.api.protocol.common import usage
from gguf_serve.api.serving import Deadline, ServingContext, stream_error
from gguf_serve.engine.chat import ChatStream
from gguf_serve.engine.requests import ChatDelta, EngineError, Finished, TokenLogprob, ToolCall

router = APIRouter()


@router.post("/v1/chat/completions")
@router.post("/chat/completions", include_in_schema=False)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    ctx = await ServingContext.for_request(request, body.model, "chat")
    chat = ctx.loaded.engine.start_chat(body.to_engine(ctx.loaded.settings, ctx.limits))
    rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventSourceResponse(_stream(ctx, chat, rid, include_usage), sep="\n", ping=15)
    return JSONResponse(await _collect(ctx, chat, rid))


async def _collect(ctx: ServingContext, chat: ChatStream, rid: str) -> dict[str, Any]:
    content: list[str] = []
    reasoning: list[str] = []
    calls: list[ToolCall] = []
    logprobs: list[TokenLogprob] = []
    fin: Finished | None = None
    async with Deadline(ctx.limits.request_timeout_s, chat.cancel, "chat completion"):
        async for ev in chat:
            if isinstance(ev, ChatDelta):
                ctx.first_token()
                content.append(ev.content)
                reasoning.append(ev.reasoning)
                calls.extend(ev.tool_calls)
                logprobs.extend(ev.logprobs or [])
            else:
                fin = ev
    fin = ctx.finished(fin)
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(content) or (None if calls else ""),
    }
    if any(reasoning):
        message["reasoning_content"] = "".join(reasoning)
    if calls:
        message["tool_calls"] = [{k: v for k, v in tool_call_json(c).items() if k != "index"} for c in calls]
    return {
        "id": rid,
        "object": "chat.completion",
        "created": ctx.created,
        "model": ctx.model_name,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": logprobs_json(logprobs) if logprobs else None,
                "finish_reason": fin.reason,
            }
        ],
        "usage": usage(fin.prompt_tokens, fin.completion_tokens, fin.cached_tokens),
    }


async def _stream(ctx: ServingContext, chat: ChatStream, rid: str, include_usage: bool) -> AsyncIterator[str]:
    def chunk(delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> str:
        body: dict[str, Any] = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": ctx.created,
            "model": ctx.model_name,
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
        }
        if include_usage:
            body["usage"] = None
        return json.dumps(body, ensure_ascii=False)

    fin: Finished | None = None
    try:
        yield chunk({"role": "assistant", "content": ""})
        async with Deadline(ctx.limits.request_timeout_s, chat.cancel, "chat completion"):
            async for ev in chat:
                if isinstance(ev, Finished):
                    fin = ev
                    break
                ctx.first_token()
                delta: dict[str, Any] = {}
                if ev.reasoning:
                    delta["reasoning_content"] = ev.reasoning
                if ev.content:
                    delta["content"] = ev.content
                if ev.tool_calls:
                    delta["tool_calls"] = [tool_call_json(c) for c in ev.tool_calls]
                yield chunk(delta, logprobs=logprobs_json(ev.logprobs) if ev.logprobs else None)
        fin = ctx.finished(fin)
        yield chunk({}, fin.reason)
        if include_usage:
            body = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": ctx.created,
                "model": ctx.model_name,
                "choices": [],
                "usage": usage(fin.prompt_tokens, fin.completion_tokens, fin.cached_tokens),
            }
            yield json.dumps(body)
        yield "[DONE]"
    except EngineError as e:  # a timeout or a failed generation after the 200 went out
        yield stream_error(e)
        yield "[DONE]"
    finally:
        # Also when the client went away: the slot is freed at the scheduler's next step.
        chat.cancel()
