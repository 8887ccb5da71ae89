"""The models a profile names: resolved, loaded, looked up by id and role, unloaded when idle."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, Literal, TypeVar, overload

from gguf_serve.engine.cpu_budget import CpuBudget, CpuShare, CpuSlot
from gguf_serve.engine.interfaces import AnyEngine, ChatModel, EmbeddingModel, Engine, RerankModel
from gguf_serve.engine.llama_runtime import LlamaModel, ModelLoadError
from gguf_serve.engine.model_defaults import with_model_sampling
from gguf_serve.engine.requests import EngineHealth, InvalidRequest, ModelNotFound, NotReady
from gguf_serve.settings import ModelSettings, Role, Settings

log = logging.getLogger("gguf_serve.registry")


class LoadState(enum.Enum):
    PENDING = "pending"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    UNLOADED = "unloaded"


E = TypeVar("E", bound=Engine, covariant=True)


@dataclass(eq=False)
class LoadedModel(Generic[E]):
    """What a route gets: the settings of the id it asked for, and the engine that serves it
    (typed by role: acquire(name, "chat") is a LoadedModel[ChatModel])."""

    settings: ModelSettings
    engine: E
    llama_model: LlamaModel | None = None
    path: Path | None = None


@dataclass(eq=False)
class _Entry:
    settings: ModelSettings
    state: LoadState = LoadState.PENDING
    error: str | None = None
    loaded: LoadedModel[AnyEngine] | None = None
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)


class ModelRegistry:
    """Entries by id; `files` maps each id that owns weights to its resolved GGUF path
    (the CLI resolves, downloads and converts them before the registry is built).

    An entry may use another's engine (`same_weights_as`, a bi-encoder reranker's
    `embedding_model`): using the dependant counts as using what it depends on, and
    unloading a model unloads its dependants first, so nothing keeps a freed model.
    """

    def __init__(
        self,
        settings: Settings,
        files: Mapping[str, Path],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._files = dict(files)
        self._clock = clock
        self._entries: dict[str, _Entry] = {m.id: _Entry(m, last_used=clock()) for m in _load_order(settings)}
        self._names = {name: m.id for m in settings.models for name in m.names}
        self._dependants: dict[str, list[str]] = {mid: [] for mid in self._entries}
        # Every engine's decodes share these threads (cpu_budget.py); one slot per model that
        # owns weights, kept across unloads and restarts.
        self.cpu_budget = CpuBudget(settings.cpu_threads)
        self._cpu_slots: dict[str, CpuSlot] = {}
        for m in settings.models:
            for dep in dependencies(m):
                self._dependants[dep].append(m.id)

    # --- lookup -------------------------------------------------------------------------------
    def entries(self) -> list[tuple[ModelSettings, LoadState, LoadedModel[AnyEngine] | None]]:
        return [(e.settings, e.state, e.loaded) for e in self._entries.values()]

    @overload
    def get(self, name: str | None, role: Literal["chat"]) -> LoadedModel[ChatModel]: ...
    @overload
    def get(self, name: str | None, role: Literal["embedding"]) -> LoadedModel[EmbeddingModel]: ...
    @overload
    def get(self, name: str | None, role: Literal["rerank"]) -> LoadedModel[RerankModel]: ...
    @overload
    def get(self, name: str | None, role: Role) -> LoadedModel[AnyEngine]: ...
    def get(self, name: str | None, role: Role) -> LoadedModel[AnyEngine]:
        entry = self._entry(name, role)
        if entry.state is LoadState.FAILED:
            raise NotReady(f"model {entry.settings.id!r} failed to load: {entry.error}")
        if entry.state is not LoadState.READY or entry.loaded is None:
            raise NotReady(f"model {entry.settings.id!r} is {entry.state.value}; retry shortly")
        self._touch(entry.settings.id)
        return entry.loaded

    @overload
    async def acquire(
        self, name: str | None, role: Literal["chat"], wait_s: float = ...
    ) -> LoadedModel[ChatModel]: ...
    @overload
    async def acquire(
        self, name: str | None, role: Literal["embedding"], wait_s: float = ...
    ) -> LoadedModel[EmbeddingModel]: ...
    @overload
    async def acquire(
        self, name: str | None, role: Literal["rerank"], wait_s: float = ...
    ) -> LoadedModel[RerankModel]: ...
    @overload
    async def acquire(self, name: str | None, role: Role, wait_s: float = ...) -> LoadedModel[AnyEngine]: ...
    async def acquire(self, name: str | None, role: Role, wait_s: float = 300.0) -> LoadedModel[AnyEngine]:
        """Like get(), but waits for a lazily loaded or idle-unloaded model to come back."""
        entry = self._entry(name, role)
        if self._loads_on_demand(entry):
            await asyncio.to_thread(self._load_one, entry)
        deadline = time.monotonic() + wait_s
        while entry.state is LoadState.LOADING and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return self.get(name, role)

    def _touch(self, mid: str) -> None:
        """A request for `mid` is a use of it and of every model it runs on."""
        now = self._clock()
        todo = [mid]
        while todo:
            e = self._entries[todo.pop()]
            e.last_used = now
            todo.extend(dependencies(e.settings))

    @staticmethod
    def _loads_on_demand(entry: _Entry) -> bool:
        return entry.state is LoadState.UNLOADED or (
            entry.state is LoadState.PENDING and entry.settings.lazy_load
        )

    def _entry(self, name: str | None, role: Role) -> _Entry:
        if not name:
            # No model named: the first model of the role, as single-model servers behave.
            candidates = [e for e in self._entries.values() if e.settings.role == role]
            if not candidates:
                raise ModelNotFound(f"no {role} model is configured", "model")
            return candidates[0]
        mid = self._names.get(name)
        if mid is None:
            known = ", ".join(sorted(self._names))
            raise ModelNotFound(f"The model {name!r} does not exist. Available models: {known}", "model")
        entry = self._entries[mid]
        if entry.settings.role != role:
            raise InvalidRequest(
                f"model {name!r} is a {entry.settings.role} model and cannot serve {role} requests", "model"
            )
        return entry

    # --- lifecycle ----------------------------------------------------------------------------
    def load_all(self) -> None:
        for e in self._entries.values():
            if not e.settings.lazy_load:
                self._load_one(e)

    @property
    def ready(self) -> bool:
        return all(
            e.state is LoadState.READY
            or (e.settings.lazy_load and e.state is not LoadState.FAILED)
            or e.state is LoadState.UNLOADED
            for e in self._entries.values()
        )

    @property
    def failures(self) -> list[str]:
        return [f"{e.settings.id}: {e.error}" for e in self._entries.values() if e.state is LoadState.FAILED]

    def _load_one(self, e: _Entry) -> None:
        with e.lock:
            if e.state is LoadState.READY:
                return
            e.state = LoadState.LOADING
            t0 = time.monotonic()
            try:
                e.loaded = self._build(e.settings)
            except Exception as err:
                e.state = LoadState.FAILED
                e.error = str(err)
                log.error("model %s failed to load: %s", e.settings.id, err)
                return
            e.state = LoadState.READY
            log.info("model %s (%s) ready in %.1fs", e.settings.id, e.settings.role, time.monotonic() - t0)
        self._touch(e.settings.id)

    def _shared(self, mid: str) -> LoadedModel[AnyEngine]:
        other = self._entries[mid]
        if other.state is not LoadState.READY and other.state is not LoadState.FAILED:
            self._load_one(other)
        if other.loaded is None:
            raise ModelLoadError(f"model {mid!r} it depends on failed to load: {other.error}")
        return other.loaded

    def _build(self, ms: ModelSettings) -> LoadedModel[AnyEngine]:
        if ms.same_weights_as:
            base = self._shared(ms.same_weights_as)
            meta = base.engine.info.meta_value
            return LoadedModel(with_model_sampling(ms, meta), base.engine, base.llama_model, base.path)
        limits = self.settings.limits
        if ms.role == "rerank" and ms.scorer == "embedding":
            from gguf_serve.engine.reranker import make_reranker

            return LoadedModel(ms, make_reranker(None, ms, limits, self._embedder_for))
        path = self._files.get(ms.id)
        if path is None:
            raise ModelLoadError(f"model {ms.id!r}: no GGUF file was resolved for it")
        if ms.id not in self._cpu_slots:
            self._cpu_slots[ms.id] = self.cpu_budget.slot()
        slot = self._cpu_slots[ms.id]
        if self.settings.engine_isolation == "process":
            from gguf_serve.engine.engine_client import EngineClient

            client = EngineClient(ms, path, limits, self.settings, slot)
            client.start()  # raises ModelLoadError with the engine process's reason
            return LoadedModel(with_model_sampling(ms, client.info.meta_value), client, None, path)
        from gguf_serve.engine.loader import load_engine

        engine, model = load_engine(ms, path, limits, CpuShare(slot))
        return LoadedModel(with_model_sampling(ms, model.meta), engine, model, path)

    def _embedder_for(self, mid: str) -> EmbeddingModel:
        loaded = self._shared(mid)
        if loaded.settings.role != "embedding":
            raise ModelLoadError(f"model {mid!r} is not an embedding model")
        return loaded.engine  # type: ignore[return-value]  # the role says which Protocol it is

    def unload(self, mid: str) -> None:
        """Free a model, and first every loaded entry that runs on it (they reload with it)."""
        for dependant in self._dependants[mid]:
            self.unload(dependant)
        e = self._entries[mid]
        with e.lock:
            loaded, e.loaded = e.loaded, None
            if loaded is None:
                return
            e.state = LoadState.UNLOADED
            # An engine whose thread is stuck in llama.cpp frees nothing (close() is False):
            # neither may its weights be freed under it.
            freed = owns_engine(loaded.settings) and loaded.engine.close() is not False
            if freed and loaded.llama_model is not None:
                loaded.llama_model.close()
        log.info("model %s unloaded", mid)

    def unload_idle(self) -> None:
        """keep_alive: free models nobody used for that many seconds (and that are not busy)."""
        now = self._clock()
        for mid, e in self._entries.items():
            ka = e.settings.keep_alive
            if ka is None or e.state is not LoadState.READY or e.loaded is None:
                continue
            if now - e.last_used > ka and self._idle(mid):
                self.unload(mid)

    def _idle(self, mid: str) -> bool:
        """No request in progress on this model or on anything that runs on it."""
        loaded = self._entries[mid].loaded
        if loaded is not None and not loaded.engine.idle():
            return False
        return all(self._idle(d) for d in self._dependants[mid])

    def health(self) -> dict[str, EngineHealth]:
        """Each loaded model's engine health (an entry running on another's engine reports that one's)."""
        out: dict[str, EngineHealth] = {}
        for mid, e in self._entries.items():
            if e.loaded is not None and e.state is LoadState.READY:
                with contextlib.suppress(Exception):
                    out[mid] = e.loaded.engine.health()
        return out

    def stats(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for mid, e in self._entries.items():
            s: dict[str, float] = {"loaded": 1.0 if e.state is LoadState.READY else 0.0}
            if e.loaded is not None and e.settings.same_weights_as is None:
                with contextlib.suppress(Exception):
                    s.update(e.loaded.engine.stats())
            out[mid] = s
        return out

    def close(self) -> None:
        for mid in reversed(list(self._entries)):
            self.unload(mid)
        self.cpu_budget.close()


def dependencies(ms: ModelSettings) -> list[str]:
    """The ids of the entries whose engine this entry runs on."""
    return [ms.depends_on] if ms.depends_on else []


def owns_engine(ms: ModelSettings) -> bool:
    """Whether the entry's engine and weights are its own to free (not another entry's)."""
    return ms.depends_on is None


def _load_order(settings: Settings) -> list[ModelSettings]:
    """Models that others run on first; within that, embedding, rerank, chat."""
    order = {"embedding": 0, "rerank": 1, "chat": 2}
    return sorted(settings.models, key=lambda m: (bool(dependencies(m)), order[m.role]))
