"""The machinery every embedding and rerank engine shares: a context that decodes whole
sequences, and one worker thread that packs the sequences of concurrent requests into
shared decodes (SequenceBatcher), behind BatchedEngine's stats/idle/close.

One worker thread owns the llama.cpp context (the core); callers tokenize on their own
side (pre) and post-process what the thread reads out (post), so the thread does nothing
but decode. Every sequence is decoded whole in one physical batch: llama.cpp pools (and,
for non-causal models, attends) within one ubatch only, so the context's n_ubatch is at
least the longest allowed input and the batch is never split. How many tokens go into
one decode is the model's `n_ubatch` setting: small packs waste less attention on the
masked pairs of other sequences, large ones make bigger matrix products.

Requests take turns: each decode is packed round-robin over the requests with sequences
waiting, one sequence of each in turn, so a one-text query waits for at most the decode
in progress, not for the whole queue of a 16-text ingest that came before it. Nor need it
wait for that decode: while the main context decodes a longer request, one of at most
`express_tokens` tokens in all (a search query, a short rerank) is decoded at once in a second,
small context with one thread (the express lane), beside the long decode. A caller reserves
its place (`reserve`) before tokenizing, so a full server refuses a request without
tokenizing thousands of inputs first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt

from gguf_serve.engine.context_size import ContextSize, context_size
from gguf_serve.engine.llama_runtime import (
    Batch,
    ContextParams,
    LlamaContext,
    LlamaModel,
    usable_cpus,
)
from gguf_serve.engine.requests import HEALTHY, EngineError, EngineHealth, NotReady, QueueFull
from gguf_serve.settings import ModelSettings

log = logging.getLogger("gguf_serve.batcher")

Vector = npt.NDArray[np.float32]
# Reads one sequence's result after a decode: (context, seq_id, batch index of its last token).
Readout = Callable[[LlamaContext, int, int], Vector]

# How far into one request's waiting sequences a pack looks for one that fits the room left.
LOOK_AHEAD = 8


def embedding_context(
    model: LlamaModel, ms: ModelSettings, size: ContextSize, pooling: str, embeddings: bool = True
) -> LlamaContext:
    """A context that decodes whole sequences of up to `size.n_ctx_seq` tokens, many per call."""
    threads = ms.n_threads or usable_cpus()
    params = ContextParams(
        n_ctx=size.n_batch,
        n_batch=size.n_batch,
        n_ubatch=size.n_batch,
        n_seq_max=size.n_seq_max,
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


def express_context(ctx: LlamaContext, cells: int) -> LlamaContext:
    """A second context on the same weights for short requests: `cells` tokens per decode
    (ContextSize.express), one thread, outside the CPU budget (its decodes are small and run
    beside the main context's, whose claim already covers the model)."""
    p = replace(ctx.params, n_ctx=cells, n_batch=cells, n_ubatch=cells, n_threads=1, n_threads_batch=1)
    express = LlamaContext(ctx.model, p)
    express.cpu = None
    return express


def reads_last_token(model: LlamaModel, pooling: str, embeddings: bool) -> bool:
    """Whether a sequence's result depends only on its last token's state, which attends to
    every token before it: a causal model pooled by its last token (Qwen3-Embedding, a rank
    head on a decoder: Qwen3-Reranker) or read from the last token's logits. Then sequences
    that start alike can decode their common prefix once (`SequenceBatcher(share_prefix=)`).
    Not for BERT-style models, whose prefix tokens attend to what follows them, nor for mean
    pooling, which averages every token of a sequence."""
    return model.causal_attention and (pooling in ("last", "rank") if embeddings else True)


def shared_prefix(seqs: list[list[int]]) -> int:
    """How many tokens every sequence starts with, leaving each at least one of its own (the
    one its result is read at)."""
    if len(seqs) < 2:
        return 0
    lo, hi = min(seqs), max(seqs)  # in token order: what these two share, every one does
    common = next((k for k, (a, b) in enumerate(zip(lo, hi, strict=False)) if a != b), min(len(lo), len(hi)))
    return min(common, min(len(s) for s in seqs) - 1)


@dataclass(eq=False)
class _Job:
    seqs: list[list[int]]
    deliver: Callable[[list[Vector] | BaseException], None]
    results: list[Vector | None] = field(default_factory=list)
    remaining: int = 0
    waiting: deque[int] = field(default_factory=deque)  # indices of the sequences not yet decoded
    finished: bool = False  # delivered, failed or abandoned by its caller
    tokens: int = 0  # of every sequence
    shared: int = 0  # tokens every sequence starts with, decoded once per decode (share_prefix)
    in_main: bool = False  # the main lane has taken a sequence of it: it finishes it there

    def __post_init__(self) -> None:
        self.results = [None] * len(self.seqs)
        self.remaining = len(self.seqs)
        self.waiting = deque(range(len(self.seqs)))
        self.tokens = sum(len(s) for s in self.seqs)


@dataclass(eq=False)
class _Lane:
    """A context and its batch, with the thread that decodes in it."""

    ctx: LlamaContext
    batch: Batch
    pack_tokens: int
    express: bool
    decodes: int = 0


class Reservation:
    """A request's place in a SequenceBatcher, taken before its inputs are tokenized.

    `SequenceBatcher.run` takes it over; leaving the `with` block without that (tokenizing
    failed, the caller was cancelled) gives the place back."""

    def __init__(self, batcher: SequenceBatcher) -> None:
        self._batcher = batcher
        self.held = True

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        self._batcher._release(self)


class SequenceBatcher:
    """One thread, one context: whole sequences from any number of requests, packed into decodes
    (and, with `express_tokens`, a second thread and context for short requests).

    Each decode takes up to `pack_tokens` tokens and n_seq_max sequences, round-robin over
    the requests with sequences waiting (one sequence of each in turn, with a short look-ahead
    within each request so a long sequence does not leave the pack half empty). A request
    that got a sequence into a decode goes to the back of the line; one whose sequences did not
    fit stays at the front for the next decode. The express lane only works while the main
    context is decoding a long request, and only takes requests of at most `express_tokens`
    tokens in all.
    """

    def __init__(
        self,
        ctx: LlamaContext,
        readout: Readout,
        name: str,
        max_queue: int,
        pack_tokens: int,
        express_tokens: int = 0,
        share_prefix: bool = False,
    ) -> None:
        self.ctx = ctx
        self.readout = readout
        self.name = name
        self.n_batch = ctx.params.n_batch
        self.n_seq_max = ctx.params.n_seq_max
        self.max_pending = max(1, max_queue + self.n_seq_max)  # requests, queued or running
        # Tokens packed into one decode; a longer sequence (up to n_batch) goes alone.
        batch = Batch(self.n_batch, self.n_seq_max)  # a shared prefix token is in many sequences
        self._main = _Lane(ctx, batch, min(pack_tokens, self.n_batch), express=False)
        self._lanes = [self._main]
        # ContextSize.express: the express context's cells, which is also the longest request
        # (all its sequences) it takes.
        self.express_tokens = min(express_tokens, self.n_batch)
        if self.express_tokens > 0:
            ectx = express_context(ctx, self.express_tokens)
            ebatch = Batch(self.express_tokens, self.n_seq_max)
            self._lanes.append(_Lane(ectx, ebatch, self.express_tokens, express=True))
        # A request's sequences that start alike (a rerank prompt, instruction and query before
        # each document) decode that prefix once per decode, as one set of KV cells that all of
        # them attend to: see reads_last_token for when the results are the same.
        self.share_prefix = share_prefix
        self._all_outputs = ctx.params.embeddings  # llama.cpp outputs every token when pooling anyway
        self._queue: deque[_Job] = deque()  # requests with sequences waiting, in turn order
        self._n_waiting = 0  # sequences waiting, over every request in the queue
        self._jobs = 0  # requests reserved, queued or running
        self._cv = threading.Condition()
        # The main lane is inside a decode with a sequence of a long request in it: the express
        # lane may work. Not while it decodes short requests only: those end soon, and a second
        # lane beside them would only put more threads than CPUs on the cores.
        self._main_long = False
        self._stopping = False
        self._freed = False
        self._dead: str | None = None  # why a worker thread ended, if one did on its own
        self.n_requests = 0
        self.n_sequences = 0
        self.n_tokens = 0
        self.decode_s = 0.0
        self._threads = [
            threading.Thread(
                target=self._run,
                args=(lane,),
                name=f"embedder-{name}{'-express' if lane.express else ''}",
                daemon=True,
            )
            for lane in self._lanes
        ]
        for t in self._threads:
            t.start()

    # --- event loop side --------------------------------------------------------------------
    def reserve(self) -> Reservation:
        """A place for one request, or NotReady / QueueFull now: cheap, so a caller checks it
        before tokenizing. Use it as `with batcher.reserve() as r: ... await batcher.run(seqs, r)`."""
        with self._cv:
            self._check_capacity()
            self._jobs += 1
        return Reservation(self)

    def _check_open(self) -> None:
        if self._dead is not None:
            raise EngineError(f"model {self.name} cannot serve: {self._dead}")
        if self._stopping:
            raise NotReady(f"model {self.name} is shutting down")

    def _check_capacity(self) -> None:
        self._check_open()
        if self._jobs >= self.max_pending:
            raise QueueFull(f"model {self.name} is busy: {self._jobs} requests in progress; retry later")

    def _release(self, r: Reservation) -> None:
        with self._cv:
            if r.held:
                r.held = False
                self._jobs -= 1

    async def run(self, seqs: list[list[int]], reserved: Reservation | None = None) -> list[Vector]:
        """Decode every sequence (each at most n_batch tokens); results in input order.
        `reserved`: the place `reserve` gave this request (taken over); None: take one now."""
        if not seqs:
            if reserved is not None:
                reserved.release()
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
        if self.share_prefix:
            job.shared = shared_prefix(seqs)
        with self._cv:
            if reserved is not None and reserved.held:
                self._check_open()
                reserved.held = False  # its place is now this job's, given back by _end
            else:
                self._check_capacity()
                self._jobs += 1
            self.n_requests += 1
            self._queue.append(job)
            self._n_waiting += len(seqs)
            self._cv.notify_all()  # the main lane, or the express lane if the main one is busy
        try:
            return await fut
        finally:
            self._end(job)  # a no-op when finished; drops what is left of an abandoned request

    def stats(self) -> dict[str, float]:
        return {
            "requests": float(self.n_requests),
            "sequences": float(self.n_sequences),
            "tokens": float(self.n_tokens),
            "decodes": float(sum(lane.decodes for lane in self._lanes)),
            "express_decodes": float(sum(lane.decodes for lane in self._lanes if lane.express)),
            "decode_seconds": self.decode_s,
            "pending_sequences": float(self._n_waiting),
            "requests_in_progress": float(self._jobs),
            "threads": float(self.ctx.threads[1]),  # this engine's share of the CPU budget
        }

    def close(self, timeout_s: float = 30.0) -> bool:
        """Stop the threads (queued requests fail NotReady) and free the batches and the express
        context; False, freeing nothing, while a thread is still inside a decode after `timeout_s`."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in self._threads):
            log.warning("%s: still decoding; its memory is left to the process exit", self.name)
            return False
        if not self._freed:
            self._freed = True
            for lane in self._lanes:
                lane.batch.free()
                if lane.express:
                    lane.ctx.close()
        return True

    def health(self) -> EngineHealth:
        return HEALTHY if self._dead is None else EngineHealth("failed", self._dead)

    # --- the worker threads -----------------------------------------------------------------
    def _run(self, lane: _Lane) -> None:
        picked: list[tuple[_Job, int]] = []  # the decode in progress: out of the queue already
        try:
            while True:
                with self._cv:
                    while not self._stopping and not self._has_work(lane):
                        self._cv.wait()
                    if self._stopping:
                        break
                    picked = self._pick(lane)
                    if not lane.express:
                        self._main_long = any(job.tokens > self.express_tokens for job, _ in picked)
                        self._cv.notify_all()  # short requests already queued: the express lane's turn
                if picked:
                    try:
                        self._decode(lane, picked)
                    finally:
                        if not lane.express:
                            with self._cv:
                                self._main_long = False
                    picked = []
        except BaseException as e:  # never leave requests waiting on a thread that is gone
            log.exception("%s: an embedding worker thread died", self.name)
            with self._cv:  # first, so that whoever its failure wakes sees the engine failed
                self._dead = f"the worker thread died: {type(e).__name__}: {e}"
                self._stopping = True
                self._cv.notify_all()  # the other lane stops too
            err = EngineError(f"model {self.name} could not process this input (worker failed)")
            for job, _ in picked:
                self._fail(job, err)
            self._fail_all(err)
            return
        self._fail_all(NotReady(f"model {self.name} is shutting down"))

    def _fail_all(self, err: EngineError) -> None:
        with self._cv:
            left = list(self._queue)
            self._queue.clear()
            self._n_waiting = 0
        for job in left:
            self._fail(job, err)

    def _fits_express(self, job: _Job) -> bool:
        """A short request the main lane has not started (one it has goes on there, so that a
        small request on an idle model is not split over two lanes on the same cores)."""
        return (
            job.tokens <= self.express_tokens and not job.in_main and not job.finished and bool(job.waiting)
        )

    def _has_work(self, lane: _Lane) -> bool:
        """Called with the lock held: whether `lane` has something to decode now."""
        if not lane.express:
            return bool(self._queue)
        return self._main_long and any(self._fits_express(j) for j in self._queue)

    def _pick(self, lane: _Lane) -> list[tuple[_Job, int]]:
        """Called with the lock held: the sequences of `lane`'s next decode, requests taking
        turns (the express lane's: of short requests only, the others keep their places)."""
        picked: list[tuple[_Job, int]] = []
        room = lane.pack_tokens
        in_pack: set[_Job] = set()  # a further sequence of these costs only what follows its prefix
        passed: list[_Job] = []  # nothing of theirs fitted this pack: first in line next time
        skipped: list[_Job] = []  # not the express lane's: where they were, in order
        while self._queue and len(picked) < self.n_seq_max and room > 0:
            job = self._queue.popleft()
            if job.finished or not job.waiting:
                continue
            if lane.express and not self._fits_express(job):
                skipped.append(job)
                continue
            discount = job.shared if job in in_pack else 0
            k = self._fitting(job, room + discount, alone=not picked)  # it costs len - discount
            if k is None:
                passed.append(job)
                continue
            i = job.waiting[k]
            del job.waiting[k]
            self._n_waiting -= 1
            job.in_main = job.in_main or not lane.express
            picked.append((job, i))
            room -= len(job.seqs[i]) - discount
            in_pack.add(job)
            if job.waiting:
                self._queue.append(job)
        self._queue.extendleft(reversed(passed + skipped))
        return picked

    def _fitting(self, job: _Job, room: int, alone: bool) -> int | None:
        """Where in `job.waiting` the next sequence that fits `room` is (the first one, whatever
        its length, when it would go alone), looking at most LOOK_AHEAD ahead."""
        if alone:
            return 0
        for k in range(min(LOOK_AHEAD, len(job.waiting))):
            if len(job.seqs[job.waiting[k]]) <= room:
                return k
        return None

    def _decode(self, lane: _Lane, picked: list[tuple[_Job, int]]) -> None:
        ctx, batch = lane.ctx, lane.batch
        batch.clear()
        last = [0] * len(picked)  # the batch index of each sequence's last token
        groups: dict[_Job, list[int]] = {}  # each request's sequences (seq ids) in this decode
        for seq_id, (job, _) in enumerate(picked):
            groups.setdefault(job, []).append(seq_id)
        for job, seq_ids in groups.items():
            start = job.shared if len(seq_ids) > 1 else 0
            for pos, tok in enumerate(job.seqs[picked[seq_ids[0]][1]][:start]):
                batch.add(tok, pos, seq_ids, self._all_outputs)
            for seq_id in seq_ids:
                tokens = job.seqs[picked[seq_id][1]]
                for pos in range(start, len(tokens)):
                    batch.add(tokens[pos], pos, seq_id, self._all_outputs or pos == len(tokens) - 1)
                last[seq_id] = batch.n_tokens - 1
        t0 = time.perf_counter()
        try:
            ctx.decode(batch)
            outs = [self.readout(ctx, seq_id, last[seq_id]) for seq_id in range(len(picked))]
        except Exception as e:
            log.error("%s: decode of %d sequences failed: %s", self.name, len(picked), e)
            err = EngineError(f"model {self.name} could not process this input ({type(e).__name__})")
            for job, _ in picked:
                self._fail(job, err)
            return
        finally:
            for seq_id in range(len(picked)):
                ctx.seq_rm(seq_id)
        done: list[_Job] = []
        with self._cv:  # the other lane may be finishing sequences of the same requests
            self.decode_s += time.perf_counter() - t0
            lane.decodes += 1
            self.n_sequences += len(picked)
            self.n_tokens += batch.n_tokens
            for (job, i), out in zip(picked, outs, strict=True):
                if job.finished:
                    continue
                job.results[i] = out
                job.remaining -= 1
                if job.remaining == 0:
                    done.append(job)
        for job in done:
            if self._end(job):
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
            if job.waiting:  # abandoned or failed: drop its queued sequences now
                self._n_waiting -= len(job.waiting)
                job.waiting.clear()
                self._queue = deque(j for j in self._queue if j is not job)
            return True


class BatchedEngine:
    """An engine whose decodes all go through one SequenceBatcher over its own context."""

    batcher: SequenceBatcher
    ctx: LlamaContext

    def _open(
        self, model: LlamaModel, ms: ModelSettings, max_queue: int, pooling: str, embeddings: bool = True
    ) -> ContextSize:
        """Create this engine's context and start its batcher, sized for `ms`; returns the size."""
        size = context_size(ms, model.n_ctx_train)
        self.ctx = embedding_context(model, ms, size, pooling, embeddings)
        self.batcher = SequenceBatcher(
            self.ctx,
            self._readout,
            ms.id,
            max_queue,
            ms.ubatch,
            express_tokens=size.express,
            share_prefix=reads_last_token(model, pooling, embeddings),
        )
        return size

    def _readout(self, ctx: LlamaContext, seq_id: int, index: int) -> Vector:
        """One sequence's result after a decode (the batcher's Readout)."""
        raise NotImplementedError

    def stats(self) -> dict[str, float]:
        return self.batcher.stats()

    def idle(self) -> bool:
        """No request in progress (the registry's keep_alive unloads only idle engines)."""
        return self.batcher.stats()["requests_in_progress"] == 0

    def health(self) -> EngineHealth:
        return self.batcher.health()

    def close(self) -> bool:
        """True when the context was freed; never under a decode still running."""
        if not self.batcher.close():
            return False
        self.ctx.close()
        return True
