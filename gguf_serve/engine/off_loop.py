"""Work that grows with the input runs in a worker thread, never on the event loop: one slow
template render or tokenization must not hold up /health and every other request."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# Tokenizing less text than this takes a few microseconds: a thread hop would cost more.
INLINE_CHARS = 4096


async def off_loop(work: Callable[[], T], abandon: Callable[[T], None] | None = None) -> T:
    """`work()` in the loop's default executor. If the caller is cancelled meanwhile (its
    client went away), `abandon` receives what `work` made once it is done, so that whatever
    it started (queued generations) is cancelled instead of running for nobody."""
    fut = asyncio.get_running_loop().run_in_executor(None, work)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        if abandon is not None:
            callback = abandon

            def settle(f: asyncio.Future[T]) -> None:
                if not f.cancelled() and f.exception() is None:
                    callback(f.result())

            fut.add_done_callback(settle)
        raise


async def tokenize_off_loop(n_chars: int, tokenize: Callable[[], T]) -> T:
    return await off_loop(tokenize) if n_chars > INLINE_CHARS else tokenize()
