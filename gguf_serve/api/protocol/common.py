"""Request fields shared by chat and text completions, and their translation to engine params."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gguf_serve.engine.requests import InvalidRequest, SamplingParams
from gguf_serve.settings import Limits, SamplingDefaults


class SamplingFields(BaseModel):
    """OpenAI sampling fields plus llama.cpp's (top_k, min_p, repeat_penalty). Unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)  # "NaN" as a string too

    model: str | None = None
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    temperature: float | None = Field(None, ge=0.0, le=5.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repeat_penalty: float | None = Field(None, gt=0.0)
    seed: int | None = None
    logit_bias: dict[str, float] | None = None
    n: int = Field(1, ge=1)
    ignore_eos: bool = False
    # llama-server's extensions: a GBNF grammar, or a JSON schema the output must match.
    grammar: str | None = None
    json_schema: dict[str, Any] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        items = [v] if isinstance(v, str) else v
        if len(items) > 16:
            raise ValueError("at most 16 stop sequences")
        return [s for s in items if s]

    def sampling_params(
        self, defaults: SamplingDefaults, limits: Limits, max_tokens: int | None, logprobs: int | None
    ) -> SamplingParams:
        if self.n > limits.max_n:
            raise InvalidRequest(
                f"n={self.n} is more than this server's limit of {limits.max_n} choices", "n"
            )
        if self.grammar is not None and self.json_schema is not None:
            raise InvalidRequest("send either grammar or json_schema, not both", "grammar")
        bias: dict[int, float] = {}
        for key, value in (self.logit_bias or {}).items():
            try:
                bias[int(key)] = max(-100.0, min(100.0, float(value)))
            except ValueError:
                raise InvalidRequest(f"logit_bias key {key!r} is not a token id", "logit_bias") from None
        cap = limits.max_tokens_cap
        wanted = max_tokens if max_tokens is not None else defaults.max_tokens
        if cap is not None:
            wanted = min(wanted, cap) if wanted is not None else cap

        def pick(value: Any, default: Any) -> Any:
            return default if value is None else value

        return SamplingParams(
            temperature=pick(self.temperature, defaults.temperature),
            top_p=pick(self.top_p, defaults.top_p),
            top_k=pick(self.top_k, defaults.top_k),
            min_p=pick(self.min_p, defaults.min_p),
            repeat_penalty=pick(self.repeat_penalty, defaults.repeat_penalty),
            presence_penalty=pick(self.presence_penalty, defaults.presence_penalty),
            frequency_penalty=pick(self.frequency_penalty, defaults.frequency_penalty),
            penalty_last_n=defaults.penalty_last_n,
            seed=self.seed,
            logit_bias=bias,
            max_tokens=wanted,
            stop=list(self.stop or []),
            logprobs=logprobs is not None,
            top_logprobs=logprobs or 0,
            ignore_eos=self.ignore_eos,
            grammar=self.grammar or None,
            json_schema=self.json_schema,
        )


def usage(prompt: int, completion: int, cached: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
