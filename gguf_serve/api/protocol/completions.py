"""POST /v1/completions: request schema and legacy logprobs shape."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from gguf_serve.api.protocol.common import SamplingFields
from gguf_serve.engine.requests import InvalidRequest, TokenLogprob


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    stream_options: dict[str, Any] | None = None

    def prompts(self, max_inputs: int) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            items: list[str | list[int]] = [p]
        elif p and all(isinstance(x, int) for x in p):
            items = [list(p)]  # type: ignore[arg-type]
        else:
            items = list(p)  # type: ignore[arg-type]
        if not items or any(len(x) == 0 for x in items):
            raise InvalidRequest("prompt must not be empty", "prompt")
        if len(items) > max_inputs:
            raise InvalidRequest(f"at most {max_inputs} prompts per request", "prompt")
        if self.echo:
            raise InvalidRequest("echo is not supported", "echo")
        return items

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


def legacy_logprobs(items: list[TokenLogprob], offset: int) -> dict[str, Any]:
    text_offset = []
    pos = offset
    for lp in items:
        text_offset.append(pos)
        pos += len(lp.token)
    return {
        "tokens": [lp.token for lp in items],
        "token_logprobs": [lp.logprob for lp in items],
        "top_logprobs": [{t: v for t, v, _ in lp.top} for lp in items],
        "text_offset": text_offset,
    }
