"""An engine process: one model's llama.cpp engine, serving the API process over a socket.

EngineClient (engine_client.py) starts it as `python -m gguf_serve.engine.engine_core FD`
and sends an EngineSpec; this process loads the model, answers with a Handshake, then runs
the engine's requests (engine_wire.py lists the messages) on its own event loop. Whatever
llama.cpp aborts on (a GGML_ASSERT, a C++ exception crossing ctypes, a segfault in a CPU
kernel) ends this process only: the API process fails this engine's requests with a 503 and
starts a new one. As Ollama's runners, it lives only as long as its connection: when the API
process goes away, so does this one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

from gguf_serve.engine.engine_wire import (
    CALL_METHODS,
    STREAM_METHODS,
    EngineSpec,
    Handshake,
    error_fields,
)
from gguf_serve.engine.interfaces import AnyEngine, ChatEvents, TokenEvents
from gguf_serve.engine.requests import EngineError, Finished

log = logging.getLogger("gguf_serve.engine_core")

STATS_INTERVAL_S = 1.0


class EngineCore:
    """Runs requests from one connection on one engine; replies in batches, one per loop turn."""

    def __init__(self, conn: Connection, engine: AnyEngine) -> None:
        self.conn = conn
        self.engine = engine
        self._tasks: dict[int, asyncio.Task[None]] = {}  # calls, and streams still starting
        self._streams: dict[int, Sequence[ChatEvents | TokenEvents]] = {}
        self._open: dict[int, int] = {}  # choices of a stream not finished yet
        self._pumps: set[asyncio.Task[None]] = set()
        self._outbox: list[tuple[Any, ...]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed: asyncio.Event | None = None

    async def serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._closed = asyncio.Event()
        threading.Thread(target=self._read, name="engine-reader", daemon=True).start()
        stats = asyncio.create_task(self._push_stats())
        await self._closed.wait()
        stats.cancel()
        for task in list(self._tasks.values()):
            task.cancel()
        for streams in self._streams.values():
            for s in streams:
                s.cancel()

    # --- the connection ---------------------------------------------------------------------
    def _read(self) -> None:
        assert self._loop is not None and self._closed is not None
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                # The API process is gone: nobody is left to answer, and its slots are ours.
                os._exit(0)
            if msg[0] == "close":
                self._loop.call_soon_threadsafe(self._closed.set)
                return
            self._loop.call_soon_threadsafe(self._dispatch, msg)

    def _send(self, msg: tuple[Any, ...]) -> None:
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outbox.append(msg)

    def _flush(self) -> None:
        batch, self._outbox = self._outbox, []
        try:
            self.conn.send(("batch", batch))
        except (BrokenPipeError, ConnectionError, EOFError):
            os._exit(0)

    async def _push_stats(self) -> None:
        while True:
            self._send_stats()
            await asyncio.sleep(STATS_INTERVAL_S)

    def _send_stats(self) -> None:
        """Also right after each request ends: its slot or batch seat is free now, and /stats,
        /slots and keep_alive must not see it busy until the next periodic push."""
        try:
            stats = self.engine.stats()
        except Exception:  # a half-built engine: skip this round
            stats = {}
        self._send(("stats", stats, self.engine.health()))

    # --- requests ---------------------------------------------------------------------------
    def _dispatch(self, msg: tuple[Any, ...]) -> None:
        kind, rid = msg[0], msg[1]
        if kind == "cancel":
            task = self._tasks.get(rid)
            if task is not None:
                task.cancel()
            for s in self._streams.get(rid, ()):
                s.cancel()
        elif kind == "stream" and msg[2] in STREAM_METHODS:
            self._tasks[rid] = asyncio.create_task(self._start_stream(rid, msg[2], msg[3]))
        elif kind == "call" and msg[2] in CALL_METHODS:
            self._tasks[rid] = asyncio.create_task(self._call(rid, msg[2], msg[3], msg[4]))
        else:
            self._send(
                ("error", rid, *error_fields(EngineError(f"unknown engine request {kind}/{msg[2:3]}")))
            )

    async def _call(self, rid: int, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        try:
            value = await getattr(self.engine, method)(*args, **kwargs)
        except asyncio.CancelledError:
            return  # the client went away: nobody waits for an answer
        except Exception as e:
            if not isinstance(e, EngineError):
                log.exception("%s failed", method)
            self._send(("error", rid, *error_fields(e)))
        else:
            self._send(("result", rid, value))
        finally:
            self._tasks.pop(rid, None)
            self._send_stats()

    async def _start_stream(self, rid: int, method: str, args: tuple[Any, ...]) -> None:
        try:
            streams: Sequence[ChatEvents | TokenEvents] = await getattr(self.engine, method)(*args)
        except asyncio.CancelledError:
            return
        except Exception as e:
            if not isinstance(e, EngineError):
                log.exception("%s failed", method)
            self._send(("error", rid, *error_fields(e)))
            return
        finally:
            self._tasks.pop(rid, None)
        self._streams[rid] = streams
        self._open[rid] = len(streams)
        self._send(("started", rid))
        for i, s in enumerate(streams):
            task = asyncio.create_task(self._pump(rid, i, s))
            self._pumps.add(task)  # the loop keeps only weak references to tasks
            task.add_done_callback(self._pumps.discard)

    async def _pump(self, rid: int, choice: int, stream: ChatEvents | TokenEvents) -> None:
        finished = False
        started = False
        try:
            async for ev in stream:
                self._send(("event", rid, choice, ev))
                finished = isinstance(ev, Finished)
                if not started:  # it holds a slot now: /stats should say so before the next push
                    started = True
                    self._send_stats()
        except Exception as e:
            log.exception("a generation failed")
            if not finished:
                self._send(("event", rid, choice, Finished("error", 0, 0, error=error_fields(e)[1])))
        finally:
            self._open[rid] -= 1
            if self._open[rid] == 0:
                del self._open[rid]
                self._streams.pop(rid, None)
                self._send_stats()


def handshake(engine: AnyEngine) -> Handshake:
    return Handshake(
        info=engine.info,
        n_ctx=engine.n_ctx,
        n_embd=int(getattr(engine, "n_embd", 0)),
        query_instruction=getattr(engine, "query_instruction", None),
        kind=str(getattr(engine, "kind", "")),
    )


def main(argv: list[str]) -> int:
    conn = Connection(int(argv[1]))
    # Ctrl-C in a terminal and systemd's stop reach every process of the group: the API
    # process drains its requests first, then closes its engines itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    spec: EngineSpec = conn.recv()
    logging.basicConfig(
        level=spec.log_level.upper(),
        format=f"%(asctime)s %(levelname)s %(name)s [{spec.settings.id} pid {os.getpid()}]: %(message)s",
        stream=sys.stderr,
    )
    from gguf_serve.engine.cpu_budget import CpuShare
    from gguf_serve.engine.llama_backend import init_backend
    from gguf_serve.engine.loader import load_engine

    try:
        init_backend(allow_amx=spec.allow_amx)
        cpu = CpuShare(spec.cpu) if spec.cpu is not None else None
        engine, model = load_engine(spec.settings, spec.path, spec.limits, cpu)
    except Exception as e:  # ModelLoadError, a reranker that cannot score, a backend that cannot start
        log.debug("load failed", exc_info=True)
        named = str(e) if spec.path.name in str(e) else f"{spec.path}: {type(e).__name__}: {e}"
        conn.send(("failed", named))
        return 1
    conn.send(("ready", handshake(engine)))
    asyncio.run(EngineCore(conn, engine).serve())
    if engine.close() is not False:
        model.close()
    with contextlib.suppress(OSError):
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
