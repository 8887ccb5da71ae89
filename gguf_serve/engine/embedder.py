"""Pooled embeddings: text or token ids in, one vector per input out, the sequences of
concurrent requests sharing decode calls (engine/batcher.py)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gguf_serve.engine.batcher import (
    BatchedEngine,
    Vector,
)
from gguf_serve.engine.llama_runtime import LlamaContext, LlamaModel
from gguf_serve.engine.model_info import ModelInfo, model_info
from gguf_serve.engine.off_loop import tokenize_off_loop
from gguf_serve.engine.qwen3_prompts import EMBED_QUERY_FORMAT
from gguf_serve.engine.requests import ContextOverflow, InvalidRequest
from gguf_serve.engine.vocabulary import Vocabulary, check_token_ids
from gguf_serve.settings import Limits, ModelSettings

log = logging.getLogger("gguf_serve.embedder")


@dataclass
class EmbeddingResult:
    vectors: list[Vector]
    prompt_tokens: int


def l2_normalize(v: Vector) -> Vector:
    norm = float(np.linalg.norm(v))
    return (v / norm).astype(np.float32) if norm > 0 else v.astype(np.float32)


class Embedder(BatchedEngine, Vocabulary):
    """The engine of an embedding model: text or token ids in, pooled vectors out."""

    def __init__(self, model: LlamaModel, ms: ModelSettings, limits: Limits) -> None:
        self.model = model
        self.settings = ms
        pooling = ms.pooling or model.pooling_type
        if pooling in ("none", "rank"):
            # A GGUF without pooling metadata (a profile's pooling = "none" is refused by its
            # settings): llama.cpp's own default for embeddings.
            log.warning("%s: the GGUF's pooling %r gives no vector per input; using mean", ms.id, pooling)
            pooling = "mean"
        self.pooling = pooling
        self._n_out = int(getattr(model, "n_embd_out", 0) or model.n_embd)
        # Qwen3-Embedding pools the last token, which must be the EOS its training appended.
        self._append_eos = model.add_eos or pooling == "last"
        self._limit = self._open(model, ms, limits.max_queue, pooling).n_ctx_seq  # after what _readout reads
        self._info = model_info(model, self._limit, self.ctx.params.n_seq_max, None)

    @property
    def n_ctx(self) -> int:
        return self._limit

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def n_embd(self) -> int:
        return self._n_out

    @property
    def query_instruction(self) -> str | None:
        return self.settings.query_instruction

    def _readout(self, ctx: LlamaContext, seq_id: int, _index: int) -> Vector:
        return ctx.seq_embedding(seq_id, self._n_out)

    # --- pre: text -> tokens ----------------------------------------------------------------
    def prepare(
        self, body: list[int], param: str = "input", truncate: bool | None = None, cut_left: bool = False
    ) -> list[int]:
        """Content tokens -> the model's sequence: BOS/EOS as the model wants, cut or refused.
        `truncate` None: the model's setting; `cut_left` keeps the end of a long input."""
        m = self.model
        head: list[int] = []
        if m.add_bos and m.bos >= 0:
            if body and body[0] == m.bos:
                body = body[1:]
            head = [m.bos]
        tail: list[int] = []
        if self._append_eos and m.eos >= 0:
            while body and body[-1] == m.eos:  # exactly one EOS ends the sequence
                body = body[:-1]
            tail = [m.eos]
        room = self._limit - len(head) - len(tail)
        if len(body) > room:
            if not (self.settings.truncate if truncate is None else truncate):
                raise ContextOverflow(
                    f"Input has {len(body) + len(head) + len(tail)} tokens, more than this model's limit of "
                    f"{self._limit} tokens per input. Shorten the input (or enable truncate for this model).",
                    param,
                )
            room = max(0, room)
            body = body[len(body) - room :] if cut_left else body[:room]
        return head + body + tail

    def text_tokens(self, text: str, instruction: str | None = None) -> list[int]:
        if instruction:
            text = EMBED_QUERY_FORMAT.format(task=instruction, text=text)
        # User text never becomes control tokens (parse_special=False).
        return self.model.tokenize(text, add_special=False, parse_special=False)

    def sequences(
        self,
        inputs: Sequence[str | Sequence[int]],
        instruction: str | None = None,
        truncate: bool | None = None,
        cut_left: bool = False,
    ) -> list[list[int]]:
        out: list[list[int]] = []
        for i, item in enumerate(inputs):
            param = f"input[{i}]" if len(inputs) > 1 else "input"
            if isinstance(item, str):
                if not item.strip():
                    raise InvalidRequest(f"{param} is an empty string; every input must have text", param)
                body = self.text_tokens(item, instruction)
            else:
                if len(item) == 0:
                    raise InvalidRequest(f"{param} is an empty list of tokens", param)
                body = check_token_ids(self.model, item, param)
            out.append(self.prepare(body, param, truncate, cut_left))
        return out

    # --- core + post ------------------------------------------------------------------------
    async def embed(
        self,
        inputs: Sequence[str | Sequence[int]],
        *,
        instruction: str | None = None,
        dimensions: int | None = None,
        normalize: bool | None = None,
        truncate: bool | None = None,
        cut_left: bool = False,
    ) -> EmbeddingResult:
        """Vectors in input order. `instruction` applies to text inputs (Qwen3-Embedding queries);
        `normalize` and `truncate` None: the model's settings."""
        if len(inputs) == 0:
            raise InvalidRequest("input is empty; send at least one string or token list", "input")
        if dimensions is not None and not 1 <= dimensions <= self._n_out:
            raise InvalidRequest(
                f"dimensions must be between 1 and {self._n_out} for this model; got {dimensions}",
                "dimensions",
            )
        n_chars = sum(len(x) for x in inputs)
        with self.batcher.reserve() as place:  # a full queue refuses before any tokenizing
            seqs = await tokenize_off_loop(
                n_chars, lambda: self.sequences(inputs, instruction, truncate, cut_left)
            )
            raw = await self.batcher.run(seqs, place)
        unit = self.settings.normalize if normalize is None else normalize
        vectors: list[Vector] = []
        for v in raw:
            if dimensions is not None and dimensions < v.shape[0]:
                v = v[:dimensions]
            vectors.append(l2_normalize(v) if unit else v.astype(np.float32))
        return EmbeddingResult(vectors, sum(len(s) for s in seqs))
