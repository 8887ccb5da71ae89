"""How large a model's llama.cpp context is: one function for the engines and GPU auto-fit.

Chat keeps one KV stream per slot, each as long as the longest conversation (`n_ctx`, or
the model's trained context for 0). Embedding and rerank decode whole sequences and drop
them right after: their cache only ever holds one batch, whatever `parallel` is.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf_serve.settings import ModelSettings

# When a GGUF does not say how long its training context was.
FALLBACK_CTX = {"chat": 4096, "embedding": 512, "rerank": 512}


@dataclass(frozen=True)
class ContextSize:
    n_ctx: int  # KV cache cells of the whole context
    n_ctx_seq: int  # the longest sequence one request may have (specials included)
    n_batch: int  # tokens one decode may hold


def context_size(ms: ModelSettings, n_ctx_train: int) -> ContextSize:
    train = n_ctx_train if n_ctx_train > 0 else FALLBACK_CTX[ms.role]
    if ms.role == "chat":
        seq = ms.n_ctx or train
        return ContextSize(n_ctx=seq * ms.parallel, n_ctx_seq=seq, n_batch=ms.n_batch)
    # Embedding/rerank: no input longer than the model was trained on (positions past it are noise).
    seq = min(ms.n_ctx, train) if ms.n_ctx > 0 else train
    n_batch = max(ms.n_batch, seq)  # one whole sequence always fits one decode
    return ContextSize(n_ctx=n_batch, n_ctx_seq=seq, n_batch=n_batch)
