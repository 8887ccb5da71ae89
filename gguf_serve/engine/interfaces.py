"""What the API layer may call on an engine, one Protocol per role: the typed boundary
between routes and engines (as vLLM's EngineClient). The registry hands out
`LoadedModel[ChatModel]`, `LoadedModel[EmbeddingModel]` or `LoadedModel[RerankModel]` by role;
a route that needs more of an engine adds it here first."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from gguf_serve.engine.chat import ChatStream
    from gguf_serve.engine.embedder import EmbeddingResult
    from gguf_serve.engine.requests import ChatRequest, SamplingParams
    from gguf_serve.engine.reranker import RerankResult
    from gguf_serve.engine.scheduler import Generation


class Engine(Protocol):
    """What the registry needs of every engine."""

    @property
    def n_ctx(self) -> int:
        """The longest sequence one request may have, in tokens."""
        ...

    def stats(self) -> dict[str, float]: ...

    def idle(self) -> bool:
        """No request in progress (keep_alive unloads only idle engines)."""
        ...

    def close(self) -> bool | None:
        """Free the engine; False when a thread still inside llama.cpp kept it from that."""
        ...


class ChatModel(Engine, Protocol):
    def start_chat(self, req: ChatRequest) -> ChatStream: ...

    def start_completion(self, prompt: str | list[int], params: SamplingParams) -> Generation: ...

    # OpenAI's n: n answers to one prompt, which is prefilled once.
    def start_chats(self, req: ChatRequest, n: int) -> list[ChatStream]: ...

    def start_completions(
        self, prompt: str | list[int], params: SamplingParams, n: int
    ) -> list[Generation]: ...


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
