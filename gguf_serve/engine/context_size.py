"""How large a model's llama.cpp context is: one function for the engines and GPU auto-fit.

Chat keeps one KV stream per slot, each as long as the longest conversation (`n_ctx`, or
the model's trained context for 0). Embedding and rerank decode whole sequences and drop
them right after: their cache only ever holds one batch, whatever `parallel` is, plus the
express lane's small second context (engine/batcher.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf_serve.settings import ModelSettings

# Sequences one embedding/rerank decode may hold (llama.cpp's n_seq_max for pooled contexts).
MAX_SEQ_PER_DECODE = 64

# When a GGUF does not say how long its training context was.
FALLBACK_CTX = {"chat": 4096, "embedding": 512, "rerank": 512}


@dataclass(frozen=True)
class ContextSize:
    n_ctx: int  # KV cache cells of the whole context
    n_ctx_seq: int  # the longest sequence one request may have (specials included)
    n_batch: int  # tokens one decode may hold
    n_seq_max: int  # sequences one decode may hold (chat: one per slot)
    express: int = 0  # KV cells of the express lane's context (embedding/rerank; 0: no lane)

    @property
    def kv_cells(self) -> int:
        """KV cells the model's contexts allocate in all: the main one and the express lane's."""
        return self.n_ctx + self.express


def whole_seqs(n_ubatch: int, n_seq_max: int) -> int:
    """n_ubatch rounded up to a multiple of n_seq_max: llama.cpp's graph reserve for a pooled
    context rounds its tokens so, and then aborts on the mean-pooling matrix product
    (GGML_ASSERT(ggml_can_mul_mat(a, b)) at context creation, e.g. n_ubatch 300 and 64 sequences)."""
    return -(-n_ubatch // n_seq_max) * n_seq_max


def context_size(ms: ModelSettings, n_ctx_train: int) -> ContextSize:
    train = n_ctx_train if n_ctx_train > 0 else FALLBACK_CTX[ms.role]
    if ms.role == "chat":
        seq = ms.n_ctx or train
        return ContextSize(n_ctx=seq * ms.parallel, n_ctx_seq=seq, n_batch=ms.n_batch, n_seq_max=ms.parallel)
    # Embedding/rerank: no input longer than the model was trained on (positions past it are noise).
    seq = min(ms.n_ctx, train) if ms.n_ctx > 0 else train
    # One whole sequence always fits one decode, which is also one ubatch: llama.cpp pools
    # within a ubatch.
    n_seq_max = max(1, min(ms.parallel, MAX_SEQ_PER_DECODE))
    n_batch = whole_seqs(max(ms.n_batch, seq), n_seq_max)
    express = whole_seqs(min(ms.express, n_batch), n_seq_max) if ms.express > 0 else 0
    return ContextSize(n_ctx=n_batch, n_ctx_seq=seq, n_batch=n_batch, n_seq_max=n_seq_max, express=express)
