"""Slot choice and the host-RAM prompt cache, on the demo chat GGUF (real weights).

The engine-level tests drive a ChatEngine directly (no HTTP) with greedy sampling, so each
check is exact: which slot a prompt lands in, how many prompt tokens came from a cache, and
whether a restored prefix gives the very continuation a fresh prefill gives.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import llama_cpp
import numpy as np
import pytest

from gguf_serve.engine import prompt_cache
from gguf_serve.engine.chat import ChatEngine
from gguf_serve.engine.llama_runtime import Batch, ContextParams, DecodeError, LlamaContext, LlamaModel
from gguf_serve.engine.prompt_cache import MAX_SPARE_BUFFERS, CachedPrompt, PromptCache, buffer_capacity
from gguf_serve.engine.requests import Finished, SamplingParams, TextChunk
from gguf_serve.engine.scheduler import Generation
from gguf_serve.settings import Limits, ModelSettings
from tests.e2e.server import demo_chat_gguf
from tests.fixtures import rag_text
from tests.fixtures.rag_text import WORDS

SYSTEM = "You answer questions about the passage below, briefly."


def passage(i: int, n_words: int = 300) -> str:
    return rag_text.passage(i, n_words)


def greedy(max_tokens: int = 8) -> SamplingParams:
    return SamplingParams(temperature=0.0, top_k=1, max_tokens=max_tokens, ignore_eos=True)


@pytest.fixture(scope="module")
def model() -> Iterator[LlamaModel]:
    m = LlamaModel(demo_chat_gguf())
    yield m
    m.close()


def engine(model: LlamaModel, parallel: int, cache_mib: int, similarity: float = 0.1) -> ChatEngine:
    ms = ModelSettings(
        id="smol",
        file=str(model.path),
        n_ctx=1024,
        parallel=parallel,
        n_threads=2,
        prompt_cache_mib=cache_mib,
        slot_similarity=similarity,
    )
    return ChatEngine(model, ms, Limits())


@pytest.fixture
def make_engine(model: LlamaModel) -> Iterator[list[ChatEngine]]:
    made: list[ChatEngine] = []
    yield made
    for e in made:
        e.close()


def prompt_text(i: int, question: str = "What is it about?") -> str:
    return (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{passage(i)}\n\n{question}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def prompt(eng: ChatEngine, i: int, question: str = "What is it about?") -> list[int]:
    return eng.tokenize_prompt(prompt_text(i, question))


def raw_prompt(eng: ChatEngine, i: int, question: str) -> list[int]:
    """No template: prompts of different `i` share no first token. llama.cpp's logits
    depend (in the last bits) on how a prompt was split into batches, so comparing two
    engines token for token needs prompts that both prefill from their first token."""
    return eng.model.tokenize(
        f"{WORDS[i % len(WORDS)]}: {passage(i)}\n\nQ: {question}\nA:", add_special=False
    )


async def _run(eng: ChatEngine, tokens: list[int], params: SamplingParams) -> tuple[list[str], Finished]:
    text: list[str] = []
    async for ev in await eng.start_completion(tokens, params):
        if isinstance(ev, TextChunk):
            text.append(ev.text)
        else:
            return text, ev
    raise AssertionError("no Finished event")


def run(eng: ChatEngine, tokens: list[int], max_tokens: int = 8) -> tuple[str, Finished]:
    # a bound, so that a request the scheduler loses fails the test instead of hanging it
    text, fin = asyncio.run(asyncio.wait_for(_run(eng, tokens, greedy(max_tokens)), 120))
    assert fin.reason == "length", fin
    return "".join(text), fin


def kv_matches_slots(eng: ChatEngine) -> None:
    """Every slot's token record is what its KV sequence holds (positions 0..n-1)."""
    mem = eng.ctx.memory
    for s in eng.scheduler.slots:
        assert llama_cpp.llama_memory_seq_pos_max(mem, s.seq_id) == len(s.cached) - 1, s.seq_id


# --- the cache's own bookkeeping (no weights) -----------------------------------------------
STATE = 1_000_000  # bytes of a made-up state (buffer_capacity gives it 1.125 MiB)
CAP = buffer_capacity(STATE)


def save(c: PromptCache, tokens: list[int], size: int = STATE, keep: CachedPrompt | None = None) -> bool:
    return c.save(tokens, size, lambda out: out.fill(tokens[-1] % 256), keep=keep)


def consistent(c: PromptCache) -> None:
    assert c.bytes == sum(e.nbytes for e in c.entries()) + c.spare_bytes <= c.limit_bytes
    for e in c.entries():  # each entry still holds what its fill wrote
        assert e.state.nbytes == STATE and (e.state == e.tokens[-1] % 256).all()


def test_cache_keeps_longest_prefix_and_drops_what_a_new_entry_extends() -> None:
    c = PromptCache(limit_bytes=10 * CAP)
    assert save(c, [1, 2, 3])
    assert c.covers([1, 2]) and c.covers([1, 2, 3]) and not c.covers([1, 2, 4])
    assert save(c, [1, 2, 3, 4, 5, 6, 7])  # extends [1, 2, 3]: that one goes
    assert len(c) == 1 and c.entries()[0].tokens.tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert save(c, [7, 8])
    found = c.best([1, 2, 3, 9])
    assert found is not None and found[1] == 3 and found[0].tokens.tolist()[:3] == [1, 2, 3]
    assert c.best([6]) is None
    c.used(found[0], 3)  # under half of it restored (a shared system prompt): it stays, now the most recent
    assert len(c) == 2 and c.entries()[-1] is found[0]
    c.used(found[0], 4)  # the slot holds most of it now (a follow-up on the same passage)
    assert len(c) == 1 and c.hits == 2 and c.restored_tokens == 7
    consistent(c)


def test_cache_evicts_least_recently_used_within_its_bound() -> None:
    c = PromptCache(limit_bytes=3 * CAP + 64)
    for i in range(5):
        assert save(c, [i, i])
        consistent(c)
    assert [e.tokens[0] for e in c.entries()] == [2, 3, 4] and c.evictions == 2
    found = c.best([2, 2, 9])
    assert found is not None
    c.used(found[0], 0)  # [2, 2] is now the most recently used: [3, 3] goes next
    save(c, [5, 5])
    assert [e.tokens[0] for e in c.entries()] == [4, 2, 5]
    assert not save(c, [9], size=4 * CAP)  # alone over the bound: not kept
    assert len(c) == 3
    consistent(c)


def test_saves_recycle_the_buffers_of_dropped_entries() -> None:
    c = PromptCache(limit_bytes=10 * CAP)
    save(c, [1, 1])
    first = c.entries()[0].buffer
    found = c.best([1, 1, 2])
    assert found is not None
    c.used(found[0], 2)  # back in a slot: its buffer waits for the next save
    assert len(c) == 0 and c.spare_bytes == CAP and c.bytes == CAP
    assert save(c, [2, 2], size=STATE + STATE // 10)  # a slightly longer state fits in it
    assert c.entries()[0].buffer is first and c.spare_bytes == 0
    assert c.bytes == CAP + c.entries()[0].tokens.nbytes
    c.discard(c.entries()[0])
    assert save(c, [3, 3], size=STATE // 4)  # far smaller: gets a buffer of its own size
    assert c.entries()[0].buffer is not first and c.entries()[0].buffer.nbytes == buffer_capacity(STATE // 4)
    assert c.spare_bytes == CAP
    c.discard(c.entries()[0])
    save(c, [4], size=3 * STATE)
    big = c.entries()[0].buffer
    c.discard(c.entries()[0])  # spares now: `first`, the small one, then `big`
    assert save(c, [5], size=3 * STATE) and c.entries()[0].buffer is big
    for i in range(MAX_SPARE_BUFFERS + 2):  # spare buffers are bounded in number
        save(c, [10 + i], size=STATE * (i + 2))
        c.discard(c.entries()[-1])
    assert len(c._spare) <= MAX_SPARE_BUFFERS
    assert c.bytes == sum(e.nbytes for e in c.entries()) + c.spare_bytes <= c.limit_bytes


def test_a_save_never_overwrites_the_entry_about_to_be_restored() -> None:
    c = PromptCache(limit_bytes=CAP + 64)  # room for one
    save(c, [1, 1])
    entry = c.entries()[0]
    assert not save(c, [2, 2], keep=entry)  # no room without it: the save is skipped
    assert c.entries() == [entry] and (entry.state == 1).all()
    assert save(c, [2, 2])  # without `keep`, the oldest goes and its buffer is reused
    assert c.entries()[0].buffer is entry.buffer and c.evictions == 1


def test_a_failed_fill_gives_its_buffer_back() -> None:
    c = PromptCache(limit_bytes=10 * CAP)

    def broken(out: np.ndarray) -> None:
        raise RuntimeError("llama_state_seq_get_data failed")

    with pytest.raises(RuntimeError):
        c.save([1, 2], STATE, broken)
    assert len(c) == 0 and c.saves == 0 and c.bytes == c.spare_bytes == CAP


def test_a_buffer_that_cannot_be_had_is_not_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    c = PromptCache(limit_bytes=10 * CAP)

    def no_memory(*args: object, **kwargs: object) -> np.ndarray:
        raise MemoryError("Unable to allocate")

    with monkeypatch.context() as m:
        m.setattr(prompt_cache.np, "empty", no_memory)
        with pytest.raises(MemoryError):
            save(c, [1, 2])
    assert len(c) == 0 and c.bytes == c.spare_bytes == 0
    assert save(c, [1, 2]) and c.bytes == CAP + 8


# --- llama.cpp's sequence state, saved and restored -----------------------------------------
def test_restored_state_gives_the_logits_of_a_fresh_prefill(model: LlamaModel) -> None:
    ctx = LlamaContext(
        model,
        ContextParams(n_ctx=3 * 512, n_batch=512, n_ubatch=512, n_seq_max=3, n_threads=2, n_threads_batch=2),
    )
    batch = Batch(512, 1)
    try:
        tokens = model.tokenize(passage(1), add_special=True)
        assert 100 < len(tokens) < 500

        def decode(seq: int, toks: list[int], start: int) -> np.ndarray:
            batch.clear()
            for i, t in enumerate(toks):
                batch.add(t, start + i, seq, i == len(toks) - 1)
            ctx.decode(batch)
            return ctx.logits(batch.n_tokens - 1).copy()

        fresh = decode(0, tokens, 0)  # the whole prompt in one go
        decode(1, tokens[:-1], 0)
        saved = ctx.seq_state(1)
        stepwise = decode(1, tokens[-1:], len(tokens) - 1)  # the same split, without a restore
        ctx.seq_rm(1)
        assert llama_cpp.llama_memory_seq_pos_max(ctx.memory, 1) == -1
        assert ctx.set_seq_state(2, saved)  # into another sequence, as the scheduler does
        assert llama_cpp.llama_memory_seq_pos_max(ctx.memory, 2) == len(tokens) - 2
        restored = decode(2, tokens[-1:], len(tokens) - 1)
        # exactly the logits of a fresh prefill split the same way (the scheduler's reuse of
        # its own slot splits prompts like this too)
        np.testing.assert_array_equal(restored, stepwise)
        # a one-go prefill rounds differently in llama.cpp (batch-size-dependent kernels),
        # but picks the same next token
        assert int(restored.argmax()) == int(fresh.argmax())
        assert not ctx.set_seq_state(1, saved[: len(saved) // 2])  # a torn state is refused
        assert llama_cpp.llama_memory_seq_pos_max(ctx.memory, 1) == -1
    finally:
        batch.free()
        ctx.close()


# --- slot choice ------------------------------------------------------------------------------
def test_distinct_long_prompts_take_empty_slots_and_keep_their_caches(
    model: LlamaModel, make_engine: list[ChatEngine]
) -> None:
    eng = engine(model, parallel=4, cache_mib=0)  # slot choice alone, no prompt cache
    make_engine.append(eng)
    prompts = [prompt(eng, i) for i in range(4)]
    for p in prompts:
        _, fin = run(eng, p)
        # only the template and system line are shared with any earlier prompt
        assert fin.cached_tokens < 0.1 * len(p)
    slots = eng.scheduler.slots
    for p in prompts:  # one conversation per slot: none overwrote another
        assert sum(1 for s in slots if s.cached[: len(p)] == p) == 1
    for i in range(4):
        follow = prompt(eng, i, "Which words repeat?")
        _, fin = run(eng, follow)
        assert fin.cached_tokens >= len(prompts[i]) - 16  # all but the question
    kv_matches_slots(eng)


def test_similar_prompt_reuses_its_slot_and_lru_takes_the_oldest(
    model: LlamaModel, make_engine: list[ChatEngine]
) -> None:
    eng = engine(model, parallel=2, cache_mib=0)
    make_engine.append(eng)
    a, b, c = (prompt(eng, i) for i in (10, 11, 12))
    run(eng, a)
    run(eng, b)
    slot_of = {id(s): s for s in eng.scheduler.slots}
    sa = next(s for s in slot_of.values() if s.cached[: len(a)] == a)
    run(eng, c)  # shares only the template: the least recently used slot (a's) is taken
    assert sa.cached[: len(c)] == c
    _, fin = run(eng, prompt(eng, 11, "Another question?"))  # mostly b: b's slot, by similarity
    assert fin.cached_tokens >= len(b) - 16


# --- the prompt cache ---------------------------------------------------------------------------
def test_conversations_outnumbering_slots_restore_from_the_cache(
    model: LlamaModel, make_engine: list[ChatEngine]
) -> None:
    eng = engine(model, parallel=2, cache_mib=256)
    # The reference keeps every conversation in a slot of its own: no prompt cache needed.
    ref = engine(model, parallel=5, cache_mib=0)
    make_engine += [eng, ref]
    ids = range(20, 25)
    firsts = [raw_prompt(eng, i, "What is it about?") for i in ids]
    # nothing shared, so both engines prefill every prompt from its first token alike
    assert all(a[0] != b[0] for a in firsts for b in firsts if a is not b)
    for p in firsts:
        run(eng, p)
        run(ref, p)
    cache = eng.scheduler.prompt_cache
    assert cache is not None and cache.saves >= 3 and cache.bytes <= cache.limit_bytes
    for i, p in zip(ids, firsts, strict=True):  # round robin: each follow-up's slot was overwritten since
        follow = raw_prompt(eng, i, "Name two words from it.")
        text, fin = run(eng, follow, max_tokens=12)
        assert fin.cached_tokens >= len(p) - 16, (i, fin.cached_tokens, len(p))
        ref_text, ref_fin = run(ref, follow, max_tokens=12)
        # the restored prefix continues exactly as the one that never left its slot
        assert ref_fin.cached_tokens == fin.cached_tokens and text == ref_text
    assert cache.hits >= 3 and cache.restored_tokens >= 3 * 300
    kv_matches_slots(eng)


def test_multi_turn_with_the_answer_appended_hits_the_cache(
    model: LlamaModel, make_engine: list[ChatEngine]
) -> None:
    eng = engine(model, parallel=1, cache_mib=256)
    make_engine.append(eng)
    first = prompt(eng, 30)
    answer, _ = run(eng, first, max_tokens=16)
    run(eng, prompt(eng, 31))  # another user takes the only slot
    turn2 = eng.tokenize_prompt(
        prompt_text(30) + answer + "<|im_end|>\n<|im_start|>user\nAnd the last word?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    _, fin = run(eng, turn2)
    assert fin.cached_tokens >= len(first)  # the passage, the question and what matches of the answer
    cache = eng.scheduler.prompt_cache
    assert cache is not None and cache.hits == 1


def test_cache_stays_within_its_byte_bound(model: LlamaModel, make_engine: list[ChatEngine]) -> None:
    eng = engine(model, parallel=1, cache_mib=24)
    make_engine.append(eng)
    cache = eng.scheduler.prompt_cache
    assert cache is not None
    prompts = [prompt(eng, 40 + i) for i in range(8)]
    for i, p in enumerate(prompts):
        run(eng, p)
        assert cache.bytes <= cache.limit_bytes == 24 * 1024 * 1024
        if i > 0:  # the previous prompt was saved when this one took the only slot
            assert cache.entries()[-1].tokens.tolist()[: len(prompts[i - 1])] == prompts[i - 1]
    # ~340 tokens x 23 KiB of f16 KV each, in buffers 1/8 larger: two fit, the oldest went
    assert cache.saves == 7 and cache.evictions >= 1 and len(cache) >= 2
    assert cache.bytes == sum(e.nbytes for e in cache.entries()) + cache.spare_bytes
    assert eng.stats()["prompt_cache_bytes"] == cache.bytes
    found = cache.best(prompts[0])
    assert found is None or found[1] < len(prompts[0]) // 2  # the oldest is gone


def test_restore_racing_a_cancel_leaves_slots_and_cache_consistent(
    model: LlamaModel, make_engine: list[ChatEngine]
) -> None:
    eng = engine(model, parallel=1, cache_mib=256)
    ref = engine(model, parallel=1, cache_mib=0)
    make_engine += [eng, ref]
    a, b = raw_prompt(eng, 50, "What is it about?"), raw_prompt(eng, 51, "What is it about?")
    assert a[0] != b[0]
    run(eng, a)
    run(ref, a)
    run(eng, b)  # a is in the cache now, b in the slot
    a2 = raw_prompt(eng, 50, "Is it long?")
    b2 = raw_prompt(eng, 51, "Is it short?")

    async def cancel_soon(tokens: list[int], delay: float) -> None:
        gen = await eng.start_completion(tokens, greedy(32))
        await asyncio.sleep(delay)
        gen.cancel()  # before, while or after the scheduler restores its prefix

    async def storm() -> None:
        for k in range(12):
            x, y = (a2, b2) if k % 2 else (b2, a2)
            await asyncio.gather(cancel_soon(x, 0.0), cancel_soon(y, 0.003 * k))
        while not eng.idle():
            await asyncio.sleep(0.01)

    asyncio.run(storm())
    kv_matches_slots(eng)
    cache = eng.scheduler.prompt_cache
    assert cache is not None and cache.bytes <= cache.limit_bytes
    # A new question on a's passage: whatever the storm left in the slot and the cache, the
    # passage's KV is the one a's first prefill computed, as in a reference that kept it.
    a3 = raw_prompt(eng, 50, "Name one word.")
    text, fin = run(eng, a3, max_tokens=12)
    ref_text, ref_fin = run(ref, a3, max_tokens=12)
    assert fin.cached_tokens >= len(a) - 16 and fin.cached_tokens == ref_fin.cached_tokens
    assert text == ref_text
    kv_matches_slots(eng)


def test_a_failed_save_loses_the_cache_entry_not_the_request(
    model: LlamaModel, make_engine: list[ChatEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    eng = engine(model, parallel=1, cache_mib=256)
    ref = engine(model, parallel=1, cache_mib=0)
    make_engine += [eng, ref]
    a, b = raw_prompt(eng, 60, "What is it about?"), raw_prompt(eng, 61, "What is it about?")
    run(eng, a)

    def torn(seq_id: int, out: np.ndarray | None = None) -> np.ndarray:
        raise DecodeError(f"llama_state_seq_get_data wrote 0 bytes for sequence {seq_id}")

    monkeypatch.setattr(eng.ctx, "seq_state", torn)
    text, fin = run(eng, b)  # evicts a's slot: its save fails
    cache = eng.scheduler.prompt_cache
    assert cache is not None and len(cache) == 0 and cache.saves == 0
    assert cache.bytes == cache.spare_bytes <= cache.limit_bytes
    assert (text, fin.cached_tokens) == (run(ref, b)[0], 0)  # b itself is answered as usual
    kv_matches_slots(eng)


def test_a_restore_that_raises_fails_its_request_alone(
    model: LlamaModel, make_engine: list[ChatEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever goes wrong while a request takes its slot (here llama.cpp's restore raising),
    that request and its n choices end with an error instead of waiting forever, and the
    scheduler serves the next one from a consistent KV cache."""
    eng = engine(model, parallel=3, cache_mib=256)
    ref = engine(model, parallel=1, cache_mib=0)
    make_engine += [eng, ref]
    a, b, c = (raw_prompt(eng, i, "What is it about?") for i in (70, 71, 72))
    for p in (a, b, c):
        run(eng, p)
    run(eng, raw_prompt(eng, 73, "What is it about?"))  # a goes to the cache
    follow = raw_prompt(eng, 70, "Is it long?")

    def broken(seq_id: int, state: np.ndarray) -> bool:
        raise RuntimeError("llama_state_seq_set_data crashed")

    async def ends(n: int) -> list[Finished]:
        async def one(g: Generation) -> Finished:
            async for ev in g:
                if isinstance(ev, Finished):
                    return ev
            raise AssertionError("no Finished event")

        gens = await eng.start_completions(follow, greedy(8), n)
        return await asyncio.wait_for(asyncio.gather(*(one(g) for g in gens)), 60)

    with monkeypatch.context() as m:
        m.setattr(eng.ctx, "set_seq_state", broken)
        for n in (1, 2):
            fins = asyncio.run(ends(n))
            assert [f.reason for f in fins] == ["error"] * n and all(f.error for f in fins)
    kv_matches_slots(eng)
    text, fin = run(eng, follow)  # a's passage restored from the cache, as if nothing had happened
    assert fin.cached_tokens >= len(a) - 16
    run(ref, a)  # the reference prefills a, then the follow-up, split the same way
    ref_text, _ = run(ref, follow)
    assert text == ref_text and eng.idle()
    kv_matches_slots(eng)


def test_a_fork_slot_is_never_saved_before_its_kv_copy_lands(
    model: LlamaModel, make_engine: list[ChatEngine]
) -> None:
    """n=2 with max_tokens=1: the second choice's slot gets the prompt's KV by a copy that
    llama.cpp makes only at the next decode, and it ends before any. The next request to take
    that slot must not save its stale buffer to the prompt cache as that prompt (nor restore
    into it): asked for again, the prompt continues exactly as on a fresh engine."""
    eng = engine(model, parallel=2, cache_mib=256)
    ref = engine(model, parallel=1, cache_mib=0)
    make_engine += [eng, ref]
    a, b, c = (raw_prompt(eng, i, "What is it about?") for i in (80, 81, 82))
    follow = raw_prompt(eng, 80, "Is it long?")

    async def two_choices() -> list[Finished]:
        gens = await eng.start_completions(a, greedy(1), 2)
        out = []
        for g in gens:
            async for ev in g:
                if isinstance(ev, Finished):
                    out.append(ev)
        return out

    assert [f.reason for f in asyncio.run(asyncio.wait_for(two_choices(), 120))] == ["length", "length"]
    first, fork = eng.scheduler.slots  # choice 0 prefilled in slot 0, choice 1 was forked into slot 1
    assert first.cached == fork.cached == a
    first.last_used, fork.last_used = 10**9, 0  # b takes the fork slot, evicting a's copy there
    run(eng, b)
    first.last_used = 0  # c takes the first slot: a leaves the slots for good
    run(eng, c)
    text, fin = run(eng, follow)  # a's passage comes back from the prompt cache
    assert fin.cached_tokens >= len(a) - 16
    run(ref, a)
    ref_text, _ = run(ref, follow)
    assert text == ref_text
    kv_matches_slots(eng)
