"""OpenAI's `n` through the openai SDK: n choices per request, streamed and not, each with its
own index and seed offset, one prefill of the prompt shared by all (its KV forked into n
sequences), usage counting every choice."""

from __future__ import annotations

import uuid
from collections import defaultdict

import httpx
import openai
import pytest

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"
Q = [{"role": "user", "content": "Write one sentence about the sea."}]


@pytest.fixture(scope="module")
def client(demo_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=demo_url, api_key="unused", max_retries=0, timeout=120)


def chat(client: openai.OpenAI, n: int, **kw: object) -> openai.types.chat.ChatCompletion:
    args: dict[str, object] = {"temperature": 0, "max_tokens": 24, **kw}
    return client.chat.completions.create(model=MODEL, messages=Q, n=n, **args)  # type: ignore[call-overload, no-any-return]


def test_greedy_choices_equal_the_single_answer(client: openai.OpenAI) -> None:
    one = chat(client, 1)
    three = chat(client, 3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    answer = one.choices[0].message.content
    assert answer and all(c.message.content == answer for c in three.choices)  # forked KV == prefilled KV
    assert all(c.finish_reason == one.choices[0].finish_reason for c in three.choices)
    assert one.usage is not None and three.usage is not None
    assert three.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt is counted once
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens
    assert three.usage.total_tokens == three.usage.prompt_tokens + three.usage.completion_tokens


def test_sampled_choices_use_seed_offsets(client: openai.OpenAI) -> None:
    kw = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 16, "seed": 1234}
    four = chat(client, 4, **kw)
    texts = [c.message.content for c in four.choices]
    assert len(set(texts)) >= 2, texts  # each choice samples with its own seed
    assert [c.message.content for c in chat(client, 4, **kw).choices] == texts  # reproducible
    # Choice i samples with seed + i: choice 1 is what seed 1235 gives alone.
    assert chat(client, 1, **{**kw, "seed": 1235}).choices[0].message.content == texts[1]
    assert chat(client, 1, **kw).choices[0].message.content == texts[0]


def test_streamed_choices_carry_their_index_and_usage_counts_all(client: openai.OpenAI) -> None:
    whole = chat(client, 2)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=Q,  # type: ignore[arg-type]
        n=2,
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    text: dict[int, str] = defaultdict(str)
    roles: dict[int, str] = {}
    finish: dict[int, str] = {}
    usage = None
    for ch in stream:
        if ch.usage is not None:
            usage = ch.usage
        for c in ch.choices:
            if c.delta.role:
                roles[c.index] = c.delta.role
            text[c.index] += c.delta.content or ""
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert roles == {0: "assistant", 1: "assistant"} and set(finish) == {0, 1}
    assert [text[0], text[1]] == [c.message.content for c in whole.choices]
    assert usage is not None and whole.usage is not None
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens


def test_the_prompt_is_prefilled_once_for_all_choices(client: openai.OpenAI, demo_server: str) -> None:
    def prefilled() -> float:
        stats = httpx.get(f"{demo_server}/stats", timeout=10).json()["models"][MODEL]
        return float(stats["tokens_prefilled"])

    # A prompt no slot or prompt cache has seen: every token of it must be prefilled.
    fresh = [{"role": "user", "content": f"{uuid.uuid4().hex} " * 40 + "Summarise that."}]
    before = prefilled()
    r = client.chat.completions.create(model=MODEL, messages=fresh, n=6, temperature=0.7, max_tokens=4)  # type: ignore[arg-type]
    assert len(r.choices) == 6 and r.usage is not None
    done = prefilled() - before
    assert r.usage.prompt_tokens * 0.9 <= done <= r.usage.prompt_tokens * 1.1, (done, r.usage.prompt_tokens)


def test_completions_n_per_prompt(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model=MODEL, prompt=["The sea is", "Mountains are"], n=2, temperature=0, max_tokens=8
    )
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text and r.choices[2].text == r.choices[3].text
    a = client.completions.create(model=MODEL, prompt="The sea is", temperature=0, max_tokens=8)
    b = client.completions.create(model=MODEL, prompt="Mountains are", temperature=0, max_tokens=8)
    assert r.choices[0].text == a.choices[0].text and r.choices[2].text == b.choices[0].text
    assert r.usage is not None and a.usage is not None and b.usage is not None
    assert r.usage.prompt_tokens == a.usage.prompt_tokens + b.usage.prompt_tokens  # once per prompt
    assert r.usage.completion_tokens == 2 * (a.usage.completion_tokens + b.usage.completion_tokens)


def test_n_beyond_the_limit_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, 9)
    assert "n=9" in str(e.value)
