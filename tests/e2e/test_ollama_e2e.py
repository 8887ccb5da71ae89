"""The Ollama API driven by the real `ollama` client and LiteLLM's `ollama_chat/` provider
(as RAGFlow calls it), against the demo server."""

from __future__ import annotations

import json
import os

import httpx
import numpy as np
import ollama
import openai
import pytest

pytestmark = pytest.mark.e2e

CHAT = "smollm2-135m-instruct"
EMBED = "all-minilm-l6-v2-embed"
RERANK = "all-minilm-l6-v2-rerank"
HELLO = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def client(demo_server: str) -> ollama.Client:
    return ollama.Client(host=demo_server, timeout=120)


def test_discovery_list_show_ps_version(client: ollama.Client, demo_server: str) -> None:
    names = [m.model for m in client.list().models]
    assert {CHAT, EMBED, RERANK} <= set(names)
    shown = client.show(CHAT)
    assert shown.details is not None and shown.details.family == "llama"
    assert shown.details.format == "gguf" and shown.details.quantization_level == "Q4_1"
    assert shown.details.parameter_size and shown.details.parameter_size.endswith("M")
    assert shown.modelinfo is not None
    arch = shown.modelinfo["general.architecture"]
    assert shown.modelinfo[f"{arch}.context_length"] > 0  # RAGFlow indexes model_info directly
    assert "completion" in (shown.capabilities or [])
    assert shown.template and "temperature" in (shown.parameters or "")
    emb = client.show(EMBED + ":latest")  # Open WebUI's spelling of an untagged name
    assert emb.capabilities == ["embedding"]
    # Continue posts `name` instead of `model`.
    r = httpx.post(demo_server + "/api/show", json={"name": CHAT}, timeout=30)
    assert r.status_code == 200 and "model_info" in r.json()
    running = {m.model for m in client.ps().models}
    assert CHAT in running
    assert httpx.get(demo_server + "/api/version", timeout=10).json()["version"]
    root = httpx.get(demo_server + "/", timeout=10)
    assert root.status_code == 200 and root.text == "Ollama is running"
    assert httpx.head(demo_server + "/", timeout=10).status_code == 200


def test_chat_whole_and_streamed(client: ollama.Client) -> None:
    opts = {"num_predict": 12, "temperature": 0, "top_p": 0.9, "stop": ["\n\n"]}
    whole = client.chat(model=CHAT, messages=HELLO, options=opts, stream=False)
    assert whole.done and whole.done_reason in ("stop", "length")
    assert whole.message.role == "assistant" and whole.message.content
    assert whole.eval_count and whole.eval_count <= 12 and whole.prompt_eval_count
    assert whole.total_duration and whole.total_duration > 0
    parts = list(client.chat(model=CHAT + ":latest", messages=HELLO, options=opts, stream=True))
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    assert parts[-1].eval_count and parts[-1].prompt_eval_count == whole.prompt_eval_count
    # Not compared with `whole` token for token: a reused prompt prefix changes the prefill's
    # batch shape, which may flip a near tie even at temperature 0.
    assert "".join(p.message.content or "" for p in parts)


def test_generate_whole_and_streamed(client: ollama.Client) -> None:
    opts = {"num_predict": 8, "temperature": 0}
    whole = client.generate(model=CHAT, prompt="The capital of France is", options=opts)
    assert whole.done and whole.response and whole.eval_count
    parts = list(client.generate(model=CHAT, prompt="The capital of France is", options=opts, stream=True))
    assert "".join(p.response for p in parts) and parts[-1].done
    raw = client.generate(model=CHAT, prompt="1, 2, 3,", raw=True, options=opts)
    assert raw.done and raw.response


def test_format_json_is_enforced(client: ollama.Client) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}},
        "required": ["city"],
    }
    r = client.chat(
        model=CHAT,
        messages=[{"role": "user", "content": "Name a city as JSON."}],
        format=schema,
        options={"num_predict": 40, "temperature": 0},
    )
    assert isinstance(json.loads(r.message.content or "")["city"], str)
    r2 = client.generate(model=CHAT, prompt="JSON please", format="json", options={"num_predict": 30})
    if r2.done_reason == "stop":
        assert isinstance(json.loads(r2.response), dict)


def test_embed_and_legacy_embeddings_match_openai(client: ollama.Client, demo_url: str) -> None:
    texts = ["the cat sat on the mat", "gguf-serve speaks Ollama", "北京是中国的首都"]
    r = client.embed(model=EMBED, input=texts, truncate=True, keep_alive=-1)
    assert len(r.embeddings) == 3 and r.prompt_eval_count
    oai = openai.OpenAI(base_url=demo_url, api_key="x").embeddings.create(model=EMBED, input=texts)
    np.testing.assert_allclose(
        np.array(r.embeddings), np.array([d.embedding for d in oai.data]), rtol=0, atol=1e-6
    )
    single = client.embed(model=EMBED + ":latest", input=texts[0])
    np.testing.assert_allclose(single.embeddings[0], r.embeddings[0], atol=1e-6)
    legacy = client.embeddings(model=EMBED, prompt=texts[0])
    np.testing.assert_allclose(legacy.embedding, r.embeddings[0], atol=1e-6)


def test_rerank_dify_shape(demo_server: str) -> None:
    body = {
        "model": RERANK,
        "query": "what is the capital of France?",
        "documents": ["Paris is the capital of France.", "Bananas are yellow.", "I like trains."],
        "top_n": 2,
    }
    r = httpx.post(demo_server + "/api/rerank", json=body, timeout=60)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 2 and results[0]["index"] == 0


def test_errors_in_ollama_shape(client: ollama.Client, demo_server: str) -> None:
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="no-such-model", messages=HELLO)
    assert e.value.status_code == 404 and "no-such-model" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.show("no-such-model")
    assert e.value.status_code == 404
    r = httpx.post(demo_server + "/api/chat", json={"messages": HELLO}, timeout=10)
    assert r.status_code == 400 and set(r.json()) == {"error"}
    r = httpx.post(
        demo_server + "/api/chat",
        json={"model": CHAT, "messages": HELLO, "options": {"num_ctx": 10**7}},
        timeout=10,
    )
    assert r.status_code == 400 and "num_ctx" in r.json()["error"]
    r = httpx.post(demo_server + "/api/embed", json={"model": CHAT, "input": "x"}, timeout=10)
    assert r.status_code == 400 and set(r.json()) == {"error"}


def test_ndjson_is_strict(demo_server: str) -> None:
    body = {"model": CHAT, "messages": HELLO, "options": {"num_predict": 6}}
    with httpx.stream("POST", demo_server + "/api/chat", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/x-ndjson")
        raw = r.read().decode()
    assert raw.endswith("\n") and "\n\n" not in raw
    lines = [json.loads(ln) for ln in raw.splitlines()]
    for item in lines:
        assert {"model", "created_at", "message", "done"} <= set(item)
    last = lines[-1]
    for key in ("done_reason", "prompt_eval_count", "eval_count", "total_duration", "eval_duration"):
        assert key in last


def test_keep_alive_zero_unloads_and_next_request_reloads(client: ollama.Client, demo_server: str) -> None:
    client.embed(model=EMBED, input="warm", keep_alive=0)
    deadline = httpx.Timeout(10)
    for _ in range(100):
        states = httpx.get(demo_server + "/ready", timeout=deadline).json()["models"]
        if states[EMBED] == "unloaded":
            break
        import time

        time.sleep(0.1)
    assert states[EMBED] == "unloaded"
    assert EMBED not in {m.model for m in client.ps().models}
    assert client.embed(model=EMBED, input="back again").embeddings  # loads on demand


def test_litellm_ollama_chat_as_ragflow_calls_it(demo_server: str) -> None:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("LITELLM_TELEMETRY", "False")
    import litellm

    litellm.telemetry = False
    kwargs = {
        "model": f"ollama_chat/{CHAT}",
        "api_base": demo_server,
        "messages": [{"role": "system", "content": "You are brief."}, *HELLO],
        "drop_params": True,
        "think": False,  # RAGFlow's switch for Qwen3's thinking; LiteLLM sends it as Ollama's `think`
        "temperature": 0.2,
        "top_p": 0.9,
        "max_tokens": 12,
        "stop": ["\n\n"],
        "timeout": 120,
    }
    whole = litellm.completion(**kwargs)
    assert whole.choices[0].message.content
    assert whole.usage.completion_tokens > 0
    chunks = list(litellm.completion(stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
