"""request_timeout_s on every route: a chat or completion past it is a 504 in OpenAI's error
shape (as embeddings and rerank are), and a stream ends with an error event."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.e2e.server import ServerProcess, demo_chat_gguf

pytestmark = pytest.mark.e2e

PROFILE = f"""
[limits]
request_timeout_s = 2

[[models]]
id = "smol"
file = "{demo_chat_gguf()}"
n_ctx = 4096
parallel = 1
"""
# Longer than 2 s on any CPU: 3,000 tokens with the end-of-turn token banned.
LONG = {"max_tokens": 3000, "logit_bias": {"2": -100}, "temperature": 0.8}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    profile = tmp_path_factory.mktemp("timeout") / "timeout.toml"
    profile.write_text(PROFILE)
    proc = ServerProcess(str(profile))
    try:
        proc.wait_ready(timeout=300)
        yield proc.base_url
    finally:
        proc.stop()


def assert_timeout_error(body: dict[str, object]) -> None:
    err = body["error"]
    assert isinstance(err, dict)
    assert err["code"] == "timeout" and err["type"] == "server_error"
    assert "took longer than 2s" in str(err["message"])


def test_chat_past_the_deadline_is_a_504(server: str) -> None:
    body = {"model": "smol", "messages": [{"role": "user", "content": "Tell me a long story."}], **LONG}
    r = httpx.post(server + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 504
    assert_timeout_error(r.json())


def test_completion_past_the_deadline_is_a_504(server: str) -> None:
    r = httpx.post(server + "/v1/completions", json={"prompt": "Once upon a time", **LONG}, timeout=60)
    assert r.status_code == 504
    assert_timeout_error(r.json())


def test_stream_past_the_deadline_ends_with_an_error_event(server: str) -> None:
    body = {
        "model": "smol",
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "stream": True,
        **LONG,
    }
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        events = [ln[len("data: ") :] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert_timeout_error(last)
    # No finish_reason "length" with zero usage pretends the answer was complete.
    chunks = [json.loads(e) for e in events[:-2]]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks)


def test_the_server_serves_on_after_timeouts(server: str) -> None:
    # The timed-out requests free their slot; then a short request is served. Its own 2 s budget
    # can run out on a loaded machine, so it may try a few times, but the slot must come free.
    deadline = time.monotonic() + 30
    while httpx.get(server + "/stats", timeout=10).json()["models"]["smol"]["busy_slots"] != 0:
        assert time.monotonic() < deadline, "a timed-out request still holds its slot"
        time.sleep(0.1)
    body = {"model": "smol", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for _ in range(3):
        r = httpx.post(server + "/v1/chat/completions", json=body, timeout=60)
        if r.status_code != 504:
            break
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2


# The Ollama, Anthropic and Responses routes have no logit_bias: a JSON schema that needs
# 20,000 characters keeps the answer going past the deadline instead.
LONG_SCHEMA = {
    "type": "object",
    # Longer than 2 s to generate on any CPU, and within the 10,000 a JSON schema may ask for.
    "properties": {"s": {"type": "string", "minLength": 5000}},
    "required": ["s"],
}
STORY = [{"role": "user", "content": "Tell me a long story."}]


def test_ollama_past_the_deadline_504_and_an_error_line(server: str) -> None:
    body = {"model": "smol", "messages": STORY, "format": LONG_SCHEMA, "options": {"num_predict": 3000}}
    r = httpx.post(server + "/api/chat", json={**body, "stream": False}, timeout=60)
    assert r.status_code == 504 and "took longer than 2s" in r.json()["error"]
    with httpx.stream("POST", server + "/api/chat", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = [json.loads(ln) for ln in r.iter_lines()]
    assert set(lines[-1]) == {"error"} and "took longer than 2s" in lines[-1]["error"]
    assert not any(line.get("done") for line in lines[:-1])


def test_anthropic_stream_past_the_deadline_ends_with_an_error_event(server: str) -> None:
    body = {
        "model": "smol",
        "max_tokens": 3000,
        "messages": STORY,
        "output_config": {"format": {"type": "json_schema", "schema": LONG_SCHEMA}},
        "stream": True,
    }
    with httpx.stream("POST", server + "/v1/messages", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = [ln for ln in r.iter_lines() if ln.startswith(("event: ", "data: "))]
    assert lines[-2] == "event: error"
    err = json.loads(lines[-1][len("data: ") :])
    assert err["type"] == "error" and "took longer than 2s" in err["error"]["message"]
    assert "event: message_stop" not in lines


def test_responses_stream_past_the_deadline_ends_with_an_error_event(server: str) -> None:
    body = {
        "model": "smol",
        "input": "Tell me a long story.",
        "max_output_tokens": 3000,
        "text": {"format": {"type": "json_schema", "name": "long", "schema": LONG_SCHEMA}},
        "stream": True,
    }
    with httpx.stream("POST", server + "/v1/responses", json=body, timeout=60) as r:
        assert r.status_code == 200
        events = [json.loads(ln[len("data: ") :]) for ln in r.iter_lines() if ln.startswith("data: ")]
    assert events[-1]["type"] == "error" and events[-1]["code"] == "timeout"
    assert not any(e["type"] == "response.completed" for e in events)
