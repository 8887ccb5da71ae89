"""Responses API input items as chat messages, and the request fields' translation."""

from __future__ import annotations

import pytest

from gguf_serve.api.protocol.responses import ResponsesRequest, input_messages, text_schema, tool_choice
from gguf_serve.engine.requests import InvalidRequest
from gguf_serve.settings import Limits, ModelSettings

MS = ModelSettings(id="m", file="m.gguf")


def test_string_input_and_instructions() -> None:
    msgs = input_messages("hi", "be brief")
    assert [(m.role, m.content) for m in msgs] == [("system", "be brief"), ("user", "hi")]


def test_reasoning_calls_and_outputs_become_one_assistant_turn_then_tools() -> None:
    msgs = input_messages(
        [
            {"role": "developer", "content": "rules"},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "weather?"}]},
            {
                "type": "reasoning",
                "id": "rs_1",
                "summary": [],
                "content": [{"type": "reasoning_text", "text": "hm"}],
            },
            {"type": "function_call", "call_id": "c1", "name": "get", "arguments": '{"city": "Oslo"}'},
            {"type": "function_call", "call_id": "c2", "name": "get", "arguments": '{"city": "Rome"}'},
            {"type": "function_call_output", "call_id": "c1", "output": "sun"},
            {"type": "function_call_output", "call_id": "c2", "output": "rain"},
            {"role": "assistant", "content": [{"type": "output_text", "text": "Sun and rain."}]},
            {"role": "user", "content": "thanks"},
        ],
        None,
    )
    assert [m.role for m in msgs] == ["system", "user", "assistant", "tool", "tool", "assistant", "user"]
    turn = msgs[2]
    assert turn.reasoning_content == "hm" and turn.content == ""
    assert [c["function"]["arguments"] for c in turn.tool_calls or []] == [{"city": "Oslo"}, {"city": "Rome"}]
    assert (msgs[3].tool_call_id, msgs[3].content) == ("c1", "sun")
    assert msgs[5].content == "Sun and rain."


def test_images_are_refused() -> None:
    with pytest.raises(InvalidRequest, match="input_image"):
        input_messages([{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}], None)


def test_fields() -> None:
    body = ResponsesRequest.model_validate(
        {
            "model": "m",
            "input": "hi",
            "max_output_tokens": 9,
            "temperature": 0.1,
            "reasoning": {"effort": "none"},
            "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}},
            "tools": [{"type": "function", "name": "get", "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "get"},
        }
    )
    req = body.to_engine(MS, Limits())
    assert (req.params.max_tokens, req.params.temperature) == (9, 0.1)
    assert req.params.json_schema == {"type": "object"}
    assert req.template_kwargs == {"enable_thinking": False}
    assert req.tools == [{"type": "function", "function": {"name": "get", "parameters": {"type": "object"}}}]
    assert req.tool_choice == {"type": "function", "function": {"name": "get"}}
    assert tool_choice("required") == "required"
    assert text_schema({"format": {"type": "json_object"}}) == {"type": "object"}
    assert text_schema(None) is None
    high = ResponsesRequest(model="m", input="x", reasoning={"effort": "high"}).to_engine(MS, Limits())
    assert high.template_kwargs == {"enable_thinking": True}


def test_previous_response_id_is_a_clear_400() -> None:
    with pytest.raises(InvalidRequest, match="does not store responses"):
        ResponsesRequest(model="m", input="x", previous_response_id="resp_1").to_engine(MS, Limits())
    with pytest.raises(InvalidRequest, match="function tools"):
        ResponsesRequest(model="m", input="x", tools=[{"type": "web_search"}]).to_engine(MS, Limits())
