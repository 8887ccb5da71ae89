"""RAG-shaped traffic against the demo server: more conversations than slots, follow-ups
with the previous answer appended. Every follow-up must skip its passage's prefill, from
its slot or from the host-RAM prompt cache, and /metrics must show the cache at work."""

from __future__ import annotations

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.fixtures import rag_text

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"
SLOTS = 8  # the demo profile's parallel


def passage(i: int, n_words: int = 400) -> str:
    return rag_text.passage(i, n_words, seed=1000 + i)


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and f'model="{MODEL}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_twelve_conversations_over_eight_slots_reuse_their_prefill(demo_url: str, demo_server: str) -> None:
    client = openai.OpenAI(base_url=demo_url, api_key="unused", max_retries=0, timeout=120)
    before = httpx.get(demo_server + "/metrics").text
    hits_before = metric(before, "gguf_serve_prompt_cache_hits_total")
    convs: list[list[ChatCompletionMessageParam]] = []
    first_prompt: list[int] = []
    n = SLOTS + 4
    for i in range(n):
        msgs: list[ChatCompletionMessageParam] = [
            {"role": "system", "content": "Answer from the passage, briefly."},
            {"role": "user", "content": f"{passage(i)}\n\nWhich word comes first?"},
        ]
        r = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=12)
        assert r.usage is not None
        first_prompt.append(r.usage.prompt_tokens)
        msgs.append({"role": "assistant", "content": r.choices[0].message.content or ""})
        convs.append(msgs)
    # Round robin: by now the first four conversations' slots went to conversations 8-11, and
    # each follow-up below takes the slot of a conversation that is not asked about next.
    for i, msgs in enumerate(convs):
        msgs.append({"role": "user", "content": "And which word comes last?"})
        r = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=12)
        assert r.usage is not None and r.usage.prompt_tokens_details is not None
        cached = r.usage.prompt_tokens_details.cached_tokens or 0
        assert cached >= 0.9 * first_prompt[i], (i, cached, first_prompt[i], r.usage.prompt_tokens)
        assert cached < r.usage.prompt_tokens
    after = httpx.get(demo_server + "/metrics").text
    assert metric(after, "gguf_serve_prompt_cache_hits_total") - hits_before >= n - SLOTS
    assert metric(after, "gguf_serve_prompt_cache_restored_tokens_total") > 0
    used = metric(after, "gguf_serve_prompt_cache_bytes")
    assert 0 < used <= metric(after, "gguf_serve_prompt_cache_limit_bytes")
    assert metric(after, "gguf_serve_prompt_cache_entries") >= 1
