"""TEI request/response shapes and model choice, and model ids RAGFlow's discovery can classify."""

from __future__ import annotations

import pytest

from gguf_serve.api.protocol.tei import (
    EmptyInput,
    TEIEmbedRequest,
    TEIRerankRequest,
    info_response,
    is_tei_rerank,
    rerank_response,
    tei_error,
    tei_model,
)
from gguf_serve.engine.requests import ContextOverflow, InvalidRequest, NotReady, QueueFull
from gguf_serve.settings import ModelSettings, Settings, SettingsError, load_settings

SHIPPED = ["demo", "cpu", "cuda"]


def ragflow_openai_compatible_kind(model_id: str) -> str:
    """RAGFlow's OpenAI-API-Compatible discovery (rag/llm/model_meta.py) guesses a model's kind
    from its lower-cased id: rerank hints first, then embedding hints, else chat."""
    name = model_id.lower()
    if any(h in name for h in ("rerank", "reranker")):
        return "rerank"
    if any(h in name for h in ("embed", "embedding", "bge")):
        return "embedding"
    if any(h in name for h in ("asr", "stt", "transcribe", "whisper", "tts", "text-to-speech")):
        return "audio"
    return "chat"


@pytest.mark.parametrize("profile", SHIPPED)
def test_every_listed_id_of_the_shipped_profiles_is_classified_by_its_role(profile: str) -> None:
    settings = load_settings(profile)
    for ms in settings.models:
        for name in ms.listed_names:
            assert ragflow_openai_compatible_kind(name) == ms.role, (profile, name)


def test_demo_keeps_the_former_embedder_id_as_a_hidden_alias() -> None:
    demo = load_settings("demo")
    embed = next(m for m in demo.models if m.role == "embedding")
    assert "embed" in embed.id and "all-minilm-l6-v2" in embed.names
    assert "all-minilm-l6-v2" not in embed.listed_names
    assert demo.models[0].role == "chat"  # /v1/models' first entry


def test_tei_model_is_the_setting_or_the_first_of_the_role() -> None:
    cpu = load_settings("cpu")
    assert tei_model(cpu, "embedding") == "qwen3-embedding-0.6b"
    assert tei_model(cpu, "rerank") == "qwen3-reranker-0.6b"
    chosen = Settings(models=cpu.models, tei={"embedding_model": "qwen3-embedding-0.6b-query"})
    assert tei_model(chosen, "embedding") == "qwen3-embedding-0.6b-query"
    assert tei_model(Settings(models=[]), "rerank") is None


@pytest.mark.parametrize(
    "tei", [{"embedding_model": "qwen3-reranker-0.6b"}, {"rerank_model": "nope"}, {"embedding_model": "x"}]
)
def test_tei_setting_must_name_a_model_of_the_role(tei: dict[str, str]) -> None:
    with pytest.raises((ValueError, SettingsError), match="tei"):
        Settings(models=load_settings("cpu").models, tei=tei)


def test_prompt_name_query_takes_the_instruction_of_the_same_weights() -> None:
    models = load_settings("cpu").models
    base = next(m for m in models if m.id == "qwen3-embedding-0.6b")
    query_id = next(m for m in models if m.id == "qwen3-embedding-0.6b-query")
    assert query_id.query_instruction
    req = TEIEmbedRequest(inputs="x", prompt_name="query")
    assert req.instruction(base, models) == query_id.query_instruction
    assert TEIEmbedRequest(inputs="x").instruction(base, models) is None
    assert TEIEmbedRequest(inputs="x").instruction(query_id, models) == query_id.query_instruction
    assert TEIEmbedRequest(inputs="x", prompt_name="document").instruction(query_id, models) is None
    with pytest.raises(InvalidRequest, match="prompt_name"):
        TEIEmbedRequest(inputs="x", prompt_name="classification").instruction(base, models)
    minilm = ModelSettings(id="m-embed", role="embedding", file="m.gguf")
    with pytest.raises(InvalidRequest, match="query"):
        TEIEmbedRequest(inputs="x", prompt_name="query").instruction(minilm, [minilm])


def test_embed_request_shapes() -> None:
    assert TEIEmbedRequest(inputs="a").input_list(8) == ["a"]
    assert TEIEmbedRequest(inputs=["a", "b"]).input_list(8) == ["a", "b"]
    assert TEIEmbedRequest(inputs=[1, 2, 3]).input_list(8) == [[1, 2, 3]]
    assert TEIEmbedRequest(inputs="a", truncation_direction="Left").truncation_direction == "left"
    with pytest.raises(EmptyInput):
        TEIEmbedRequest(inputs=[]).input_list(8)
    with pytest.raises(InvalidRequest, match="at most 2"):
        TEIEmbedRequest(inputs=["a", "b", "c"]).input_list(2)
    with pytest.raises(ValueError, match="inputs must be"):
        TEIEmbedRequest(inputs={"a": 1})  # type: ignore[arg-type]


def test_rerank_body_is_told_apart_by_its_fields() -> None:
    assert is_tei_rerank({"query": "q", "texts": ["a"], "raw_scores": False, "truncate": True})
    assert not is_tei_rerank({"query": "q", "documents": ["a"]})
    assert not is_tei_rerank({"query": "q", "documents": ["a"], "texts": ["b"]})
    assert not is_tei_rerank(["texts"])
    with pytest.raises(EmptyInput):
        TEIRerankRequest(query="q", texts=[]).text_list(8)
    with pytest.raises(InvalidRequest, match="left"):
        TEIRerankRequest(query="q", texts=["a"], truncation_direction="left").text_list(8)


def test_rerank_response_sorted_by_score_raw_and_text() -> None:
    out = rerank_response(["a", "b", "c"], [0.2, 0.9, 0.5], [-1.4, 2.2, 0.0], False, False)
    assert out == [{"index": 1, "score": 0.9}, {"index": 2, "score": 0.5}, {"index": 0, "score": 0.2}]
    raw = rerank_response(["a", "b", "c"], [0.2, 0.9, 0.5], [-1.4, 2.2, 0.0], True, True)
    assert raw[0] == {"index": 1, "score": 2.2, "text": "b"} and [x["index"] for x in raw] == [1, 2, 0]


@pytest.mark.parametrize(
    ("exc", "status", "kind"),
    [
        (None, 422, "Validation"),
        (EmptyInput("e"), 400, "Empty"),
        (ContextOverflow("long"), 413, "Validation"),
        (InvalidRequest("bad"), 422, "Validation"),
        (QueueFull("busy"), 429, "Overloaded"),
        (NotReady("loading"), 503, "Unhealthy"),
    ],
)
def test_errors_map_to_tei_kinds(exc: InvalidRequest | None, status: int, kind: str) -> None:
    assert tei_error(exc, "msg") == (status, {"error": "msg", "error_type": kind})


def test_info_shapes() -> None:
    s = load_settings("cpu")
    embed, rerank, chat = (next(m for m in s.models if m.role == r) for r in ("embedding", "rerank", "chat"))
    info = info_response(embed, s, "1.0", 8192, "last")
    assert info["model_type"] == {"embedding": {"pooling": "last"}} and info["model_dtype"] == "Q8_0"
    assert info["max_input_length"] == 8192 and info["max_client_batch_size"] == s.limits.max_inputs
    assert "reranker" in info_response(rerank, s, "1.0", None, None)["model_type"]
    assert info_response(chat, s, "1.0", None, None)["model_type"] == "text-generation"
