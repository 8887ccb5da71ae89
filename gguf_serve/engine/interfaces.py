"""What the API layer may call on an engine, one Protocol per role: the client side of the
boundary between routes and engines (as vLLM's EngineClient). The engine itself may run in
this process or in a supervised engine process (engine/engine_client.py): routes cannot tell,
so every call that reaches llama.cpp is async, and what crosses is plain data.

The registry hands out `LoadedModel[ChatModel]`, `LoadedModel[EmbeddingModel]` or
`LoadedModel[RerankModel]` by role; a route that needs more of an engine adds it here first.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from gguf_serve.engine.embedder import EmbeddingResult
    from gguf_serve.engine.model_info import ModelInfo
    from gguf_serve.engine.requests import (
        ChatDelta,
        ChatRequest,
        EngineHealth,
        Finished,
        SamplingParams,
        TextChunk,
    )
    from gguf_serve.engine.reranker import RerankResult


class TokenEvents(Protocol):
    """One completion choice: TextChunk..., then one Finished. Closing early cancels."""

    def __aiter__(self) -> AsyncIterator[TextChunk | Finished]: ...

    def cancel(self) -> None:
        """Free the slot at the engine's next step (a no-op once finished)."""
        ...


class ChatEvents(Protocol):
    """One chat choice: ChatDelta... (reasoning, content and tool calls kept apart), then Finished."""

    def __aiter__(self) -> AsyncIterator[ChatDelta | Finished]: ...

    def cancel(self) -> None: ...


class Engine(Protocol):
    """What the registry and every route need of every engine."""

    @property
    def n_ctx(self) -> int:
        """The longest sequence one request may have, in tokens."""
        ...

    @property
    def info(self) -> ModelInfo:
        """What the model is (architecture, sizes, template, special tokens), read at load."""
        ...

    def stats(self) -> dict[str, float]: ...

    def idle(self) -> bool:
        """No request in progress (keep_alive unloads only idle engines)."""
        ...

    def health(self) -> EngineHealth:
        """Whether the engine serves, and if not, why (for /health, /ready, /stats)."""
        ...

    def close(self) -> bool | None:
        """Free the engine; False when a thread still inside llama.cpp kept it from that."""
        ...

    async def tokenize(self, text: str, add_special: bool = False, parse_special: bool = False) -> list[int]:
        """`parse_special`: control-token text (<|im_end|>) becomes control tokens; off for user data."""
        ...

    async def detokenize(self, tokens: Sequence[int]) -> list[bytes]:
        """The bytes of each token (a piece need not be valid UTF-8 on its own)."""
        ...


class ChatModel(Engine, Protocol):
    # Rendering, tokenizing and grammar compilation happen inside these calls, off the event
    # loop; InvalidRequest, ContextOverflow and QueueFull raise here, before any response starts.
    async def start_chat(self, req: ChatRequest) -> ChatEvents: ...

    async def start_completion(self, prompt: str | list[int], params: SamplingParams) -> TokenEvents: ...

    # OpenAI's n: n answers to one prompt, which is prefilled once.
    async def start_chats(self, req: ChatRequest, n: int) -> Sequence[ChatEvents]: ...

    async def start_completions(
        self, prompt: str | list[int], params: SamplingParams, n: int
    ) -> Sequence[TokenEvents]: ...

    async def render(self, req: ChatRequest) -> str:
        """The prompt text the chat template makes of a request (what start_chat would prefill)."""
        ...


class EmbeddingModel(Engine, Protocol):
    @property
    def n_embd(self) -> int: ...

    @property
    def query_instruction(self) -> str | None: ...

    async def embed(
        self,
        inputs: Sequence[str | Sequence[int]],
        *,
        instruction: str | None = None,
        dimensions: int | None = None,
        normalize: bool | None = None,
        truncate: bool | None = None,
        cut_left: bool = False,
    ) -> EmbeddingResult: ...


class RerankModel(Engine, Protocol):
    kind: str  # head | causal | embedding

    async def score(
        self, query: str, documents: list[str], instruction: str | None = None, truncate: bool | None = None
    ) -> RerankResult: ...


AnyEngine = ChatModel | EmbeddingModel | RerankModel
