"""Split a streamed answer into reasoning (<think>...</think>) and content."""

from __future__ import annotations

from gguf_serve.engine.text_stream import partial_tag_len

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


class ReasoningParser:
    """Incremental: feed text, get (reasoning, content) pieces; never both from one tag split.

    `in_reasoning=True` starts inside a think block, for templates that open <think> in the
    prompt (the output then holds only </think>).
    """

    def __init__(self, in_reasoning: bool = False) -> None:
        self._state = "reasoning" if in_reasoning else "start"
        self._buf = ""
        self._strip_leading = False  # drop the newlines that follow </think>

    def feed(self, text: str) -> tuple[str, str]:
        self._buf += text
        reasoning = content = ""
        while self._buf:
            if self._state == "start":
                stripped = self._buf.lstrip()
                if stripped.startswith(THINK_OPEN):
                    self._buf = stripped[len(THINK_OPEN) :]
                    self._state = "reasoning"
                    continue
                if stripped and THINK_OPEN.startswith(stripped):
                    break  # maybe the start of <think>: wait for more
                if not stripped:
                    break  # only whitespace so far
                self._state = "content"
                continue
            if self._state == "reasoning":
                i = self._buf.find(THINK_CLOSE)
                if i >= 0:
                    reasoning += self._buf[:i]
                    self._buf = self._buf[i + len(THINK_CLOSE) :]
                    self._state = "content"
                    self._strip_leading = True
                    continue
                keep = partial_tag_len(self._buf, (THINK_CLOSE,))
                reasoning += self._buf[: len(self._buf) - keep]
                self._buf = self._buf[len(self._buf) - keep :]
                break
            # content
            if self._strip_leading:
                self._buf = self._buf.lstrip("\n")
                if not self._buf:
                    break
                self._strip_leading = False
            content += self._buf
            self._buf = ""
        return reasoning, content

    def flush(self) -> tuple[str, str]:
        buf, self._buf = self._buf, ""
        if self._state == "reasoning":
            return buf, ""
        return "", buf.lstrip("\n") if self._strip_leading else buf
