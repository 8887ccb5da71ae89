"""Hugging Face text-embeddings-inference's API against the demo server, with the bodies
RAGFlow's HuggingFace provider sends (rag/llm/embedding_model.py HuggingFaceEmbed,
rag/llm/rerank_model.py HuggingfaceRerank, rag/llm/model_meta.py HuggingFace): no model
name, no API key, a list of vectors back from /embed and a list of {index, score} from /rerank."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import pytest

pytestmark = pytest.mark.e2e

EMBED = "all-minilm-l6-v2-embed"
RERANK = "all-minilm-l6-v2-rerank"
DOCS = [
    "The Eiffel Tower is a wrought-iron lattice tower in Paris, France.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "The Great Wall of China stretches thousands of kilometres across northern China.",
    "Python is a popular programming language for data science and machine learning.",
    "Mount Everest is the highest mountain above sea level.",
    "Croissants are a French pastry made of layered dough.",
    "The Seine flows through Paris.",
    "Light travels at about 300,000 kilometres per second.",
    "Rust is a systems programming language focused on safety.",
    "Tokyo is the capital of Japan.",
]


@pytest.fixture(scope="module")
def http(demo_server: str) -> Any:
    with httpx.Client(base_url=demo_server, timeout=120) as c:
        yield c


def tei_error(r: httpx.Response, status: int, kind: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error_type"] == kind and isinstance(body["error"], str) and body["error"], body
    return str(body["error"])


# --- /embed ------------------------------------------------------------------------------------


def test_ragflow_encode_batch_is_a_list_of_vectors_equal_to_openai_route(http: httpx.Client) -> None:
    texts = ["Test if the api key is available", *DOCS[:3]]
    r = http.post("/embed", json={"inputs": texts}, headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    vectors = np.array(r.json())  # what RAGFlow does with the body
    assert vectors.shape == (4, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)  # normalize defaults to true
    assert int(r.headers["x-compute-tokens"]) > 0
    openai_shape = http.post("/v1/embeddings", json={"model": EMBED, "input": texts}).json()
    expected = np.array([d["embedding"] for d in openai_shape["data"]])
    assert np.allclose(vectors, expected, atol=1e-5)


def test_ragflow_encode_queries_single_string_gets_one_vector(http: httpx.Client) -> None:
    r = http.post("/embed", json={"inputs": "Where is the Eiffel Tower?"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body) == 1 and len(body[0]) == 384  # RAGFlow reads response.json()[0]
    again = http.post("/embed", json={"inputs": ["Where is the Eiffel Tower?"]}).json()
    assert np.allclose(body[0], again[0], atol=1e-6)


def test_embed_normalize_false_truncate_and_dimensions(http: httpx.Client) -> None:
    raw = np.array(http.post("/embed", json={"inputs": DOCS[0], "normalize": False}).json()[0])
    unit = np.array(http.post("/embed", json={"inputs": DOCS[0]}).json()[0])
    assert abs(np.linalg.norm(raw) - 1.0) > 0.05  # MiniLM's mean-pooled vector is not unit length
    assert np.allclose(raw / np.linalg.norm(raw), unit, atol=1e-5)

    long = "word " * 700  # more than MiniLM's 512 tokens
    tei_error(http.post("/embed", json={"inputs": long, "truncate": False}), 413, "Validation")
    cut = http.post("/embed", json={"inputs": long, "truncate": True})
    assert cut.status_code == 200 and len(cut.json()[0]) == 384
    left = http.post(
        "/embed", json={"inputs": "apple " * 600 + "zebra", "truncate": True, "truncation_direction": "Left"}
    )
    right = http.post("/embed", json={"inputs": "apple " * 600 + "zebra", "truncate": True})
    assert left.status_code == right.status_code == 200
    assert not np.allclose(left.json()[0], right.json()[0], atol=1e-3)  # different ends were kept

    short = http.post("/embed", json={"inputs": [DOCS[1]], "dimensions": 64}).json()[0]
    assert len(short) == 64 and abs(np.linalg.norm(short) - 1.0) < 1e-4


@pytest.mark.parametrize(
    ("body", "status", "kind", "needle"),
    [
        ({"inputs": []}, 400, "Empty", "empty"),
        ({"inputs": 5}, 422, "Validation", "inputs"),
        ({}, 422, "Validation", "inputs"),
        ({"inputs": "x", "prompt_name": "query"}, 422, "Validation", "prompt_name"),
        ({"inputs": "x", "truncation_direction": "middle"}, 422, "Validation", "truncation_direction"),
        ({"inputs": [[10**9]]}, 422, "Validation", "vocabulary"),
        ({"inputs": ["ok", " "]}, 422, "Validation", "[1]"),
    ],
)
def test_embed_errors_have_tei_shape(
    http: httpx.Client, body: dict[str, Any], status: int, kind: str, needle: str
) -> None:
    assert needle in tei_error(http.post("/embed", json=body), status, kind)


def test_embed_document_prompt_means_no_instruction(http: httpx.Client) -> None:
    plain = http.post("/embed", json={"inputs": DOCS[2]}).json()[0]
    doc = http.post("/embed", json={"inputs": DOCS[2], "prompt_name": "document"}).json()[0]
    assert np.allclose(plain, doc, atol=1e-6)


# --- /rerank -----------------------------------------------------------------------------------


def ragflow_huggingface_rerank(base_url: str, query: str, texts: list[str]) -> list[float]:
    """What RAGFlow's HuggingFace rerank does: `{base}/rerank` unless the URL already ends in
    /rerank, 8 texts per request, each result's score placed at offset + index."""
    base = base_url.rstrip("/")
    endpoint = base if base.endswith("/rerank") else f"{base}/rerank"
    scores = [0.0] * len(texts)
    for start in range(0, len(texts), 8):
        body = {"query": query, "texts": texts[start : start + 8], "raw_scores": False, "truncate": True}
        r = httpx.post(endpoint, headers={"Content-Type": "application/json"}, json=body, timeout=60)
        r.raise_for_status()
        for item in r.json():
            scores[item["index"] + start] = item["score"]
    return scores


def test_ragflow_rerank_matches_the_jina_route(demo_server: str, http: httpx.Client) -> None:
    query = "Where is the Eiffel Tower?"
    for base in (demo_server, demo_server + "/", demo_server + "/rerank"):
        scores = ragflow_huggingface_rerank(base, query, DOCS)
        assert int(np.argmax(scores)) == 0 and all(0.0 <= s <= 1.0 for s in scores)
    jina = http.post("/v1/rerank", json={"model": RERANK, "query": query, "documents": DOCS}).json()
    by_index = {x["index"]: x["relevance_score"] for x in jina["results"]}
    # Batches of 8 pack into different decodes than one of 10: float32 noise only.
    assert np.allclose(scores, [by_index[i] for i in range(len(DOCS))], atol=1e-4)


def test_rerank_tei_shape_sorted_raw_scores_and_text(http: httpx.Client) -> None:
    query = "How do plants turn sunlight into energy?"
    r = http.post("/rerank", json={"query": query, "texts": DOCS[:5], "return_text": True})
    assert r.status_code == 200, r.text
    ranks = r.json()
    assert [set(x) for x in ranks] == [{"index", "score", "text"}] * 5
    assert [x["score"] for x in ranks] == sorted((x["score"] for x in ranks), reverse=True)
    assert ranks[0]["index"] == 1 and ranks[0]["text"] == DOCS[1]
    raw = http.post("/rerank", json={"query": query, "texts": DOCS[:5], "raw_scores": True}).json()
    # The demo reranker is a bi-encoder: its raw score is the cosine, its score (cosine + 1) / 2.
    scored = {x["index"]: x["score"] for x in ranks}
    for x in raw:
        assert "text" not in x
        # two requests, batched differently: equal up to float32 rounding of the pooled vectors
        assert abs((x["score"] + 1) / 2 - scored[x["index"]]) < 1e-4


def test_rerank_body_decides_the_shape_and_the_error_shape(http: httpx.Client) -> None:
    jina = http.post("/rerank", json={"model": RERANK, "query": "q", "documents": ["a", "b"]})
    assert jina.status_code == 200 and "results" in jina.json()
    tei_error(http.post("/rerank", json={"query": "q", "texts": []}), 400, "Empty")
    tei_error(http.post("/rerank", json={"query": 5, "texts": ["a"]}), 422, "Validation")
    long = {"query": "q", "texts": ["word " * 700], "truncate": False}
    tei_error(http.post("/rerank", json=long), 413, "Validation")
    assert http.post("/rerank", json={**long, "truncate": True}).status_code == 200
    bad_jina = http.post("/rerank", json={"model": RERANK, "query": "q", "documents": []})
    assert bad_jina.status_code == 400 and bad_jina.json()["error"]["type"] == "invalid_request_error"
    neither = http.post("/rerank", json={"query": "q"})
    assert neither.status_code == 400 and "documents" in neither.json()["error"]["message"]


# --- /info -------------------------------------------------------------------------------------


def test_info_describes_the_embed_model_as_tei_does(http: httpx.Client) -> None:
    info = http.get("/info").json()
    assert info["model_id"] == EMBED
    assert info["model_type"] == {"embedding": {"pooling": "mean"}}
    assert info["max_input_length"] == 512 and info["model_dtype"] == "float32"
    assert isinstance(info["max_client_batch_size"], int) and isinstance(info["auto_truncate"], bool)
    # RAGFlow's HuggingFace discovery: a dict model_type with "embedding" -> an embedding model.
    assert "embedding" in info["model_type"]
