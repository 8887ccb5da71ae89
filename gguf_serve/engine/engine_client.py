"""The API process's side of an engine process (engine_core.py): a client that implements the
engine Protocols over a socket, and a supervisor that restarts the process when it dies.

As vLLM's EngineClient before its EngineCore, and Ollama's server before its runners: routes
call ChatModel / EmbeddingModel / RerankModel methods and cannot tell that llama.cpp runs in
another process. When that process dies, whatever the signal or abort:
- every request in flight on it ends with EngineUnavailable (a 503, or a stream's error event);
- new requests get the same 503 while it restarts, with the reason;
- it restarts by itself after a backoff that grows while it keeps dying soon after starting;
- health() says so, for /health (still 200: the server heals itself), /ready, /stats, /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from gguf_serve.engine.cpu_budget import CpuShare, CpuSlot
from gguf_serve.engine.engine_wire import EngineSpec, Handshake, error_from
from gguf_serve.engine.llama_runtime import ModelLoadError
from gguf_serve.engine.model_info import ModelInfo
from gguf_serve.engine.requests import (
    HEALTHY,
    ChatDelta,
    ChatRequest,
    EngineHealth,
    EngineUnavailable,
    Finished,
    SamplingParams,
    TextChunk,
)
from gguf_serve.settings import Limits, ModelSettings, Settings

if TYPE_CHECKING:
    from gguf_serve.engine.embedder import EmbeddingResult
    from gguf_serve.engine.reranker import RerankResult

log = logging.getLogger("gguf_serve.engine_client")

# Seconds before a restart: the first restart comes fast; a process that dies again within
# STABLE_S of its start waits twice as long each time, up to the last value.
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
STABLE_S = 60.0
CLOSE_TIMEOUT_S = 30.0

Ev = TypeVar("Ev", ChatDelta | Finished, TextChunk | Finished)


def describe_exit(returncode: int | None) -> str:
    """How a process ended, as an operator reads it: 'was killed by SIGKILL', 'exited with code 1'."""
    if returncode is None:
        return "stopped answering"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with code {returncode}"


@dataclass(eq=False)
class _Pending:
    """A request waiting for its engine: a call's future, or a stream's per-choice queues."""

    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    queues: list[asyncio.Queue[Any]] = field(default_factory=list)
    open_choices: int = 0


class RemoteStream(Generic[Ev]):
    """One choice of a streamed request, read from its queue: events, then one Finished."""

    def __init__(self, client: EngineClient, rid: int, queue: asyncio.Queue[Any]) -> None:
        self._client = client
        self._rid = rid
        self._queue = queue
        self._done = False

    async def __aiter__(self) -> AsyncIterator[Ev]:
        try:
            while True:
                ev = await self._queue.get()
                if isinstance(ev, Finished):
                    self._done = True
                yield ev
                if self._done:
                    return
        finally:
            self.cancel()

    def cancel(self) -> None:
        """Free the request's slot at the engine's next step (a no-op once finished)."""
        if not self._done:
            self._done = True
            self._client.cancel(self._rid)


class EngineClient:
    """One model's engine in a supervised engine process. It implements ChatModel,
    EmbeddingModel and RerankModel; the registry hands it out typed by the model's role."""

    def __init__(
        self, ms: ModelSettings, path: Path, limits: Limits, settings: Settings, cpu: CpuSlot | None = None
    ) -> None:
        self.settings = ms
        self._spec = EngineSpec(ms, path, limits, settings.allow_amx, settings.log_level, cpu)
        self._cpu = CpuShare(cpu) if cpu is not None else None
        self._lock = threading.Lock()  # guards the process, its connection and the pending map
        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._hs: Handshake | None = None
        self._health = EngineHealth("restarting", "starting")
        self._started_at = 0.0
        self._backoff = 0
        self._closing = False
        self._stats: dict[str, float] = {}
        self.restarts = 0

    # --- the process ----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine process and wait for its model to load (ModelLoadError if it cannot)."""
        proc, conn, hs = self._spawn()
        with self._lock:
            if self._closing:  # closed while loading: nobody wants this process any more
                self._stop(proc, conn)
                return
            self._proc, self._conn, self._hs = proc, conn, hs
            self._health = EngineHealth("ok", None, self.restarts)
            self._started_at = time.monotonic()
        threading.Thread(
            target=self._read, args=(proc, conn), name=f"engine-{self.settings.id}", daemon=True
        ).start()

    def _spawn(self) -> tuple[subprocess.Popen[bytes], Connection, Handshake]:
        ours, theirs = socket.socketpair()
        cmd = [sys.executable, "-m", "gguf_serve.engine.engine_core", str(theirs.fileno())]
        try:
            fds = (theirs.fileno(),) + ((self._spec.cpu.fd,) if self._spec.cpu is not None else ())
            proc = subprocess.Popen(cmd, pass_fds=fds, stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        conn = Connection(ours.detach())
        what = f"model {self.settings.id!r} ({self._spec.path.name})"
        try:
            conn.send(self._spec)
            while not conn.poll(1.0):  # loading takes as long as it takes, unless the process dies
                if proc.poll() is not None:
                    break
            msg = conn.recv()
        except (EOFError, OSError):
            self._stop(proc, conn)
            raise ModelLoadError(
                f"{what}: the engine process {describe_exit(proc.returncode)} while loading it "
                "(a corrupt or unsupported GGUF? see the log above)"
            ) from None
        if msg[0] != "ready":
            self._stop(proc, conn)
            raise ModelLoadError(str(msg[1]))
        return proc, conn, msg[1]

    @staticmethod
    def _stop(proc: subprocess.Popen[bytes], conn: Connection) -> None:
        with contextlib.suppress(OSError):
            conn.close()
        try:
            proc.wait(timeout=CLOSE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _read(self, proc: subprocess.Popen[bytes], conn: Connection) -> None:
        """The reader thread of one engine process: hands replies to their event loops."""
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break
            except Exception:  # a reply that cannot be unpickled: treat the engine as broken
                log.exception("model %s: unreadable reply from the engine process", self.settings.id)
                proc.kill()
                break
            if msg[0] == "batch":
                self._deliver(msg[1], proc)
        self._exited(proc, conn)

    def _deliver(self, items: list[tuple[Any, ...]], proc: subprocess.Popen[bytes]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Pending, tuple[Any, ...]]]] = {}
        for item in items:
            if item[0] == "stats":
                self._stats, health = item[1], item[2]
                if health.status != "ok":  # a worker thread died in there: restart the process
                    log.error("model %s: %s; restarting its engine process", self.settings.id, health.reason)
                    with contextlib.suppress(OSError):
                        proc.kill()
                continue
            p = self._pending.get(item[1])
            if p is not None:
                by_loop.setdefault(p.loop, []).append((p, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(self._apply, batch)
            except RuntimeError:  # that loop is closed: nobody is listening, nothing is in flight
                for _, item in batch:
                    self._forget(item[1])

    def _apply(self, batch: list[tuple[_Pending, tuple[Any, ...]]]) -> None:
        """On the request's event loop: settle futures, feed queues."""
        for p, item in batch:
            kind, rid = item[0], item[1]
            if kind == "event":
                p.queues[item[2]].put_nowait(item[3])
                if isinstance(item[3], Finished):
                    p.open_choices -= 1
                    if p.open_choices == 0:
                        self._forget(rid)
            elif p.future.done():
                continue
            elif kind == "result":
                p.future.set_result(item[2])
            elif kind == "started":
                p.future.set_result(None)
            elif kind == "error":
                p.future.set_exception(error_from(item[2:]))

    def _exited(self, proc: subprocess.Popen[bytes], conn: Connection) -> None:
        """The engine process is gone: fail what it held, and start another unless closing."""
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with contextlib.suppress(OSError):
            conn.close()
        if self._cpu is not None:  # it may have died in the middle of a decode, its claim held
            self._cpu.forget()
        reason = f"its engine process {describe_exit(proc.returncode)}"
        with self._lock:
            if self._conn is not conn:
                return
            self._proc = self._conn = None
            pending, self._pending = list(self._pending.values()), {}
            closing = self._closing
            if not closing:
                lived = time.monotonic() - self._started_at
                self._backoff = 0 if lived > STABLE_S else min(self._backoff + 1, len(RESTART_BACKOFF_S) - 1)
                self._health = EngineHealth("restarting", reason, self.restarts)
        if closing:
            return
        err = EngineUnavailable(f"model {self.settings.id} failed: {reason}; it is restarting, retry shortly")
        log.error("model %s: %s; %d requests failed, restarting it", self.settings.id, reason, len(pending))
        for p in pending:
            with contextlib.suppress(RuntimeError):
                p.loop.call_soon_threadsafe(_fail, p, err)
        threading.Thread(target=self._restart, name=f"restart-{self.settings.id}", daemon=True).start()

    def _restart(self) -> None:
        delay = RESTART_BACKOFF_S[self._backoff]
        while True:
            time.sleep(delay)
            if self._closing:
                return
            try:
                with self._lock:
                    self.restarts += 1
                    self._health = replace(self._health, restarts=self.restarts)
                self.start()
            except ModelLoadError as e:
                log.error("model %s: restart failed: %s", self.settings.id, e)
                with self._lock:
                    self._health = EngineHealth("restarting", f"restart failed: {e}", self.restarts)
                delay = min(2 * delay, RESTART_BACKOFF_S[-1])
                continue
            log.info(
                "model %s: engine process restarted (%d restarts so far)", self.settings.id, self.restarts
            )
            return

    # --- requests ---------------------------------------------------------------------------
    def _begin(self, n_choices: int = 0) -> tuple[int, _Pending, Connection]:
        with self._lock:
            conn = self._conn
            if conn is None or self._health.status != "ok":
                raise EngineUnavailable(
                    f"model {self.settings.id} is not serving: {self._health.reason}; retry shortly"
                )
            loop = asyncio.get_running_loop()
            p = _Pending(loop, loop.create_future(), [asyncio.Queue() for _ in range(n_choices)], n_choices)
            rid = next(self._ids)
            self._pending[rid] = p
        return rid, p, conn

    def _send(self, conn: Connection, msg: tuple[Any, ...]) -> None:
        try:
            with self._send_lock:
                conn.send(msg)
        except (OSError, ValueError):  # the process died as we wrote; the reader fails the rest
            raise EngineUnavailable(
                f"model {self.settings.id}'s engine process is gone; retry shortly"
            ) from None

    def _forget(self, rid: int) -> None:
        with self._lock:
            self._pending.pop(rid, None)

    def cancel(self, rid: int) -> None:
        """Tell the engine a request's client went away (every choice of it)."""
        with self._lock:
            conn = self._conn if rid in self._pending else None
        if conn is not None:
            with contextlib.suppress(EngineUnavailable):
                self._send(conn, ("cancel", rid))

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        rid, p, conn = self._begin()
        try:
            self._send(conn, ("call", rid, method, args, kwargs))
            return await p.future
        except asyncio.CancelledError:
            self.cancel(rid)
            raise
        finally:
            self._forget(rid)

    async def _stream(self, method: str, args: tuple[Any, ...], n: int) -> list[RemoteStream[Any]]:
        rid, p, conn = self._begin(n)
        try:
            self._send(conn, ("stream", rid, method, args))
            await p.future
        except BaseException:
            self.cancel(rid)
            self._forget(rid)
            raise
        return [RemoteStream(self, rid, q) for q in p.queues]

    # --- ChatModel --------------------------------------------------------------------------
    async def start_chats(self, req: ChatRequest, n: int) -> Sequence[RemoteStream[ChatDelta | Finished]]:
        return await self._stream("start_chats", (req, n), n)

    async def start_chat(self, req: ChatRequest) -> RemoteStream[ChatDelta | Finished]:
        return (await self.start_chats(req, 1))[0]

    async def start_completions(
        self, prompt: str | list[int], params: SamplingParams, n: int
    ) -> Sequence[RemoteStream[TextChunk | Finished]]:
        return await self._stream("start_completions", (prompt, params, n), n)

    async def start_completion(
        self, prompt: str | list[int], params: SamplingParams
    ) -> RemoteStream[TextChunk | Finished]:
        return (await self.start_completions(prompt, params, 1))[0]

    async def render(self, req: ChatRequest) -> str:
        return str(await self._call("render", req))

    # --- EmbeddingModel / RerankModel ---------------------------------------------------------
    async def embed(self, inputs: Sequence[str | Sequence[int]], **kwargs: Any) -> EmbeddingResult:
        return await self._call("embed", [x if isinstance(x, str) else list(x) for x in inputs], **kwargs)

    async def score(
        self, query: str, documents: list[str], instruction: str | None = None, truncate: bool | None = None
    ) -> RerankResult:
        return await self._call("score", query, documents, instruction, truncate)

    @property
    def n_embd(self) -> int:
        return self._handshake.n_embd

    @property
    def query_instruction(self) -> str | None:
        return self._handshake.query_instruction

    @property
    def kind(self) -> str:
        return self._handshake.kind

    # --- Engine -----------------------------------------------------------------------------
    @property
    def _handshake(self) -> Handshake:
        if self._hs is None:
            raise EngineUnavailable(f"model {self.settings.id} has not started")
        return self._hs

    @property
    def n_ctx(self) -> int:
        return self._handshake.n_ctx

    @property
    def info(self) -> ModelInfo:
        return self._handshake.info

    async def tokenize(self, text: str, add_special: bool = False, parse_special: bool = False) -> list[int]:
        return list(await self._call("tokenize", text, add_special, parse_special))

    async def detokenize(self, tokens: Sequence[int]) -> list[bytes]:
        return list(await self._call("detokenize", list(tokens)))

    def stats(self) -> dict[str, float]:
        up = self._health.status == "ok"
        proc = self._proc
        return {
            **(self._stats if up else {}),
            "engine_up": float(up),
            "engine_restarts": float(self.restarts),
            "engine_pid": float(proc.pid if proc is not None else 0),
        }

    def idle(self) -> bool:
        return not self._pending

    def health(self) -> EngineHealth:
        return self._health if self._health.status != "ok" else HEALTHY

    def close(self) -> bool:
        """Stop the engine process (it frees its model) and never restart it."""
        with self._lock:
            self._closing = True
            proc, conn = self._proc, self._conn
        if proc is None or conn is None:
            return True
        with contextlib.suppress(EngineUnavailable):
            self._send(conn, ("close",))
        try:
            proc.wait(timeout=CLOSE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning("model %s: the engine process did not stop; killing it", self.settings.id)
            proc.kill()
            proc.wait()
        return True


def _fail(p: _Pending, err: EngineUnavailable) -> None:
    if not p.future.done():
        p.future.set_exception(err)
    for q in p.queues:
        q.put_nowait(Finished("error", 0, 0, error=err.message, error_status=503))
