"""The GPU kit's CPU-side steps: what it packs, that it fits, and the check itself without a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.scripts import load_script

ROOT = Path(__file__).resolve().parent.parent


kit = load_script("gpu_kit")


@pytest.mark.parametrize(
    "member",
    [
        "llama_cpp_python-0.3.36/CMakeLists.txt",
        "llama_cpp_python-0.3.36/llama_cpp/llama_cpp.py",
        "llama_cpp_python-0.3.36/vendor/llama.cpp/ggml/src/ggml-cuda/mmq.cu",
        "llama_cpp_python-0.3.36/vendor/llama.cpp/ggml/src/ggml-cpu/ggml-cpu.c",
        "llama_cpp_python-0.3.36/vendor/llama.cpp/src/llama.cpp",
        "llama_cpp_python-0.3.36/vendor/llama.cpp/common/common.cpp",
        "llama_cpp_python-0.3.36/vendor/llama.cpp/vendor/nlohmann/json.hpp",
        "llama_cpp_python-0.3.36/vendor/llama.cpp/tools/mtmd/CMakeLists.txt",
    ],
)
def test_the_kit_keeps_what_a_cuda_build_reads(member: str) -> None:
    assert kit.wanted(member)


@pytest.mark.parametrize(
    "member",
    [
        "llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-qwen2.gguf",
        "llama_cpp_python-0.3.36/vendor/llama.cpp/docs/build.md",
        "llama_cpp_python-0.3.36/vendor/llama.cpp/ggml/src/ggml-vulkan/ggml-vulkan.cpp",
        "llama_cpp_python-0.3.36/vendor/llama.cpp/tools/server/server.cpp",
        "llama_cpp_python-0.3.36/.git/modules/vendor/llama.cpp/objects/pack/x.pack",
        "llama_cpp_python-0.3.36/vendor/llama.cpp/.github/workflows/build.yml",
    ],
)
def test_the_kit_leaves_out_what_it_never_reads(member: str) -> None:
    assert not kit.wanted(member)


@pytest.mark.slow
def test_the_kit_fits_what_travels(tmp_path: Path) -> None:
    """Pruned sources and every wheel the GPU machine lacks, under its 64 MiB with the tree."""
    out = tmp_path / "kit"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_kit.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "travels" in proc.stdout
    wheels = {p.name.split("-")[0].lower().replace("_", "-") for p in (out / "wheels").glob("*.whl")}
    assert set(kit.MISSING_THERE) <= wheels, set(kit.MISSING_THERE) - wheels
    assert (out / "llama-src.tar.gz").stat().st_size < 24 * 2**20


@pytest.mark.slow
def test_the_gpu_check_runs_every_step_but_the_gpu(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--cpu", "--out", str(tmp_path), "--tokens", "16"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu-check.json").read_text())
    assert summary["mode"] == "cpu"
    checks = summary["checks"]
    assert checks["chat_tokens"] > 0 and checks["embedding_dim"] == 64
    assert len(checks["rerank_scores"]) == 3
    assert set(summary["decode_tok_s"]) == {"offload_all_1", "offload_all_4", "cpu_only_1", "cpu_only_4"}
    assert all(v > 0 for v in summary["decode_tok_s"].values())
    assert summary["clean_exit_offload"]
    # The offloaded server's log says how many layers each model put on the GPU.
    log = (tmp_path / "server-offload.log").read_text()
    assert "qwen3-0.6b-shape-Q4_K_M.gguf, 4 of 4 layers on the GPU" in log
