"""Load one model that owns its weights and build the engine its role needs: the same steps
whether the engine runs in the API process or in its own engine process (engine_core.py)."""

from __future__ import annotations

import logging
from pathlib import Path

from gguf_serve.engine.cpu_budget import CpuShare
from gguf_serve.engine.gpu_fit import ModelFootprint, choose_gpu_layers, estimate_memory, read_footprint
from gguf_serve.engine.interfaces import AnyEngine, EmbeddingModel
from gguf_serve.engine.llama_backend import init_backend
from gguf_serve.engine.llama_runtime import LlamaModel, ModelLoadError
from gguf_serve.engine.memory import buffer_sizes
from gguf_serve.settings import Limits, ModelSettings

log = logging.getLogger("gguf_serve.registry")


def load_engine(
    ms: ModelSettings, path: Path, limits: Limits, cpu: CpuShare | None = None
) -> tuple[AnyEngine, LlamaModel]:
    """The engine and the weights it runs on (free the engine first, then the weights); its
    decodes take their threads from `cpu`, the engine's share of the server's budget."""
    try:
        footprint = read_footprint(path)  # header and tensor index only, read once for both uses
    except Exception as e:  # gguf-py on a cut or garbled file: an IndexError, a ValueError ...
        raise ModelLoadError(
            f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); re-download or re-convert it"
        ) from e
    n_gpu_layers = choose_gpu_layers(footprint, ms)
    use_mmap = ms.use_mmap if ms.use_mmap is not None else not repacks_weights(footprint, n_gpu_layers)
    with buffer_sizes() as buffers:
        model = LlamaModel(path, n_gpu_layers=n_gpu_layers, use_mmap=use_mmap)
        model.cpu = cpu
        engine = _engine(model, ms, limits)
    estimate = estimate_memory(footprint, ms)
    log.info(
        "model %s: %s, %d of %d layers on the GPU, %.0f MiB of weights, KV cache up to %.0f MiB (%s/%s)",
        ms.id,
        path.name,
        min(n_gpu_layers, model.n_layer) if n_gpu_layers >= 0 else model.n_layer,
        model.n_layer,
        model.size_bytes / 2**20,
        estimate.kv / 2**20,
        ms.cache_type_k,
        ms.cache_type_v,
    )
    log.info(
        "model %s memory, llama.cpp's buffers: %s (weights %s; estimated %.0f MiB weights + %.0f MiB KV)",
        ms.id,
        buffers.summary(),
        "memory-mapped" if use_mmap else "read into memory",
        estimate.weights / 2**20,
        estimate.kv / 2**20,
    )
    return engine, model


def repacks_weights(footprint: ModelFootprint, n_gpu_layers: int) -> bool:
    """Whether llama.cpp will repack some of these weights into CPU_REPACK buffers. Then the
    file is read, not mapped: loading a mapped file pages in every tensor, the repacked ones
    too, and those pages stay resident beside their repacked copies (~2 GiB for a 4B Q4_K_M)."""
    return n_gpu_layers == 0 and init_backend().repack and footprint.repackable_bytes > 0


def _engine(model: LlamaModel, ms: ModelSettings, limits: Limits) -> AnyEngine:
    try:
        engine: AnyEngine
        if ms.role == "chat":
            from gguf_serve.engine.chat import ChatEngine

            engine = ChatEngine(model, ms, limits)
        elif ms.role == "embedding":
            from gguf_serve.engine.embedder import Embedder

            engine = Embedder(model, ms, limits)
        else:
            from gguf_serve.engine.reranker import make_reranker

            engine = make_reranker(model, ms, limits, _no_embedder)
    except Exception:
        model.close()
        raise
    return engine


def _no_embedder(mid: str) -> EmbeddingModel:
    # A bi-encoder reranker (scorer = "embedding") owns no weights: the registry builds it.
    raise ModelLoadError(f"model {mid!r}: a bi-encoder reranker is not loaded from a file")
