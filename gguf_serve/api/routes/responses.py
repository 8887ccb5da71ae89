"""POST /v1/responses (OpenAI's Responses API, whole or streamed as the typed events the
SDK's `responses.stream()` helper accumulates) and POST /v1/responses/input_tokens."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse

from gguf_serve.api.protocol.responses import (
    ResponsesRequest,
    function_call_item,
    message_item,
    new_id,
    reasoning_item,
    response_object,
)
from gguf_serve.api.serving import ChatAnswer, ServingContext
from gguf_serve.api.strict_json import StrictJSONRoute
from gguf_serve.engine.interfaces import ChatEvents, ChatModel
from gguf_serve.engine.requests import EngineError

router = APIRouter(route_class=StrictJSONRoute)


@dataclass(frozen=True)
class TextItem:
    """An output item that holds text: how it is made, its id prefix, and its one content
    part as a stream opens it (the part's type names its delta and done events)."""

    make: Callable[..., dict[str, Any]]
    prefix: str
    part: dict[str, Any]
    extra: dict[str, Any]  # what its delta and done events carry besides the text

    def new(self, text: str) -> dict[str, Any]:
        """A finished item with a new id."""
        return self.make(new_id(self.prefix), text)

    def opening(self) -> dict[str, Any]:
        """A new item as a stream opens it: in progress, its content part still to come."""
        return {**self.make(new_id(self.prefix), "", "in_progress"), "content": []}


TEXT_ITEMS = {
    "reasoning": TextItem(reasoning_item, "rs", {"type": "reasoning_text", "text": ""}, {}),
    "message": TextItem(
        message_item,
        "msg",
        {"type": "output_text", "text": "", "annotations": [], "logprobs": []},
        {"logprobs": []},
    ),
}


@router.post("/v1/responses/input_tokens")
async def input_tokens(body: ResponsesRequest, request: Request) -> dict[str, Any]:
    ctx = await ServingContext.for_request(request, body.model, "chat")
    engine = ctx.loaded.engine
    prompt = await engine.render(body.to_engine(ctx.loaded.settings, ctx.limits))
    bos = engine.info.bos_token
    tokens = await engine.tokenize(
        prompt, add_special=not (bos and prompt.startswith(bos)), parse_special=True
    )
    return {"object": "response.input_tokens", "input_tokens": len(tokens)}


@router.post("/v1/responses")
@router.post("/responses", include_in_schema=False)
async def create_response(body: ResponsesRequest, request: Request) -> Response:
    ctx = await ServingContext.for_request(request, body.model, "chat")
    req = body.to_engine(ctx.loaded.settings, ctx.limits)
    chat = (await ctx.loaded.engine.start_chats(req, 1))[0]
    rid = new_id("resp")
    created = time.time()
    if body.stream:
        return EventSourceResponse(_stream(ctx, chat, body, rid, created), ping=15)
    return JSONResponse(await _collect(ctx, chat, body, rid, created))


async def _collect(
    ctx: ServingContext[ChatModel], chat: ChatEvents, body: ResponsesRequest, rid: str, created: float
) -> dict[str, Any]:
    output: list[dict[str, Any]] = []
    answer = ChatAnswer(ctx, chat, "response")
    try:
        async for ev in answer:
            for kind, piece in (("reasoning", ev.reasoning), ("message", ev.content)):
                if not piece:
                    continue
                last = output[-1] if output else None
                if last is not None and last["type"] == kind:
                    last["content"][0]["text"] += piece
                else:
                    output.append(TEXT_ITEMS[kind].new(piece))
            output.extend(function_call_item(new_id("fc"), c) for c in ev.tool_calls)
    finally:
        chat.cancel()
    done = ctx.finished(answer.finished)
    if not any(item["type"] in ("message", "function_call") for item in output):
        output.append(TEXT_ITEMS["message"].new(""))
    return response_object(rid, ctx.model_name, created, body, output, done)


async def _stream(
    ctx: ServingContext[ChatModel], chat: ChatEvents, body: ResponsesRequest, rid: str, created: float
) -> AsyncIterator[dict[str, str]]:
    seq = 0
    output: list[dict[str, Any]] = []  # finished items, in output_index order
    current: dict[str, Any] | None = None  # the item being streamed
    text = ""

    def event(kind: str, **data: Any) -> dict[str, str]:
        nonlocal seq
        seq += 1
        return {
            "event": kind,
            "data": json.dumps({"type": kind, "sequence_number": seq - 1, **data}, ensure_ascii=False),
        }

    def open_item(item: dict[str, Any], part: dict[str, Any] | None) -> list[dict[str, str]]:
        nonlocal current, text
        out = close_item()
        current, text = item, ""
        index = len(output)
        out.append(event("response.output_item.added", output_index=index, item=item))
        if part is not None:
            out.append(
                event(
                    "response.content_part.added",
                    item_id=item["id"],
                    output_index=index,
                    content_index=0,
                    part=part,
                )
            )
        return out

    def close_item() -> list[dict[str, str]]:
        nonlocal current
        if current is None:
            return []
        index, iid, out = len(output), current["id"], []
        if current["type"] in TEXT_ITEMS:
            t = TEXT_ITEMS[current["type"]]
            done = t.make(iid, text)
            at = {"item_id": iid, "output_index": index, "content_index": 0}
            out.append(event(f"response.{t.part['type']}.done", **at, text=text, **t.extra))
            out.append(event("response.content_part.done", **at, part=done["content"][0]))
        else:
            done = current
        out.append(event("response.output_item.done", output_index=index, item=done))
        output.append(done)
        current = None
        return out

    def text_delta(kind: str, piece: str) -> list[dict[str, str]]:
        """A piece of reasoning or answer text, opening its item when another one is open."""
        nonlocal text
        t = TEXT_ITEMS[kind]
        out = []
        if current is None or current["type"] != kind:
            out = open_item(t.opening(), t.part)
        text += piece
        iid = current["id"]  # type: ignore[index]
        at = {"item_id": iid, "output_index": len(output), "content_index": 0}
        out.append(event(f"response.{t.part['type']}.delta", **at, delta=piece, **t.extra))
        return out

    yield event("response.created", response=response_object(rid, ctx.model_name, created, body, [], None))
    yield event(
        "response.in_progress", response=response_object(rid, ctx.model_name, created, body, [], None)
    )
    answer = ChatAnswer(ctx, chat, "response")
    try:
        async for ev in answer:
            for kind, piece in (("reasoning", ev.reasoning), ("message", ev.content)):
                if piece:
                    for e in text_delta(kind, piece):
                        yield e
            for call in ev.tool_calls:
                fc = function_call_item(new_id("fc"), call, "in_progress")
                for e in open_item(fc, None):
                    yield e
                index = len(output)
                yield event(
                    "response.function_call_arguments.delta",
                    item_id=fc["id"],
                    output_index=index,
                    delta=call.arguments,
                )
                yield event(
                    "response.function_call_arguments.done",
                    item_id=fc["id"],
                    output_index=index,
                    name=call.name,
                    arguments=call.arguments,
                )
                current = function_call_item(fc["id"], call)
        done = ctx.finished(answer.finished)
        if current is None and not any(i["type"] in ("message", "function_call") for i in output):
            for e in open_item(TEXT_ITEMS["message"].opening(), TEXT_ITEMS["message"].part):
                yield e
        for e in close_item():
            yield e
        # response.completed also when a length limit cut the answer (status "incomplete" and
        # incomplete_details say so): the SDK's stream helper finishes only on this event.
        yield event(
            "response.completed", response=response_object(rid, ctx.model_name, created, body, output, done)
        )
    except EngineError as e:  # after the 200 went out
        yield event("error", code=e.code, message=e.message, param=e.param)
    finally:
        chat.cancel()
