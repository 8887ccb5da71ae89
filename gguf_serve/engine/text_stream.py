"""Token bytes -> text that is safe to send: whole UTF-8 characters, stop strings cut."""

from __future__ import annotations

import codecs


class StopTextStream:
    """Feeds token bytes, releases text.

    Holds back an incomplete UTF-8 sequence, and the tail that could still become the
    start of a stop string, so a client never sees half a character or half a stop word.
    """

    def __init__(self, stop: list[str]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = [s for s in stop if s]
        self._hold = max((len(s) for s in self._stops), default=0)
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
        keep = self._partial_stop_len()
        out = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(self._pending) - keep :]
        return out

    def _partial_stop_len(self) -> int:
        """Length of the longest tail of pending text that is a prefix of some stop string."""
        text = self._pending
        for n in range(min(self._hold - 1, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self._stops):
                return n
        return 0

    def flush(self) -> str:
        """At the end of generation: whatever is still held is real text."""
        out = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        return out
