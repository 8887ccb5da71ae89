"""Converted tiny checkpoints run in llama.cpp and agree with transformers on the same tokens."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from gguf_serve.convert import runtime

TEXTS = [
    "The quick brown fox jumps over the lazy dog. yes",
    "我想在苹果公司工作 🚀 def add(a, b): return a + b  # 123",
    "<|im_start|>user\nIs this relevant?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
]


def _ids(folder: Path, text: str) -> list[int]:
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return tok.encode(text).ids


def _hf_logits(folder: Path, ids: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _assert_same_argmax(got: np.ndarray, want: np.ndarray, tol: float) -> None:
    """Same argmax wherever the reference's top-2 gap exceeds the numeric tolerance (no near-ties)."""
    top2 = np.sort(want, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * tol
    assert clear.mean() > 0.5
    assert (got.argmax(-1) == want.argmax(-1))[clear].all()


def _fields(path: Path) -> dict[str, object]:
    reader = gguf.GGUFReader(path)
    return {f.name: f.contents() for f in reader.fields.values()}


def _tensors(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    reader = gguf.GGUFReader(path)
    return {t.name: (tuple(int(x) for x in t.shape), t.tensor_type.name) for t in reader.tensors}


@pytest.mark.parametrize(
    ("kind", "arch", "pre"),
    [("qwen3_chat", "qwen3", "qwen2"), ("qwen2", "qwen2", "qwen2"), ("llama", "llama", "smollm")],
)
def test_causal_f32_logits_match_transformers(converted, tiny_checkpoint, kind, arch, pre):
    folder = tiny_checkpoint(kind)
    path = converted(kind, "F32")
    fields = _fields(path)
    assert fields["general.architecture"] == arch
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == pre
    assert "{%- for message in messages %}" in str(fields["tokenizer.chat_template"])
    with runtime.load_model(path) as model:
        for text in TEXTS:
            ids = _ids(folder, text)
            assert model.tokenize(text) == ids
            got = runtime.causal_logits(model, ids)
            want = _hf_logits(folder, ids)
            assert got.shape == want.shape
            tol = 2e-3 * float(np.abs(want).max()) + 1e-3
            assert float(np.abs(got - want).max()) < tol, kind
            _assert_same_argmax(got, want, tol)


@pytest.mark.parametrize("kind", ["qwen3_chat", "llama"])
def test_causal_q8_0_close(converted, tiny_checkpoint, kind):
    folder = tiny_checkpoint(kind)
    path = converted(kind, "Q8_0")
    assert _fields(path)["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    ids = _ids(folder, TEXTS[0])
    with runtime.load_model(path) as model:
        got = runtime.causal_logits(model, ids)
    want = _hf_logits(folder, ids)
    corr = np.corrcoef(got.ravel(), want.ravel())[0, 1]
    assert corr > 0.995
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.7


def test_qwen3_embedding_last_token_pooling(converted, tiny_checkpoint):
    from transformers import AutoModel

    folder = tiny_checkpoint("qwen3_embedding")
    path = converted("qwen3_embedding", "F32")
    fields = _fields(path)
    assert fields["qwen3.pooling_type"] == int(gguf.PoolingType.LAST)
    assert fields["tokenizer.ggml.add_eos_token"] is True
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert fields["tokenizer.ggml.eos_token_id"] == tok.token_to_id("<|endoftext|>")
    assert "output.weight" not in _tensors(path)
    hf = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    with runtime.load_model(path) as model:
        seqs = [model.tokenize(t) for t in TEXTS]
        assert all(s[-1] == tok.token_to_id("<|endoftext|>") for s in seqs)
        got = runtime.pooled(model, seqs)
    for vec, ids in zip(got, seqs, strict=True):
        assert ids == tok.encode(TEXTS[seqs.index(ids)]).ids
        with torch.no_grad():
            want = hf(torch.tensor([ids])).last_hidden_state[0, -1].numpy()
        cos = float(vec @ want / np.linalg.norm(vec) / np.linalg.norm(want))
        assert cos > 0.9999


@pytest.mark.parametrize("kind", ["qwen3_reranker_tied", "qwen3_reranker_untied"])
def test_qwen3_reranker_rank_head(converted, tiny_checkpoint, kind):
    folder = tiny_checkpoint(kind)
    path = converted(kind, "F32")
    fields = _fields(path)
    assert fields["qwen3.pooling_type"] == int(gguf.PoolingType.RANK)
    assert fields["qwen3.classifier.output_labels"] == ["yes", "no"]
    assert "Judge whether the Document" in str(fields["tokenizer.chat_template.rerank"])
    tensors = _tensors(path)
    assert tensors["cls.output.weight"][0] == (64, 2)
    assert "output.weight" not in tensors  # tied: no lm_head; untied: lm_head becomes cls.output only
    assert "token_embd.weight" in tensors
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    yes, no = tok.token_to_id("yes"), tok.token_to_id("no")
    with runtime.load_model(path) as model:
        seqs = [model.tokenize(t) for t in TEXTS]
        got = runtime.pooled(model, seqs)
    for scores, ids in zip(got, seqs, strict=True):
        logits = torch.tensor(_hf_logits(folder, ids)[-1])
        want = torch.softmax(logits[[yes, no]], 0).numpy()
        np.testing.assert_allclose(scores, want, atol=2e-3)


def test_f16_keeps_norms_f32_and_llama_qk_permuted(converted, tiny_checkpoint):
    from safetensors.numpy import load_file

    path = converted("llama", "F16")
    tensors = _tensors(path)
    assert tensors["blk.0.attn_norm.weight"][1] == "F32"
    assert tensors["blk.0.attn_q.weight"][1] == "F16"
    folder = tiny_checkpoint("llama")
    reader = gguf.GGUFReader(converted("llama", "F32"))
    q = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    hf = {}
    for shard in folder.glob("*.safetensors"):
        hf.update(load_file(shard))
    raw = hf["model.layers.0.self_attn.q_proj.weight"]
    got = np.asarray(q.data).reshape(raw.shape)
    assert not np.array_equal(got, raw)  # rotary permutation applied
    assert np.array_equal(np.sort(got.ravel()), np.sort(raw.ravel()))
