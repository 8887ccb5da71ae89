"""Ollama's API over the same engines: chat and generate (NDJSON streams), embed, rerank,
and the discovery routes (tags, show, ps, version) that RAGFlow, Open WebUI, Dify, LangChain
and LlamaIndex call. Errors are Ollama's {"error": message}, also as a line mid-stream."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from gguf_serve import __version__
from gguf_serve.api.errors import describe_validation
from gguf_serve.api.protocol.ollama import (
    OLLAMA_API_VERSION,
    ChatBody,
    EmbedBody,
    EmbeddingsBody,
    GenerateBody,
    OllamaBase,
    RerankBody,
    ShowBody,
    done_reason,
    model_entry,
    now_iso,
    resolve_name,
    sampling_params,
    show_response,
    timings,
    tool_calls_json,
)
from gguf_serve.api.protocol.rerank import rerank_response
from gguf_serve.api.serving import Deadline, ServingContext
from gguf_serve.api.strict_json import StrictJSONRoute
from gguf_serve.engine.interfaces import ChatEvents, ChatModel, TokenEvents
from gguf_serve.engine.registry import LoadState, ModelRegistry
from gguf_serve.engine.requests import (
    ChatDelta,
    EngineError,
    Finished,
    InvalidRequest,
    ModelNotFound,
    TextChunk,
)
from gguf_serve.settings import Role, Settings

log = logging.getLogger("gguf_serve.ollama")
_STARTED = now_iso()
_background: set[asyncio.Task[None]] = set()


class OllamaRoute(StrictJSONRoute):
    """Errors in Ollama's shape: {"error": message} with the status Ollama gives."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def ollama_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return JSONResponse({"error": describe_validation(exc)[0]}, status_code=400)
            except EngineError as exc:
                return JSONResponse({"error": exc.message}, status_code=exc.status)

        return ollama_handler


# Ollama reads JSON whatever the Content-Type; LiteLLM's ollama_chat provider sends none.
router = APIRouter(route_class=OllamaRoute, strict_content_type=False)


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _resolve(request: Request, name: str) -> str:
    return resolve_name(name, (n for m in _settings(request).models for n in m.names))


async def _context(request: Request, body: OllamaBase, role: Role) -> ServingContext[Any]:
    ctx = await ServingContext.for_request(request, _resolve(request, body.model), role)
    ctx.model_name = body.model  # Ollama echoes the name the client sent
    return ctx


# --- discovery --------------------------------------------------------------------------------


@router.get("/", include_in_schema=False)
@router.head("/", include_in_schema=False)
async def root() -> PlainTextResponse:
    return PlainTextResponse("Ollama is running")


@router.get("/api/version")
@router.head("/api/version", include_in_schema=False)
async def version() -> dict[str, str]:
    return {"version": OLLAMA_API_VERSION, "server": f"gguf-serve {__version__}"}


def _ordered_entries(request: Request) -> list[Any]:
    order = {m.id: i for i, m in enumerate(_settings(request).models)}
    registry: ModelRegistry = request.app.state.registry
    return sorted(registry.entries(), key=lambda e: order.get(e[0].id, len(order)))


@router.get("/api/tags")
@router.head("/api/tags", include_in_schema=False)
async def tags(request: Request) -> dict[str, Any]:
    models: list[dict[str, Any]] = []
    for ms, _state, loaded in _ordered_entries(request):
        info = loaded.engine.info if loaded is not None else None
        models.extend(model_entry(name, ms, info, _STARTED) for name in ms.listed_names)
    return {"models": models}


@router.get("/api/ps")
async def ps(request: Request) -> dict[str, Any]:
    models = []
    for ms, state, loaded in _ordered_entries(request):
        if state is not LoadState.READY or loaded is None:
            continue
        info = loaded.engine.info
        expires = time.time() + ms.keep_alive if ms.keep_alive else time.time() + 100 * 365 * 86400
        entry = model_entry(ms.id, ms, info, _STARTED)
        del entry["modified_at"]
        on_gpu = ms.n_gpu_layers == "auto" or ms.n_gpu_layers != 0
        entry.update(
            expires_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(min(expires, 2**32))),
            size_vram=info.size_bytes if on_gpu else 0,
            context_length=info.n_ctx,
        )
        models.append(entry)
    return {"models": models}


@router.post("/api/show")
async def show(body: ShowBody, request: Request) -> dict[str, Any]:
    name = _resolve(request, body.wanted)
    ms = next((m for m in _settings(request).models if name in m.names), None)
    if ms is None:
        raise ModelNotFound(f"model '{body.wanted}' not found", "model")
    registry: ModelRegistry = request.app.state.registry
    loaded = await registry.acquire(name, ms.role)  # what the model is is read at load
    return show_response(loaded.settings, loaded.engine.info, _STARTED)


# --- chat and generate ------------------------------------------------------------------------


async def _chat_deltas(events: TokenEvents) -> AsyncIterator[ChatDelta | Finished]:
    """A raw generate's text, as the deltas a chat answer streams."""
    async for ev in events:
        yield ChatDelta(content=ev.text) if isinstance(ev, TextChunk) else ev


def _unload_after(request: Request, ctx: ServingContext[Any], keep_alive: float | None) -> None:
    """keep_alive 0: unload the model once nothing runs on it (Ollama's lifecycle). A negative
    or positive keep_alive leaves it to the profile's keep_alive."""
    if keep_alive is None or keep_alive != 0:
        return
    registry: ModelRegistry = request.app.state.registry
    mid = ctx.loaded.settings.id
    engine = ctx.loaded.engine

    async def unload() -> None:
        for _ in range(100):  # a finished request frees its slot at the engine's next step
            if engine.idle():
                await asyncio.to_thread(registry.unload, mid)
                return
            await asyncio.sleep(0.05)
        log.info("keep_alive 0: model %s still busy; left loaded", mid)

    task = asyncio.create_task(unload())
    _background.add(task)
    task.add_done_callback(_background.discard)


async def _lines(
    ctx: ServingContext[ChatModel],
    events: AsyncIterator[ChatDelta | Finished],
    cancel: Callable[[], None],
    chat: bool,
) -> AsyncIterator[dict[str, Any]]:
    """The lines of an Ollama answer: one per delta, then the final one with the counts."""
    started_ns = int(ctx.started * 1e9)
    first_ns: int | None = None
    fin: Finished | None = None

    def line(
        content: str = "", thinking: str = "", calls: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        out: dict[str, Any] = {"model": ctx.model_name, "created_at": now_iso()}
        if chat:
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if thinking:
                message["thinking"] = thinking
            if calls:
                message["tool_calls"] = calls
            out["message"] = message
        else:
            out["response"] = content
            if thinking:
                out["thinking"] = thinking
        return out

    async with Deadline(ctx.limits.request_timeout_s, cancel, "generation"):
        async for ev in events:
            if isinstance(ev, Finished):
                fin = ev
                continue
            if not (ev.content or ev.reasoning or ev.tool_calls):
                continue
            if first_ns is None:
                first_ns = time.monotonic_ns()
            ctx.first_token()
            calls = tool_calls_json(ev.tool_calls) if ev.tool_calls else None
            yield {**line(ev.content, ev.reasoning, calls), "done": False}
    done = ctx.finished(fin)
    yield {
        **line(),
        "done": True,
        "done_reason": done_reason(done.reason),
        **timings(started_ns, first_ns, time.monotonic_ns(), done.prompt_tokens, done.completion_tokens),
    }


async def _respond(
    request: Request,
    ctx: ServingContext[ChatModel],
    body: ChatBody | GenerateBody,
    events: AsyncIterator[ChatDelta | Finished],
    cancel: Callable[[], None],
) -> Response:
    """NDJSON lines as they come (stream, Ollama's default), or the lines merged into one."""
    chat = isinstance(body, ChatBody)
    keep_alive = body.keep_alive_s()
    lines = _lines(ctx, events, cancel, chat)
    if body.stream:

        async def ndjson() -> AsyncIterator[bytes]:
            try:
                async for item in lines:
                    yield json.dumps(item, ensure_ascii=False).encode() + b"\n"
            except EngineError as e:  # after the 200 went out: an error line ends the stream
                yield json.dumps({"error": e.message}).encode() + b"\n"
            finally:
                cancel()
                _unload_after(request, ctx, keep_alive)

        return StreamingResponse(ndjson(), media_type="application/x-ndjson")

    content: list[str] = []
    thinking: list[str] = []
    calls: list[dict[str, Any]] = []
    last: dict[str, Any] = {}
    try:
        async for item in lines:
            part = item["message"] if chat else item
            content.append(part.get("content" if chat else "response", ""))
            thinking.append(part.get("thinking", ""))
            calls.extend(part.get("tool_calls") or [])
            last = item
    finally:
        cancel()
        _unload_after(request, ctx, keep_alive)
    text, thought = "".join(content), "".join(thinking)
    if chat:
        last["message"] = {"role": "assistant", "content": text}
        if thought:
            last["message"]["thinking"] = thought
        if calls:
            last["message"]["tool_calls"] = calls
    else:
        last["response"] = text
        if thought:
            last["thinking"] = thought
    return JSONResponse(last)


def _load_answer(request: Request, ctx: ServingContext[Any], body: OllamaBase, chat: bool) -> JSONResponse:
    """No messages (or no prompt): Ollama loads the model, or unloads it with keep_alive 0."""
    unload = body.keep_alive_s() == 0
    out: dict[str, Any] = {"model": body.model, "created_at": now_iso()}
    if chat:
        out["message"] = {"role": "assistant", "content": ""}
    else:
        out["response"] = ""
    out.update(done=True, done_reason="unload" if unload else "load")
    _unload_after(request, ctx, body.keep_alive_s())
    return JSONResponse(out)


@router.post("/api/chat")
async def chat(body: ChatBody, request: Request) -> Response:
    ctx = await _context(request, body, "chat")
    if not body.messages:
        return _load_answer(request, ctx, body, chat=True)
    req = body.to_engine(ctx.loaded.settings, ctx.limits, ctx.loaded.engine.n_ctx)
    stream: ChatEvents = (await ctx.loaded.engine.start_chats(req, 1))[0]
    return await _respond(request, ctx, body, aiter(stream), stream.cancel)


@router.post("/api/generate")
async def generate(body: GenerateBody, request: Request) -> Response:
    ctx = await _context(request, body, "chat")
    if not body.prompt and not body.system:
        return _load_answer(request, ctx, body, chat=False)
    engine = ctx.loaded.engine
    cancel: Callable[[], None]
    events: AsyncIterator[ChatDelta | Finished]
    if body.raw:  # the prompt as it is, no template
        params = sampling_params(body.options, body.format, ctx.loaded.settings, ctx.limits, engine.n_ctx)
        gen = (await engine.start_completions(body.prompt or "", params, 1))[0]
        events, cancel = _chat_deltas(gen), gen.cancel
    else:
        stream = (await engine.start_chats(body.to_engine(ctx.loaded.settings, ctx.limits, engine.n_ctx), 1))[
            0
        ]
        events, cancel = aiter(stream), stream.cancel
    return await _respond(request, ctx, body, events, cancel)


# --- embeddings and rerank --------------------------------------------------------------------


@router.post("/api/embed")
async def embed(body: EmbedBody, request: Request) -> JSONResponse:
    ctx = await _context(request, body, "embedding")
    t0 = time.monotonic_ns()
    ms = ctx.loaded.settings
    result = await ctx.within_deadline(
        "embedding",
        ctx.loaded.engine.embed(
            body.texts(ctx.limits.max_inputs),
            instruction=ms.query_instruction,
            dimensions=body.dimensions,
            truncate=body.truncate,
        ),
    )
    if ctx.metrics is not None:
        ctx.metrics.add_tokens(ms.id, result.prompt_tokens, 0)
    _unload_after(request, ctx, body.keep_alive_s())
    return JSONResponse(
        {
            "model": body.model,
            "embeddings": [[float(x) for x in v.tolist()] for v in result.vectors],
            "total_duration": time.monotonic_ns() - t0,
            "load_duration": 0,
            "prompt_eval_count": result.prompt_tokens,
        }
    )


@router.post("/api/embeddings")
async def embeddings(body: EmbeddingsBody, request: Request) -> JSONResponse:
    """The legacy route: one `prompt`, one `embedding`."""
    ctx = await _context(request, body, "embedding")
    ms = ctx.loaded.settings
    if not body.prompt:  # Ollama answers an empty prompt with an empty embedding
        return JSONResponse({"embedding": []})
    result = await ctx.within_deadline(
        "embedding", ctx.loaded.engine.embed([body.prompt], instruction=ms.query_instruction)
    )
    if ctx.metrics is not None:
        ctx.metrics.add_tokens(ms.id, result.prompt_tokens, 0)
    _unload_after(request, ctx, body.keep_alive_s())
    return JSONResponse({"embedding": [float(x) for x in result.vectors[0].tolist()]})


@router.post("/api/rerank")
async def rerank(body: RerankBody, request: Request) -> JSONResponse:
    ctx = await _context(request, body, "rerank")
    if len(body.documents) > ctx.limits.max_documents:
        raise InvalidRequest(
            f"documents has {len(body.documents)} items; this server takes at most "
            f"{ctx.limits.max_documents} per request",
            "documents",
        )
    result = await ctx.within_deadline("rerank", ctx.loaded.engine.score(body.query, body.documents))
    if ctx.metrics is not None:
        ctx.metrics.add_tokens(ctx.loaded.settings.id, result.prompt_tokens, 0)
    return JSONResponse(
        rerank_response(body.model, body.documents, result.scores, result.prompt_tokens, body.top_n, True)
    )
