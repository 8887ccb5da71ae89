"""Tokenize and detokenize for the API (llama-server's /tokenize, Ollama's token counts): the
part of the Engine Protocol every engine that owns a model shares."""

from __future__ import annotations

from collections.abc import Sequence

from gguf_serve.engine.llama_runtime import LlamaModel
from gguf_serve.engine.off_loop import tokenize_off_loop
from gguf_serve.engine.requests import InvalidRequest


def check_token_ids(model: LlamaModel, ids: Sequence[int], param: str) -> list[int]:
    """Token ids a client sent, refused (400) outside the vocabulary: llama.cpp indexes its
    tables with them unchecked."""
    n_vocab = model.n_vocab
    for t in ids:
        if not 0 <= t < n_vocab:
            raise InvalidRequest(f"token id {t} is outside this model's vocabulary (0..{n_vocab - 1})", param)
    return list(ids)


class Vocabulary:
    model: LlamaModel

    async def tokenize(self, text: str, add_special: bool = False, parse_special: bool = False) -> list[int]:
        return await tokenize_off_loop(
            len(text), lambda: self.model.tokenize(text, add_special, parse_special)
        )

    async def detokenize(self, tokens: Sequence[int]) -> list[bytes]:
        ids = check_token_ids(self.model, tokens, "tokens")
        return [self.model.token_bytes(t, special=True) for t in ids]
