"""The wheel a clone builds: profiles inside it, the Python it needs, `--profile demo`
resolved from the installed package outside any checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROFILES = ("demo", "cpu", "cuda")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Build from a copy, so the build leaves nothing (build/, *.egg-info) in the checkout.
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "profiles", src / "profiles")
    shutil.copytree(
        ROOT / "gguf_serve", src / "gguf_serve", symlinks=True, ignore=shutil.ignore_patterns("__pycache__")
    )
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            ".",
        ],
        cwd=src,
        check=True,
        capture_output=True,
        timeout=300,
    )
    (whl,) = out.glob("gguf_serve-*.whl")
    return whl


def test_wheel_carries_the_profiles_and_the_python_it_needs(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = Parser().parsestr(z.read(meta).decode())
    for p in PROFILES:
        assert f"gguf_serve/profiles/{p}.toml" in names
    # tomllib and asyncio.timeout are 3.11
    assert metadata["Requires-Python"] == ">=3.11"


def test_installed_wheel_resolves_profiles_outside_a_checkout(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)  # an unpacked wheel is what pip installs
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GGUF_SERVE_")}
    env["PYTHONPATH"] = str(site)  # ahead of the checkout's editable install
    script = (
        "import json, gguf_serve\n"
        "from gguf_serve.settings import load_settings, resolve_profile\n"
        "out = {'package': gguf_serve.__file__}\n"
        "for name in ('demo', 'cpu', 'cuda'):\n"
        "    out[name] = [str(resolve_profile(name)), [m.id for m in load_settings(name).models]]\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert Path(out["package"]).is_relative_to(site)
    for name in PROFILES:
        path, ids = out[name]
        assert Path(path).is_relative_to(site) and ids
