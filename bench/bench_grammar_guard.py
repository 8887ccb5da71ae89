"""Cost of SamplerChain.sample with and without a grammar (issue 18's guard), beside the plain
llama_sampler_sample path, on the demo model's logits (49152 tokens), one thread.

    .venv/bin/python -m bench.bench_grammar_guard
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import llama_cpp as llama

from gguf_serve.engine.llama_runtime import Batch, ContextParams, LlamaContext, LlamaModel
from gguf_serve.engine.requests import SamplingParams
from gguf_serve.engine.sampling import SamplerChain
from tests.e2e.server import demo_chat_gguf

m = LlamaModel(demo_chat_gguf())
ctx = LlamaContext(
    m, ContextParams(n_ctx=256, n_batch=64, n_ubatch=64, n_seq_max=1, n_threads=1, n_threads_batch=1)
)
b = Batch(64)
toks = m.tokenize("Once upon a time", add_special=True, parse_special=True)
for i, t in enumerate(toks):
    idx = b.add(t, i, 0, i == len(toks) - 1)
ctx.decode(b)
P = dict(temperature=0.8, top_k=40, top_p=0.9, min_p=0.05, repeat_penalty=1.1)


def per_call(fn: Callable[[], Any], n: int = 3000) -> float:
    for _ in range(100):
        fn()
    runs = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t) / n * 1e6)
    return statistics.median(runs)


plain = SamplerChain(m, SamplingParams(**P))
raw = plain.ptr
print(
    f"no grammar, raw llama_sampler_sample : {per_call(lambda: llama.llama_sampler_sample(raw, ctx.ptr, idx)):8.1f} us/token"
)
print(f"no grammar, SamplerChain.sample      : {per_call(lambda: plain.sample(ctx.ptr, idx)):8.1f} us/token")
G = "root ::= [a-zA-Z ,.]*"


def old_style() -> Any:  # the grammar inside the chain, as before (llama_sampler_sample)
    sp = llama.llama_sampler_chain_default_params()
    c = llama.llama_sampler_chain_init(sp)
    llama.llama_sampler_chain_add(c, llama.llama_sampler_init_grammar(m.vocab, G.encode(), b"root"))
    for s in (
        llama.llama_sampler_init_penalties(m.n_vocab, 64, 1.1, 0.0, 0.0),
        llama.llama_sampler_init_top_k(40),
        llama.llama_sampler_init_top_p(0.9, 1),
        llama.llama_sampler_init_min_p(0.05, 1),
        llama.llama_sampler_init_temp(0.8),
        llama.llama_sampler_init_dist(1),
    ):
        llama.llama_sampler_chain_add(c, s)
    return c


oc = old_style()
print(
    f"grammar, in the chain (before)       : {per_call(lambda: llama.llama_sampler_sample(oc, ctx.ptr, idx), 300):8.1f} us/token"
)
gc = SamplerChain(m, SamplingParams(grammar=G, **P))
print(
    f"grammar, guarded (now)               : {per_call(lambda: gc.sample(ctx.ptr, idx), 300):8.1f} us/token"
)
