"""A host-RAM prompt cache: KV state of sequences evicted from their slot, keyed by tokens.

When a slot is about to be overwritten by an unrelated prompt, the scheduler copies the
sequence's KV state (llama.cpp's per-sequence state API) into this cache. A later request
whose prompt starts with the same tokens (a RAG follow-up after other users' requests, the
next turn of a chat) gets that state copied back into its slot and skips that prefill, as
llama-server's `--cache-ram` does. Bounded in bytes, least recently used entry out first.
Used by the scheduler thread only; stats() may be read from any thread.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

_STEP = 64 * 1024
MAX_SPARE_BUFFERS = 4  # free buffers kept for the next saves; more are given back


def common_prefix_len(a: list[int] | npt.NDArray[np.int32], b: list[int] | npt.NDArray[np.int32]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    # numpy compares long prompts much faster than a Python loop.
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


@dataclass(eq=False)
class CachedPrompt:
    tokens: npt.NDArray[np.int32]  # the tokens whose KV the state holds, in order
    buffer: npt.NDArray[np.uint8]  # holds the state in its first `size` bytes (room to spare)
    size: int

    @property
    def state(self) -> npt.NDArray[np.uint8]:
        """llama_state_seq_get_data of that sequence."""
        return self.buffer[: self.size]

    @property
    def nbytes(self) -> int:
        return int(self.buffer.nbytes + self.tokens.nbytes)


def buffer_capacity(size: int) -> int:
    """A new buffer for a state of `size` bytes has 1/8 more (in 64 KiB steps): the next
    turn of a conversation or another passage of about the same length then fits in it
    when it is recycled."""
    return -(-(size + size // 8) // _STEP) * _STEP


def reusable(buffer: npt.NDArray[np.uint8], size: int) -> bool:
    """Whether a free buffer may take a state of `size` bytes without wasting half of it."""
    return size <= buffer.nbytes <= 2 * buffer_capacity(size)


class PromptCache:
    """Entries and the free buffers kept for the next saves share one bound in bytes.

    Why keep free buffers: a saved state is tens of MiB to GiB, and a new numpy buffer of
    that size is a fresh mapping whose first write page-faults on every page; on the VMs we
    measured that made a save 35-70 ms instead of 6 ms, on the request path of the request
    that evicts a slot. A restored entry's buffer (or an evicted one's) takes the next save.
    """

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._entries: OrderedDict[int, CachedPrompt] = OrderedDict()  # oldest use first
        self._spare: list[npt.NDArray[np.uint8]] = []  # oldest release first
        self._next_key = 0
        self.bytes = 0  # entries and spare buffers: all the RAM the cache holds
        self.spare_bytes = 0
        self.hits = 0
        self.misses = 0
        self.restored_tokens = 0
        self.saves = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[CachedPrompt]:
        return list(self._entries.values())

    def covers(self, tokens: list[int]) -> bool:
        """Whether an entry already holds all of `tokens` (so saving them again is a waste)."""
        n = len(tokens)
        return any(
            len(e.tokens) >= n and common_prefix_len(e.tokens, tokens) == n for e in self._entries.values()
        )

    def save(
        self,
        tokens: list[int],
        size: int,
        fill: Callable[[npt.NDArray[np.uint8]], object],
        keep: CachedPrompt | None = None,
    ) -> bool:
        """Keep the KV state of `tokens` (`size` bytes, written by `fill` into the buffer it is
        given); entries it extends go, then the least recently used ones until it fits, but
        never `keep` (the entry about to be restored: its buffer must not take this state).
        False when it does not fit."""
        toks = np.asarray(tokens, dtype=np.int32)
        if not tokens or size + toks.nbytes > self.limit_bytes:  # alone over the bound
            return False
        for key, e in list(self._entries.items()):
            if (
                e is not keep
                and len(e.tokens) <= len(toks)
                and common_prefix_len(e.tokens, toks) == len(e.tokens)
            ):
                self._release(key)
        buffer = self._buffer_for(size, toks.nbytes, keep)
        if buffer is None:
            return False
        try:
            fill(buffer[:size])
        except BaseException:
            self._add_spare(buffer)  # still counted in self.bytes
            raise
        self._entries[self._next_key] = CachedPrompt(toks, buffer, size)
        self._next_key += 1
        self.bytes += toks.nbytes
        self.saves += 1
        return True

    def best(self, prompt: list[int]) -> tuple[CachedPrompt, int] | None:
        """The entry sharing the longest prefix with `prompt`, and that length."""
        found: tuple[CachedPrompt, int] | None = None
        for e in self._entries.values():
            n = common_prefix_len(e.tokens, prompt)
            if n > 0 and (found is None or n > found[1]):
                found = (e, n)
        return found

    def used(self, entry: CachedPrompt, n_restored: int) -> None:
        """`entry` was restored into a slot: count the hit, and drop the entry when the slot
        now holds most of it, as llama-server moves an entry back into its slot. What is lost
        is its tail (a RAG follow-up replaces the last question and answer); the slot's
        conversation is saved again when the slot is overwritten. An entry that lent only a
        short prefix (the system prompt) stays."""
        self.hits += 1
        self.restored_tokens += n_restored
        for key, e in self._entries.items():
            if e is entry:
                if n_restored >= len(entry.tokens) / 2:
                    self._release(key)
                else:
                    self._entries.move_to_end(key)
                return

    def discard(self, entry: CachedPrompt) -> None:
        for key, e in list(self._entries.items()):
            if e is entry:
                self._release(key)

    def _buffer_for(self, size: int, extra: int, keep: CachedPrompt | None) -> npt.NDArray[np.uint8] | None:
        """A buffer for a state of `size` bytes, counted in self.bytes (with `extra` for its
        tokens): a spare one if one fits, else a new one in the room that spare buffers and
        then the least recently used entries other than `keep` make."""
        while True:
            fitting = [b for b in self._spare if reusable(b, size)]
            if fitting:
                buffer = min(fitting, key=lambda b: b.nbytes)
                self._take_spare(buffer)
                return buffer
            capacity = min(buffer_capacity(size), self.limit_bytes - extra)
            if self.bytes + capacity + extra <= self.limit_bytes:
                buffer = np.empty(capacity, dtype=np.uint8)  # counted once it exists
                self.bytes += capacity
                return buffer
            if self._spare:  # none fits: the largest goes first
                self._free_spare(max(self._spare, key=lambda b: b.nbytes))
                continue
            oldest = next((k for k, e in self._entries.items() if e is not keep), None)
            if oldest is None:  # only `keep` is left, and it leaves no room
                return None
            self._release(oldest)  # its buffer may fit
            self.evictions += 1

    def _release(self, key: int) -> None:
        """Drop an entry; its buffer is kept for the next save (the oldest spare goes when
        there are too many)."""
        e = self._entries.pop(key)
        self.bytes -= e.tokens.nbytes
        self._add_spare(e.buffer)
        if len(self._spare) > MAX_SPARE_BUFFERS:
            self._free_spare(self._spare[0])

    def _add_spare(self, buffer: npt.NDArray[np.uint8]) -> None:
        self._spare.append(buffer)
        self.spare_bytes += buffer.nbytes

    def _take_spare(self, buffer: npt.NDArray[np.uint8]) -> None:
        # by identity: list.remove would compare numpy arrays element by element
        self._spare = [b for b in self._spare if b is not buffer]
        self.spare_bytes -= buffer.nbytes

    def _free_spare(self, buffer: npt.NDArray[np.uint8]) -> None:
        self._take_spare(buffer)
        self.bytes -= buffer.nbytes

    def stats(self) -> dict[str, float]:
        return {
            "prompt_cache_bytes": float(self.bytes),
            "prompt_cache_spare_bytes": float(self.spare_bytes),
            "prompt_cache_limit_bytes": float(self.limit_bytes),
            "prompt_cache_entries": float(len(self._entries)),
            "prompt_cache_hits": float(self.hits),
            "prompt_cache_misses": float(self.misses),
            "prompt_cache_restored_tokens": float(self.restored_tokens),
            "prompt_cache_saves": float(self.saves),
            "prompt_cache_evictions": float(self.evictions),
        }
