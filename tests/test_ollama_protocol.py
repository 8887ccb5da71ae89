"""Ollama request translation: options -> sampling, format -> JSON schema, names, keep_alive,
think, messages and tool calls, and the /api/show shape."""

from __future__ import annotations

import pytest

from gguf_serve.api.protocol.ollama import (
    ChatBody,
    GenerateBody,
    Options,
    capabilities,
    done_reason,
    format_schema,
    parameter_size,
    parse_duration,
    resolve_name,
    sampling_params,
    show_response,
    tool_calls_json,
)
from gguf_serve.engine.model_info import ModelInfo
from gguf_serve.engine.requests import InvalidRequest, ToolCall
from gguf_serve.settings import Limits, ModelSettings, SamplingDefaults

MS = ModelSettings(id="qwen3", file="qwen3.gguf", sampling=SamplingDefaults(temperature=0.6, top_k=20))
INFO = ModelInfo(
    architecture="qwen3",
    name="Qwen3 4B",
    file_type="Q4_K_M",
    n_params=4_022_468_096,
    size_bytes=2_500_000_000,
    n_ctx_train=40960,
    n_ctx=8192,
    n_vocab=151936,
    n_embd=2560,
    n_slots=4,
    chat_template="{% if tools %}...{% endif %}<think>",
    bos_token="",
    eos_token="<|im_end|>",
)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        (0, 0),
        (-1, -1),
        ("0", 0.0),
        ("-1", -1.0),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("30s", 30.0),
    ],
)
def test_keep_alive_durations(value: object, seconds: float | None) -> None:
    assert parse_duration(value) == seconds  # type: ignore[arg-type]


def test_bad_keep_alive_is_a_400() -> None:
    with pytest.raises(InvalidRequest):
        parse_duration("soon")


def test_names_resolve_with_or_without_latest() -> None:
    known = ["qwen3", "tagged:v1"]
    assert resolve_name("qwen3:latest", known) == "qwen3"
    assert resolve_name("qwen3", known) == "qwen3"
    assert resolve_name("tagged:v1", known) == "tagged:v1"
    assert resolve_name("other:latest", known) == "other:latest"  # the registry's 404 names it


def test_options_map_to_sampling_with_profile_defaults() -> None:
    opts = Options(num_predict=64, top_p=0.8, stop="###", seed=7, repeat_penalty=1.1, min_p=0.1)
    p = sampling_params(opts, None, MS, Limits(), 4096)
    assert (p.max_tokens, p.top_p, p.stop, p.seed, p.repeat_penalty, p.min_p) == (
        64,
        0.8,
        ["###"],
        7,
        1.1,
        0.1,
    )
    assert p.temperature == 0.6 and p.top_k == 20  # unset: the profile's defaults
    assert (
        sampling_params(Options(num_predict=-1), None, MS, Limits(max_tokens_cap=100), 4096).max_tokens == 100
    )


def test_num_ctx_is_checked_against_the_model() -> None:
    sampling_params(Options(num_ctx=2048), None, MS, Limits(), 4096)
    with pytest.raises(InvalidRequest, match="num_ctx"):
        sampling_params(Options(num_ctx=32768), None, MS, Limits(), 4096)


def test_format_becomes_a_json_schema() -> None:
    assert format_schema("json") == {"type": "object"}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert format_schema(schema) == schema
    assert format_schema(None) is None and format_schema("") is None
    with pytest.raises(InvalidRequest):
        format_schema("yaml")
    assert sampling_params(None, "json", MS, Limits(), 4096).json_schema == {"type": "object"}


def test_chat_messages_tools_and_think() -> None:
    body = ChatBody.model_validate(
        {
            "model": "qwen3",
            "think": False,
            "messages": [
                {"role": "user", "content": "weather?"},
                {
                    "role": "assistant",
                    "content": "",
                    "thinking": "look it up",
                    "tool_calls": [{"function": {"name": "get", "arguments": {"city": "Paris"}}}],
                },
                {"role": "tool", "content": "sunny", "tool_name": "get"},
            ],
            "tools": [{"type": "function", "function": {"name": "get", "parameters": {"type": "object"}}}],
        }
    )
    req = body.to_engine(MS, Limits(), 4096)
    assert req.template_kwargs == {"enable_thinking": False}
    assert req.tools and req.tools_enabled
    call = req.messages[1].tool_calls[0]  # type: ignore[index]
    assert call["function"]["arguments"] == {"city": "Paris"} and call["name"] == "get"
    assert req.messages[1].reasoning_content == "look it up"
    assert req.messages[2].role == "tool" and req.messages[2].name == "get"
    assert ChatBody(model="m", think="high").to_engine(MS, Limits(), 4096).template_kwargs == {
        "enable_thinking": True
    }
    with pytest.raises(InvalidRequest, match="images"):
        ChatBody.model_validate(
            {"model": "m", "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}
        ).to_engine(MS, Limits(), 4096)


def test_generate_uses_the_template_with_system() -> None:
    req = GenerateBody(model="m", prompt="hi", system="be brief").to_engine(MS, Limits(), 4096)
    assert [(m.role, m.content) for m in req.messages] == [("system", "be brief"), ("user", "hi")]
    with pytest.raises(InvalidRequest, match="suffix"):
        GenerateBody(model="m", prompt="a", suffix="b").to_engine(MS, Limits(), 4096)


def test_tool_call_arguments_are_objects() -> None:
    out = tool_calls_json([ToolCall(0, "call_1", "get", '{"city": "Paris"}')])
    assert out == [{"id": "call_1", "function": {"index": 0, "name": "get", "arguments": {"city": "Paris"}}}]
    assert done_reason("tool_calls") == "stop" and done_reason("length") == "length"


def test_show_has_what_ragflow_and_llamaindex_read() -> None:
    shown = show_response(MS, INFO, "2026-01-01T00:00:00Z")
    assert shown["model_info"]["general.architecture"] == "qwen3"
    assert shown["model_info"]["qwen3.context_length"] == 8192
    assert shown["details"] == {
        "parent_model": "",
        "format": "gguf",
        "family": "qwen3",
        "families": ["qwen3"],
        "parameter_size": "4.0B",
        "quantization_level": "Q4_K_M",
    }
    assert shown["capabilities"] == ["completion", "tools", "thinking"]
    assert "temperature 0.6" in shown["parameters"]
    assert capabilities("embedding", INFO) == ["embedding"]
    assert parameter_size(134_515_008) == "135M" and parameter_size(14_000_000_000) == "14B"
