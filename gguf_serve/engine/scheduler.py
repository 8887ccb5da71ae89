"""Continuous batching for one chat model.

One thread owns the llama.cpp context. Each step it puts the next token of every
generating sequence, plus chunks of prompts being prefilled, into ONE llama_decode batch,
then samples every sequence with its own sampler chain and hands the text to the
request's asyncio queue. Slots keep their KV cache after a request ends, so the next
request with the same prefix (a multi-turn chat, a RAG system prompt) skips that prefill.
A new request goes to the idle slot that shares a large part of its prompt, else to an
empty or the least recently used one; what that slot held is saved to the host-RAM prompt
cache first, and the longest cached prefix of the new prompt is restored from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

import numpy as np

from gguf_serve.engine.llama_runtime import Batch, DecodeError, LlamaContext, LlamaModel
from gguf_serve.engine.prompt_cache import CachedPrompt, PromptCache, common_prefix_len
from gguf_serve.engine.requests import (
    HEALTHY,
    ContextOverflow,
    EngineError,
    EngineHealth,
    Finished,
    FinishReason,
    GenerationEvent,
    InvalidRequest,
    NotReady,
    QueueFull,
    SamplingParams,
    TextChunk,
    TokenLogprob,
)
from gguf_serve.engine.sampling import NoTokenAllowed, SamplerChain
from gguf_serve.engine.text_stream import StopTextStream

log = logging.getLogger("gguf_serve.scheduler")


@dataclass(eq=False)
class Job:
    prompt: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[GenerationEvent]
    # Built at submit time, so a bad grammar or logit bias is a 400 before anything is queued.
    sampler: SamplerChain
    cancelled: bool = False
    # OpenAI's n > 1: the other choices of this request. They wait in slots of their own
    # until this job's prompt is prefilled, then get a copy of its KV (one prefill for n).
    forks: list[Job] = field(default_factory=list)

    def cancel(self) -> None:
        # A plain bool store is atomic under the GIL; the scheduler reads it each step.
        self.cancelled = True


class Generation:
    """The events of one request: TextChunk..., then one Finished. Closing early cancels."""

    def __init__(self, scheduler: ChatScheduler, job: Job) -> None:
        self._scheduler = scheduler
        self.job = job

    async def __aiter__(self) -> AsyncIterator[GenerationEvent]:
        queue = self.job.queue
        held: GenerationEvent | None = None
        try:
            while True:
                ev = held if held is not None else await queue.get()
                held = None
                # A reader that fell behind gets the tokens waiting for it as one chunk:
                # fewer, larger SSE events when the machine is busy, none delayed.
                while isinstance(ev, TextChunk) and not queue.empty():
                    nxt = queue.get_nowait()
                    if isinstance(nxt, TextChunk):
                        ev = ev.merged(nxt)
                    else:
                        held = nxt
                yield ev
                if isinstance(ev, Finished):
                    return
        finally:
            self.cancel()

    def cancel(self) -> None:
        """Free the slot at the scheduler's next step (a no-op once finished)."""
        if not self.job.cancelled:
            self.job.cancel()
            self._scheduler.wake()


class SlotState(enum.Enum):
    IDLE = "idle"
    PREFILL = "prefill"
    GENERATE = "generate"
    FORK = "fork"  # a choice of n waiting for the KV of the prompt its first choice prefills


@dataclass(eq=False)
class Slot:
    seq_id: int
    cached: list[int] = field(default_factory=list)  # tokens whose KV is in this sequence
    state: SlotState = SlotState.IDLE
    job: Job | None = None
    sampler: SamplerChain | None = None
    stream: StopTextStream | None = None
    prompt_pos: int = 0  # next prompt index to prefill
    n_cached_at_start: int = 0
    n_generated: int = 0
    max_new: int = 0
    last_token: int = -1
    batch_index: int = -1  # where this slot's logits are in the current batch
    last_used: int = -1  # the scheduler's clock when a request last started or ended here
    forks: list[Slot] = field(default_factory=list)  # FORK slots waiting for this one's prompt
    # A fork copied another slot's KV into this one, and llama.cpp copies between KV streams
    # only at the start of the next decode: until then this sequence's buffer is stale, so a
    # save would store garbage and a restore would be overwritten by the copy.
    kv_pending: bool = False


def _deliver(items: list[tuple[Job, GenerationEvent]]) -> None:
    for job, ev in items:
        job.queue.put_nowait(ev)


class ChatScheduler:
    def __init__(
        self,
        model: LlamaModel,
        ctx: LlamaContext,
        n_slots: int,
        max_queue: int,
        name: str,
        prompt_cache: PromptCache | None = None,
        slot_similarity: float = 0.1,
    ) -> None:
        self.model = model
        self.prompt_cache = prompt_cache
        self.slot_similarity = slot_similarity
        self._clock = 0
        self.ctx = ctx
        self.name = name
        self.max_queue = max_queue
        self.slots = [Slot(seq_id=i) for i in range(n_slots)]
        self.n_ctx_seq = ctx.n_ctx_seq
        self._batch = Batch(ctx.params.n_batch, 1)
        self._waiting: deque[Job] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._freed = False
        self._dead: str | None = None  # why the scheduler thread ended, if it did on its own
        self._outbox: list[tuple[Job, GenerationEvent]] = []
        self._thread = threading.Thread(target=self._run, name=f"scheduler-{name}", daemon=True)
        self._thread.start()
        self.tokens_generated = 0
        self.tokens_prefilled = 0
        # Where the scheduler thread's time goes: llama_decode vs sampling (with text handling).
        self.decodes = 0
        self.decode_s = 0.0
        self.sample_s = 0.0

    # --- called from the event loop ---------------------------------------------------------
    def check_fits(self, n_prompt: int, max_tokens: int | None) -> None:
        limit = self.n_ctx_seq
        if n_prompt >= limit:
            raise ContextOverflow(
                f"This model's maximum context length is {limit} tokens. However, your prompt has "
                f"{n_prompt} tokens. Shorten the prompt or messages.",
                "messages",
            )
        if max_tokens is not None and n_prompt + max_tokens > limit:
            raise ContextOverflow(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} for the completion). "
                "Reduce the prompt or max_tokens.",
                "max_tokens",
            )

    def check_capacity(self) -> None:
        """NotReady or QueueFull now, as `submit` would: cheap, so a caller checks it before
        rendering and tokenizing a prompt. `submit` checks again (the authoritative check:
        other requests may have been queued meanwhile)."""
        with self._cv:
            self._check_room()

    def _check_room(self) -> None:
        """With the lock held: EngineError (the thread died), NotReady or QueueFull."""
        if self._dead is not None:
            raise EngineError(f"model {self.name} cannot serve: {self._dead}")
        if self._stopping:
            raise NotReady(f"model {self.name} is shutting down")
        free = sum(1 for s in self.slots if s.job is None)
        if len(self._waiting) >= free + self.max_queue:
            raise QueueFull(
                f"model {self.name} is busy: {len(self.slots)} slots in use and {len(self._waiting)} "
                "requests waiting; retry later",
                retry_after_s=1.0,
            )

    def submit(
        self, prompt: list[int], params: SamplingParams, n: int, loop: asyncio.AbstractEventLoop
    ) -> list[Job]:
        """Queue a request for `n` choices of one prompt, whose events `loop` will read (call
        from any thread: building the samplers compiles grammars). Choice i samples with
        seed + i (each its own random seed when the request has none)."""
        self.check_fits(len(prompt), params.max_tokens)
        if not 1 <= n <= len(self.slots):
            raise InvalidRequest(
                f"n={n} is more than this model's {len(self.slots)} parallel slots (one per choice)", "n"
            )
        jobs: list[Job] = []
        try:
            for i in range(n):
                seed = None if params.seed is None else params.seed + i
                p = params if i == 0 else replace(params, seed=seed)
                jobs.append(Job(prompt, p, loop, asyncio.Queue(), SamplerChain(self.model, p)))
        except Exception:
            for j in jobs:
                j.sampler.free()
            raise
        job = jobs[0]
        job.forks = jobs[1:]
        with self._cv:
            try:
                self._check_room()
            except EngineError:
                for j in jobs:
                    j.sampler.free()
                raise
            self._waiting.append(job)
            self._cv.notify()
        return jobs

    def start_n(
        self, prompt: list[int], params: SamplingParams, n: int, loop: asyncio.AbstractEventLoop
    ) -> list[Generation]:
        """`n` choices of one prompt, prefilled once: the streams of choice 0..n-1 (raising
        ContextOverflow/QueueFull now, before any response starts)."""
        return [Generation(self, job) for job in self.submit(prompt, params, n, loop)]

    def wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def stats(self) -> dict[str, float]:
        busy = sum(1 for s in self.slots if s.job is not None)
        return {
            "slots": float(len(self.slots)),
            "busy_slots": float(busy),
            "queue_depth": float(len(self._waiting)),
            "kv_used_cells": float(sum(len(s.cached) for s in self.slots)),
            "kv_total_cells": float(self.n_ctx_seq * len(self.slots)),
            "tokens_generated": float(self.tokens_generated),
            "tokens_prefilled": float(self.tokens_prefilled),
            "decodes": float(self.decodes),
            "decode_seconds": self.decode_s,
            "sample_seconds": self.sample_s,
            "threads": float(self.ctx.threads[0]),  # this engine's share of the CPU budget
            "threads_batch": float(self.ctx.threads[1]),
            **(self.prompt_cache.stats() if self.prompt_cache is not None else {}),
        }

    def idle(self) -> bool:
        return not self._waiting and all(s.job is None for s in self.slots)

    def close(self, timeout_s: float = 30.0) -> bool:
        """Stop the thread (waiting requests end "cancelled") and free the batch. False when
        the thread is still inside llama.cpp after `timeout_s`: then nothing is freed, since
        freeing a batch or context a live decode uses would crash the process."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout=timeout_s)
        if self._thread.is_alive():
            log.warning(
                "%s: the scheduler is still decoding; its memory is left to the process exit", self.name
            )
            return False
        if not self._freed:  # close() may be called again after a False
            self._freed = True
            self._batch.free()
        return True

    def health(self) -> EngineHealth:
        return HEALTHY if self._dead is None else EngineHealth("failed", self._dead)

    # --- the scheduler thread ---------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # never leave requests waiting on a thread that is gone
            log.exception("%s: the scheduler thread died", self.name)
            with self._cv:
                self._dead = f"the scheduler thread died: {type(e).__name__}: {e}"
                self._stopping = True
            self._end_all("error", "the model's scheduler failed")

    def _serve(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._waiting and all(s.job is None for s in self.slots):
                    self._cv.wait()
                if self._stopping:
                    break
            try:
                self._drop_cancelled()
                self._admit()
                self._step()
                self._flush()
            except Exception:  # never let one bad step kill the scheduler
                log.exception("scheduler step failed for %s", self.name)
                for s in self.slots:
                    if s.job is not None:
                        self._finish(s, "error", error="internal error in the scheduler")
                    self.ctx.seq_rm(s.seq_id)
                    s.cached = []
                self._flush()
        self._end_all("cancelled")

    def _end_all(self, reason: FinishReason, error: str | None = None) -> None:
        """End every request, running or waiting (the thread is stopping)."""
        for s in self.slots:
            if s.job is not None:
                self._finish(s, reason, error)
        with self._cv:
            waiting, self._waiting = list(self._waiting), deque()
        for job in waiting:
            for j in (job, *job.forks):
                j.sampler.free()
                self._emit(j, Finished(reason, len(j.prompt), 0, error=error))
        self._flush()

    def _emit(self, job: Job, ev: GenerationEvent) -> None:
        self._outbox.append((job, ev))

    def _flush(self) -> None:
        """Hand this step's events to their event loops: one wake-up per loop, not per token."""
        if not self._outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, GenerationEvent]]] = {}
        for job, ev in self._outbox:
            by_loop.setdefault(job.loop, []).append((job, ev))
        self._outbox = []
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody is listening
                loop.call_soon_threadsafe(_deliver, items)

    def _drop_cancelled(self) -> None:
        with self._cv:
            if any(j.cancelled for j in self._waiting):
                for j in self._waiting:
                    if j.cancelled:
                        # A request cancelled before it had a slot still ends with its Finished
                        # event, or its reader waits forever; the choices of n go with it.
                        for f in (j, *j.forks):
                            f.sampler.free()
                            self._emit(f, Finished("cancelled", len(f.prompt), 0))
                self._waiting = deque(j for j in self._waiting if not j.cancelled)
        for s in self.slots:
            if s.job is not None and s.job.cancelled:
                self._finish(s, "cancelled")

    def _admit(self) -> None:
        while True:
            idle = [s for s in self.slots if s.job is None]
            if not idle:
                return
            with self._cv:
                # n choices start together, in n slots (first come, first served).
                if not self._waiting or len(idle) < 1 + len(self._waiting[0].forks):
                    return
                job = self._waiting.popleft()
            chosen: list[Slot] = []
            try:
                chosen.append(self._choose_slot(idle, job.prompt))
                self._start(chosen[0], job)
                for fork in job.forks:
                    rest = [s for s in idle if s.job is None]
                    chosen.append(min(rest, key=lambda s: (bool(s.cached), s.last_used)))
                    self._park(chosen[-1], fork, chosen[0])
            except Exception:  # a request that cannot start fails alone, and never hangs
                log.exception("%s: could not start a request", self.name)
                self._fail_start(job, chosen)

    def _fail_start(self, job: Job, chosen: list[Slot]) -> None:
        """End `job` and its choices with an error, whether or not they had reached their
        slots, and empty those slots' KV (a restore or save may have stopped half way)."""
        error = "internal error starting the request"
        jobs = (job, *job.forks)
        placed = [s.job for s in chosen if s.job is not None]  # chosen slots were idle: these are ours
        for s in chosen:
            if s.job is not None:
                self._finish(s, "error", error)  # its waiting choices too
        for j in jobs:
            if not any(j is p for p in placed):
                j.sampler.free()
                self._emit(j, Finished("error", len(j.prompt), 0, error=error))
        for s in chosen:
            self.ctx.seq_rm(s.seq_id)
            s.cached = []

    def _park(self, slot: Slot, job: Job, first: Slot) -> None:
        """A choice of n waits in `slot` for the KV of the prompt `first` prefills."""
        self._save(slot)
        self.ctx.seq_rm(slot.seq_id, 0, -1)
        p = job.params
        slot.cached = []
        slot.job = job
        slot.sampler = job.sampler
        slot.stream = StopTextStream(p.stop)
        slot.prompt_pos = len(job.prompt)
        slot.n_cached_at_start = 0
        slot.n_generated = 0
        room = self.n_ctx_seq - len(job.prompt)
        slot.max_new = min(p.max_tokens, room) if p.max_tokens is not None else room
        slot.state = SlotState.FORK
        slot.last_used = self._tick()
        first.forks.append(slot)

    def _fork(self, first: Slot) -> None:
        """`first` has just prefilled its prompt: copy that KV to its waiting choices and
        sample their first tokens from the same logits (each with its own sampler)."""
        assert first.job is not None
        for f in first.forks:
            if f.state is not SlotState.FORK or f.job is None or f.job not in first.job.forks:
                continue  # cancelled meanwhile
            # Across KV streams llama.cpp copies the whole sequence at the next decode.
            self.ctx.seq_cp(first.seq_id, f.seq_id)
            f.kv_pending = True
            f.cached = list(first.cached)
            f.batch_index = first.batch_index
            self._sample(f)
        first.forks = []

    def _choose_slot(self, idle: list[Slot], prompt: list[int]) -> Slot:
        """llama-server's rule: the idle slot sharing the largest fraction of the prompt, if
        that is more than slot_similarity; else an empty or the least recently used one. A
        long RAG prompt that shares only the template and system prompt with a slot's
        conversation (a few % of it) leaves that conversation where it is."""
        best: Slot | None = None
        best_sim = self.slot_similarity
        if best_sim > 0:
            for s in idle:
                if s.cached:
                    sim = common_prefix_len(s.cached, prompt) / len(prompt)
                    if sim > best_sim:
                        best, best_sim = s, sim
        if best is not None:
            return best
        return min(idle, key=lambda s: (bool(s.cached), s.last_used))

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _reuse(self, slot: Slot, prompt: list[int]) -> int:
        """Put the longest known prefix of `prompt` into `slot`'s KV (its own cache, or a
        state from the prompt cache) and return its length; what the slot held and is about
        to lose goes to the prompt cache first."""
        keep = min(common_prefix_len(slot.cached, prompt), len(prompt) - 1)
        cache = self.prompt_cache
        if cache is None:
            return keep
        found = cache.best(prompt)
        restore = found is not None and min(found[1], len(prompt) - 1) > keep and not slot.kv_pending
        # Save when most of the slot would be lost (llama-server's f_keep < 0.5): a follow-up
        # that keeps the passages and drops only the last question is not worth a copy.
        losing = bool(slot.cached) and (restore or keep < len(slot.cached) / 2)
        if losing:
            self._save(slot, keep=found[0] if found is not None and restore else None)
        if found is None or not restore:
            cache.misses += 1
            return keep
        entry, n_shared = found
        if not self.ctx.set_seq_state(slot.seq_id, entry.state):
            log.warning("%s: could not restore a cached prompt of %d tokens", self.name, len(entry.tokens))
            cache.discard(entry)
            cache.misses += 1
            slot.cached = []
            return 0
        slot.cached = entry.tokens.tolist()
        keep = min(n_shared, len(prompt) - 1)
        cache.used(entry, keep)
        return keep

    def _save(self, slot: Slot, keep: CachedPrompt | None = None) -> None:
        """Copy what `slot` holds into the prompt cache before it is overwritten, unless an
        entry holds it already or there is no room (`keep`, to be restored next, stays)."""
        cache = self.prompt_cache
        if cache is None or not slot.cached or slot.kv_pending or cache.covers(slot.cached):
            return
        seq_id = slot.seq_id
        size = self.ctx.seq_state_size(seq_id)
        try:
            cache.save(slot.cached, size, lambda out: self.ctx.seq_state(seq_id, out), keep=keep)
        except (DecodeError, MemoryError) as e:  # the prompt is just not cached; the request goes on
            log.warning(
                "%s: could not save %d tokens to the prompt cache: %s", self.name, len(slot.cached), e
            )

    def _start(self, slot: Slot, job: Job) -> None:
        keep = self._reuse(slot, job.prompt)
        slot.last_used = self._tick()
        if not self.ctx.seq_rm(slot.seq_id, keep, -1):  # some caches cannot drop a tail
            self.ctx.seq_rm(slot.seq_id, 0, -1)
            keep = 0
        p = job.params
        slot.sampler = job.sampler
        slot.cached = job.prompt[:keep]  # always what the KV cache now holds
        slot.job = job
        slot.stream = StopTextStream(p.stop)
        slot.prompt_pos = keep
        slot.n_cached_at_start = keep
        slot.n_generated = 0
        room = self.n_ctx_seq - len(job.prompt)
        slot.max_new = min(p.max_tokens, room) if p.max_tokens is not None else room
        slot.state = SlotState.PREFILL

    def _step(self) -> None:
        batch = self._batch
        batch.clear()
        active: list[Slot] = []
        # Decode first: one token per generating sequence keeps streams flowing while
        # long prompts are prefilled in the room that is left.
        for s in self.slots:
            if s.state is SlotState.GENERATE:
                s.batch_index = batch.add(s.last_token, len(s.cached), s.seq_id, True)
                s.cached.append(s.last_token)
                active.append(s)
        for s in self.slots:
            if s.state is not SlotState.PREFILL or batch.space == 0:
                continue
            assert s.job is not None
            prompt = s.job.prompt
            n = min(len(prompt) - s.prompt_pos, batch.space)
            for i in range(s.prompt_pos, s.prompt_pos + n):
                last = i == len(prompt) - 1
                idx = batch.add(prompt[i], i, s.seq_id, last)
                if last:
                    s.batch_index = idx
            s.cached.extend(prompt[s.prompt_pos : s.prompt_pos + n])
            s.prompt_pos += n
            self.tokens_prefilled += n
            if s.prompt_pos == len(prompt):
                active.append(s)
        if batch.n_tokens == 0:
            return
        t0 = time.perf_counter()
        try:
            self.ctx.decode(batch)
        except DecodeError as e:
            log.error("%s: %s", self.name, e)
            for s in self.slots:
                if s.job is not None and (s in active or s.state is SlotState.PREFILL):
                    self._finish(s, "error", error="the model could not process this batch (KV cache full?)")
                    self.ctx.seq_rm(s.seq_id)
                    s.cached = []
            return
        t1 = time.perf_counter()
        for s in self.slots:  # the decode applied every pending KV copy first
            s.kv_pending = False
        for s in active:
            self._sample(s)
        self.decodes += 1
        self.decode_s += t1 - t0
        self.sample_s += time.perf_counter() - t1

    def _sample(self, s: Slot) -> None:
        assert s.job is not None and s.sampler is not None and s.stream is not None
        if s.forks:
            self._fork(s)
        p = s.job.params
        logprobs = self._logprobs(s.batch_index, p.top_logprobs) if p.logprobs else None
        try:
            token = s.sampler.sample(self.ctx.ptr, s.batch_index)
        except NoTokenAllowed as e:  # the client's grammar is at a dead end: its request ends
            self._finish(s, "error", error=str(e), error_status=400)
            return
        s.state = SlotState.GENERATE
        s.n_generated += 1
        self.tokens_generated += 1
        if self.model.is_eog(token) and not p.ignore_eos:
            self._finish(s, "stop")
            return
        text = s.stream.feed(self.model.token_bytes(token))
        lp = [self._token_logprob(token, logprobs)] if logprobs is not None else None
        if text or lp:
            self._emit(s.job, TextChunk(text, 1, lp))
        if s.stream.stopped:
            self._finish(s, "stop")
        elif s.n_generated >= s.max_new or len(s.cached) + 1 >= self.n_ctx_seq:
            self._finish(s, "length")
        else:
            s.last_token = token

    def _finish(
        self, s: Slot, reason: FinishReason, error: str | None = None, error_status: int = 500
    ) -> None:
        job = s.job
        assert job is not None
        if s.stream is not None and not s.stream.stopped and reason in ("stop", "length"):
            tail = s.stream.flush()
            if tail:
                self._emit(job, TextChunk(tail, 0))
        self._emit(
            job, Finished(reason, len(job.prompt), s.n_generated, s.n_cached_at_start, error, error_status)
        )
        forks, s.forks = s.forks, []
        for f in forks:  # choices still waiting for this prompt's KV never get it
            if f.state is SlotState.FORK and f.job is not None and f.job in job.forks:
                self._finish(f, "error" if reason == "error" else "cancelled", error)
        if s.sampler is not None:
            s.sampler.free()
        s.sampler = None
        s.stream = None
        s.job = None
        s.state = SlotState.IDLE
        s.last_used = self._tick()
        if reason in ("error",):
            s.cached = []

    # --- logprobs (only when asked: it copies the logits row) -------------------------------
    def _logprobs(self, batch_index: int, top_n: int) -> tuple[np.ndarray, np.ndarray, int]:
        logits = self.ctx.logits(batch_index).astype(np.float64)
        m = logits.max()
        logz = m + math.log(float(np.exp(logits - m).sum()))
        lp = logits - logz
        top = np.argpartition(-lp, top_n)[:top_n] if top_n > 0 else np.empty(0, dtype=np.int64)
        top = top[np.argsort(-lp[top])]
        return lp, top, top_n

    def _token_logprob(self, token: int, data: tuple[np.ndarray, np.ndarray, int]) -> TokenLogprob:
        lp, top, _ = data
        raw = self.model.token_bytes(token)
        return TokenLogprob(
            token=raw.decode("utf-8", "replace"),
            logprob=float(lp[token]),
            bytes=list(raw),
            top=[
                (
                    self.model.token_bytes(int(t)).decode("utf-8", "replace"),
                    float(lp[t]),
                    list(self.model.token_bytes(int(t))),
                )
                for t in top
            ],
        )
