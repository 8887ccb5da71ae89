"""scripts/llama_wheel.py: one cached wheel per build configuration, never another's."""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path

import pytest

from tests.fixtures.scripts import load_script

ROOT = Path(__file__).resolve().parent.parent


lw = load_script("llama_wheel")


def key(monkeypatch: pytest.MonkeyPatch, target: str, **kw: object) -> str:
    monkeypatch.setattr(lw, "native_target", lambda: target)
    cfg = lw.configuration(kw.get("gpu", "cpu"), bool(kw.get("portable", False)), kw.get("cuda_arch"))
    return str(lw.config_key(cfg))


def test_a_native_wheel_is_keyed_on_the_cpu_it_was_built_for(monkeypatch: pytest.MonkeyPatch) -> None:
    avx2 = key(monkeypatch, "-march=znver3 -mavx2")
    avx512 = key(monkeypatch, "-march=sapphirerapids -mavx2 -mavx512f -mamx-int8")
    assert avx2 != avx512
    assert avx2.startswith("native-cpu-")


def test_portable_and_gpu_builds_are_other_configurations(monkeypatch: pytest.MonkeyPatch) -> None:
    native = key(monkeypatch, "-march=znver3")
    portable = key(monkeypatch, "-march=znver3", portable=True)
    cuda = key(monkeypatch, "-march=znver3", gpu="cuda")
    cuda90 = key(monkeypatch, "-march=znver3", gpu="cuda", cuda_arch="90")
    assert len({native, portable, cuda, cuda90}) == 4
    # A portable wheel runs on any x86-64 CPU: the build machine's CPU is not part of its key.
    assert portable == key(monkeypatch, "-march=sapphirerapids", portable=True)


@pytest.mark.skipif(not lw.X86, reason="AMX flags exist on x86-64 only")
def test_every_build_turns_amx_off() -> None:
    for gpu in ("cpu", "cuda"):
        for portable in (False, True):
            args = lw.cmake_args(gpu, portable, None)
            assert {"-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"} <= set(args)
    # With GGML_NATIVE=ON, -march=native enables AMX whatever GGML_AMX_* say: the compiler flags remove it.
    assert lw.NO_AMX_FLAGS.split() == ["-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16"]
    portable = lw.cmake_args("cpu", True, None)
    assert {"-DGGML_NATIVE=OFF", "-DGGML_BACKEND_DL=ON", "-DGGML_CPU_ALL_VARIANTS=ON"} <= set(portable)


def test_a_cached_wheel_is_reused_without_compiling(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GGUF_SERVE_WHEEL_CACHE", str(tmp_path))
    monkeypatch.setattr(lw, "native_target", lambda: "-march=test")
    cfg = lw.configuration("cpu", False, None)
    other = lw.configuration("cuda", False, "90")
    folder = tmp_path / lw.config_key(cfg)
    folder.mkdir()
    wheel = folder / f"llama_cpp_python-{lw.LLAMA_CPP_VERSION}-py3-none-linux_x86_64.whl"
    wheel.write_bytes(b"not really a wheel")

    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"compiled although a wheel was cached: {args}")

    monkeypatch.setattr(lw.subprocess, "run", no_build)
    monkeypatch.setattr(lw, "unpack_sources", lambda sdist, dest: dest)  # (compiling starts with this)
    assert lw.ensure_wheel(cfg, None) == wheel
    # Another configuration finds nothing in that folder and would compile.
    with pytest.raises(AssertionError, match="compiled"):
        lw.ensure_wheel(other, tmp_path / "sdist.tar.gz")


def test_a_users_cmake_args_are_part_of_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CMAKE_ARGS", raising=False)
    plain = key(monkeypatch, "-march=znver3")
    monkeypatch.setenv("CMAKE_ARGS", "-DGGML_BLAS=ON -DGGML_BLAS_VENDOR=OpenBLAS")
    assert key(monkeypatch, "-march=znver3") != plain
    assert lw.cmake_args("cpu", False, None)[-2:] == ["-DGGML_BLAS=ON", "-DGGML_BLAS_VENDOR=OpenBLAS"]


def test_the_pin_is_one_version() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"llama-cpp-python=={lw.LLAMA_CPP_VERSION}" in deps


def test_this_venv_has_the_wheel_built_for_this_machine() -> None:
    """What `make install` installed is this machine's configuration, not a cached other one."""
    marker = Path(sys.prefix) / lw.MARKER
    if not marker.exists():
        pytest.skip(
            "llama-cpp-python was not installed by scripts/llama_wheel.py (not a `make install` venv)"
        )
    installed = json.loads(marker.read_text())
    cfg = installed["config"]
    expected = lw.configuration(cfg["gpu"], cfg["portable"], None)
    expected["cmake_args"] = cfg["cmake_args"]  # a CUDA arch given at install time is part of it
    if "nvcc" in cfg:
        expected["nvcc"] = cfg["nvcc"]
    assert installed["key"] == lw.config_key(expected), (
        f"the venv's llama-cpp-python was built for {installed['key']}, this machine is {lw.config_key(expected)}"
    )
