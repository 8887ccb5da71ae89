"""The memory estimate (gpu_fit.estimate_memory) against what llama.cpp allocates on the demo
models, and the per-model breakdown read from llama.cpp's log (engine/memory.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from gguf_serve.engine.batcher import embedding_context
from gguf_serve.engine.chat import ChatEngine
from gguf_serve.engine.context_size import context_size
from gguf_serve.engine.embedder import Embedder
from gguf_serve.engine.gpu_fit import ModelFootprint, estimate_memory, read_footprint
from gguf_serve.engine.llama_backend import init_backend
from gguf_serve.engine.llama_runtime import LlamaModel
from gguf_serve.engine.loader import load_engine, repacks_weights
from gguf_serve.engine.memory import MemoryBreakdown, buffer_sizes, note_log_line
from gguf_serve.settings import Limits, ModelSettings
from tests.e2e.server import demo_chat_gguf

MIB = 2**20


def test_buffer_lines_are_read_from_llama_cpp_log() -> None:
    with buffer_sizes() as b:
        note_log_line("load_tensors:   CPU_REPACK model buffer size =  1234.50 MiB")
        note_log_line("load_tensors:   CPU_Mapped model buffer size =   100.00 MiB")
        note_log_line("llama_kv_cache:        CPU KV buffer size =   896.00 MiB")
        note_log_line("llama_context:        CPU  output buffer size =     0.58 MiB")
        note_log_line("llama_context:        CPU compute buffer size =   300.25 MiB")
        note_log_line("llama_context: n_ctx = 8192")
    note_log_line("llama_kv_cache:        CPU KV buffer size =   1.00 MiB")  # outside: not counted
    assert b.buffers == {
        ("model", "CPU_REPACK"): round(1234.5 * MIB),
        ("model", "CPU_Mapped"): 100 * MIB,
        ("KV", "CPU"): 896 * MIB,
        ("output", "CPU"): round(0.58 * MIB),
        ("compute", "CPU"): round(300.25 * MIB),
    }
    assert b.total("model") == round(1334.5 * MIB)
    assert b.summary().startswith("weights 1,334 MiB (CPU_REPACK 1,234, CPU_Mapped 100), KV 896 MiB")


def test_chat_estimate_is_what_llama_cpp_allocates() -> None:
    path = demo_chat_gguf()
    fp = read_footprint(path)
    for cache_type in ("f16", "q8_0"):
        ms = ModelSettings(
            id="smol", file="x", n_ctx=1024, parallel=3, cache_type_k=cache_type, cache_type_v=cache_type
        )
        with buffer_sizes() as b:
            model = LlamaModel(path)
            engine = ChatEngine(model, ms, Limits())
        try:
            est = estimate_memory(fp, ms)
            assert b.total("KV") == pytest.approx(est.kv, rel=0.002), cache_type
            # The weights: one mapped buffer for the file (its tensors, aligned), nothing repacked.
            assert b.total("model") == pytest.approx(est.weights, rel=0.01)
            assert b.total("compute") > 0
        finally:
            engine.close()
            model.close()


def test_embedding_estimate_is_what_llama_cpp_allocates(qwen3_cache: Path, tmp_path: Path) -> None:
    """A decoder embedding model (Qwen3, KV cache) and an encoder (MiniLM-like BERT: none)."""
    from gguf_serve.convert.pipeline import ensure_converted
    from tests.fixtures import qwen3_checkpoints as qc

    ckpt = qc.modelscope_dir(qwen3_cache, "Qwen/Qwen3-Embedding-0.6B")
    path = ensure_converted(str(ckpt), "Qwen3-Embedding-0.6B", "F16", tmp_path)
    fp = read_footprint(path)
    ms = ModelSettings(id="e", file="x", role="embedding", n_ctx=512, n_batch=1024, parallel=4)
    model = LlamaModel(path)
    try:
        with buffer_sizes() as b:  # the main context and the express lane's (256 tokens)
            Embedder(model, ms.model_copy(update={"express_tokens": 256}), Limits()).close()
        with buffer_sizes() as main_only:
            embedding_context(model, ms, context_size(ms, model.n_ctx_train), "last").close()
    finally:
        model.close()
    per_cell = fp.n_embd_kv * 4 * len(fp.layer_bytes)
    assert estimate_memory(fp, ms.model_copy(update={"express_tokens": 0})).kv == 1024 * per_cell
    # llama.cpp logs MiB with 2 decimals: this small model's caches are fractions of a MiB
    assert main_only.total("KV") == pytest.approx(1024 * per_cell, abs=0.006 * MIB)
    with_express = estimate_memory(fp, ms.model_copy(update={"express_tokens": 256})).kv
    assert with_express == (1024 + 256) * per_cell
    assert b.total("KV") == pytest.approx(with_express, abs=0.011 * MIB)
    bert = ModelFootprint([1000] * 6, 0, 384, 512, architecture="bert")
    assert estimate_memory(bert, ms).kv == 0


def test_the_start_up_log_names_each_buffer(caplog: pytest.LogCaptureFixture) -> None:
    ms = ModelSettings(id="smol", file="x", n_ctx=512, parallel=2)
    with caplog.at_level(logging.INFO, logger="gguf_serve.registry"):
        engine, model = load_engine(ms, demo_chat_gguf(), Limits())
    engine.close()
    model.close()
    line = next(r.getMessage() for r in caplog.records if "memory, llama.cpp's buffers" in r.getMessage())
    assert "weights" in line and "KV" in line and "compute" in line and "memory-mapped" in line


def test_files_with_repacked_weights_are_read_not_mapped() -> None:
    q4k = ModelFootprint([100] * 2, 10, 64, type_bytes={"Q4_K": 150, "Q6_K": 60})
    q8 = ModelFootprint([100] * 2, 10, 64, type_bytes={"Q8_0": 200, "F32": 10})
    assert not repacks_weights(q8, 0)
    assert not repacks_weights(q4k, 999)  # on the GPU: nothing is repacked for the CPU
    assert repacks_weights(q4k, 0) == init_backend().repack


def test_breakdown_of_nothing_is_zero() -> None:
    assert MemoryBreakdown().total() == 0


def test_use_mmap_false_reads_the_file_and_keeps_no_mapped_copy(tmp_path: Path) -> None:
    """Q4_0 weights are repacked on an AVX2 CPU: mapped, the file's pages (originals of the
    repacked tensors included) stay resident beside the repacked copy; read, only one copy."""
    from gguf_serve.convert.quantize import quantize_gguf

    if not init_backend().repack:
        pytest.skip("this CPU backend repacks no weights")
    q4_0 = quantize_gguf(demo_chat_gguf(), tmp_path / "smol-Q4_0.gguf", "Q4_0", allow_requantize=True)
    fp = read_footprint(q4_0)
    sizes = {}
    for use_mmap in (True, False):
        with buffer_sizes() as b:
            LlamaModel(q4_0, use_mmap=use_mmap).close()
        sizes[use_mmap] = b
    assert ("model", "CPU_REPACK") in sizes[False].buffers and ("model", "CPU_Mapped") not in sizes[
        False
    ].buffers
    assert sizes[False].total("model") == pytest.approx(fp.weight_bytes, rel=0.01)
    assert sizes[True].buffers[("model", "CPU_Mapped")] > 0.9 * fp.weight_bytes
    assert (
        sizes[True].total("model")
        > sizes[False].total("model") + sizes[True].buffers[("model", "CPU_REPACK")] * 0.9
    )
