"""Chat and completions through the official openai SDK against a real server."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about rain.",
    "Count from 1 to 10.",
    "Explain gravity in one sentence.",
    "Name three colors.",
    "What is 2+2?",
    "Say hello in Spanish.",
    "Describe a cat.",
]


@pytest.fixture(scope="module")
def client(demo_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=demo_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def aclient(demo_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=demo_url, api_key="unused", max_retries=0, timeout=120)


def greedy(client: openai.OpenAI, q: str, max_tokens: int = 40, **kw: object) -> str:
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": q}], temperature=0, max_tokens=max_tokens, **kw
    )
    return r.choices[0].message.content or ""


def test_plain_chat(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=32
    )
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage is not None and r.usage.prompt_tokens > 5 and 0 < r.usage.completion_tokens <= 32
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.model == MODEL and r.id.startswith("chatcmpl-")


def test_stream_equals_non_stream_and_usage_once(client: openai.OpenAI) -> None:
    q = "Tell me about the moon."
    whole = greedy(client, q, 48)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": q}],
        temperature=0,
        max_tokens=48,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, finish, usages, n_chunks = [], None, [], 0
    for chunk in stream:
        n_chunks += 1
        if chunk.usage is not None:
            usages.append(chunk.usage)
            assert chunk.choices == []
            continue
        delta = chunk.choices[0].delta
        parts.append(delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(parts) == whole
    assert n_chunks > 5  # really streamed, token by token
    assert finish in ("stop", "length")
    assert len(usages) == 1 and usages[0].completion_tokens > 0


def test_concurrent_greedy_equals_sequential(
    client: openai.OpenAI, aclient: openai.AsyncOpenAI, demo_server: str
) -> None:
    sequential = [greedy(client, q) for q in QUESTIONS]

    async def one(q: str) -> str:
        r = await aclient.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": q}], temperature=0, max_tokens=40
        )
        return r.choices[0].message.content or ""

    async def all_at_once() -> list[str]:
        return list(await asyncio.gather(*(one(q) for q in QUESTIONS)))

    before = _chat_stats(demo_server)
    assert asyncio.run(all_at_once()) == sequential
    after = _chat_stats(demo_server)
    # ...and they really shared decodes: far fewer llama_decode calls than tokens generated.
    tokens = after["tokens_generated"] - before["tokens_generated"]
    decodes = after["decodes"] - before["decodes"]
    assert tokens > 0 and decodes < tokens / 2, (tokens, decodes)


def _chat_stats(base: str) -> dict[str, float]:
    stats: dict[str, float] = httpx.get(f"{base}/stats", timeout=10).json()["models"][MODEL]
    return stats


def _busy_slots(base: str) -> float:
    return _chat_stats(base)["busy_slots"]


def test_cancelled_stream_frees_its_slot(client: openai.OpenAI, demo_server: str) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Write a very long story about dragons."}],
        max_tokens=1500,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    for got, _ in enumerate(stream, start=1):
        if got == 5:
            break
    assert _busy_slots(demo_server) >= 1
    stream.close()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and _busy_slots(demo_server) > 0:
        time.sleep(0.2)
    assert _busy_slots(demo_server) == 0
    assert greedy(client, "Say hi.", 8)  # and the server still serves


def test_stop_strings(client: openai.OpenAI) -> None:
    q = "Count from 1 to 10, separated by commas."
    full = greedy(client, q, 40)
    words = [w for w in full.replace(",", " ").split() if len(w) >= 1]
    assert len(words) >= 3, full
    stop = words[2]
    cut = full[: full.index(stop)]
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": q}],
        temperature=0,
        max_tokens=40,
        stop=[stop, "@@never@@"],
    )
    assert r.choices[0].message.content == cut
    assert r.choices[0].finish_reason == "stop"


def test_json_schema_output(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Give me a person as JSON with name and age."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
        max_tokens=100,
        temperature=0,
    )
    data = json.loads(r.choices[0].message.content or "")
    assert set(data) == {"name", "age"}
    assert isinstance(data["name"], str) and isinstance(data["age"], int)


def test_an_enforced_json_string_never_holds_a_raw_control_character(
    client: openai.OpenAI, demo_server: str
) -> None:
    """JSON forbids a raw newline inside a string. With the newline token pushed as hard as a
    client can push it, the schema's grammar must still refuse it there (llama-cpp-python's
    converter allowed it, and the answer was invalid JSON)."""
    newline = httpx.post(f"{demo_server}/tokenize", json={"content": "\n"}, timeout=30).json()["tokens"]
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "maxLength": 12}},
        "required": ["answer"],
    }
    out = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Answer in JSON, one line per word."}],
        max_tokens=40,
        temperature=0,
        logit_bias={str(t): 100 for t in newline},
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    )
    assert isinstance(json.loads(out.choices[0].message.content or "")["answer"], str)


def test_context_overflow_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 5000}])
    assert "maximum context length" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=100000
        )


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found"  # type: ignore[index]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"{not json", 400),
        (b'{"model": "smollm2-135m-instruct"}', 400),
        (b'{"model": "smollm2-135m-instruct", "messages": "hello"}', 400),
        (b'{"model": "smollm2-135m-instruct", "messages": [], "max_tokens": 5}', 400),
        (
            b'{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}',
            400,
        ),
        (b'{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "x"}], "n": 50}', 400),
        (b'{"model": "all-minilm-l6-v2", "messages": [{"role": "user", "content": "x"}]}', 400),
        (
            b'{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"999999": 5}}',
            400,
        ),
    ],
)
def test_bad_requests_get_openai_errors_and_server_keeps_serving(
    demo_server: str, client: openai.OpenAI, body: bytes, status: int
) -> None:
    r = httpx.post(
        f"{demo_server}/v1/chat/completions",
        content=body,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] == "invalid_request_error"
    assert greedy(client, "Say hi.", 4)


def test_unknown_fields_are_ignored(demo_server: str) -> None:
    r = httpx.post(
        f"{demo_server}/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
            "drop_params": True,
            "some_future_field": {"x": 1},
        },
        timeout=60,
    )
    assert r.status_code == 200, r.text


def test_prefix_cache_reused_on_multi_turn(client: openai.OpenAI) -> None:
    system = "You are a careful assistant. " * 20
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": "Name a fruit."}]
    first = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=8)
    msgs += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "Another?"},
    ]
    second = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=8)
    details = second.usage.prompt_tokens_details  # type: ignore[union-attr]
    assert details is not None and details.cached_tokens >= first.usage.prompt_tokens - 1  # type: ignore[union-attr]


def test_penalties_are_applied(client: openai.OpenAI) -> None:
    q = "Repeat the word cat many times."
    plain = greedy(client, q, 30)
    penalised = greedy(
        client, q, 30, presence_penalty=1.5, frequency_penalty=1.5, extra_body={"repeat_penalty": 1.5}
    )
    assert penalised and penalised != plain


def test_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content and len(content) <= 5
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob, abs=1e-4)


def test_completions_endpoint(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.choices[0].text and r.usage and r.usage.completion_tokens > 0
    multi = client.completions.create(
        model=MODEL, prompt=["One, two,", "Red, green,"], max_tokens=6, temperature=0
    )
    assert [c.index for c in multi.choices] == [0, 1]
    single = client.completions.create(model=MODEL, prompt="Red, green,", max_tokens=6, temperature=0)
    assert multi.choices[1].text == single.choices[0].text
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL, prompt="Red, green,", max_tokens=6, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == single.choices[0].text


def test_models_list(client: openai.OpenAI, demo_server: str) -> None:
    listed = client.models.list().data
    assert listed[0].id == MODEL  # `models.list().data[0]` picks the chat model, not an embedder
    data = httpx.get(f"{demo_server}/v1/models").json()["data"]
    chat = next(m for m in data if m["id"] == MODEL)
    assert chat["role"] == "chat" and chat["model_type"] == "chat" and chat["context_length"] == 2048


def test_health(demo_server: str) -> None:
    assert httpx.get(f"{demo_server}/health").json() == {"status": "ok"}
    assert httpx.get(f"{demo_server}/ready").status_code == 200


def test_tool_choice_required_or_named_forces_one_call(client: openai.OpenAI) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string", "maxLength": 20}},
                    "required": ["city"],
                },
            },
        },
        {
            "type": "function",
            "function": {
                "name": "get_time",
                # Bounded arguments, so that 60 tokens always hold the whole call.
                "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
            },
        },
    ]
    for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
        r = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "What's the weather in Paris?"}],
            tools=tools,  # type: ignore[arg-type]
            tool_choice=choice,  # type: ignore[arg-type]
            max_tokens=60,
        )
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.tool_calls and len(c.message.tool_calls) == 1
        call = c.message.tool_calls[0].function  # type: ignore[union-attr]
        assert isinstance(json.loads(call.arguments), dict)
        if isinstance(choice, dict):
            assert call.name == "get_time"
        else:
            assert call.name in ("get_weather", "get_time")
