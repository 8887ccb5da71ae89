"""llama-server's extra routes on the demo server: /tokenize, /detokenize, /props, /slots."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.e2e

CHAT = "smollm2-135m-instruct"
EMBED = "all-minilm-l6-v2-embed"


def test_tokenize_and_detokenize_round_trip(demo_server: str) -> None:
    text = "Hello, 世界! <|im_end|>"
    r = httpx.post(demo_server + "/tokenize", json={"content": text}, timeout=30)
    assert r.status_code == 200
    tokens = r.json()["tokens"]
    assert tokens and all(isinstance(t, int) for t in tokens)
    back = httpx.post(demo_server + "/detokenize", json={"tokens": tokens}, timeout=30).json()["content"]
    assert back == text
    # parse_special (llama-server's default: true) makes <|im_end|> one control token.
    plain = httpx.post(demo_server + "/tokenize", json={"content": text, "parse_special": False}, timeout=30)
    assert len(plain.json()["tokens"]) > len(tokens)
    bos = httpx.post(demo_server + "/tokenize", json={"content": "hi", "add_special": True}, timeout=30)
    assert len(bos.json()["tokens"]) >= len(
        httpx.post(demo_server + "/tokenize", json={"content": "hi"}).json()["tokens"]
    )


def test_with_pieces_gives_bytes_where_a_piece_is_not_utf8(demo_server: str) -> None:
    r = httpx.post(demo_server + "/tokenize", json={"content": "a 🦙 b", "with_pieces": True}, timeout=30)
    items = r.json()["tokens"]
    assert all(set(item) == {"id", "piece"} for item in items)
    rebuilt = b"".join(
        item["piece"].encode() if isinstance(item["piece"], str) else bytes(item["piece"]) for item in items
    )
    assert rebuilt.decode() == "a 🦙 b"
    assert any(isinstance(item["piece"], list) for item in items)  # the llama is split across tokens


def test_tokenize_another_model_and_errors(demo_server: str) -> None:
    r = httpx.post(demo_server + "/tokenize", json={"content": "hello", "model": EMBED}, timeout=30)
    assert r.status_code == 200 and r.json()["tokens"]
    r = httpx.post(demo_server + "/detokenize", json={"tokens": [10**9]}, timeout=30)
    assert r.status_code == 400
    assert httpx.post(demo_server + "/tokenize", json={"content": "x", "model": "nope"}).status_code == 404


def test_props_has_what_llama_vscode_reads_and_no_paths(demo_server: str) -> None:
    r = httpx.get(demo_server + "/props", timeout=30)
    assert r.status_code == 200
    props = r.json()
    assert props["default_generation_settings"]["n_ctx"] == 2048
    assert props["total_slots"] == 8
    assert props["chat_template"] and "eos_token" in props and "bos_token" in props and props["build_info"]
    text = r.text
    assert ".gguf" not in text and "model_path" not in props and "models/" not in text
    emb = httpx.get(demo_server + "/props", params={"model": EMBED}, timeout=30).json()
    assert emb["default_generation_settings"]["n_ctx"] == 512 and emb["role"] == "embedding"


def test_slots_is_off_by_default(demo_server: str) -> None:
    r = httpx.get(demo_server + "/slots", timeout=10)
    assert r.status_code == 404 and "slots_endpoint" in r.json()["error"]["message"]
