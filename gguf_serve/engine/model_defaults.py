"""Sampling defaults a GGUF file carries: general.sampling.*, which llama.cpp's converter (and
ours) writes from the checkpoint's generation_config.json. They fill the sampling fields a
profile leaves unset; whatever the profile (or the environment, or a flag) sets wins, and
a request's own fields win over both."""

from __future__ import annotations

import logging
from collections.abc import Callable

from pydantic import ValidationError

from gguf_serve.settings import ModelSettings, SamplingDefaults

log = logging.getLogger("gguf_serve.engine")

# SamplingDefaults field -> (GGUF key, type), as llama-server reads them (common/arg.cpp).
GGUF_SAMPLING_KEYS: dict[str, tuple[str, type[float] | type[int]]] = {
    "temperature": ("general.sampling.temp", float),
    "top_k": ("general.sampling.top_k", int),
    "top_p": ("general.sampling.top_p", float),
    "min_p": ("general.sampling.min_p", float),
    "repeat_penalty": ("general.sampling.penalty_repeat", float),
    "penalty_last_n": ("general.sampling.penalty_last_n", int),
}


def gguf_sampling(meta: Callable[[str], str | None]) -> dict[str, float | int]:
    """The general.sampling.* values of a model, by SamplingDefaults field name."""
    out: dict[str, float | int] = {}
    for field, (key, kind) in GGUF_SAMPLING_KEYS.items():
        raw = meta(key)
        if raw is None:
            continue
        try:
            out[field] = kind(float(raw))
        except ValueError:
            log.warning("ignoring %s = %r in the GGUF (not a number)", key, raw)
    return out


def with_gguf_sampling(profile: SamplingDefaults, from_gguf: dict[str, float | int]) -> SamplingDefaults:
    """profile, with the fields it did not set taken from the GGUF (each one validated)."""
    chosen = profile.model_dump(exclude_unset=True)
    for field, value in from_gguf.items():
        if field in profile.model_fields_set:
            continue
        try:
            SamplingDefaults.model_validate({**chosen, field: value})
        except ValidationError:
            log.warning("ignoring the GGUF's sampling default %s = %r (out of range)", field, value)
            continue
        chosen[field] = value
    if chosen.keys() == profile.model_fields_set:
        return profile
    return SamplingDefaults.model_validate(chosen)


def with_model_sampling(ms: ModelSettings, meta: Callable[[str], str | None]) -> ModelSettings:
    """A chat entry's settings with its GGUF's sampling defaults filled in (see with_gguf_sampling)."""
    if ms.role != "chat":
        return ms
    sampling = with_gguf_sampling(ms.sampling, gguf_sampling(meta))
    if sampling is ms.sampling:
        return ms
    taken = sorted(sampling.model_fields_set - ms.sampling.model_fields_set)
    log.info("model %s: sampling defaults from the GGUF: %s", ms.id, {k: getattr(sampling, k) for k in taken})
    return ms.model_copy(update={"sampling": sampling})
