"""The CPU budget the engines share (engine/cpu_budget.py): the split, the claim that lapses,
the table across processes, and a llama.cpp context that really decodes with its share."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator

import llama_cpp as llama
import pytest

from gguf_serve.engine.cpu_budget import LINGER_S, CpuBudget, CpuShare
from gguf_serve.engine.llama_runtime import Batch, ContextParams, LlamaContext, LlamaModel
from tests.e2e.server import demo_chat_gguf


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def budget() -> Iterator[CpuBudget]:
    b = CpuBudget(threads=4)
    yield b
    b.close()


def test_a_lone_engine_gets_the_whole_budget(budget: CpuBudget) -> None:
    a = CpuShare(budget.slot())
    CpuShare(budget.slot())  # another engine that is not decoding
    assert a.claim() == 4


def test_engines_decoding_together_split_it_and_idle_ones_give_it_back(budget: CpuBudget) -> None:
    clock = Clock()
    a, b, c = (CpuShare(budget.slot(), clock) for _ in range(3))
    assert a.claim() == 4
    assert b.claim() == 2  # a is still decoding
    assert a.claim() == 2
    assert c.claim() == 1  # 4 threads, 3 engines: the first in slot order get the remainder
    assert a.claim() == 2 and b.claim() == 1
    a.release()
    c.release()
    assert b.claim() == 1  # a and c just finished a decode: they may start the next one at once
    clock.now += LINGER_S + 0.01
    assert b.claim() == 4  # they did not: their claims lapsed


def test_never_fewer_than_one_thread() -> None:
    budget = CpuBudget(threads=2)
    try:
        shares = [CpuShare(budget.slot()) for _ in range(3)]
        assert [s.claim() for s in shares] == [2, 1, 1]
    finally:
        budget.close()


def test_the_table_is_shared_with_an_engine_process_and_a_dead_ones_claim_is_forgotten(
    budget: CpuBudget,
) -> None:
    mine, theirs = budget.slot(), budget.slot()
    child = textwrap.dedent(
        f"""
        from gguf_serve.engine.cpu_budget import CpuShare, CpuSlot
        CpuShare(CpuSlot({theirs.fd}, {theirs.index}, {theirs.threads})).claim()
        """
    )
    # The child claims and exits in the middle of its "decode", as a crashed engine would.
    subprocess.run([sys.executable, "-c", child], pass_fds=(theirs.fd,), check=True, timeout=60)
    me = CpuShare(mine)
    assert me.claim() == 2
    CpuShare(theirs).forget()  # what EngineClient does when the process is gone
    assert me.claim() == 4


def test_a_context_decodes_with_its_share() -> None:
    budget = CpuBudget(threads=2)
    model = LlamaModel(demo_chat_gguf())
    try:
        model.cpu = CpuShare(budget.slot())
        other = CpuShare(budget.slot())
        ctx = LlamaContext(model, ContextParams(64, 8, 8, 1, n_threads=2, n_threads_batch=2))
        batch = Batch(8)
        try:
            batch.add(model.bos, 0, 0, True)
            ctx.decode(batch)
            assert ctx.threads == (2, 2) and llama.llama_n_threads(ctx.ptr) == 2
            other.claim()  # another model starts decoding
            ctx.seq_rm(0)
            ctx.decode(batch)
            assert ctx.threads == (1, 1)
            assert llama.llama_n_threads(ctx.ptr) == 1 and llama.llama_n_threads_batch(ctx.ptr) == 1
            other.forget()
            ctx.seq_rm(0)
            ctx.decode(batch)
            assert llama.llama_n_threads(ctx.ptr) == 2
        finally:
            batch.free()
            ctx.close()
    finally:
        model.close()
        budget.close()
