"""Rerank scorers: (query, documents) -> relevance in [0, 1], every pair of a request batched.

Three ways to score, one interface:
- HeadScorer: a GGUF with rank pooling and a classifier head (llama.cpp-converted
  Qwen3-Reranker, BGE rerankers); the head's output turned into P(relevant).
- CausalScorer: a plain causal Qwen3-Reranker GGUF; P(yes) over {yes, no} at the last
  token of the reranker's own prompt (what the head computes, from the LM head).
- EmbeddingScorer: an embedding model as a bi-encoder; cosine mapped to [0, 1].
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from gguf_serve.engine.batcher import (
    BatchedEngine,
    Vector,
)
from gguf_serve.engine.embedder import l2_normalize
from gguf_serve.engine.interfaces import EmbeddingModel
from gguf_serve.engine.llama_runtime import LlamaContext, LlamaModel
from gguf_serve.engine.model_info import ModelInfo, model_info
from gguf_serve.engine.off_loop import tokenize_off_loop
from gguf_serve.engine.qwen3_prompts import RERANK_INSTRUCTION, RERANK_PROMPT, fill_runs
from gguf_serve.engine.requests import HEALTHY, ContextOverflow, EngineHealth, InvalidRequest
from gguf_serve.engine.vocabulary import Vocabulary
from gguf_serve.settings import Limits, ModelSettings

log = logging.getLogger("gguf_serve.reranker")

# Qwen3-Reranker's prompt (from its model card); {instruction}, {query}, {document} are filled in.
# Architectures whose rank head already ends in a softmax (llama-graph.cpp build_pooling).
SOFTMAX_HEAD_ARCHS = frozenset({"qwen3", "qwen3vl"})
POSITIVE_LABELS = ("yes", "relevant", "true", "positive", "label_1", "1")


@dataclass
class RerankResult:
    scores: list[float]  # relevance in [0, 1]
    prompt_tokens: int
    # The scorer's own output before it becomes [0, 1]: a logit (head, causal) or a cosine.
    raw_scores: list[float] = field(default_factory=list)


class Reranker:
    """The engine of a rerank model."""

    kind = "none"

    @property
    def n_ctx(self) -> int:
        raise NotImplementedError

    @property
    def info(self) -> ModelInfo:
        raise NotImplementedError

    async def tokenize(self, text: str, add_special: bool = False, parse_special: bool = False) -> list[int]:
        raise NotImplementedError

    async def detokenize(self, tokens: Sequence[int]) -> list[bytes]:
        raise NotImplementedError

    async def score(
        self, query: str, documents: list[str], instruction: str | None = None, truncate: bool | None = None
    ) -> RerankResult:
        """`truncate` None: the model's setting."""
        raise NotImplementedError

    def stats(self) -> dict[str, float]:
        return {}

    def idle(self) -> bool:
        return True

    def health(self) -> EngineHealth:
        return HEALTHY

    def close(self) -> bool:
        return True


_CONTROL_TEXTS: dict[tuple[str, str], list[str]] = {}


def _control_texts(model: LlamaModel, template: str, fields: Sequence[str]) -> list[str]:
    """The texts of the control tokens (<|im_start|>, <|im_end|>) in the template's own text,
    longest first: tokens that render as nothing unless specials are rendered. Cached."""
    key = (str(model.path), template)
    cached = _CONTROL_TEXTS.get(key)
    if cached is not None:
        return cached
    parts = [template]
    for f in fields:
        parts = [x for p in parts for x in p.split("{" + f + "}")]
    found = {
        model.token_bytes(t, special=True).decode("utf-8", "replace")
        for part in parts
        for t in model.tokenize(part, add_special=False, parse_special=True)
        if not model.token_bytes(t) and model.token_bytes(t, special=True)
    }
    if len(_CONTROL_TEXTS) > 64:
        _CONTROL_TEXTS.clear()
    out = _CONTROL_TEXTS[key] = sorted(found, key=len, reverse=True)
    return out


def tokenize_filled(model: LlamaModel, template: str, **fields: str) -> list[int]:
    """A prompt template's {name} fields filled with client text, tokenized so that only the
    template's own control-token texts become control tokens: a query or document holding
    "<|im_end|>" stays text. The text between the template's control tokens (template text and
    fields together) is tokenized as one piece, as llama.cpp splits a prompt at special tokens
    before tokenizing, so ordinary text gives exactly the tokens of the whole filled prompt."""
    runs = fill_runs(template, _control_texts(model, template, list(fields)), fields)
    out: list[int] = []
    for piece, special in runs:
        if piece:
            out += model.tokenize(piece, add_special=False, parse_special=special)
    return out


def check_request(query: str, documents: list[str]) -> None:
    if not query.strip():
        raise InvalidRequest("query is empty", "query")
    if not documents:
        raise InvalidRequest("documents is empty; send at least one document", "documents")


class _PairScorer(BatchedEngine, Vocabulary, Reranker):
    """Shared by HeadScorer and CausalScorer: pair prompts -> one decode batch per many pairs."""

    def __init__(
        self, model: LlamaModel, ms: ModelSettings, limits: Limits, pooling: str, embeddings: bool = True
    ) -> None:
        self.model = model
        self.settings = ms
        self.limit = self._open(model, ms, limits.max_queue, pooling, embeddings).n_ctx_seq
        self._info = model_info(model, self.limit, self.ctx.params.n_seq_max, None)

    @property
    def n_ctx(self) -> int:
        return self.limit

    @property
    def info(self) -> ModelInfo:
        return self._info

    def _template(self, instruction: str) -> str | None:
        """The prompt with {instruction}, {query} and {document} left to fill (the instruction
        is the client's too); None: a plain BERT-style pair."""
        raise NotImplementedError

    def _pair(self, template: str | None, query: str, doc: str, instruction: str = "") -> list[int]:
        m = self.model
        if template is not None:
            return tokenize_filled(m, template, instruction=instruction, query=query, document=doc)
        # llama.cpp server's format_prompt_rerank for models without a rerank template.
        q = m.tokenize(query, add_special=False, parse_special=False)
        d = m.tokenize(doc, add_special=False, parse_special=False)
        eos = [m.eos] if m.add_eos and m.eos >= 0 else []
        sep_id = m.meta("tokenizer.ggml.seperator_token_id")
        sep = [int(sep_id)] if sep_id is not None and m.meta("tokenizer.ggml.add_sep_token") == "true" else []
        bos = [m.bos] if m.add_bos and m.bos >= 0 else []
        return bos + q + eos + sep + d + eos

    def _sequence(
        self, template: str | None, query: str, doc: str, i: int, truncate: bool, instruction: str = ""
    ) -> list[int]:
        tokens = self._pair(template, query, doc, instruction)
        if len(tokens) <= self.limit:
            return tokens
        if truncate:
            doc_tokens = self.model.tokenize(doc, add_special=False, parse_special=False)
            keep = len(doc_tokens) - (len(tokens) - self.limit)
            for _ in range(4):  # re-tokenizing a cut text can shift a few tokens; retry shorter
                if keep <= 0:
                    break
                tokens = self._pair(template, query, self.model.detokenize(doc_tokens[:keep]), instruction)
                if len(tokens) <= self.limit:
                    return tokens
                keep -= len(tokens) - self.limit
        raise ContextOverflow(
            f"documents[{i}] with the query takes {len(tokens)} tokens, more than this model's limit of "
            f"{self.limit} tokens per pair. Shorten the query or document (or enable truncate for this model).",
            f"documents[{i}]",
        )

    def _sequences(
        self, query: str, documents: list[str], instruction: str, truncate: bool
    ) -> list[list[int]]:
        template = self._template(instruction)
        return [self._sequence(template, query, d, i, truncate, instruction) for i, d in enumerate(documents)]

    def _to_score(self, out: Vector) -> float:
        raise NotImplementedError

    def _to_raw(self, out: Vector) -> float:
        """The relevance logit: log(p / (1 - p)) of the probability the head or LM gives."""
        p = min(1.0 - 1e-12, max(1e-12, self._to_score(out)))
        return math.log(p / (1.0 - p))

    async def score(
        self, query: str, documents: list[str], instruction: str | None = None, truncate: bool | None = None
    ) -> RerankResult:
        check_request(query, documents)
        instr = instruction or self.settings.rerank_instruction
        cut = self.settings.truncate if truncate is None else truncate
        n_chars = sum(len(d) for d in documents)
        with self.batcher.reserve() as place:  # a full queue refuses before any tokenizing
            seqs = await tokenize_off_loop(n_chars, lambda: self._sequences(query, documents, instr, cut))
            outs = await self.batcher.run(seqs, place)
        scores = [min(1.0, max(0.0, self._to_score(o))) for o in outs]
        return RerankResult(scores, sum(len(s) for s in seqs), [self._to_raw(o) for o in outs])


class HeadScorer(_PairScorer):
    kind = "head"

    def __init__(self, model: LlamaModel, ms: ModelSettings, limits: Limits) -> None:
        labels = model.classifier_labels() or ["0"]
        self.n_out = len(labels)
        lower = [label.strip().lower() for label in labels]
        self.positive = next((lower.index(p) for p in POSITIVE_LABELS if p in lower), 0)
        self.softmaxed = model.architecture in SOFTMAX_HEAD_ARCHS
        self.rerank_template = model.chat_template("rerank")
        super().__init__(model, ms, limits, "rank")

    def _readout(self, ctx: LlamaContext, seq_id: int, index: int) -> Vector:
        return ctx.seq_embedding(seq_id, self.n_out)

    def _template(self, instruction: str) -> str | None:
        t = self.rerank_template
        if t is None:
            return None
        if "{instruction}" in t:
            return t
        # Converted Qwen3-Reranker templates carry the default instruction verbatim.
        return t.replace(RERANK_INSTRUCTION, "{instruction}") if RERANK_INSTRUCTION in t else t

    def _to_raw(self, out: Vector) -> float:
        return float(out[0]) if self.n_out == 1 else super()._to_raw(out)

    def _to_score(self, out: Vector) -> float:
        if self.n_out == 1:
            return 1.0 / (1.0 + math.exp(-float(out[0])))
        if self.softmaxed:
            return float(out[self.positive])
        z = out.astype(np.float64)
        e = np.exp(z - z.max())
        return float(e[self.positive] / e.sum())


class CausalScorer(_PairScorer):
    kind = "causal"

    def __init__(self, model: LlamaModel, ms: ModelSettings, limits: Limits) -> None:
        yes, no = model.token_id("yes"), model.token_id("no")
        if yes is None or no is None:
            raise ValueError(
                f"{model.path}: scorer 'causal' needs single 'yes' and 'no' tokens in the vocabulary"
            )
        self.yes, self.no = yes, no
        super().__init__(model, ms, limits, "unspecified", embeddings=False)

    def _readout(self, ctx: LlamaContext, seq_id: int, index: int) -> Vector:
        row = ctx.logits(index)
        return np.array([row[self.yes], row[self.no]], dtype=np.float32)

    def _template(self, instruction: str) -> str | None:
        return RERANK_PROMPT

    def _to_raw(self, out: Vector) -> float:
        return float(out[0]) - float(out[1])

    def _to_score(self, out: Vector) -> float:
        # softmax over (yes, no), as Qwen3-Reranker's model card computes it
        return 1.0 / (1.0 + math.exp(float(out[1]) - float(out[0])))


class EmbeddingScorer(Reranker):
    """Bi-encoder: embed the query (with the embedder's query instruction) and the documents."""

    kind = "embedding"

    def __init__(self, embedder: EmbeddingModel, ms: ModelSettings) -> None:
        self.embedder = embedder
        self.settings = ms

    @property
    def n_ctx(self) -> int:
        return self.embedder.n_ctx

    @property
    def info(self) -> ModelInfo:
        return self.embedder.info

    async def tokenize(self, text: str, add_special: bool = False, parse_special: bool = False) -> list[int]:
        return await self.embedder.tokenize(text, add_special, parse_special)

    async def detokenize(self, tokens: Sequence[int]) -> list[bytes]:
        return await self.embedder.detokenize(tokens)

    async def score(
        self, query: str, documents: list[str], instruction: str | None = None, truncate: bool | None = None
    ) -> RerankResult:
        check_request(query, documents)
        instr = instruction or self.embedder.query_instruction
        texts = [i for i, d in enumerate(documents) if d.strip()]  # empty documents score 0
        # Query and documents go to the batcher together, so they share decodes.
        calls = [self.embedder.embed([query], instruction=instr, truncate=truncate)]
        if texts:
            calls.append(self.embedder.embed([documents[i] for i in texts], truncate=truncate))
        try:
            results = await asyncio.gather(*calls)
        except ContextOverflow as e:
            raise ContextOverflow(
                e.message.replace("Input has", "The query or a document has"), "documents"
            ) from None
        qv = l2_normalize(results[0].vectors[0])
        scores = [0.0] * len(documents)
        cosines = [-1.0] * len(documents)
        doc_vectors = results[1].vectors if texts else []
        for i, v in zip(texts, doc_vectors, strict=True):
            cosines[i] = float(np.dot(qv, l2_normalize(v)))
            scores[i] = min(1.0, max(0.0, (cosines[i] + 1.0) / 2.0))
        return RerankResult(scores, sum(r.prompt_tokens for r in results), cosines)

    def stats(self) -> dict[str, float]:
        return {}  # the embedder reports under its own id

    def health(self) -> EngineHealth:
        return self.embedder.health()

    def close(self) -> bool:
        return True  # the embedder belongs to its own registry entry


def make_reranker(
    model: LlamaModel | None, ms: ModelSettings, limits: Limits, embedder_for: Callable[[str], EmbeddingModel]
) -> Reranker:
    """The scorer ms.scorer names; "auto" looks at the GGUF."""
    kind = ms.scorer
    if kind == "embedding":
        if not ms.embedding_model:
            raise ValueError(f"model {ms.id}: scorer 'embedding' needs embedding_model")
        return EmbeddingScorer(embedder_for(ms.embedding_model), ms)
    if model is None:
        raise ValueError(f"model {ms.id}: scorer {kind!r} needs a GGUF file")
    pooling = model.pooling_type
    if kind == "auto":
        if pooling == "rank":
            kind = "head"
        elif pooling in ("mean", "cls", "last"):
            raise ValueError(
                f"model {ms.id}: {model.path.name} is an embedding model ({pooling} pooling); serve it as an "
                "embedding model and set scorer = 'embedding', embedding_model = '<its id>' here"
            )
        elif model.token_id("yes") is not None and model.token_id("no") is not None:
            kind = "causal"
        else:
            raise ValueError(
                f"model {ms.id}: {model.path.name} has neither a rank head nor single 'yes'/'no' tokens; "
                "it cannot score pairs"
            )
    if kind == "head":
        if pooling != "rank" and ms.pooling != "rank":
            raise ValueError(
                f"model {ms.id}: scorer 'head' needs a GGUF with rank pooling (this one: {pooling})"
            )
        return HeadScorer(model, ms, limits)
    return CausalScorer(model, ms, limits)
