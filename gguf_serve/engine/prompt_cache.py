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
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


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
    state: npt.NDArray[np.uint8]  # llama_state_seq_get_data of that sequence

    @property
    def nbytes(self) -> int:
        return int(self.state.nbytes + self.tokens.nbytes)


class PromptCache:
    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._entries: OrderedDict[int, CachedPrompt] = OrderedDict()  # oldest use first
        self._next_key = 0
        self.bytes = 0
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

    def fits(self, nbytes: int) -> bool:
        return nbytes <= self.limit_bytes

    def put(self, tokens: list[int], state: npt.NDArray[np.uint8]) -> bool:
        """Keep `state` (the KV of `tokens`); entries it extends go, then the least recently
        used ones until it fits. False when one entry alone would exceed the bound."""
        entry = CachedPrompt(np.asarray(tokens, dtype=np.int32), state)
        if not tokens or not self.fits(entry.nbytes):
            return False
        for key, e in list(self._entries.items()):
            if len(e.tokens) <= len(tokens) and common_prefix_len(e.tokens, tokens) == len(e.tokens):
                self._drop(key)
        while self._entries and self.bytes + entry.nbytes > self.limit_bytes:
            self._drop(next(iter(self._entries)))
            self.evictions += 1
        self._entries[self._next_key] = entry
        self._next_key += 1
        self.bytes += entry.nbytes
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
        now holds all of it (it is saved again, longer, when that slot is overwritten)."""
        self.hits += 1
        self.restored_tokens += n_restored
        for key, e in self._entries.items():
            if e is entry:
                if n_restored >= len(entry.tokens):
                    self._drop(key)
                else:
                    self._entries.move_to_end(key)
                return

    def discard(self, entry: CachedPrompt) -> None:
        for key, e in list(self._entries.items()):
            if e is entry:
                self._drop(key)

    def _drop(self, key: int) -> None:
        self.bytes -= self._entries.pop(key).nbytes

    def stats(self) -> dict[str, float]:
        return {
            "prompt_cache_bytes": float(self.bytes),
            "prompt_cache_limit_bytes": float(self.limit_bytes),
            "prompt_cache_entries": float(len(self._entries)),
            "prompt_cache_hits": float(self.hits),
            "prompt_cache_misses": float(self.misses),
            "prompt_cache_restored_tokens": float(self.restored_tokens),
            "prompt_cache_saves": float(self.saves),
            "prompt_cache_evictions": float(self.evictions),
        }
