"""What every generating route needs: the model, limits, timing, and a deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from fastapi import Request

from gguf_serve.engine.registry import LoadedModel
from gguf_serve.engine.requests import EngineError, Finished
from gguf_serve.settings import Limits, Role


class GenerationFailed(EngineError):
    status = 500
    code = "generation_failed"


@dataclass
class ServingContext:
    request: Request
    loaded: LoadedModel
    model_name: str
    limits: Limits
    created: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.monotonic)
    _ttft_seen: bool = False

    @classmethod
    async def for_request(cls, request: Request, model: str | None, role: Role) -> ServingContext:
        state = request.app.state
        loaded = await state.registry.acquire(model, role)
        # The access log reads the model id from here (never the prompt).
        request.scope.setdefault("state", {})["model"] = loaded.settings.id
        return cls(request, loaded, model or loaded.settings.id, state.settings.limits)

    @property
    def metrics(self) -> Any:
        return getattr(self.request.app.state, "metrics", None)

    def first_token(self) -> None:
        if not self._ttft_seen:
            self._ttft_seen = True
            if self.metrics is not None:
                self.metrics.observe_ttft(self.loaded.settings.id, time.monotonic() - self.started)

    def finished(self, fin: Finished | None) -> Finished:
        """Account for a finished generation; turn an engine failure into an error."""
        if fin is None:  # the deadline cut it short
            fin = Finished("length", 0, 0)
        if self.metrics is not None:
            self.metrics.add_tokens(self.loaded.settings.id, fin.prompt_tokens, fin.completion_tokens)
        if fin.reason == "error":
            raise GenerationFailed(fin.error or "generation failed")
        if fin.reason == "cancelled":
            fin.reason = "length"  # the request's own deadline ended it
        return fin


class Deadline:
    """`async with Deadline(seconds, cancel)`: past the deadline, cancel the generation and
    end the loop quietly; the answer so far is returned with finish_reason "length"."""

    def __init__(self, seconds: float, cancel: Callable[[], None]) -> None:
        self._timeout = asyncio.timeout(seconds)
        self._cancel = cancel

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
            return True
        return False
