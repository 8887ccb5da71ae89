"""A chat model: its template, its scheduler, and the parsers that shape its output."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from llama_cpp.llama_grammar import JSON_GBNF

from gguf_serve.engine.chat_template import CHATML_TEMPLATE, ChatTemplate, check_template_kwargs
from gguf_serve.engine.context_size import context_size
from gguf_serve.engine.grammar_check import GrammarError, check_json_schema
from gguf_serve.engine.json_grammar import json_schema_gbnf
from gguf_serve.engine.llama_runtime import ContextParams, LlamaContext, LlamaModel, usable_cpus
from gguf_serve.engine.model_defaults import GGUF_SAMPLING_KEYS
from gguf_serve.engine.model_info import ModelInfo, model_info
from gguf_serve.engine.off_loop import off_loop
from gguf_serve.engine.prompt_cache import PromptCache
from gguf_serve.engine.reasoning import ReasoningParser
from gguf_serve.engine.requests import (
    ChatDelta,
    ChatRequest,
    EngineHealth,
    Finished,
    InvalidRequest,
    SamplingParams,
    TextChunk,
    ToolCall,
)
from gguf_serve.engine.scheduler import ChatScheduler, Generation
from gguf_serve.engine.tool_calls import ToolCallParser, forced_call_grammar, forced_tool
from gguf_serve.engine.vocabulary import Vocabulary, check_token_ids
from gguf_serve.settings import Limits, ModelSettings


def grammar_for_json_schema(schema: dict[str, Any]) -> str:
    """A JSON schema (response_format's, llama-server's top-level `json_schema`, or any other
    API's) -> GBNF through llama.cpp's own converter, after the caps on its size and depth.
    `{"type": "object"}` alone (response_format json_object) is any JSON object."""
    try:
        check_json_schema(schema)
    except GrammarError as e:
        raise InvalidRequest(str(e), "json_schema") from None
    if schema == {"type": "object"}:
        return JSON_GBNF
    try:
        return json_schema_gbnf(schema)
    except Exception as e:
        raise InvalidRequest(f"unsupported JSON schema: {e}", "json_schema") from e


def compile_grammar(params: SamplingParams) -> None:
    if params.json_schema is not None and params.grammar is None:
        params.grammar = grammar_for_json_schema(params.json_schema)


# Stands in for the final message's content while the template renders, so that the prompt
# can be cut right where that content belongs (templates strip or rewrite content).
PREFILL_MARK = "\x00gguf-serve-prefill\x00"


def _cancel_each(streams: list[ChatStream] | list[Generation]) -> None:
    for s in streams:
        s.cancel()


class ChatEngine(Vocabulary):
    def __init__(self, model: LlamaModel, ms: ModelSettings, limits: Limits) -> None:
        self.model = model
        self.settings = ms
        size = context_size(ms, model.n_ctx_train)
        threads = ms.n_threads or usable_cpus()
        # One KV stream per slot: sequences never evict each other, and results do not
        # depend on what else is in the batch (greedy output equals the sequential one).
        self.ctx = LlamaContext(
            model,
            ContextParams(
                n_ctx=size.n_ctx,
                n_batch=size.n_batch,
                n_ubatch=ms.ubatch,
                n_seq_max=ms.parallel,
                n_threads=threads,
                n_threads_batch=ms.n_threads_batch or threads,
                flash_attn=ms.flash_attn,
                type_k=ms.cache_type_k,
                type_v=ms.cache_type_v,
                kv_unified=False,
            ),
        )
        bos = model.detokenize([model.bos], special=True) if model.bos >= 0 else ""
        eos = model.detokenize([model.eos], special=True) if model.eos >= 0 else ""
        source = ms.chat_template or model.chat_template() or CHATML_TEMPLATE
        self.template = ChatTemplate(source, bos, eos)
        cache_bytes = ms.prompt_cache_bytes
        self.scheduler = ChatScheduler(
            model,
            self.ctx,
            ms.parallel,
            limits.max_queue,
            ms.id,
            prompt_cache=PromptCache(cache_bytes) if cache_bytes > 0 else None,
            slot_similarity=ms.slot_similarity,
        )

        sampling_keys = tuple(key for key, _ in GGUF_SAMPLING_KEYS.values())
        self._info = model_info(model, self.scheduler.n_ctx_seq, ms.parallel, source, sampling_keys)

    @property
    def n_ctx(self) -> int:
        return self.scheduler.n_ctx_seq

    @property
    def info(self) -> ModelInfo:
        return self._info

    # --- prompts ------------------------------------------------------------------------------
    def tokenize_prompt(self, text: str) -> list[int]:
        # A template that already wrote the BOS text must not get a second BOS.
        bos_text = self.template.bos_token
        add_special = not (bos_text and text.startswith(bos_text))
        return self.model.tokenize(text, add_special=add_special, parse_special=True)

    async def render(self, req: ChatRequest) -> str:
        return await off_loop(lambda: self.render_now(req))

    def render_now(self, req: ChatRequest) -> str:
        if not req.messages:
            raise InvalidRequest("messages must not be empty", "messages")
        check_template_kwargs(req.template_kwargs)
        tools = req.tools if req.tools_enabled else None
        messages = [m.as_template_dict() for m in req.messages]
        if not req.continue_final_message:
            return self.template.render(
                messages, tools=tools, add_generation_prompt=req.add_generation_prompt, **req.template_kwargs
            )
        # Assistant prefill: the prompt ends inside the last message, after its content.
        final = messages[-1]
        if final["role"] != "assistant":
            raise InvalidRequest("continue_final_message needs an assistant message last", "messages")
        text = final["content"]
        rendered = self.template.render(
            [*messages[:-1], {**final, "content": PREFILL_MARK}],
            tools=tools,
            add_generation_prompt=False,
            **req.template_kwargs,
        )
        cut = rendered.rfind(PREFILL_MARK)
        if cut < 0:
            raise InvalidRequest(
                "this model's chat template does not render the final assistant message; "
                "it cannot be continued",
                "continue_final_message",
            )
        return rendered[:cut] + text

    # --- generation ---------------------------------------------------------------------------
    # Render, tokenize, compile the grammar and queue in a worker thread (errors raise here);
    # the answer streams later. A caller that goes away meanwhile cancels what was queued.
    async def start_chat(self, req: ChatRequest) -> ChatStream:
        return (await self.start_chats(req, 1))[0]

    async def start_chats(self, req: ChatRequest, n: int) -> list[ChatStream]:
        """OpenAI's n: `n` answers to one prompt, which is prefilled once."""
        loop = asyncio.get_running_loop()
        return await off_loop(lambda: self._start_chats(req, n, loop), _cancel_each)

    async def start_completion(self, prompt: str | list[int], params: SamplingParams) -> Generation:
        return (await self.start_completions(prompt, params, 1))[0]

    async def start_completions(
        self, prompt: str | list[int], params: SamplingParams, n: int
    ) -> list[Generation]:
        loop = asyncio.get_running_loop()
        return await off_loop(lambda: self._start_completions(prompt, params, n, loop), _cancel_each)

    def _start_chats(self, req: ChatRequest, n: int, loop: asyncio.AbstractEventLoop) -> list[ChatStream]:
        self.scheduler.check_capacity()  # a full queue refuses before rendering and tokenizing
        prompt = self.render_now(req)
        tokens = self.tokenize_prompt(prompt)
        params = req.params
        compile_grammar(params)
        forced, name = forced_tool(req.tool_choice) if req.tools_enabled else (False, None)
        if forced and params.grammar is None and req.tools:
            params.grammar = forced_call_grammar(req.tools, name)
        # Inside an open <think> (a Thinking template's prompt, or a prefill that opened one).
        thinking = prompt.rstrip().endswith("<think>") or (
            req.continue_final_message and prompt.rfind("<think>") > prompt.rfind("</think>")
        )
        parse_reasoning = self.settings.reasoning and req.parse_reasoning and params.grammar is None
        return [
            ChatStream(
                generation,
                ReasoningParser(in_reasoning=thinking) if parse_reasoning else None,
                ToolCallParser() if req.tools_enabled else None,
            )
            for generation in self.scheduler.start_n(tokens, params, n, loop)
        ]

    def _start_completions(
        self, prompt: str | list[int], params: SamplingParams, n: int, loop: asyncio.AbstractEventLoop
    ) -> list[Generation]:
        self.scheduler.check_capacity()  # a full queue refuses before tokenizing
        tokens = self.tokenize_prompt(prompt) if isinstance(prompt, str) else list(prompt)
        if not tokens:
            raise InvalidRequest("prompt must not be empty", "prompt")
        check_token_ids(self.model, tokens, "prompt")
        compile_grammar(params)
        return self.scheduler.start_n(tokens, params, n, loop)

    def stats(self) -> dict[str, float]:
        return self.scheduler.stats()

    def idle(self) -> bool:
        return self.scheduler.idle()

    def health(self) -> EngineHealth:
        return self.scheduler.health()

    def close(self) -> bool:
        """True when everything was freed (see ChatScheduler.close)."""
        if not self.scheduler.close():
            return False
        self.ctx.close()
        return True


class ChatStream:
    """A chat answer as deltas: reasoning, content and tool calls kept apart, then Finished."""

    def __init__(
        self, generation: Generation, reasoning: ReasoningParser | None, tools: ToolCallParser | None
    ) -> None:
        self.generation = generation
        self._reasoning = reasoning
        self._tools = tools
        self._made_calls = False

    def _split(self, text: str, final: bool = False) -> list[ChatDelta]:
        rp, tp = self._reasoning, self._tools
        r, c = rp.feed(text) if rp is not None else ("", text)
        if final and rp is not None:
            r2, c2 = rp.flush()
            r, c = r + r2, c + c2
        calls: list[ToolCall] = []
        if tp is not None:
            c, calls = tp.feed(c)
            if final:
                c2, calls2 = tp.flush()
                c, calls = c + c2, calls + calls2
        self._made_calls = self._made_calls or bool(calls)
        out = []
        if r:  # reasoning and content never share a delta
            out.append(ChatDelta(reasoning=r))
        if c or calls:
            out.append(ChatDelta(content=c, tool_calls=calls))
        return out

    async def __aiter__(self) -> AsyncIterator[ChatDelta | Finished]:
        async for ev in self.generation:
            if isinstance(ev, TextChunk):
                deltas = self._split(ev.text)
                if ev.logprobs:
                    if deltas:
                        deltas[-1].logprobs = ev.logprobs
                    else:
                        deltas = [ChatDelta(logprobs=ev.logprobs)]
                for d in deltas:
                    yield d
            else:
                for d in self._split("", final=True):
                    yield d
                if self._made_calls and ev.reason == "stop":
                    ev.reason = "tool_calls"
                yield ev

    def cancel(self) -> None:
        self.generation.cancel()
