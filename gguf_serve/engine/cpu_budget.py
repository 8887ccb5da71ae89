"""One CPU budget for every engine of a server: how many threads each decode may use.

Left alone, each model's llama.cpp context runs as many threads as there are CPUs, so a chat
decode and an embedding decode at the same time put twice the threads on the cores. llama.cpp's
threads meet at a barrier after every op and wait there by spinning: when the OS parks one of
them to run another engine's thread, the others spin on, and both decodes crawl (issue 19's
mixed-load run on 2 cores: chat at 0.17 x its idle speed, ingest at 0.37 x).

So the engines split one budget instead: a context that is decoding claims a share, the budget
divided evenly among the contexts decoding now, and sets its thread count to it before the
decode (llama_set_n_threads applies from the next decode on). A context that stops decoding
gives its share back LINGER_S later, so a busy engine keeps its claim between its decodes,
while an idle one is counted out almost at once.

The claims live in a small table in shared memory (an unlinked file that every engine process
inherits as a file descriptor), one slot per engine, each written only by its own engine: a
timestamp on CLOCK_MONOTONIC, which is the same clock in every process. The API process clears
the slot of an engine process that died in the middle of a decode.
"""

from __future__ import annotations

import math
import mmap
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from gguf_serve.engine.llama_runtime import usable_cpus

# How long a context still counts as decoding after its last decode ended: longer than the gap
# between two decodes of a busy engine (sampling, packing the next batch: milliseconds), short
# enough that a model left alone gets every thread back almost at once.
LINGER_S = 0.1
SLOTS = 64  # engines one server may run (one per model that owns weights)
_DECODING = math.inf


@dataclass(frozen=True)
class CpuSlot:
    """What an engine process is told about its place in the budget (it travels pickled)."""

    fd: int  # the shared table, inherited by the engine process under the same number
    index: int
    threads: int  # the whole budget


class CpuBudget:
    """The shared table; the API process creates it, hands each engine a slot."""

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads or usable_cpus()
        with tempfile.TemporaryFile() as f:  # unlinked at once: nothing is left behind
            f.truncate(SLOTS * 8)
            self.fd = os.dup(f.fileno())
        os.set_inheritable(self.fd, False)  # only the engine processes it is passed to get it
        self._next = 0

    def slot(self) -> CpuSlot:
        if self._next >= SLOTS:
            raise ValueError(f"at most {SLOTS} engines share one CPU budget")
        self._next += 1
        return CpuSlot(self.fd, self._next - 1, self.threads)

    def close(self) -> None:
        os.close(self.fd)


def _table(fd: int) -> np.ndarray:
    return np.frombuffer(mmap.mmap(fd, SLOTS * 8), dtype=np.float64)


class CpuShare:
    """One engine's view of the budget: claim before a decode, give back after it."""

    def __init__(self, slot: CpuSlot, clock: Callable[[], float] = time.monotonic) -> None:
        self.index = slot.index
        self.budget = slot.threads
        self._table = _table(slot.fd)
        self._clock = clock

    def claim(self) -> int:
        """Mark this engine as decoding; the threads its decode may use now."""
        self._table[self.index] = _DECODING
        claims = self._table > self._clock()
        k = int(claims.sum())
        rank = int(claims[: self.index].sum())  # the first budget % k engines get one thread more
        base, extra = divmod(self.budget, k)
        return max(1, base + (1 if rank < extra else 0))

    def release(self) -> None:
        self._table[self.index] = self._clock() + LINGER_S

    def forget(self) -> None:
        """Count this engine out now: its process died, perhaps in the middle of a decode."""
        self._table[self.index] = 0.0
