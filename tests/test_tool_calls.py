from __future__ import annotations

import json

import pytest

from gguf_serve.engine.requests import InvalidRequest
from gguf_serve.engine.tool_calls import ToolCallParser, forced_call_grammar, forced_tool

OUTPUT = (
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京", "unit": "c"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
)


@pytest.mark.parametrize("split", [1, 4, 13, 10_000])
def test_calls_parsed_in_any_split(split: int) -> None:
    p = ToolCallParser()
    content, calls = "", []
    for i in range(0, len(OUTPUT), split):
        c, k = p.feed(OUTPUT[i : i + split])
        content += c
        calls += k
    c, k = p.flush()
    content += c
    calls += k
    assert content.strip() == "Let me check."
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    assert [c.index for c in calls] == [0, 1]
    assert json.loads(calls[0].arguments) == {"city": "北京", "unit": "c"}
    assert calls[0].id != calls[1].id and calls[0].id.startswith("call_")


def test_invalid_json_is_kept_as_content() -> None:
    p = ToolCallParser()
    c1, calls = p.feed("<tool_call>{not json}</tool_call> after")
    c2, calls2 = p.flush()
    assert calls == calls2 == []
    assert c1 + c2 == "<tool_call>{not json}</tool_call> after"


def test_unterminated_valid_call_is_parsed_at_the_end() -> None:
    p = ToolCallParser()
    c, calls = p.feed('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}')
    assert c == "" and calls == []
    c, calls = p.flush()
    assert [x.name for x in calls] == ["f"] and json.loads(calls[0].arguments) == {"a": 1}


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}


def test_which_tool_choices_force_a_call() -> None:
    assert forced_tool("required") == (True, None)
    assert forced_tool({"type": "function", "function": {"name": "get_time"}}) == (True, "get_time")
    for choice in (None, "auto", "none", {"type": "function"}):
        assert forced_tool(choice) == (False, None)


def test_forced_call_grammar_is_one_tagged_call_of_the_named_tool() -> None:
    from llama_cpp.llama_grammar import LlamaGrammar

    gbnf = forced_call_grammar([WEATHER, CLOCK], "get_weather")
    assert gbnf.startswith('root ::= "<tool_call>\\n" forced-call "\\n</tool_call>"')
    assert '"\\"get_weather\\""' in gbnf and "get_time" not in gbnf
    LlamaGrammar.from_string(gbnf, verbose=False)  # llama.cpp's parser accepts it
    both = forced_call_grammar([WEATHER, CLOCK], None)
    assert "get_weather" in both and "get_time" in both
    LlamaGrammar.from_string(both, verbose=False)
    with pytest.raises(InvalidRequest, match="tool_choice"):
        forced_call_grammar([WEATHER], "nope")
