"""POST /v1/chat/completions, streamed over SSE or answered whole."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse

from gguf_serve.api.protocol.chat import ChatCompletionRequest, logprobs_json, tool_call_json
from gguf_serve.api.protocol.common import usage
from gguf_serve.api.serving import Deadline, ServingContext, stream_error
from gguf_serve.api.strict_json import StrictJSONRoute
from gguf_serve.engine.interfaces import ChatEvents
from gguf_serve.engine.requests import ChatDelta, EngineError, Finished, TokenLogprob, ToolCall

router = APIRouter(route_class=StrictJSONRoute)


@router.post("/v1/chat/completions")
@router.post("/chat/completions", include_in_schema=False)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    ctx = await ServingContext.for_request(request, body.model, "chat")
    chats = list(await ctx.loaded.engine.start_chats(body.to_engine(ctx.loaded.settings, ctx.limits), body.n))
    rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventSourceResponse(_stream(ctx, chats, rid, include_usage), sep="\n", ping=15)
    return JSONResponse(await _collect_all(ctx, chats, rid))


def _cancel_all(chats: list[ChatEvents]) -> None:
    for chat in chats:
        chat.cancel()


def _total_usage(fins: list[Finished]) -> dict[str, Any]:
    """OpenAI counts the prompt once and the completion tokens of every choice."""
    return usage(fins[0].prompt_tokens, sum(f.completion_tokens for f in fins), fins[0].cached_tokens)


def _account(ctx: ServingContext, i: int, fin: Finished | None) -> Finished:
    if fin is not None and i > 0:  # the n choices share one prefill: metrics count it once
        fin = replace(fin, prompt_tokens=0, cached_tokens=0)
    return ctx.finished(fin)


async def _collect(ctx: ServingContext, chat: ChatEvents) -> tuple[dict[str, Any], Any, Finished | None]:
    content: list[str] = []
    reasoning: list[str] = []
    calls: list[ToolCall] = []
    logprobs: list[TokenLogprob] = []
    fin: Finished | None = None
    async for ev in chat:
        if isinstance(ev, ChatDelta):
            ctx.first_token()
            content.append(ev.content)
            reasoning.append(ev.reasoning)
            calls.extend(ev.tool_calls)
            logprobs.extend(ev.logprobs or [])
        else:
            fin = ev
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(content) or (None if calls else ""),
    }
    if any(reasoning):
        message["reasoning_content"] = "".join(reasoning)
    if calls:
        message["tool_calls"] = [{k: v for k, v in tool_call_json(c).items() if k != "index"} for c in calls]
    return message, logprobs_json(logprobs) if logprobs else None, fin


async def _collect_all(ctx: ServingContext, chats: list[ChatEvents], rid: str) -> dict[str, Any]:
    try:
        async with Deadline(ctx.limits.request_timeout_s, lambda: _cancel_all(chats), "chat completion"):
            results = await asyncio.gather(*(_collect(ctx, chat) for chat in chats))
    finally:
        _cancel_all(chats)  # a no-op for the finished ones
    usage_of = [fin for _, _, fin in results]
    choices = []
    for i, (message, logprobs, fin) in enumerate(results):
        done = _account(ctx, i, fin)
        choices.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": done.reason})
    return {
        "id": rid,
        "object": "chat.completion",
        "created": ctx.created,
        "model": ctx.model_name,
        "choices": choices,
        "usage": _total_usage([f for f in usage_of if f is not None]),
    }


async def _stream(
    ctx: ServingContext, chats: list[ChatEvents], rid: str, include_usage: bool
) -> AsyncIterator[str]:
    """The n choices' deltas interleaved as they come, each chunk tagged with its index."""

    def chunk(i: int, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> str:
        body: dict[str, Any] = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": ctx.created,
            "model": ctx.model_name,
            "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
        }
        if include_usage:
            body["usage"] = None
        return json.dumps(body, ensure_ascii=False)

    queue: asyncio.Queue[tuple[int, ChatDelta | Finished | None]] = asyncio.Queue()

    async def pump(i: int, chat: ChatEvents) -> None:
        try:
            async for ev in chat:
                await queue.put((i, ev))
        finally:
            queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, chat)) for i, chat in enumerate(chats)]
    fins: dict[int, Finished] = {}
    try:
        for i in range(len(chats)):
            yield chunk(i, {"role": "assistant", "content": ""})
        async with Deadline(ctx.limits.request_timeout_s, lambda: _cancel_all(chats), "chat completion"):
            seen: set[int] = set()
            while len(seen) < len(chats):
                i, ev = await queue.get()
                if ev is None:
                    if i not in seen:  # the stream ended without a finish reason
                        _account(ctx, i, None)
                    continue
                if isinstance(ev, Finished):
                    seen.add(i)
                    fins[i] = ev
                    yield chunk(i, {}, _account(ctx, i, replace(ev)).reason)
                    continue
                ctx.first_token()
                delta: dict[str, Any] = {}
                if ev.reasoning:
                    delta["reasoning_content"] = ev.reasoning
                if ev.content:
                    delta["content"] = ev.content
                if ev.tool_calls:
                    delta["tool_calls"] = [tool_call_json(c) for c in ev.tool_calls]
                yield chunk(i, delta, logprobs=logprobs_json(ev.logprobs) if ev.logprobs else None)
        if include_usage:
            body = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": ctx.created,
                "model": ctx.model_name,
                "choices": [],
                "usage": _total_usage([fins[i] for i in sorted(fins)]),
            }
            yield json.dumps(body)
        yield "[DONE]"
    except EngineError as e:  # a timeout or a failed generation after the 200 went out
        yield stream_error(e)
        yield "[DONE]"
    finally:
        # Also when the client went away: the slots are freed at the scheduler's next step.
        _cancel_all(chats)
        for t in tasks:
            t.cancel()
