"""engine/llama_backend.py's decisions: which CPU variant, whether AMX runs, what the log says."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gguf_serve.engine.kernel_check import compare_logits, passes
from gguf_serve.engine.llama_backend import (
    VariantCandidate,
    amx_policy,
    init_backend,
    parse_system_info,
    pick_variant,
    read_cpu,
)

VARIANTS = [
    VariantCandidate(Path("libggml-cpu-haswell.so"), 68, False),
    VariantCandidate(Path("libggml-cpu-sapphirerapids.so"), 253, True),
    VariantCandidate(Path("libggml-cpu-zen4.so"), 197, False),
    VariantCandidate(Path("libggml-cpu-alderlake.so"), 0, False),  # AVX-VNNI: not on this CPU
]


def test_an_amx_cpu_gets_the_best_variant_without_amx() -> None:
    assert pick_variant(VARIANTS, allow_amx=False).path.name == "libggml-cpu-zen4.so"


def test_allow_amx_brings_the_amx_variant_back() -> None:
    assert pick_variant(VARIANTS, allow_amx=True).path.name == "libggml-cpu-sapphirerapids.so"


def test_an_avx2_cpu_gets_haswell() -> None:
    avx2_only = [
        VariantCandidate(c.path, c.score if c.path.name.endswith("haswell.so") else 0, c.has_amx)
        for c in VARIANTS
    ]
    assert pick_variant(avx2_only, allow_amx=False).path.name == "libggml-cpu-haswell.so"


def test_no_runnable_variant_is_a_clear_error() -> None:
    only_amx = [VariantCandidate(Path("libggml-cpu-sapphirerapids.so"), 253, True)]
    with pytest.raises(RuntimeError, match="no ggml CPU variant runs on this CPU"):
        pick_variant(only_amx, allow_amx=False)


@pytest.mark.parametrize(
    ("built", "host", "allow", "extra", "says"),
    [
        (False, False, False, True, "off (CPU has no AMX)"),
        (False, True, False, True, "off (not built)"),  # make install on an AMX Xeon
        (True, False, False, True, "off (CPU has no AMX)"),
        (True, True, False, False, "off (this build has AMX kernels"),  # a foreign AMX build: plain path
        (True, True, True, True, "on"),
    ],
)
def test_amx_policy(built: bool, host: bool, allow: bool, extra: bool, says: str) -> None:
    got_extra, text = amx_policy(built, host, allow)
    assert got_extra is extra
    assert text.startswith(says)


def test_system_info_is_parsed_per_backend() -> None:
    text = "CPU : SSE3 = 1 | AVX2 = 1 | AMX_INT8 = 1 | REPACK = 1 | CUDA : ARCHS = 900 | USE_GRAPHS = 1 | "
    assert parse_system_info(text) == {
        "CPU": {"SSE3": "1", "AVX2": "1", "AMX_INT8": "1", "REPACK": "1"},
        "CUDA": {"ARCHS": "900", "USE_GRAPHS": "1"},
    }


def test_this_process_never_runs_amx_unasked() -> None:
    info = init_backend()
    _, features = read_cpu()
    assert info.cpu_features == features
    assert not info.amx.startswith("on")
    assert "CPU" in info.ggml
    # what `make install` builds: AMX never compiled in
    assert info.ggml["CPU"].get("AMX_INT8", "0") != "1"
    assert info.summary().startswith("CPU ")


def test_the_verdict_tells_rounding_from_garbage() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(64, 500)).astype(np.float32) * 4
    rounding = ref + rng.normal(size=ref.shape).astype(np.float32) * 0.05
    assert passes(*compare_logits(rounding, ref))
    garbage = rng.normal(size=ref.shape).astype(np.float32) * 4
    assert not passes(*compare_logits(garbage, ref))
    nan = rounding.copy()
    nan[3, 7] = np.nan
    assert compare_logits(nan, ref) == (0.0, 0.0, 0.0)
    assert not passes(*compare_logits(nan, ref))
