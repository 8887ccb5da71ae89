"""A portable build (PORTABLE=1 make install, the Docker images) picks its CPU variant at run time.

Uses the portable wheel that scripts/llama_wheel.py cached on this machine (unpacked beside this
venv's packages, so nothing is reinstalled); skipped where none was built yet.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from gguf_serve.engine.llama_backend import read_cpu
from tests.e2e.server import demo_chat_gguf
from tests.fixtures.scripts import load_script

ROOT = Path(__file__).resolve().parent.parent
lw = load_script("llama_wheel")


def portable_wheel() -> Path | None:
    folder = lw.cache_root() / lw.config_key(lw.configuration("cpu", True, None))
    wheels = sorted(folder.glob("llama_cpp_python-*.whl"))
    return wheels[-1] if wheels else None


@pytest.fixture(scope="module")
def portable_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    wheel = portable_wheel()
    if wheel is None:
        pytest.skip(
            "no portable llama-cpp-python wheel on this machine yet: `PORTABLE=1 make install` builds one"
        )
    site = tmp_path_factory.mktemp("portable-site")
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    return site


def run(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PYTHONPATH": f"{site}:{ROOT}"}
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, **env},
        cwd=ROOT,
    )


def test_the_wheel_ships_every_cpu_variant_inside_the_package(portable_site: Path) -> None:
    variants = sorted(p.name for p in (portable_site / "llama_cpp" / "lib").glob("libggml-cpu-*.so"))
    assert "libggml-cpu-haswell.so" in variants and "libggml-cpu-x64.so" in variants, variants
    assert "libggml-cpu-sapphirerapids.so" in variants  # built, but never loaded unasked


def test_the_best_variant_without_amx_is_loaded(portable_site: Path) -> None:
    code = (
        "import json, llama_cpp; from gguf_serve.engine.llama_backend import init_backend; "
        "i = init_backend(); print(json.dumps({'file': llama_cpp.__file__, **i.as_dict()}))"
    )
    proc = run(portable_site, "-c", code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["file"].startswith(str(portable_site))
    assert info["build"] == "portable"
    _, features = read_cpu()
    if "amx_int8" in features:
        assert info["cpu_variant"] != "sapphirerapids"
    elif "avx512f" not in features and "avx2" in features:
        assert info["cpu_variant"] in ("haswell", "alderlake"), info["cpu_variant"]
    assert info["ggml"]["CPU"].get("AMX_INT8", "0") != "1"
    assert not info["amx"].startswith("on")


@pytest.mark.slow
def test_the_portable_kernels_match_the_plain_ones(portable_site: Path) -> None:
    proc = run(portable_site, "-m", "gguf_serve", "check-kernels", str(demo_chat_gguf()))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "ggml portable build" in proc.stdout and "ok Q4_1" in proc.stdout, proc.stdout
