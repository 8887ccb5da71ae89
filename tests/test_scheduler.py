"""ChatScheduler on real weights (SmolLM2-135M), no HTTP: prefix reuse, cancel during
prefill, QueueFull, a failed decode, shutdown while streaming."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from gguf_serve.engine.chat import ChatEngine
from gguf_serve.engine.llama_runtime import DecodeError, LlamaModel
from gguf_serve.engine.requests import (
    ChatMessage,
    ChatRequest,
    Finished,
    QueueFull,
    SamplingParams,
    TextChunk,
)
from gguf_serve.engine.scheduler import Generation, SlotState
from gguf_serve.settings import Limits, ModelSettings
from tests.e2e.server import demo_chat_gguf

STORY = "Once upon a time, in a small village by the sea, there lived an old fisherman. "
GREEDY = {"temperature": 0.0, "top_k": 1}


@pytest.fixture(scope="module")
def model() -> Iterator[LlamaModel]:
    m = LlamaModel(demo_chat_gguf())
    yield m
    m.close()


def make_engine(model: LlamaModel, **kw: Any) -> ChatEngine:
    limits = Limits(max_queue=kw.pop("max_queue", 4))
    ms = ModelSettings(id="smol", file="x", **{"n_ctx": 2048, "parallel": 2, "n_batch": 256, **kw})
    return ChatEngine(model, ms, limits)


@pytest.fixture
def engine(model: LlamaModel) -> Iterator[ChatEngine]:
    e = make_engine(model)
    yield e
    assert e.close(), "the scheduler thread did not stop"


def params(**kw: Any) -> SamplingParams:
    return SamplingParams(**{**GREEDY, "max_tokens": 8, **kw})


async def collect(gen: Generation) -> tuple[str, Finished]:
    text: list[str] = []
    async for ev in gen:
        if isinstance(ev, TextChunk):
            text.append(ev.text)
        else:
            return "".join(text), ev
    raise AssertionError("no Finished event")


def wait_for(cond: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def test_a_shared_prefix_is_not_prefilled_again(engine: ChatEngine) -> None:
    prompt = STORY * 6

    async def twice() -> tuple[tuple[str, Finished], tuple[str, Finished]]:
        first = await collect(await engine.start_completion(prompt, params()))
        second = await collect(await engine.start_completion(prompt, params()))
        return first, second

    (text1, fin1), (text2, fin2) = asyncio.run(twice())
    n_prompt = len(engine.tokenize_prompt(prompt))
    assert fin1.prompt_tokens == fin2.prompt_tokens == n_prompt and fin1.cached_tokens == 0
    # all but the last prompt token came from the slot's cache, and greedy output is the same
    assert fin2.cached_tokens == n_prompt - 1
    assert text1 == text2 and fin1.reason == fin2.reason == "length"


def test_cancel_during_prefill_frees_the_slot(model: LlamaModel) -> None:
    # 64-token batches: a prompt of ~1,500 tokens takes many steps to prefill.
    engine = make_engine(model, n_batch=64, n_ubatch=64, parallel=1)
    try:

        async def cancel_in_prefill() -> tuple[Finished, tuple[str, Finished]]:
            gen = await engine.start_completion(STORY * 60, params())
            slot = engine.scheduler.slots[0]
            await asyncio.to_thread(wait_for, lambda: slot.state is SlotState.PREFILL and slot.prompt_pos > 0)
            gen.cancel()
            events = [ev async for ev in gen]
            assert all(not isinstance(ev, TextChunk) for ev in events)  # nothing was generated
            fin = events[-1]
            assert isinstance(fin, Finished)
            return fin, await collect(await engine.start_completion("Hello", params(max_tokens=2)))

        fin, (_, after) = asyncio.run(cancel_in_prefill())
        assert fin.reason == "cancelled" and fin.completion_tokens == 0
        assert after.reason == "length" and after.completion_tokens == 2
        assert engine.idle()
    finally:
        assert engine.close()


def test_queue_full_then_served_once_there_is_room(model: LlamaModel) -> None:
    engine = make_engine(model, parallel=1, max_queue=0)
    try:

        async def over_capacity() -> tuple[str, Finished]:
            busy = await engine.start_completion(STORY, params(max_tokens=500, ignore_eos=True))
            # the scheduler thread admits it into the only slot; until then the slot looks free
            slot = engine.scheduler.slots[0]
            await asyncio.to_thread(wait_for, lambda: slot.job is not None)
            with pytest.raises(QueueFull, match="busy") as e:
                await engine.start_completion("Hello", params())
            assert e.value.status == 429 and e.value.retry_after_s > 0
            busy.cancel()
            async for _ in busy:
                pass
            return await collect(await engine.start_completion("Hello", params(max_tokens=3)))

        _, fin = asyncio.run(over_capacity())
        assert fin.completion_tokens == 3
    finally:
        assert engine.close()


def test_a_full_queue_refuses_before_rendering_or_tokenizing(
    model: LlamaModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ChatScheduler.check_capacity runs first: a busy server does not render templates or
    tokenize prompts (of any length) only to refuse them in submit."""
    engine = make_engine(model, parallel=1, max_queue=0)
    try:

        async def refused() -> tuple[str, Finished]:
            busy = await engine.start_completion(STORY, params(max_tokens=500, ignore_eos=True))
            slot = engine.scheduler.slots[0]
            await asyncio.to_thread(wait_for, lambda: slot.job is not None)
            calls: list[str] = []

            def counted(name: str, real: Any) -> Any:
                def wrapper(*a: Any, **kw: Any) -> Any:
                    calls.append(name)
                    return real(*a, **kw)

                return wrapper

            monkeypatch.setattr(engine, "render_now", counted("render", engine.render_now))
            monkeypatch.setattr(engine, "tokenize_prompt", counted("tokenize", engine.tokenize_prompt))
            chat = ChatRequest([ChatMessage(role="user", content=STORY * 50)], params())
            with pytest.raises(QueueFull, match="busy"):
                await engine.start_chat(chat)
            with pytest.raises(QueueFull, match="busy"):
                await engine.start_completion(STORY * 50, params())
            assert calls == []
            busy.cancel()
            async for _ in busy:
                pass
            # with room again the same request is rendered, tokenized and served
            stream = await engine.start_chat(ChatRequest([ChatMessage(role="user", content="Hi")], params()))
            assert calls == ["render", "tokenize"]
            return await collect(stream.generation)

        _, fin = asyncio.run(refused())
        assert fin.completion_tokens > 0
    finally:
        assert engine.close()


def test_a_request_cancelled_while_it_waits_for_a_slot_still_ends(model: LlamaModel) -> None:
    # The only slot is busy, so the second request waits; cancelled there, its reader must still
    # get Finished("cancelled") (it hung forever before, e.g. when a loaded machine admitted late).
    engine = make_engine(model, parallel=1, max_queue=1)
    try:

        async def cancel_waiting() -> Finished:
            busy = await engine.start_completion(STORY, params(max_tokens=500, ignore_eos=True))
            waiting = await engine.start_completion("Hello", params())
            waiting.cancel()
            events = [ev async for ev in waiting]
            busy.cancel()
            async for _ in busy:
                pass
            assert len(events) == 1 and isinstance(events[0], Finished)
            return events[0]

        fin = asyncio.run(asyncio.wait_for(cancel_waiting(), timeout=60))
        assert fin.reason == "cancelled" and fin.completion_tokens == 0
        assert engine.idle()
    finally:
        assert engine.close()


def test_a_failed_decode_ends_its_requests_with_an_error_and_the_model_serves_on(
    engine: ChatEngine,
) -> None:
    ctx = engine.ctx
    real_decode = ctx.decode
    failed = threading.Event()

    def decode_once_failing(batch: Any) -> None:
        if not failed.is_set():
            failed.set()
            raise DecodeError("llama_decode returned 1 (no KV slot for the batch)")
        real_decode(batch)

    ctx.decode = decode_once_failing  # type: ignore[method-assign]
    try:

        async def run() -> tuple[tuple[str, Finished], tuple[str, Finished]]:
            bad = await collect(await engine.start_completion(STORY, params()))
            good = await collect(await engine.start_completion(STORY, params()))
            return bad, good

        (_, bad), (text, good) = asyncio.run(run())
    finally:
        ctx.decode = real_decode  # type: ignore[method-assign]
    assert bad.reason == "error" and bad.error and "could not process" in bad.error
    # the failed sequence's cache was dropped: the retry prefills from scratch and works
    assert good.reason == "length" and good.cached_tokens == 0 and text


def test_shutdown_while_streaming_ends_the_stream(model: LlamaModel) -> None:
    engine = make_engine(model)

    async def stream_then_close() -> tuple[list[str], Finished, bool]:
        gen = await engine.start_completion(STORY, params(max_tokens=1000, ignore_eos=True))
        texts: list[str] = []
        closed = False
        async for ev in gen:
            if isinstance(ev, TextChunk):
                texts.append(ev.text)
                if len(texts) == 3:
                    closed = await asyncio.to_thread(engine.close)
            else:
                return texts, ev, closed
        raise AssertionError("no Finished event")

    texts, fin, closed = asyncio.run(stream_then_close())
    assert closed and fin.reason == "cancelled" and len(texts) >= 3
    assert fin.completion_tokens < 1000


def test_close_frees_nothing_while_a_decode_is_running(model: LlamaModel) -> None:
    """ChatScheduler.close used to free its batch after the join timed out, under a live decode."""
    engine = make_engine(model, n_batch=2048, n_ubatch=2048, parallel=1)

    async def close_mid_decode() -> tuple[bool, Finished]:
        gen = await engine.start_completion(STORY * 100, params())  # one ~1,700-token decode
        slot = engine.scheduler.slots[0]
        await asyncio.to_thread(wait_for, lambda: slot.prompt_pos > 0)  # set just before llama_decode
        stopped_at_once = engine.scheduler.close(timeout_s=0)
        events = [ev async for ev in gen]
        fin = events[-1]
        assert isinstance(fin, Finished)
        return stopped_at_once, fin

    stopped_at_once, fin = asyncio.run(close_mid_decode())
    assert not stopped_at_once  # the decode was still running: nothing was freed
    assert fin.reason == "cancelled"
    assert engine.close()  # the thread has ended by now: everything is freed
