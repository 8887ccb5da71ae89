"""Per-sequence sampler chains built from llama.cpp's own samplers (and its grammar)."""

from __future__ import annotations

import ctypes
import math
import random

import llama_cpp as llama
import numpy as np

from gguf_serve.engine.grammar_check import GrammarError, check_grammar
from gguf_serve.engine.llama_runtime import LlamaModel
from gguf_serve.engine.requests import InvalidRequest, SamplingParams

# llama_token_data as numpy sees it: one row per vocabulary entry.
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


class NoTokenAllowed(Exception):
    """The grammar admits no token here (not even end of generation). llama.cpp would accept
    a forbidden token anyway and throw from inside llama_sampler_sample, which kills the
    process; the request ends with this message instead."""


class SamplerChain:
    """Owns one llama_sampler chain. Order follows llama.cpp's common defaults:
    logit bias -> penalties -> top_k -> top_p -> min_p -> temperature -> dist,
    with the grammar first so that every later step sees only allowed tokens.

    The grammar is its own sampler, applied before the chain: when it leaves no finite
    candidate the request ends (NoTokenAllowed) instead of llama.cpp accepting a forbidden
    token. Without a grammar, sampling is llama_sampler_sample as before."""

    def __init__(self, model: LlamaModel, p: SamplingParams) -> None:
        self.ptr: ctypes.c_void_p | None = None
        self.grammar: ctypes.c_void_p | None = None
        if p.grammar:
            try:
                check_grammar(p.grammar, model.n_vocab)
            except GrammarError as e:
                raise InvalidRequest(str(e), "grammar") from None
            g = llama.llama_sampler_init_grammar(model.vocab, p.grammar.encode(), b"root")
            if not g:
                raise InvalidRequest(
                    "llama.cpp could not parse the grammar (left recursion, or a <token> that is not exactly one token?)",
                    "grammar",
                )
            self.grammar = g
            self.n_vocab = model.n_vocab
            self._cur = (llama.llama_token_data * model.n_vocab)()
            self._rows = np.frombuffer(memoryview(self._cur), dtype=_TOKEN_DATA)
            self._ids = np.arange(model.n_vocab, dtype=np.int32)
        sparams = llama.llama_sampler_chain_default_params()
        sparams.no_perf = True
        self.ptr = llama.llama_sampler_chain_init(sparams)
        self.seed = p.seed if p.seed is not None and p.seed >= 0 else random.getrandbits(32)
        add = self._add
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
        if self.grammar is None:
            # llama_sampler_sample also accepts the token into every sampler of the chain
            # (penalty history).
            return int(llama.llama_sampler_sample(self.ptr, ctx_ptr, batch_index))
        return self._sample_with_grammar(ctx_ptr, batch_index)

    def _sample_with_grammar(self, ctx_ptr: ctypes.c_void_p, batch_index: int) -> int:
        """What llama_sampler_sample does, with the grammar applied first and checked."""
        logits = np.ctypeslib.as_array(
            llama.llama_get_logits_ith(ctx_ptr, batch_index), shape=(self.n_vocab,)
        )
        rows = self._rows
        rows["id"] = self._ids
        rows["logit"] = logits
        rows["p"] = 0.0
        cur_p = llama.llama_token_data_array(
            data=ctypes.cast(self._cur, llama.llama_token_data_p),
            size=self.n_vocab,
            selected=-1,
            sorted=False,
        )
        llama.llama_sampler_apply(self.grammar, ctypes.byref(cur_p))
        if not np.isfinite(rows["logit"]).any():
            raise NoTokenAllowed(
                "the grammar admits no token at this point of the output (not even the end): "
                "check its token references and characters"
            )
        llama.llama_sampler_apply(self.ptr, ctypes.byref(cur_p))
        sel = int(cur_p.selected)
        if not 0 <= sel < int(cur_p.size) or not math.isfinite(cur_p.data[sel].logit):
            raise NoTokenAllowed("no token the grammar admits survived sampling")
        token = int(cur_p.data[sel].id)
        llama.llama_sampler_accept(self.grammar, token)
        llama.llama_sampler_accept(self.ptr, token)
        return token

    def free(self) -> None:
        if self.ptr:
            llama.llama_sampler_free(self.ptr)
            self.ptr = None
        if self.grammar:
            llama.llama_sampler_free(self.grammar)
            self.grammar = None
