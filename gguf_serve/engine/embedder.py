"""Pooled embeddings, with the sequences of concurrent requests sharing decode calls.

One worker thread owns the llama.cpp context (the core); callers tokenize on their own
side (pre) and normalize the pooled vectors (post), so the thread does nothing but
decode. Every sequence is decoded whole in one physical batch: llama.cpp pools (and,
for non-causal models, attends) within one ubatch only, so the context's n_ubatch is at
least the longest allowed input and the batch is never split. How many tokens go into
one decode is the model's `n_ubatch` setting: small packs waste less attention on the
masked pairs of other sequences, large ones make bigger matrix products.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from gguf_serve.engine.context_size import context_size
from gguf_serve.engine.llama_runtime import (
    Batch,
    ContextParams,
    LlamaContext,
    LlamaModel,
    usable_cpus,
)
from gguf_serve.engine.qwen3_prompts import EMBED_QUERY_FORMAT
from gguf_serve.engine.requests import ContextOverflow, EngineError, InvalidRequest, NotReady, QueueFull
from gguf_serve.settings import Limits, ModelSettings

log = logging.getLogger("gguf_serve.embedder")

Vector = npt.NDArray[np.float32]
# Reads one sequence's result after a decode: (context, seq_id, batch index of its last token).
Readout = Callable[[LlamaContext, int, int], Vector]

MAX_SEQ_PER_DECODE = 64
# Tokenizing more text than this in one request (64 long documents) would stall the event
# loop for other requests: it goes to a thread.
TOKENIZE_IN_THREAD_CHARS = 4096
T = TypeVar("T")


async def tokenize_off_loop(n_chars: int, tokenize: Callable[[], T]) -> T:
    return await asyncio.to_thread(tokenize) if n_chars > TOKENIZE_IN_THREAD_CHARS else tokenize()


def embedding_context(
    model: LlamaModel, ms: ModelSettings, pooling: str, embeddings: bool = True
) -> LlamaContext:
    """A context that decodes whole sequences of up to `seq_limit(model, ms)` tokens, many per call."""
    size = context_size(ms, model.n_ctx_train)
    n_batch = size.n_batch
    threads = ms.n_threads or usable_cpus()
    params = ContextParams(
        n_ctx=size.n_ctx,
        n_batch=n_batch,
        n_ubatch=n_batch,
        n_seq_max=max(1, min(ms.parallel, MAX_SEQ_PER_DECODE)),
        n_threads=threads,
        n_threads_batch=ms.n_threads_batch or threads,
        embeddings=embeddings,
        pooling=pooling,
        flash_attn=ms.flash_attn,
        type_k=ms.cache_type_k,
        type_v=ms.cache_type_v,
        kv_unified=True,
    )
    return LlamaContext(model, params)


def seq_limit(model: LlamaModel, ms: ModelSettings) -> int:
    """The longest sequence (in tokens, specials included) one input may have."""
    return context_size(ms, model.n_ctx_train).n_ctx_seq


@dataclass(eq=False)
class _Job:
    seqs: list[list[int]]
    deliver: Callable[[list[Vector] | BaseException], None]
    results: list[Vector | None] = field(default_factory=list)
    remaining: int = 0
    finished: bool = False  # delivered, failed or abandoned by its caller

    def __post_init__(self) -> None:
        self.results = [None] * len(self.seqs)
        self.remaining = len(self.seqs)


class SequenceBatcher:
    """One thread, one context: whole sequences from any number of requests, packed into decodes.

    Each decode takes up to n_batch tokens and n_seq_max sequences, first come first served
    (with a short look-ahead so a long sequence does not leave the batch half empty).
    """

    def __init__(
        self, ctx: LlamaContext, readout: Readout, name: str, max_queue: int, pack_tokens: int
    ) -> None:
        self.ctx = ctx
        self.readout = readout
        self.name = name
        self.n_batch = ctx.params.n_batch
        # Tokens packed into one decode; a longer sequence (up to n_batch) goes alone.
        self.pack_tokens = min(pack_tokens, self.n_batch)
        self.n_seq_max = ctx.params.n_seq_max
        self.max_pending = max(1, max_queue + self.n_seq_max)  # requests, queued or running
        self._batch = Batch(self.n_batch, 1)
        self._all_outputs = ctx.params.embeddings  # llama.cpp outputs every token when pooling anyway
        self._pending: deque[tuple[_Job, int]] = deque()
        self._jobs = 0
        self._cv = threading.Condition()
        self._stopping = False
        self.n_requests = 0
        self.n_sequences = 0
        self.n_tokens = 0
        self.n_decodes = 0
        self.decode_s = 0.0
        self._thread = threading.Thread(target=self._run, name=f"embedder-{name}", daemon=True)
        self._thread.start()

    # --- event loop side --------------------------------------------------------------------
    async def run(self, seqs: list[list[int]]) -> list[Vector]:
        """Decode every sequence (each at most n_batch tokens); results in input order."""
        if not seqs:
            return []
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[Vector]] = loop.create_future()

        def settle(res: list[Vector] | BaseException) -> None:
            if fut.done():
                return
            if isinstance(res, BaseException):
                fut.set_exception(res)
            else:
                fut.set_result(res)

        def deliver(res: list[Vector] | BaseException) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
                loop.call_soon_threadsafe(settle, res)

        job = _Job(seqs, deliver)
        with self._cv:
            if self._stopping:
                raise NotReady(f"model {self.name} is shutting down")
            if self._jobs >= self.max_pending:
                raise QueueFull(f"model {self.name} is busy: {self._jobs} requests in progress; retry later")
            self._jobs += 1
            self.n_requests += 1
            self._pending.extend((job, i) for i in range(len(seqs)))
            self._cv.notify()
        try:
            return await fut
        finally:
            self._end(job)  # a no-op when finished; drops what is left of an abandoned request

    def stats(self) -> dict[str, float]:
        return {
            "requests": float(self.n_requests),
            "sequences": float(self.n_sequences),
            "tokens": float(self.n_tokens),
            "decodes": float(self.n_decodes),
            "decode_seconds": self.decode_s,
            "pending_sequences": float(len(self._pending)),
            "requests_in_progress": float(self._jobs),
        }

    def close(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout=30)
        if not self._thread.is_alive():
            self._batch.free()

    # --- the worker thread ------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._pending:
                    self._cv.wait()
                if self._stopping:
                    break
                picked = self._pick()
            if picked:
                self._decode(picked)
        with self._cv:
            left = {id(j): j for j, _ in self._pending}
            self._pending.clear()
        for job in left.values():
            self._fail(job, NotReady(f"model {self.name} is shutting down"))

    def _pick(self) -> list[tuple[_Job, int]]:
        """Called with the lock held: the sequences of the next decode."""
        picked: list[tuple[_Job, int]] = []
        kept: list[tuple[_Job, int]] = []
        room = self.pack_tokens
        scanned = 0
        while self._pending and len(picked) < self.n_seq_max and scanned < 4 * self.n_seq_max:
            job, i = self._pending.popleft()
            if job.finished:
                continue
            scanned += 1
            n = len(job.seqs[i])
            if n <= room or not picked:
                picked.append((job, i))
                room -= n
                if room <= 0:
                    break
            else:
                kept.append((job, i))
        self._pending.extendleft(reversed(kept))
        return picked

    def _decode(self, picked: list[tuple[_Job, int]]) -> None:
        batch = self._batch
        batch.clear()
        last: list[int] = []
        for seq_id, (job, i) in enumerate(picked):
            tokens = job.seqs[i]
            for pos, tok in enumerate(tokens):
                batch.add(tok, pos, seq_id, self._all_outputs or pos == len(tokens) - 1)
            last.append(batch.n_tokens - 1)
        t0 = time.perf_counter()
        try:
            self.ctx.decode(batch)
            outs = [self.readout(self.ctx, seq_id, last[seq_id]) for seq_id in range(len(picked))]
        except Exception as e:
            log.error("%s: decode of %d sequences failed: %s", self.name, len(picked), e)
            err = EngineError(f"model {self.name} could not process this input ({type(e).__name__})")
            for job, _ in picked:
                self._fail(job, err)
            return
        finally:
            for seq_id in range(len(picked)):
                self.ctx.seq_rm(seq_id)
        self.decode_s += time.perf_counter() - t0
        self.n_decodes += 1
        self.n_sequences += len(picked)
        self.n_tokens += batch.n_tokens
        for (job, i), out in zip(picked, outs, strict=True):
            if job.finished:
                continue
            job.results[i] = out
            job.remaining -= 1
            if job.remaining == 0 and self._end(job):
                job.deliver([r for r in job.results if r is not None])

    def _fail(self, job: _Job, err: BaseException) -> None:
        if self._end(job):
            job.deliver(err)

    def _end(self, job: _Job) -> bool:
        """Mark a job finished (once); True for the call that did it."""
        with self._cv:
            if job.finished:
                return False
            job.finished = True
            self._jobs -= 1
            if job.remaining > 0 and self._pending:  # abandoned: drop its queued sequences now
                self._pending = deque(p for p in self._pending if p[0] is not job)
            return True


@dataclass
class EmbeddingResult:
    vectors: list[Vector]
    prompt_tokens: int


def l2_normalize(v: Vector) -> Vector:
    norm = float(np.linalg.norm(v))
    return (v / norm).astype(np.float32) if norm > 0 else v.astype(np.float32)


class BatchedEngine:
    """An engine whose decodes all go through one SequenceBatcher over its own context."""

    batcher: SequenceBatcher
    ctx: LlamaContext

    def stats(self) -> dict[str, float]:
        return self.batcher.stats()

    def idle(self) -> bool:
        """No request in progress (the registry's keep_alive unloads only idle engines)."""
        return self.batcher.stats()["requests_in_progress"] == 0

    def close(self) -> None:
        self.batcher.close()
        self.ctx.close()


class Embedder(BatchedEngine):
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
        self._limit = seq_limit(model, ms)
        self._n_out = int(getattr(model, "n_embd_out", 0) or model.n_embd)
        # Qwen3-Embedding pools the last token, which must be the EOS its training appended.
        self._append_eos = model.add_eos or pooling == "last"
        self.ctx = embedding_context(model, ms, pooling)
        self.batcher = SequenceBatcher(self.ctx, self._readout, ms.id, limits.max_queue, ms.ubatch)

    @property
    def n_ctx(self) -> int:
        return self._limit

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

    def tokenize(self, text: str, instruction: str | None = None) -> list[int]:
        if instruction:
            text = EMBED_QUERY_FORMAT.format(task=instruction, text=text)
        # User text never becomes control tokens (parse_special=False).
        return self.model.tokenize(text, add_special=False, parse_special=False)

    def check_ids(self, ids: Sequence[int], param: str = "input") -> list[int]:
        n_vocab = self.model.n_vocab
        for t in ids:
            if not 0 <= t < n_vocab:
                raise InvalidRequest(
                    f"token id {t} is outside this model's vocabulary (0..{n_vocab - 1})", param
                )
        return list(ids)

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
                body = self.tokenize(item, instruction)
            else:
                if len(item) == 0:
                    raise InvalidRequest(f"{param} is an empty list of tokens", param)
                body = self.check_ids(item, param)
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
        seqs = await tokenize_off_loop(
            n_chars, lambda: self.sequences(inputs, instruction, truncate, cut_left)
        )
        raw = await self.batcher.run(seqs)
        unit = self.settings.normalize if normalize is None else normalize
        vectors: list[Vector] = []
        for v in raw:
            if dimensions is not None and dimensions < v.shape[0]:
                v = v[:dimensions]
            vectors.append(l2_normalize(v) if unit else v.astype(np.float32))
        return EmbeddingResult(vectors, sum(len(s) for s in seqs))
