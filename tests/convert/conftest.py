"""Session-scoped tiny checkpoints and their converted GGUF files (built once per test run)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests.fixtures import tiny_checkpoints as tc  # noqa: E402

CHECKPOINTS = {
    "qwen3_chat": tc.write_qwen3_chat,
    "qwen3_embedding": tc.write_qwen3_embedding,
    "qwen3_reranker_tied": lambda d: tc.write_qwen3_reranker(d, tied=True),
    "qwen3_reranker_untied": lambda d: tc.write_qwen3_reranker(d, tied=False),
    "qwen2": tc.write_qwen2,
    "llama": tc.write_llama,
}


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny_checkpoints")


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_root: Path):
    """tiny_checkpoint(kind) -> folder of that checkpoint, written on first use."""
    cache: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in cache:
            cache[kind] = CHECKPOINTS[kind](tiny_root / kind)
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def converted(tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory):
    """converted(kind, quant) -> the GGUF path built by ensure_converted (F32, Q8_0, ...)."""
    from gguf_serve.convert.pipeline import ensure_converted

    models_dir = tmp_path_factory.mktemp("models")

    def get(kind: str, quant: str = "F32") -> Path:
        return ensure_converted(str(tiny_checkpoint(kind)), kind, quant, models_dir)

    return get
