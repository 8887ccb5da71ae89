"""Anthropic's Messages API driven by the real anthropic SDK against the demo server."""

from __future__ import annotations

import json

import anthropic
import httpx
import pytest

pytestmark = pytest.mark.e2e

CHAT = "smollm2-135m-instruct"
HELLO = [{"role": "user", "content": "Say hello."}]
WEATHER = {
    "name": "get_weather",
    "description": "Get the current weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"],
    },
}


@pytest.fixture(scope="module")
def client(demo_server: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=demo_server, api_key="unused", max_retries=0, timeout=120)


def test_messages_create(client: anthropic.Anthropic) -> None:
    msg = client.messages.create(
        model=CHAT,
        max_tokens=16,
        system=[{"type": "text", "text": "You are brief."}],
        messages=HELLO,
        stop_sequences=["\n\n"],
        extra_body={"temperature": 0, "top_k": 40},  # sampling fields the 2.x SDK no longer names
    )
    assert msg.type == "message" and msg.role == "assistant" and msg.model == CHAT
    assert msg.id.startswith("msg_")
    assert msg.content[0].type == "text" and msg.content[0].text
    assert msg.stop_reason in ("end_turn", "max_tokens")
    assert msg.usage.input_tokens > 0 and 0 < msg.usage.output_tokens <= 16


def test_messages_stream_and_final_message(client: anthropic.Anthropic) -> None:
    whole = client.messages.create(model=CHAT, max_tokens=12, messages=HELLO, extra_body={"temperature": 0})
    with client.messages.stream(
        model=CHAT, max_tokens=12, messages=HELLO, extra_body={"temperature": 0}
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and text == final.content[0].text  # type: ignore[union-attr]
    assert final.stop_reason in ("end_turn", "max_tokens") and 0 < final.usage.output_tokens <= 12
    assert final.usage.input_tokens == whole.usage.input_tokens


def test_raw_stream_has_named_events(demo_server: str) -> None:
    body = {"model": CHAT, "max_tokens": 8, "messages": HELLO, "stream": True}
    with httpx.stream("POST", demo_server + "/v1/messages", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = [ln for ln in r.iter_lines() if ln and not ln.startswith(":")]
    events = [ln[len("event: ") :] for ln in lines if ln.startswith("event: ")]
    datas = [json.loads(ln[len("data: ") :]) for ln in lines if ln.startswith("data: ")]
    assert len(events) == len(datas) and [d["type"] for d in datas] == events
    assert events[0] == "message_start" and events[-2:] == ["message_delta", "message_stop"]
    assert datas[0]["message"]["usage"]["input_tokens"] > 0 and datas[0]["message"]["content"] == []
    assert events[1] == "content_block_start" and "content_block_stop" in events


def test_count_tokens(client: anthropic.Anthropic) -> None:
    counted = client.messages.count_tokens(model=CHAT, messages=HELLO)
    created = client.messages.create(model=CHAT, max_tokens=4, messages=HELLO)
    assert counted.input_tokens == created.usage.input_tokens
    longer = client.messages.count_tokens(model=CHAT, system="Answer briefly. " * 30, messages=HELLO)
    assert longer.input_tokens > counted.input_tokens


def test_named_tool_is_forced(client: anthropic.Anthropic) -> None:
    msg = client.messages.create(
        model=CHAT,
        max_tokens=80,
        tools=[WEATHER, {"name": "get_time", "input_schema": {"type": "object"}}],
        tool_choice={"type": "tool", "name": "get_weather"},
        messages=[{"role": "user", "content": "What's the weather in Paris?"}],
    )
    assert msg.stop_reason == "tool_use"
    uses = [b for b in msg.content if b.type == "tool_use"]
    assert len(uses) == 1 and uses[0].name == "get_weather"
    assert isinstance(uses[0].input, dict) and isinstance(uses[0].input["city"], str)  # type: ignore[index]
    # The result goes back as a tool_result block, with the call and thinking in the history.
    follow = client.messages.create(
        model=CHAT,
        max_tokens=10,
        tools=[WEATHER],
        messages=[
            {"role": "user", "content": "What's the weather in Paris?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "ask", "signature": ""},
                    *[{"type": "tool_use", "id": uses[0].id, "name": "get_weather", "input": uses[0].input}],
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": uses[0].id, "content": "sunny, 25C"},
                    {"type": "text", "text": "Summarise."},
                ],
            },
        ],
    )
    assert follow.content


def test_streamed_forced_tool_call(client: anthropic.Anthropic) -> None:
    with client.messages.stream(
        model=CHAT,
        max_tokens=80,
        tools=[WEATHER],
        tool_choice={"type": "any"},
        messages=[{"role": "user", "content": "Weather in Oslo?"}],
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    use = next(b for b in final.content if b.type == "tool_use")
    assert use.name == "get_weather" and "city" in use.input  # type: ignore[operator]


def test_errors_in_anthropic_shape(client: anthropic.Anthropic, demo_server: str) -> None:
    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.create(model="claude-nope", max_tokens=5, messages=HELLO)
    assert e.value.body["type"] == "error"  # type: ignore[index]
    assert e.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(
            model=CHAT,
            max_tokens=5,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image",
                            "source": {"type": "base64", "media_type": "image/png", "data": "aGk="},
                        }
                    ],
                }
            ],
        )
    r = httpx.post(demo_server + "/v1/messages", json={"model": CHAT, "max_tokens": 5}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_structured_output_is_enforced(client: anthropic.Anthropic) -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "maxLength": 10}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    msg = client.messages.create(
        model=CHAT,
        max_tokens=40,
        messages=[{"role": "user", "content": "Answer in JSON."}],
        # output_config is a named argument only in recent SDKs; the body is the same.
        extra_body={"output_config": {"format": {"type": "json_schema", "schema": schema}}},
    )
    assert isinstance(json.loads(msg.content[0].text)["answer"], str)  # type: ignore[union-attr]
