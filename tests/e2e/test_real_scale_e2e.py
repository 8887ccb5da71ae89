"""`gguf-serve --profile cpu` at real scale: the three Qwen3-shaped models the rehearsal makes
(docs/real-scale-rehearsal.md), served from one process and used as RAGFlow uses them.

Opt-in (REAL_SCALE=1): the files are ~10 GB and are not in a clone; loading them
takes the better part of a minute and the 64-document rerank minutes on 2 cores.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.e2e.server import REPO, ServerProcess

PROFILE = REPO / "profiles" / "cpu.toml"
MODELS = {m["id"]: m for m in tomllib.loads(PROFILE.read_text(encoding="utf-8"))["models"]}

# Not a GGUF_SERVE_* name: the server takes those as settings and refuses unknown ones.
pytestmark = pytest.mark.skipif(
    os.environ.get("REAL_SCALE") != "1",
    reason="real-scale smoke: set REAL_SCALE=1 after making the files (docs/real-scale-rehearsal.md)",
)


@pytest.fixture(scope="module")
def cpu_server() -> Iterator[ServerProcess]:
    missing = [m["file"] for m in MODELS.values() if not (REPO / "models" / m["file"]).is_file()]
    assert not missing, f"make the rehearsal files first (docs/real-scale-rehearsal.md): {missing}"
    server = ServerProcess("cpu")
    try:
        server.wait_ready(timeout=1800)
        yield server
    finally:
        assert server.stop() == 0, server.log_tail()


def test_all_three_models_are_listed(cpu_server: ServerProcess) -> None:
    ids = [m["id"] for m in httpx.get(cpu_server.base_url + "/v1/models", timeout=30).json()["data"]]
    assert ids == list(MODELS)


def test_chat_stream(cpu_server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=cpu_server.base_url + "/v1", api_key="x", timeout=1800, max_retries=0)
    stream = client.chat.completions.create(
        model="qwen3-4b-instruct",
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens > 5 and 1 <= usage.completion_tokens <= 8
    assert any(c.choices and c.choices[0].finish_reason in ("stop", "length") for c in chunks)


def test_four_concurrent_chats(cpu_server: ServerProcess) -> None:
    """More conversations than the profile's 2 chat slots: the others wait their turn, none fails."""
    client = openai.OpenAI(base_url=cpu_server.base_url + "/v1", api_key="x", timeout=1800, max_retries=0)

    def chat(i: int) -> int:
        out = client.chat.completions.create(
            model="qwen3-4b-instruct",
            messages=[{"role": "user", "content": f"Question {i}: what is a search index?"}],
            max_tokens=8,
        )
        assert out.usage is not None
        return out.usage.completion_tokens

    with ThreadPoolExecutor(4) as pool:
        assert all(1 <= n <= 8 for n in pool.map(chat, range(4)))


def test_sixteen_text_embedding(cpu_server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=cpu_server.base_url + "/v1", api_key="x", timeout=1800, max_retries=0)
    texts = [f"Passage {i}: the retrieval index keeps {i} vectors per shard." for i in range(16)]
    for model in ("qwen3-embedding-0.6b", "qwen3-embedding-0.6b-query"):
        out = client.embeddings.create(model=model, input=texts)
        assert [d.index for d in out.data] == list(range(16))
        assert {len(d.embedding) for d in out.data} == {1024}  # Qwen3-Embedding-0.6B's hidden size
        assert abs(sum(x * x for x in out.data[0].embedding) - 1.0) < 1e-3  # normalised


def test_sixty_four_document_rerank(cpu_server: ServerProcess) -> None:
    docs = [
        f"Document {i} about {'search latency' if i % 2 else 'river gardens'} and shards." for i in range(64)
    ]
    r = httpx.post(
        cpu_server.base_url + "/v1/rerank",
        json={"model": "qwen3-reranker-0.6b", "query": "What is search latency?", "documents": docs},
        timeout=1800,
    )
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert sorted(x["index"] for x in results) == list(range(64))
    scores = [x["relevance_score"] for x in results]
    assert scores == sorted(scores, reverse=True) and all(0.0 <= s <= 1.0 for s in scores)
