"""Parse Qwen/Hermes-style tool calls: <tool_call>{"name": ..., "arguments": {...}}</tool_call>."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from gguf_serve.engine.json_grammar import json_schema_gbnf
from gguf_serve.engine.requests import InvalidRequest, ToolCall
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


def forced_tool(tool_choice: Any) -> tuple[bool, str | None]:
    """Whether `tool_choice` forces a call, and of which tool (None: any of them).
    "required" (OpenAI) and {"type": "function", "function": {"name": ...}} force one."""
    if tool_choice == "required":
        return True, None
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        name = (tool_choice.get("function") or {}).get("name")
        if isinstance(name, str) and name:
            return True, name
    return False, None


def _tool_name(tool: dict[str, Any]) -> str | None:
    fn = tool.get("function") or {}
    name = fn.get("name")
    return name if isinstance(name, str) else None


def forced_call_grammar(tools: list[dict[str, Any]], name: str | None) -> str:
    """GBNF for an answer that is exactly one <tool_call> of the named tool (any tool when
    None), its arguments held to the tool's JSON schema by llama.cpp's converter; the tags
    are the ones ToolCallParser reads."""
    chosen = [t for t in tools if _tool_name(t) is not None and (name is None or _tool_name(t) == name)]
    if not chosen:
        raise InvalidRequest(f"tool_choice names {name!r}, which is not one of the tools", "tool_choice")
    alternatives = []
    for tool in chosen:
        params = (tool.get("function") or {}).get("parameters") or {"type": "object"}
        alternatives.append(
            {
                "type": "object",
                "properties": {"name": {"const": _tool_name(tool)}, "arguments": params},
                "required": ["name", "arguments"],
            }
        )
    schema = alternatives[0] if len(alternatives) == 1 else {"oneOf": alternatives}
    try:
        gbnf = json_schema_gbnf(schema)
    except Exception as e:
        raise InvalidRequest(f"unsupported JSON schema in the forced tool's parameters: {e}", "tools") from e
    body = re.sub(r"^root ::=", "forced-call ::=", gbnf, flags=re.MULTILINE)
    return f'root ::= "{OPEN}\\n" forced-call "\\n{CLOSE}"\n{body}'
