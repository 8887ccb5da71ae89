"""A broken model file (cut short, garbage after the magic, a vocabulary shorter than its
embedding rows) is a one-line start-up error that names the file, never a signal. Each case is
a server process of its own."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.server import REPO, demo_chat_gguf, free_port
from tests.fixtures import broken_gguf

pytestmark = pytest.mark.e2e

BREAKERS: dict[str, Callable[[Path], Path]] = {
    "truncated": lambda dst: broken_gguf.truncated(demo_chat_gguf(), dst),
    "garbage_after_magic": broken_gguf.garbage_after_magic,
    "short_vocabulary": lambda dst: broken_gguf.short_vocabulary(demo_chat_gguf(), dst),
}


@pytest.mark.parametrize("kind", sorted(BREAKERS))
def test_a_broken_model_file_is_a_one_line_start_up_error(kind: str, tmp_path: Path) -> None:
    bad = BREAKERS[kind](tmp_path / f"{kind}.gguf")
    profile = tmp_path / "profile.toml"
    profile.write_text(f'[[models]]\nid = "chat"\nfile = "{bad}"\nn_ctx = 512\nparallel = 1\n')
    proc = subprocess.run(
        [sys.executable, "-m", "gguf_serve", "serve", "--profile", str(profile), "--port", str(free_port())],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode > 0, f"ended by signal {-proc.returncode}:\n{proc.stderr[-2000:]}"
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("gguf-serve: error:") and bad.name in last, proc.stderr[-2000:]
