"""OpenAI's Responses API driven by the real openai SDK against the demo server: create,
create(stream=True), the responses.stream() helper, input_tokens, tools and text.format."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

pytestmark = pytest.mark.e2e

CHAT = "smollm2-135m-instruct"
INPUT = [
    {"role": "system", "content": "Book"},
    {"role": "user", "content": "What is the best book"},
]
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"],
    },
}


@pytest.fixture(scope="module")
def client(demo_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=demo_url, api_key="unused", max_retries=0, timeout=120)


def test_create(client: openai.OpenAI) -> None:
    res = client.responses.create(model=CHAT, input=INPUT, max_output_tokens=8, temperature=0)
    assert res.id.startswith("resp_") and res.object == "response" and res.model == CHAT
    assert res.output[0].type == "message" and res.output[0].id.startswith("msg_")
    assert res.output_text
    assert res.usage is not None and res.usage.input_tokens > 0 and 0 < res.usage.output_tokens <= 8
    assert res.usage.input_tokens_details.cached_tokens >= 0
    if res.usage.output_tokens == 8:
        assert res.status == "incomplete"
        assert res.incomplete_details is not None and res.incomplete_details.reason == "max_output_tokens"


def test_create_stream_and_stream_helper_agree(client: openai.OpenAI) -> None:
    whole = client.responses.create(model=CHAT, input="Say hello.", max_output_tokens=10, temperature=0)
    gathered, kinds, seqs = "", [], []
    for ev in client.responses.create(
        model=CHAT, input="Say hello.", max_output_tokens=10, temperature=0, stream=True
    ):
        kinds.append(ev.type)
        seqs.append(ev.sequence_number)
        if ev.type == "response.output_text.delta":
            assert ev.output_index == 0 and ev.content_index == 0
            gathered += ev.delta
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert seqs == list(range(len(seqs)))
    assert gathered  # (not compared with `whole`: a reused prefix may flip a near tie)
    with client.responses.stream(
        model=CHAT, input="Say hello.", max_output_tokens=10, temperature=0
    ) as stream:
        deltas = "".join(ev.delta for ev in stream if ev.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert deltas and deltas == final.output_text
    assert final.usage is not None and final.usage.input_tokens == whole.usage.input_tokens  # type: ignore[union-attr]


def test_forced_function_call_and_its_output(client: openai.OpenAI) -> None:
    res = client.responses.create(
        model=CHAT,
        input="What's the weather in Paris?",
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=60,
        temperature=0,  # greedy: a sampled 135M model can run a string past the 60 tokens
    )
    calls = [o for o in res.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    assert isinstance(json.loads(calls[0].arguments)["city"], str)
    follow = client.responses.create(
        model=CHAT,
        input=[
            {"role": "user", "content": "What's the weather in Paris?"},
            {
                "type": "function_call",
                "call_id": calls[0].call_id,
                "name": "get_weather",
                "arguments": calls[0].arguments,
            },
            {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"},
        ],
        tools=[WEATHER],  # type: ignore[list-item]
        max_output_tokens=8,
    )
    assert follow.output
    with client.responses.stream(
        model=CHAT,
        input="Weather in Oslo?",
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required",
        max_output_tokens=60,
        temperature=0,
    ) as stream:
        final = stream.get_final_response()
    streamed = [o for o in final.output if o.type == "function_call"]
    assert len(streamed) == 1 and isinstance(json.loads(streamed[0].arguments)["city"], str)


def test_text_format_json_schema(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"title": {"type": "string", "maxLength": 12}},
        "required": ["title"],
        "additionalProperties": False,
    }
    res = client.responses.create(
        model=CHAT,
        input="A book title as JSON.",
        text={"format": {"type": "json_schema", "name": "book", "schema": schema, "strict": True}},
        max_output_tokens=40,
    )
    assert isinstance(json.loads(res.output_text)["title"], str)


def test_input_tokens_and_errors(client: openai.OpenAI, demo_url: str) -> None:
    counted = client.responses.input_tokens.count(model=CHAT, input=INPUT)
    made = client.responses.create(model=CHAT, input=INPUT, max_output_tokens=2)
    assert counted.input_tokens == made.usage.input_tokens  # type: ignore[union-attr]
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=CHAT, input="hi", previous_response_id="resp_123")
    assert "previous_response_id" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="gpt-nope", input="hi")
    r = httpx.post(
        demo_url + "/responses", json={"model": CHAT, "input": "hi", "max_output_tokens": 2}, timeout=60
    )
    assert r.status_code == 200 and r.json()["object"] == "response"
