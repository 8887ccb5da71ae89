"""llama-server's (and vLLM's) request extensions through the openai SDK's extra_body:
a GBNF `grammar`, a top-level `json_schema`, and assistant prefill with
`continue_final_message` / `add_generation_prompt`."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from gguf import GGUFReader

from gguf_serve.engine.chat_template import ChatTemplate
from tests.e2e.server import demo_chat_gguf

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"
YES_NO = 'root ::= ("yes" | "no") "."'
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "population": {"type": "integer"}},
    "required": ["city", "population"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def client(demo_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=demo_url, api_key="unused", max_retries=0, timeout=120)


def ask(
    client: openai.OpenAI, messages: list[dict[str, str]], **extra: object
) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(
        model=MODEL,
        messages=messages,
        temperature=0,
        max_tokens=40,
        extra_body=extra,  # type: ignore[arg-type]
    )


def test_gbnf_grammar_constrains_chat_and_completions(client: openai.OpenAI) -> None:
    for seed in range(4):
        r = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Is the sky green? Tell me a long story about it."}],
            temperature=1.0,
            seed=seed,
            max_tokens=10,
            extra_body={"grammar": YES_NO},
        )
        assert r.choices[0].message.content in ("yes.", "no."), r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop"
    c = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=1.0, extra_body={"grammar": YES_NO}
    )
    assert c.choices[0].text in ("yes.", "no.")


def test_top_level_json_schema(client: openai.OpenAI) -> None:
    r = ask(client, [{"role": "user", "content": "Give me a city as JSON."}], json_schema=SCHEMA)
    data = json.loads(r.choices[0].message.content or "")
    assert set(data) == {"city", "population"} and isinstance(data["population"], int)
    c = client.completions.create(
        model=MODEL,
        prompt="A city as JSON:",
        max_tokens=60,
        temperature=0,
        extra_body={"json_schema": SCHEMA},
    )
    assert set(json.loads(c.choices[0].text)) == {"city", "population"}


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"grammar": YES_NO, "json_schema": SCHEMA}, "grammar"),
        ({"grammar": "root ::= (", "max_tokens": 4}, None),
        ({"json_schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}, "json_schema"),
        ({"grammar": YES_NO, "response_format": {"type": "json_object"}}, "response_format"),
        ({"continue_final_message": True}, "messages"),
        ({"continue_final_message": True, "add_generation_prompt": True}, "continue_final_message"),
    ],
)
def test_bad_extension_fields_are_400(
    demo_server: str, client: openai.OpenAI, extra: dict[str, object], param: str | None
) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}
    r = httpx.post(f"{demo_server}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    if param is not None:
        assert err["param"] == param
    assert ask(client, [{"role": "user", "content": "Say hi."}]).choices[0].message.content


def demo_template() -> ChatTemplate:
    reader = GGUFReader(str(demo_chat_gguf()))
    field = reader.fields["tokenizer.chat_template"]
    return ChatTemplate(bytes(field.parts[field.data[0]]).decode())


def test_continue_final_message_is_the_raw_prompt_ending_in_the_prefill(client: openai.OpenAI) -> None:
    """The prefilled chat equals a completion of the template's prompt with the prefill
    appended (greedy): the answer continues the assistant message instead of opening a turn."""
    question = [{"role": "user", "content": "What is the capital of France?"}]
    prefix = "The capital of France is"
    prefilled = ask(
        client,
        [*question, {"role": "assistant", "content": prefix}],
        continue_final_message=True,
        add_generation_prompt=False,
    )
    raw_prompt = demo_template().render(question, add_generation_prompt=True) + prefix
    raw = client.completions.create(model=MODEL, prompt=raw_prompt, temperature=0, max_tokens=40)
    rest = prefilled.choices[0].message.content or ""
    assert rest and rest == raw.choices[0].text
    assert not rest.lstrip().startswith(prefix)  # only the continuation comes back
    assert prefilled.usage is not None and prefilled.usage.prompt_tokens == raw.usage.prompt_tokens  # type: ignore[union-attr]
    # Without the prefill the same question starts a fresh answer: a different prompt.
    fresh = ask(client, question)
    assert fresh.usage is not None and fresh.usage.prompt_tokens < prefilled.usage.prompt_tokens


def test_add_generation_prompt_false_renders_no_assistant_turn(client: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    with_prompt = ask(client, msgs)
    without = ask(client, msgs, add_generation_prompt=False)
    assert with_prompt.usage is not None and without.usage is not None
    # SmolLM2's template writes "<|im_start|>assistant\n" (3 tokens) only for the generation prompt.
    assert without.usage.prompt_tokens < with_prompt.usage.prompt_tokens
