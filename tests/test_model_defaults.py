"""A GGUF's general.sampling.* defaults (from generation_config.json) fill what the profile
leaves unset; what the profile sets wins."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gguf_serve.engine.model_defaults import gguf_sampling, with_gguf_sampling
from gguf_serve.settings import ModelSettings, SamplingDefaults, Settings
from tests.fixtures import qwen3_checkpoints as qc


def test_profile_wins_gguf_fills_the_rest() -> None:
    profile = SamplingDefaults.model_validate({"temperature": 0.2})
    got = with_gguf_sampling(profile, {"temperature": 0.7, "top_k": 20, "top_p": 0.8})
    assert (got.temperature, got.top_k, got.top_p) == (0.2, 20, 0.8)
    assert got.min_p == SamplingDefaults().min_p  # neither sets it: the built-in default
    assert with_gguf_sampling(profile, {}) is profile


def test_out_of_range_gguf_values_are_ignored() -> None:
    got = with_gguf_sampling(SamplingDefaults(), {"top_p": 0.0, "temperature": 9.0, "top_k": 5})
    assert (got.top_p, got.temperature, got.top_k) == (
        SamplingDefaults().top_p,
        SamplingDefaults().temperature,
        5,
    )


def test_gguf_keys_are_read_as_llama_cpp_names_them() -> None:
    meta = {
        "general.sampling.temp": "0.600000",
        "general.sampling.top_k": "20",
        "general.sampling.min_p": "x",
    }
    assert gguf_sampling(meta.get) == {"temperature": 0.6, "top_k": 20}


@pytest.fixture(scope="module")
def instruct_gguf(qwen3_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gguf_serve.convert.converter import convert_checkpoint

    dst = tmp_path_factory.mktemp("gguf") / "instruct-F16.gguf"
    folder = qc.modelscope_dir(qwen3_cache, "Qwen/Qwen3-4B-Instruct-2507")
    convert_checkpoint(folder, dst, "f16", name="Qwen3-4B-Instruct-2507")
    return dst


@pytest.fixture
def registry(instruct_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    from gguf_serve.engine.registry import ModelRegistry
    from gguf_serve.model_files import resolve_model_files

    monkeypatch.chdir(tmp_path)  # no stray .env
    common: dict[str, Any] = {"role": "chat", "file": str(instruct_gguf), "n_ctx": 256, "parallel": 1}
    settings = Settings(
        models=[
            ModelSettings(id="plain", **common),
            ModelSettings(id="tuned", sampling=SamplingDefaults(temperature=0.2, min_p=0.0), **common),
        ],
        models_dir=tmp_path,
    )
    reg = ModelRegistry(settings, resolve_model_files(settings))
    reg.load_all()
    yield reg
    reg.close()


def test_server_takes_the_ggufs_sampling_defaults(registry: Any) -> None:
    plain = registry.get("plain", "chat").settings.sampling
    # Qwen3-4B-Instruct-2507's generation_config.json: temperature 0.7, top_k 20, top_p 0.8
    assert (plain.temperature, plain.top_k, plain.top_p) == (pytest.approx(0.7), 20, pytest.approx(0.8))
    assert plain.min_p == SamplingDefaults().min_p
    tuned = registry.get("tuned", "chat").settings.sampling
    assert (tuned.temperature, tuned.min_p) == (0.2, 0.0)  # the profile's own values win
    assert (tuned.top_k, tuned.top_p) == (20, pytest.approx(0.8))
