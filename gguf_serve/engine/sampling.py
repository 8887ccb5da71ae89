"""Per-sequence sampler chains built from llama.cpp's own samplers (and its grammar)."""

from __future__ import annotations

import ctypes
import random

import llama_cpp as llama

from gguf_serve.engine.llama_runtime import LlamaModel
from gguf_serve.engine.requests import InvalidRequest, SamplingParams


class SamplerChain:
    """Owns one llama_sampler chain. Order follows llama.cpp's common defaults:
    logit bias -> penalties -> top_k -> top_p -> min_p -> temperature -> dist,
    with the grammar first so that every later step sees only allowed tokens."""

    def __init__(self, model: LlamaModel, p: SamplingParams) -> None:
        sparams = llama.llama_sampler_chain_default_params()
        sparams.no_perf = True
        self.ptr = llama.llama_sampler_chain_init(sparams)
        self.seed = p.seed if p.seed is not None and p.seed >= 0 else random.getrandbits(32)
        add = self._add
        if p.grammar:
            g = llama.llama_sampler_init_grammar(model.vocab, p.grammar.encode(), b"root")
            if not g:
                self.free()
                raise InvalidRequest("the grammar (from response_format or tools) could not be parsed")
            add(g)
        if p.logit_bias:
            n = len(p.logit_bias)
            arr = (llama.llama_logit_bias * n)()
            for i, (tok, bias) in enumerate(p.logit_bias.items()):
                if not 0 <= tok < model.n_vocab:
                    self.free()
                    raise InvalidRequest(f"logit_bias token {tok} is outside the vocabulary", "logit_bias")
                arr[i].token = tok  # type: ignore[assignment]  # ctypes converts
                arr[i].bias = bias
            add(llama.llama_sampler_init_logit_bias(model.n_vocab, n, arr))
        if p.repeat_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
            add(
                llama.llama_sampler_init_penalties(
                    model.n_vocab, p.penalty_last_n, p.repeat_penalty, p.frequency_penalty, p.presence_penalty
                )
            )
        if p.temperature <= 0.0:
            add(llama.llama_sampler_init_greedy())
        else:
            if p.top_k > 0:
                add(llama.llama_sampler_init_top_k(p.top_k))
            if p.top_p < 1.0:
                add(llama.llama_sampler_init_top_p(p.top_p, 1))
            if p.min_p > 0.0:
                add(llama.llama_sampler_init_min_p(p.min_p, 1))
            add(llama.llama_sampler_init_temp(p.temperature))
            add(llama.llama_sampler_init_dist(self.seed))

    def _add(self, s: ctypes.c_void_p) -> None:
        llama.llama_sampler_chain_add(self.ptr, s)

    def sample(self, ctx_ptr: ctypes.c_void_p, batch_index: int) -> int:
        # llama_sampler_sample also accepts the token into every sampler of the chain
        # (penalty history, grammar state).
        return int(llama.llama_sampler_sample(self.ptr, ctx_ptr, batch_index))

    def free(self) -> None:
        if self.ptr:
            llama.llama_sampler_free(self.ptr)
            self.ptr = None
