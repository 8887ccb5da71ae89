#!/usr/bin/env python3
"""Prepare .gpu-kit/: what the lent GPU machine needs to build and check gguf-serve offline.

That machine has CUDA's nvcc, CMake, ninja, Python 3.12 with PyTorch, transformers, numpy,
httpx, typer and friends, 16 cores, and no package registry; at most 64 MiB travels with the
working tree. So the kit holds:

- llama-src.tar.gz: the pinned llama-cpp-python sdist without what a CUDA build never reads
  (llama.cpp's docs, model vocab files, tests, examples, other tools, other GPU backends),
  unpatched: there, `llama_wheel.py build` applies patches/llama.cpp (the working tree carries
  it) as every other build does;
- wheels/: the Python 3.12 manylinux wheels of gguf-serve's dependencies that the machine lacks,
  at the versions this venv tested.

`make gpu-kit` runs this here; `make gpu-check` (bench/gpu_check.sh) runs there. Standard library
only, plus pip for the downloads.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import llama_wheel  # noqa: E402

LIMIT_BYTES = 64 * 1024 * 1024  # what travels to the device machine, working tree included
TARGET_PYTHON = "3.12"
PLATFORMS = [
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]
# Imported by gguf-serve (serve, convert, the checks) and absent from the GPU machine's image.
MISSING_THERE = [
    "fastapi",
    "starlette",
    "uvicorn",
    "sse-starlette",
    "pydantic",
    "pydantic-core",
    "pydantic-settings",
    "python-dotenv",
    "annotated-types",
    "typing-inspection",
    "gguf",
    "openai",
    "httpx2",
    "httpcore2",
    "truststore",
    "opentelemetry-api",
    "jiter",
    "sniffio",
]
# Paths in the sdist a CUDA build of libllama never reads (relative to vendor/llama.cpp).
UNUSED = (
    "models/",
    "docs/",
    "tests/",
    "examples/",
    "benches/",
    "pocs/",
    "media/",
    "app/",
    "gguf-py/",
    "grammars/",
    "ci/",
    "skills/",
    "requirements/",
    "conversion/",
    "scripts/",
    "licenses/",
)
KEEP_TOOLS = ("tools/CMakeLists.txt", "tools/mtmd/")
OTHER_BACKENDS = (
    "ggml-vulkan",
    "ggml-sycl",
    "ggml-opencl",
    "ggml-metal",
    "ggml-hexagon",
    "ggml-et",
    "ggml-webgpu",
    "ggml-openvino",
    "ggml-cann",
    "ggml-virtgpu",
    "ggml-musa",
    "ggml-zdnn",
    "ggml-zendnn",
    "ggml-hip",
)


def wanted(name: str) -> bool:
    """Whether a member of the sdist goes into the pruned copy."""
    _, _, rel = name.partition("/")  # strip llama_cpp_python-X.Y.Z/
    if rel.startswith((".git/", "docs/", "examples/", "tests/", "docker/")) or "/.github/" in f"/{rel}":
        return False
    if not rel.startswith("vendor/llama.cpp/"):
        return True
    inner = rel.removeprefix("vendor/llama.cpp/")
    if inner.startswith(UNUSED):
        return False
    if inner.startswith("tools/") and not inner.startswith(KEEP_TOOLS):
        return False
    return not inner.startswith(tuple(f"ggml/src/{b}/" for b in OTHER_BACKENDS))


def prune_sdist(src: Path, dst: Path) -> None:
    tmp = dst.with_suffix(".part")
    with tarfile.open(src) as tin, tarfile.open(tmp, "w:gz", compresslevel=9) as tout:
        for member in tin:
            if not wanted(member.name):
                continue
            data = tin.extractfile(member) if member.isfile() else None
            tout.addfile(member, data)
    tmp.replace(dst)


def download_wheels(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in MISSING_THERE]
    platform_args = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run(
        [
            sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
            "--python-version", TARGET_PYTHON, "--implementation", "cp", *platform_args,
            "-d", str(dest), *pins,
        ],
        check=True,
    )  # fmt: skip


def tree_bytes() -> int:
    """What else travels: the tracked and untracked-not-ignored files of the working tree."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    return sum(
        (ROOT / p.decode()).stat().st_size for p in out.split(b"\0") if p and (ROOT / p.decode()).is_file()
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / ".gpu-kit")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    sdist = out / "llama-src.tar.gz"
    if not sdist.exists():
        prune_sdist(llama_wheel.fetch_sdist(llama_wheel.cache_root(), None), sdist)
    download_wheels(out / "wheels")
    kit = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    total = kit + tree_bytes()
    print(
        f"gpu-kit: {out} holds {kit / 2**20:.1f} MiB; with the working tree {total / 2**20:.1f} MiB travels"
    )
    if total > LIMIT_BYTES:
        raise SystemExit(f"gpu-kit: {total / 2**20:.1f} MiB is over the device machine's 64 MiB")


if __name__ == "__main__":
    main()
