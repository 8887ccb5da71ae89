"""Run a GGUF file in llama.cpp for verification and tests, on the engine's binding.

Small, synchronous helpers: logits of every position of one sequence, and pooled outputs
(embeddings, or rank scores for rank-pooling models). Tokenize and metadata are the
engine's LlamaModel methods. Unlike the serving engine, these only have to be exact, not
fast: an F32 KV cache, no flash attention, one sequence per context.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from gguf_serve.convert.errors import ConvertError
from gguf_serve.engine.llama_runtime import (
    Batch,
    ContextParams,
    DecodeError,
    LlamaContext,
    LlamaModel,
    ModelLoadError,
    usable_cpus,
)

# Verification runs beside conversions and tests; more threads would not change a result.
MAX_THREADS = 2


class _Closable(Protocol):
    def close(self) -> None: ...


C = TypeVar("C", bound=_Closable)


@contextlib.contextmanager
def _opened(make: Callable[[], C]) -> Iterator[C]:
    """A llama.cpp object made by `make`, closed on exit; a load failure is a ConvertError."""
    try:
        obj = make()
    except ModelLoadError as e:
        raise ConvertError(str(e)) from None
    try:
        yield obj
    finally:
        obj.close()


def load_model(path: Path, vocab_only: bool = False) -> contextlib.AbstractContextManager[LlamaModel]:
    return _opened(lambda: LlamaModel(path, vocab_only=vocab_only))


def _context(
    model: LlamaModel, n_ctx: int, embeddings: bool
) -> contextlib.AbstractContextManager[LlamaContext]:
    threads = min(MAX_THREADS, usable_cpus())
    params = ContextParams(
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_ubatch=n_ctx,
        n_seq_max=1,
        n_threads=threads,
        n_threads_batch=threads,
        embeddings=embeddings,
        # an F32 KV cache: verification compares against float32 references
        type_k="f32",
        type_v="f32",
        flash_attn=False,
    )
    return _opened(lambda: LlamaContext(model, params))


@contextlib.contextmanager
def _batch(tokens: list[int]) -> Iterator[Batch]:
    """One sequence (id 0) with an output at every position."""
    batch = Batch(max(1, len(tokens)))
    try:
        for pos, t in enumerate(tokens):
            batch.add(t, pos, 0, logits=True)
        yield batch
    finally:
        batch.free()


def causal_logits(model: LlamaModel, tokens: list[int]) -> npt.NDArray[np.float32]:
    """Logits at every position of one sequence: shape (len(tokens), n_vocab)."""
    with _context(model, max(32, len(tokens)), embeddings=False) as ctx, _batch(tokens) as batch:
        try:
            ctx.decode(batch)
        except DecodeError as e:
            raise ConvertError(f"llama.cpp failed to run the model: {e}") from None
        out = np.empty((len(tokens), model.n_vocab), dtype=np.float32)
        for i in range(len(tokens)):
            out[i] = ctx.logits(i)
    return out


def pooled(model: LlamaModel, seqs: list[list[int]]) -> npt.NDArray[np.float32]:
    """The model's pooled output per sequence: an embedding, or rank scores (n_cls_out) for RANK pooling.

    Sequences run one at a time (memory cleared between them): exactness over speed. Always a
    decode, as the engine's embedder and reranker do (llama.cpp runs BERT-style encoders so).
    """
    n_ctx = max(32, max((len(s) for s in seqs), default=1))
    dim = max(1, model.n_cls_out) if model.pooling_type == "rank" else model.n_embd
    out = np.empty((len(seqs), dim), dtype=np.float32)
    with _context(model, n_ctx, embeddings=True) as ctx:
        for i, toks in enumerate(seqs):
            ctx.clear()
            with _batch(toks) as batch:
                try:
                    ctx.decode(batch)
                except DecodeError as e:
                    raise ConvertError(f"llama.cpp failed to run the model: {e}") from None
                try:
                    out[i] = ctx.seq_embedding(0, dim)
                except DecodeError:
                    raise ConvertError(
                        "llama.cpp returned no pooled output (is the file an embedding model?)"
                    ) from None
    return out
