"""Anthropic Messages requests as engine chat requests: system, blocks, tool use and results,
tool_choice, thinking, structured output, and the error shape."""

from __future__ import annotations

import pytest

from gguf_serve.api.protocol.anthropic import MessagesRequest, error_body, tool_choice, tool_use_block
from gguf_serve.engine.requests import InvalidRequest, ToolCall
from gguf_serve.settings import Limits, ModelSettings

MS = ModelSettings(id="m", file="m.gguf")
TOOL = {"name": "get_weather", "description": "weather", "input_schema": {"type": "object"}}


def engine(body: dict) -> object:
    return MessagesRequest.model_validate({"model": "m", "max_tokens": 10, **body}).to_engine(MS, Limits())


def test_system_blocks_and_text_blocks() -> None:
    req = engine(
        {
            "system": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}],
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
            ],
        }
    )
    assert [(m.role, m.content) for m in req.messages] == [("system", "Be brief."), ("user", "ab")]  # type: ignore[attr-defined]
    assert req.params.max_tokens == 10  # type: ignore[attr-defined]


def test_tool_use_and_results_become_openai_messages() -> None:
    req = engine(
        {
            "tools": [TOOL],
            "messages": [
                {"role": "user", "content": "weather?"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "look", "signature": "s"},
                        {"type": "text", "text": "Checking."},
                        {
                            "type": "tool_use",
                            "id": "toolu_1",
                            "name": "get_weather",
                            "input": {"city": "Oslo"},
                        },
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "here:"},
                        {
                            "type": "tool_result",
                            "tool_use_id": "toolu_1",
                            "content": [{"type": "text", "text": "sun"}],
                        },
                        {
                            "type": "tool_result",
                            "tool_use_id": "toolu_2",
                            "content": "boom",
                            "is_error": True,
                        },
                    ],
                },
            ],
        }
    )
    roles = [m.role for m in req.messages]  # type: ignore[attr-defined]
    assert roles == ["user", "assistant", "tool", "tool", "user"]
    assistant = req.messages[1]  # type: ignore[attr-defined]
    assert assistant.content == "Checking." and assistant.reasoning_content == "look"
    assert assistant.tool_calls[0]["function"] == {"name": "get_weather", "arguments": {"city": "Oslo"}}
    assert req.messages[2].content == "sun" and req.messages[2].tool_call_id == "toolu_1"  # type: ignore[attr-defined]
    assert req.messages[3].content == "Error: boom"  # type: ignore[attr-defined]
    assert req.tools == [  # type: ignore[attr-defined]
        {
            "type": "function",
            "function": {"name": "get_weather", "parameters": {"type": "object"}, "description": "weather"},
        }
    ]


def test_tool_choice_mapping() -> None:
    assert tool_choice({"type": "auto"}) == "auto"
    assert tool_choice({"type": "any"}) == "required"
    assert tool_choice({"type": "none"}) == "none"
    assert tool_choice({"type": "tool", "name": "x"}) == {"type": "function", "function": {"name": "x"}}
    with pytest.raises(InvalidRequest):
        tool_choice({"type": "sometimes"})


def test_thinking_and_sampling_and_output_format() -> None:
    req = engine(
        {
            "messages": [{"role": "user", "content": "hi"}],
            "thinking": {"type": "enabled", "budget_tokens": 1024},
            "temperature": 0.2,
            "top_k": 5,
            "stop_sequences": ["END"],
            "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}},
        }
    )
    assert req.template_kwargs == {"enable_thinking": True}  # type: ignore[attr-defined]
    p = req.params  # type: ignore[attr-defined]
    assert (p.temperature, p.top_k, p.stop, p.json_schema) == (0.2, 5, ["END"], {"type": "object"})
    off = engine({"messages": [{"role": "user", "content": "hi"}], "thinking": {"type": "disabled"}})
    assert off.template_kwargs == {"enable_thinking": False}  # type: ignore[attr-defined]


def test_images_and_server_tools_are_refused_clearly() -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "aGk="}}
    with pytest.raises(InvalidRequest, match="image input is not supported"):
        engine({"messages": [{"role": "user", "content": [image]}]})
    with pytest.raises(InvalidRequest, match="client tools"):
        engine(
            {
                "messages": [{"role": "user", "content": "x"}],
                "tools": [{"type": "web_search_20250305", "name": "w"}],
            }
        )


def test_tool_use_block_and_error_shape() -> None:
    block = tool_use_block(ToolCall(0, "call_abc", "get_weather", '{"city": "Oslo"}'))
    assert block == {"type": "tool_use", "id": "toolu_abc", "name": "get_weather", "input": {"city": "Oslo"}}
    assert error_body(404, "no such model") == {
        "type": "error",
        "error": {"type": "not_found_error", "message": "no such model"},
    }
