"""The Ollama, Anthropic and Responses routes' shapes for an answer with reasoning, text and a
tool call, read back by the real clients (ollama, anthropic, openai) in-process.

The demo model neither reasons nor calls tools on its own, so a scripted chat engine stands in
behind the ChatModel Protocol (engine/interfaces.py): the routes cannot tell, and what is tested
is the API layer's translation of ChatDelta/Finished events into each protocol's stream.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import anthropic
import ollama
import openai
import pytest
import uvicorn
from fastapi import FastAPI

from gguf_serve.api.errors import install_error_handlers
from gguf_serve.api.routes import anthropic as anthropic_routes
from gguf_serve.api.routes import ollama as ollama_routes
from gguf_serve.api.routes import responses as responses_routes
from gguf_serve.engine.model_info import ModelInfo
from gguf_serve.engine.registry import LoadedModel, LoadState
from gguf_serve.engine.requests import ChatDelta, ChatRequest, Finished, ModelNotFound, ToolCall
from gguf_serve.settings import ModelSettings, Settings

MS = ModelSettings(id="qwen3", file="qwen3.gguf")
INFO = ModelInfo("qwen3", "Qwen3", "Q4_K_M", 4_000_000_000, 2_000_000_000, 40960, 4096, 151936, 2560, 4,
                 "{% if tools %}{% endif %}<think>", "", "<|im_end|>")  # fmt: skip
SCRIPT = [
    ChatDelta(reasoning="The user wants "),
    ChatDelta(reasoning="the weather."),
    ChatDelta(content="Let me check."),
    ChatDelta(tool_calls=[ToolCall(0, "call_abc", "get_weather", '{"city": "Paris"}')]),
    Finished("tool_calls", prompt_tokens=11, completion_tokens=21, cached_tokens=3),
]


class Events:
    def __init__(self) -> None:
        self.cancelled = False

    async def __aiter__(self) -> AsyncIterator[ChatDelta | Finished]:
        for ev in SCRIPT:
            yield ev

    def cancel(self) -> None:
        self.cancelled = True


class ScriptedChat:
    """A ChatModel whose every answer is SCRIPT."""

    n_ctx = 4096
    info = INFO

    def __init__(self) -> None:
        self.requests: list[ChatRequest] = []

    async def start_chats(self, req: ChatRequest, n: int) -> Sequence[Events]:
        self.requests.append(req)
        return [Events() for _ in range(n)]

    async def render(self, req: ChatRequest) -> str:
        return "\n".join(f"{m.role}: {m.content}" for m in req.messages)

    async def tokenize(self, text: str, add_special: bool = False, parse_special: bool = False) -> list[int]:
        return list(range(len(text.split())))

    def stats(self) -> dict[str, float]:
        return {}

    def idle(self) -> bool:
        return True


class OneModelRegistry:
    def __init__(self, engine: ScriptedChat) -> None:
        self.loaded = LoadedModel(MS, engine)

    async def acquire(self, name: str | None, role: str, wait_s: float = 0) -> LoadedModel[Any]:
        if name not in (None, "qwen3"):
            raise ModelNotFound(f"The model {name!r} does not exist", "model")
        return self.loaded

    def entries(self) -> list[tuple[ModelSettings, LoadState, LoadedModel[Any]]]:
        return [(MS, LoadState.READY, self.loaded)]


@pytest.fixture
def engine() -> ScriptedChat:
    return ScriptedChat()


@pytest.fixture
def base_url(engine: ScriptedChat) -> Iterator[str]:
    """The routes on a real loopback server (the clients use different httpx packages)."""
    app = FastAPI()
    app.state.settings = Settings(models=[MS])
    app.state.registry = OneModelRegistry(engine)
    install_error_handlers(app)
    for module in (ollama_routes, anthropic_routes, responses_routes):
        app.include_router(module.router)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=5)
        sock.close()


def test_ollama_chat_thinking_and_tool_calls(base_url: str, engine: ScriptedChat) -> None:
    client = ollama.Client(host=base_url)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    parts = list(client.chat(model="qwen3:latest", messages=[{"role": "user", "content": "weather?"}],
                             tools=tools, think=True, stream=True))  # fmt: skip
    assert "".join(p.message.thinking or "" for p in parts) == "The user wants the weather."
    assert "".join(p.message.content or "" for p in parts) == "Let me check."
    calls = [c for p in parts for c in p.message.tool_calls or []]
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    assert calls[0].function.arguments == {"city": "Paris"}  # an object, not JSON text
    last = parts[-1]
    assert last.done and last.done_reason == "stop" and last.prompt_eval_count == 11 and last.eval_count == 21
    assert engine.requests[-1].template_kwargs == {"enable_thinking": True}
    whole = client.chat(model="qwen3", messages=[{"role": "user", "content": "weather?"}], think=True)
    assert (
        whole.message.thinking == "The user wants the weather." and whole.message.content == "Let me check."
    )
    assert whole.message.tool_calls and whole.message.tool_calls[0].function.arguments == {"city": "Paris"}
    gen = client.generate(model="qwen3", prompt="weather?", think=True)
    assert gen.thinking == "The user wants the weather." and gen.response == "Let me check."


def test_anthropic_thinking_text_and_tool_use_blocks(base_url: str) -> None:
    client = anthropic.Anthropic(base_url=base_url, api_key="x", max_retries=0)
    kwargs: dict[str, Any] = {
        "model": "qwen3",
        "max_tokens": 50,
        "messages": [{"role": "user", "content": "weather?"}],
        "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
        "thinking": {"type": "enabled", "budget_tokens": 1024},
    }
    msg = client.messages.create(**kwargs)
    assert [b.type for b in msg.content] == ["thinking", "text", "tool_use"]
    assert msg.content[0].thinking == "The user wants the weather."  # type: ignore[union-attr]
    assert msg.content[2].input == {"city": "Paris"}  # type: ignore[union-attr]
    assert msg.stop_reason == "tool_use"
    assert (msg.usage.input_tokens, msg.usage.output_tokens, msg.usage.cache_read_input_tokens) == (11, 21, 3)
    with client.messages.stream(**kwargs) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert [b.model_dump() for b in final.content] == [b.model_dump() for b in msg.content]
    starts = [e.index for e in events if e.type == "content_block_start"]
    stops = [e.index for e in events if e.type == "content_block_stop"]
    assert starts == stops == [0, 1, 2]
    assert final.stop_reason == "tool_use" and final.usage.output_tokens == 21


def test_responses_reasoning_message_and_function_call_items(base_url: str) -> None:
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0)
    kwargs: dict[str, Any] = {
        "model": "qwen3",
        "input": "weather?",
        "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}],
        "reasoning": {"effort": "high"},
    }
    res = client.responses.create(**kwargs)
    assert [o.type for o in res.output] == ["reasoning", "message", "function_call"]
    assert res.output[0].content[0].text == "The user wants the weather."  # type: ignore[union-attr, index]
    assert res.output_text == "Let me check."
    call = res.output[2]
    assert call.call_id == "call_abc" and json.loads(call.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
    assert res.usage is not None and res.usage.input_tokens_details.cached_tokens == 3
    with client.responses.stream(**kwargs) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert [o.type for o in final.output] == ["reasoning", "message", "function_call"]
    assert final.output_text == "Let me check."
    assert [e.sequence_number for e in events] == list(range(len(events)))
    added = [e.output_index for e in events if e.type == "response.output_item.added"]
    assert added == [0, 1, 2]
    deltas = [e for e in events if e.type == "response.reasoning_text.delta"]
    assert "".join(e.delta for e in deltas) == "The user wants the weather."
