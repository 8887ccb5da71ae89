"""Every weight type the profiles and tests use runs right on this CPU's kernel path.

llama.cpp chooses CPU kernels by machine (repacked weights for AVX2/AVX-512, AMX tiles on
4th-gen+ Xeons with an AMX build); some of those paths have crashed or computed garbage
upstream. For each weight type, `gguf-serve check-kernels` decodes a long prompt and a batch of
sequences through the path the server takes here and through the plain kernels, and compares
the logits at every position. Each check runs in a child process, so a kernel that segfaults
is a failing test that names the weight type and the CPU, not the end of the suite.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from gguf_serve.convert.quantize import quantize_gguf
from gguf_serve.engine.kernel_check import crash_message
from gguf_serve.engine.llama_backend import read_cpu
from tests.e2e.server import demo_chat_gguf

# The demo's own Q4_1 and every type a profile or test serves.
WEIGHT_TYPES = ["Q4_1", "Q4_0", "Q4_K_M", "Q8_0", "F16", "F32"]


@pytest.fixture(scope="module")
def gguf_of_type(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    root = tmp_path_factory.mktemp("kernel-paths")
    demo = demo_chat_gguf()

    def get(weight_type: str) -> Path:
        if weight_type == "Q4_1":
            return demo
        dst = root / f"smollm2-135m-{weight_type}.gguf"
        if not dst.exists():
            # Requantized from the demo's Q4_1: lossy, but real shapes and real kernels.
            quantize_gguf(demo, dst, weight_type, allow_requantize=True)
        return dst

    return get


@pytest.mark.slow
@pytest.mark.parametrize("weight_type", WEIGHT_TYPES)
def test_kernel_path_matches_plain_kernels(weight_type: str, gguf_of_type: Callable[[str], Path]) -> None:
    path = gguf_of_type(weight_type)
    proc = subprocess.run(
        [sys.executable, "-m", "gguf_serve", "check-kernels", str(path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    model, features = read_cpu()
    where = f"{weight_type} on CPU {model} [{' '.join(features)}]"
    assert proc.returncode == 0, f"{where}:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    assert f"ok {weight_type} " in proc.stdout, f"{where}: the check did not report this type:\n{proc.stdout}"


def test_a_crash_names_the_signal_and_the_cpu(tmp_path: Path) -> None:
    message = crash_message(tmp_path / "m-Q4_0.gguf", -11)
    model, features = read_cpu()
    assert message.startswith("CRASH m-Q4_0.gguf:")
    assert "SIGSEGV" in message and model in message
    assert all(f in message for f in features)
