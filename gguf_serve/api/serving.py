"""What every generating route needs: the model, limits, timing, and a deadline."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Generic, Literal, TypeVar, overload

from fastapi import Request

from gguf_serve.api.errors import error_body
from gguf_serve.engine.interfaces import AnyEngine, ChatEvents, ChatModel, EmbeddingModel, RerankModel
from gguf_serve.engine.registry import E, LoadedModel, ModelRegistry
from gguf_serve.engine.requests import ChatDelta, EngineError, EngineUnavailable, Finished, InvalidRequest
from gguf_serve.settings import Limits, Role

T = TypeVar("T")


class GenerationFailed(EngineError):
    status = 500
    code = "generation_failed"


class RequestTimeout(EngineError):
    """The request ran past limits.request_timeout_s: a 504, or an error event in a stream."""

    status = 504
    code = "timeout"


def stream_error(err: EngineError) -> str:
    """The error event that ends an SSE stream whose headers (200) are already sent."""
    return json.dumps(error_body(err.status, err.message, err.param, err.code))


@dataclass
class ServingContext(Generic[E]):
    """The model a request was routed to, typed by role: for_request(..., "chat") is a
    ServingContext[ChatModel], so a route calls only what engine/interfaces.py declares."""

    request: Request
    loaded: LoadedModel[E]
    model_name: str
    limits: Limits
    created: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.monotonic)
    _ttft_seen: bool = False

    @overload
    @staticmethod
    async def for_request(
        request: Request, model: str | None, role: Literal["chat"]
    ) -> ServingContext[ChatModel]: ...
    @overload
    @staticmethod
    async def for_request(
        request: Request, model: str | None, role: Literal["embedding"]
    ) -> ServingContext[EmbeddingModel]: ...
    @overload
    @staticmethod
    async def for_request(
        request: Request, model: str | None, role: Literal["rerank"]
    ) -> ServingContext[RerankModel]: ...
    @staticmethod
    async def for_request(request: Request, model: str | None, role: Role) -> ServingContext[AnyEngine]:
        state = request.app.state
        registry: ModelRegistry = state.registry
        loaded = await registry.acquire(model, role)
        # The access log reads the model id from here (never the prompt).
        request.scope.setdefault("state", {})["model"] = loaded.settings.id
        return ServingContext(request, loaded, model or loaded.settings.id, state.settings.limits)

    @property
    def metrics(self) -> Any:
        return getattr(self.request.app.state, "metrics", None)

    async def within_deadline(self, what: str, call: Awaitable[T]) -> T:
        """`call` (an embedding, a rerank) bounded by limits.request_timeout_s: past it, RequestTimeout."""
        try:
            async with asyncio.timeout(self.limits.request_timeout_s):
                return await call
        except TimeoutError:
            raise RequestTimeout(f"{what} took longer than {self.limits.request_timeout_s:g}s") from None

    def first_token(self) -> None:
        if not self._ttft_seen:
            self._ttft_seen = True
            if self.metrics is not None:
                self.metrics.observe_ttft(self.loaded.settings.id, time.monotonic() - self.started)

    def finished(self, fin: Finished | None) -> Finished:
        """Account for a finished generation; turn an engine failure into an error."""
        if fin is None:  # the generation ended without saying how
            raise GenerationFailed("generation ended without a finish reason")
        if self.metrics is not None:
            self.metrics.add_tokens(self.loaded.settings.id, fin.prompt_tokens, fin.completion_tokens)
        if fin.reason == "error":
            if fin.error_status == 400:
                raise InvalidRequest(fin.error or "invalid request", "grammar")
            if fin.error_status == 503:
                raise EngineUnavailable(fin.error or "the model's engine is restarting; retry shortly")
            raise GenerationFailed(fin.error or "generation failed")
        if fin.reason == "cancelled":
            fin.reason = "length"  # the server shut down mid-answer: what it made is returned
        return fin


class ChatAnswer:
    """A chat answer as a route reads it: its non-empty deltas within the request's deadline,
    the first one counted as the time to first token; `finished` holds its Finished once the
    iteration ends (None if the engine never said how it finished)."""

    def __init__(self, ctx: ServingContext[Any], chat: ChatEvents, what: str) -> None:
        self._ctx = ctx
        self._chat = chat
        self._what = what
        self.finished: Finished | None = None

    async def __aiter__(self) -> AsyncIterator[ChatDelta]:
        async with Deadline(self._ctx.limits.request_timeout_s, self._chat.cancel, self._what):
            async for ev in self._chat:
                if isinstance(ev, Finished):
                    self.finished = ev
                elif ev:
                    self._ctx.first_token()
                    yield ev


class Deadline:
    """`async with Deadline(seconds, cancel, what)`: past the deadline, cancel the generation
    and raise RequestTimeout, as embeddings and rerank do."""

    def __init__(self, seconds: float, cancel: Callable[[], None], what: str) -> None:
        self._timeout = asyncio.timeout(seconds)
        self._seconds = seconds
        self._cancel = cancel
        self._what = what

    async def __aenter__(self) -> Deadline:
        await self._timeout.__aenter__()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> bool:
        try:
            await self._timeout.__aexit__(et, e, tb)
        except TimeoutError:
            self._cancel()
            raise RequestTimeout(f"{self._what} took longer than {self._seconds:g}s") from None
        return False
