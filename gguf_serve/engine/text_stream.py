"""Token bytes -> text that is safe to send: whole UTF-8 characters, stop strings cut."""

from __future__ import annotations

import codecs
from collections.abc import Sequence


def partial_tag_len(text: str, tags: Sequence[str]) -> int:
    """Length of the longest tail of text that is a proper prefix of one of the tags:
    text that must be held back because the next token may complete a tag."""
    longest = max((len(t) for t in tags), default=0)
    for n in range(min(longest - 1, len(text)), 0, -1):
        tail = text[-n:]
        if any(t.startswith(tail) for t in tags):
            return n
    return 0


class StopTextStream:
    """Feeds token bytes, releases text.

    Holds back an incomplete UTF-8 sequence, and the tail that could still become the
    start of a stop string, so a client never sees half a character or half a stop word.
    """

    def __init__(self, stop: list[str]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = [s for s in stop if s]
        self._pending = ""
        self.stopped = False

    def feed(self, data: bytes) -> str:
        """Returns releasable text; sets `stopped` when a stop string appeared (cut there)."""
        self._pending += self._decoder.decode(data)
        if not self._stops:
            out, self._pending = self._pending, ""
            return out
        cut = min((i for i in (self._pending.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            out = self._pending[:cut]
            self._pending = ""
            self.stopped = True
            return out
        keep = partial_tag_len(self._pending, self._stops)
        out = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(self._pending) - keep :]
        return out

    def flush(self) -> str:
        """At the end of generation: whatever is still held is real text."""
        out = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        return out
