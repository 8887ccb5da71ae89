"""POST /v1/completions: raw prompts (a string, several strings, or token ids)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse

from gguf_serve.api.protocol.common import usage
from gguf_serve.api.protocol.completions import CompletionRequest, legacy_logprobs
from gguf_serve.api.serving import Deadline, ServingContext, stream_error
from gguf_serve.api.strict_json import StrictJSONRoute
from gguf_serve.engine.interfaces import TokenEvents
from gguf_serve.engine.requests import EngineError, Finished, TextChunk, TokenLogprob

router = APIRouter(route_class=StrictJSONRoute)


@router.post("/v1/completions")
@router.post("/completions", include_in_schema=False)
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    ctx = await ServingContext.for_request(request, body.model, "chat")
    params_for = lambda: body.sampling_params(  # noqa: E731 - each prompt gets its own params
        ctx.loaded.settings.sampling, ctx.limits, body.max_tokens, body.logprobs
    )
    gens: list[TokenEvents] = []
    try:
        for prompt in body.prompts(ctx.limits.max_inputs):
            # n choices per prompt (one prefill each): choice index = prompt index * n + j
            gens.extend(await ctx.loaded.engine.start_completions(prompt, params_for(), body.n))
    except Exception:
        _cancel_all(gens)
        raise
    rid = f"cmpl-{uuid.uuid4().hex[:24]}"
    if body.stream:
        return EventSourceResponse(_stream(ctx, gens, rid, body.include_usage, body.n), sep="\n", ping=15)
    try:
        results = await asyncio.gather(*(_collect(ctx, g) for g in gens))
    finally:  # one choice failing, or the client leaving, ends its siblings too
        _cancel_all(gens)
    choices = []
    total = [0, 0, 0]
    for i, (text, lps, fin) in enumerate(results):
        choices.append(
            {
                "index": i,
                "text": text,
                "logprobs": legacy_logprobs(lps, 0) if body.logprobs is not None else None,
                "finish_reason": fin.reason,
            }
        )
        if i % body.n == 0:  # the choices of one prompt share its prefill: counted once
            total[0] += fin.prompt_tokens
            total[2] += fin.cached_tokens
        total[1] += fin.completion_tokens
    return JSONResponse(
        {
            "id": rid,
            "object": "text_completion",
            "created": ctx.created,
            "model": ctx.model_name,
            "choices": choices,
            "usage": usage(*total),
        }
    )


async def _collect(ctx: ServingContext, gen: TokenEvents) -> tuple[str, list[TokenLogprob], Finished]:
    parts: list[str] = []
    lps: list[TokenLogprob] = []
    fin: Finished | None = None
    async with Deadline(ctx.limits.request_timeout_s, gen.cancel, "completion"):
        async for ev in gen:
            if isinstance(ev, TextChunk):
                ctx.first_token()
                parts.append(ev.text)
                lps.extend(ev.logprobs or [])
            else:
                fin = ev
    return "".join(parts), lps, ctx.finished(fin)


def _cancel_all(gens: list[TokenEvents]) -> None:
    for g in gens:
        g.cancel()


async def _stream(
    ctx: ServingContext, gens: list[TokenEvents], rid: str, include_usage: bool, n: int = 1
) -> AsyncIterator[str]:
    # Several prompts stream interleaved, each chunk tagged with its choice index.
    queue: asyncio.Queue[tuple[int, TextChunk | Finished | None]] = asyncio.Queue()

    async def pump(i: int, gen: TokenEvents) -> None:
        async for ev in gen:
            await queue.put((i, ev))
        await queue.put((i, None))

    def chunk(i: int, text: str, finish: str | None, logprobs: Any = None) -> str:
        choice = {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return json.dumps(
            {
                "id": rid,
                "object": "text_completion",
                "created": ctx.created,
                "model": ctx.model_name,
                "choices": [choice],
            },
            ensure_ascii=False,
        )

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    totals = [0, 0, 0]
    offsets = [0] * len(gens)
    try:
        open_streams = len(gens)
        async with Deadline(ctx.limits.request_timeout_s, lambda: _cancel_all(gens), "completion"):
            while open_streams:
                i, ev = await queue.get()
                if ev is None:
                    open_streams -= 1
                elif isinstance(ev, TextChunk):
                    ctx.first_token()
                    lp = legacy_logprobs(ev.logprobs, offsets[i]) if ev.logprobs else None
                    offsets[i] += len(ev.text)
                    yield chunk(i, ev.text, None, lp)
                else:
                    fin = ctx.finished(ev)
                    if i % n == 0:
                        totals[0] += fin.prompt_tokens
                        totals[2] += fin.cached_tokens
                    totals[1] += fin.completion_tokens
                    yield chunk(i, "", fin.reason)
        if include_usage:
            yield json.dumps(
                {
                    "id": rid,
                    "object": "text_completion",
                    "created": ctx.created,
                    "model": ctx.model_name,
                    "choices": [],
                    "usage": usage(*totals),
                }
            )
        yield "[DONE]"
    except EngineError as e:  # a timeout or a failed generation after the 200 went out
        yield stream_error(e)
        yield "[DONE]"
    finally:
        _cancel_all(gens)
        for t in tasks:
            t.cancel()
