"""Parse Qwen/Hermes-style tool calls: <tool_call>{"name": ..., "arguments": {...}}</tool_call>."""

from __future__ import annotations

import json
import uuid

from gguf_serve.engine.requests import ToolCall
from gguf_serve.engine.text_stream import partial_tag_len

OPEN = "<tool_call>"
CLOSE = "</tool_call>"


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


class ToolCallParser:
    """Incremental: content passes through; each complete <tool_call> block becomes a ToolCall.

    A block whose JSON does not parse is given back as plain content, so nothing is lost.
    """

    def __init__(self) -> None:
        self._buf = ""
        self._inside = False
        self._index = 0

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self._buf += text
        content = ""
        calls: list[ToolCall] = []
        while self._buf:
            if not self._inside:
                i = self._buf.find(OPEN)
                if i < 0:
                    keep = partial_tag_len(self._buf, (OPEN,))
                    content += self._buf[: len(self._buf) - keep]
                    self._buf = self._buf[len(self._buf) - keep :]
                    break
                content += self._buf[:i]
                self._buf = self._buf[i + len(OPEN) :]
                self._inside = True
                continue
            j = self._buf.find(CLOSE)
            if j < 0:
                break
            body = self._buf[:j]
            self._buf = self._buf[j + len(CLOSE) :]
            self._inside = False
            call = self._parse(body)
            if call is None:
                content += OPEN + body + CLOSE
            else:
                calls.append(call)
        return content, calls

    def flush(self) -> tuple[str, list[ToolCall]]:
        """End of output: an unterminated block is parsed if it holds valid JSON."""
        buf, self._buf = self._buf, ""
        if self._inside:
            self._inside = False
            call = self._parse(buf)
            return ("", [call]) if call is not None else (OPEN + buf, [])
        return buf, []

    def _parse(self, body: str) -> ToolCall | None:
        try:
            obj = json.loads(body.strip())
        except json.JSONDecodeError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        args = obj.get("arguments", obj.get("parameters", {}))
        args_text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        call = ToolCall(index=self._index, id=new_call_id(), name=obj["name"], arguments=args_text)
        self._index += 1
        return call
