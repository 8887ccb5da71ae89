"""Run a GGUF file in llama.cpp through the low-level llama_cpp bindings.

Small, synchronous helpers for verification and tests: tokenize, logits of every position
of one sequence, and pooled outputs (embeddings, or rank scores for rank-pooling models).
The serving engine has its own runtime; this one only has to be exact, not fast.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from gguf_serve.convert.errors import ConvertError
from gguf_serve.engine.llama_backend import init_backend


@contextlib.contextmanager
def load_model(path: Path, vocab_only: bool = False) -> Iterator[Any]:
    # The serving engine's backend start-up: one log route, one CPU-variant and AMX decision.
    backend = init_backend()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = vocab_only
    params.use_extra_bufts = backend.extra_buffer_types
    params.n_gpu_layers = 0
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise ConvertError(f"{path}: llama.cpp cannot load this file")
    try:
        yield model
    finally:
        llama_cpp.llama_model_free(model)


def tokenize(model: Any, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
    vocab = llama_cpp.llama_model_get_vocab(model)
    raw = text.encode("utf-8")
    n_max = len(raw) + 16
    buf = (llama_cpp.llama_token * n_max)()
    n = llama_cpp.llama_tokenize(vocab, raw, len(raw), buf, n_max, add_special, parse_special)
    if n < 0:
        n_max = -n
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(vocab, raw, len(raw), buf, n_max, add_special, parse_special)
    return list(buf[:n])


def meta(model: Any, key: str) -> str | None:
    buf = ctypes.create_string_buffer(4096)
    n = llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode("utf-8", errors="replace") if n >= 0 else None


@contextlib.contextmanager
def _context(model: Any, n_ctx: int, embeddings: bool, n_seq: int = 1, threads: int = 2) -> Iterator[Any]:
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = n_ctx
    cparams.n_batch = n_ctx
    cparams.n_ubatch = n_ctx
    cparams.n_seq_max = n_seq
    cparams.n_threads = threads
    cparams.n_threads_batch = threads
    cparams.embeddings = embeddings
    # an F32 KV cache: verification compares against float32 references
    cparams.type_k = llama_cpp.GGML_TYPE_F32
    cparams.type_v = llama_cpp.GGML_TYPE_F32
    cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    if not ctx:
        raise ConvertError("llama.cpp cannot create a context for this model")
    try:
        yield ctx
    finally:
        llama_cpp.llama_free(ctx)


def _batch(seqs: list[list[int]], all_logits: bool) -> Any:
    n = sum(len(s) for s in seqs)
    batch = llama_cpp.llama_batch_init(n, 0, max(1, len(seqs)))
    i = 0
    for sid, toks in enumerate(seqs):
        for pos, t in enumerate(toks):
            batch.token[i] = t
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = sid
            batch.logits[i] = all_logits or pos == len(toks) - 1
            i += 1
    batch.n_tokens = n
    return batch


def causal_logits(model: Any, tokens: list[int]) -> np.ndarray[Any, Any]:
    """Logits at every position of one sequence: shape (len(tokens), n_vocab)."""
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    with _context(model, max(32, len(tokens)), embeddings=False) as ctx:
        batch = _batch([tokens], all_logits=True)
        try:
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise ConvertError("llama_decode failed")
            out = np.empty((len(tokens), n_vocab), dtype=np.float32)
            for i in range(len(tokens)):
                ptr = llama_cpp.llama_get_logits_ith(ctx, i)
                out[i] = np.ctypeslib.as_array(ptr, shape=(n_vocab,))
        finally:
            llama_cpp.llama_batch_free(batch)
    return out


def pooled(model: Any, seqs: list[list[int]]) -> np.ndarray[Any, Any]:
    """The model's pooled output per sequence: an embedding, or rank scores (n_cls_out) for RANK pooling.

    Sequences run one at a time (memory cleared between them): exactness over speed.
    """
    n_ctx = max(32, max((len(s) for s in seqs), default=1))
    with _context(model, n_ctx, embeddings=True) as ctx:
        ptype = llama_cpp.llama_pooling_type(ctx)
        if ptype == llama_cpp.LLAMA_POOLING_TYPE_RANK:
            dim = max(1, llama_cpp.llama_model_n_cls_out(model))
        else:
            dim = llama_cpp.llama_model_n_embd(model)
        encoder_only = llama_cpp.llama_model_has_encoder(model) and not llama_cpp.llama_model_has_decoder(
            model
        )
        out = np.empty((len(seqs), dim), dtype=np.float32)
        for i, toks in enumerate(seqs):
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
            batch = _batch([toks], all_logits=True)
            try:
                run = llama_cpp.llama_encode if encoder_only else llama_cpp.llama_decode
                rc = run(ctx, batch)
                if rc != 0:
                    raise ConvertError(f"llama.cpp failed to run the model (code {rc})")
                ptr = llama_cpp.llama_get_embeddings_seq(ctx, 0)
                if not ptr:
                    raise ConvertError(
                        "llama.cpp returned no pooled output (is the file an embedding model?)"
                    )
                out[i] = np.ctypeslib.as_array(ptr, shape=(dim,))
            finally:
                llama_cpp.llama_batch_free(batch)
    return out
