"""The command line as a person meets it: start-up errors are one line, `gguf-serve chat` talks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.server import REPO

pytestmark = pytest.mark.e2e


def serve(profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gguf_serve", "--profile", str(profile), "--port", "0", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (None, "make convert MODELS=Missing-Model"),
        (b"this is not a gguf file at all", "not a GGUF file"),
        (b"GGUF\x03\x00\x00\x00" + b"\x00" * 64, "could not load"),
    ],
    ids=["missing", "not-gguf", "corrupt-gguf"],
)
def test_bad_model_file_is_one_line_and_nonzero_exit(
    tmp_path: Path, content: bytes | None, needle: str
) -> None:
    gguf = tmp_path / "Missing-Model" / "Missing-Model-Q4_K_M.gguf"
    if content is not None:
        gguf.parent.mkdir()
        gguf.write_bytes(content)
    profile = tmp_path / "p.toml"
    profile.write_text(
        f'models_dir = "{tmp_path}"\n[[models]]\nid = "m"\nfile = "Missing-Model/Missing-Model-Q4_K_M.gguf"\n'
    )
    r = serve(profile)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and "Segmentation" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("gguf-serve: error:")]
    assert len(errors) == 1 and needle in errors[0], r.stderr[-2000:]


def test_chat_client_streams_a_reply_and_quits(demo_server: str) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "gguf_serve", "chat", "--url", demo_server, "--system", "Answer briefly."],
        input="What is the capital of France?\n/clear\nSay hi.\n/quit\n",
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stderr
    assert "smollm2-135m-instruct" in r.stdout or len(r.stdout.strip()) > 20
    assert len(r.stdout.strip()) > 20


def test_chat_client_unreachable_server_is_one_line() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "gguf_serve", "chat", "--url", "http://127.0.0.1:9"],
        input="hi\n",
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0
    assert "Traceback" not in r.stderr + r.stdout
