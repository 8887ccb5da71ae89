#!/usr/bin/env python3
"""Build, cache and install the llama-cpp-python wheel for one build configuration.

The one place that decides how llama.cpp is compiled (`make install`, the Dockerfiles and the
GPU kit all call it), and the reason pip's own wheel cache is bypassed for this one package:
pip keys a cached wheel on the sdist alone, not on CMAKE_ARGS, the compiler or the CPU a
`-march=native` build was made for, so it hands back a wheel built for another configuration
without a word (an AVX-512 wheel on an AVX2-only host: SIGILL; an AMX wheel: a crash in
`ggml_backend_amx_mul_mat`). Here every wheel lives in a folder named by a hash of everything
that went into it, and a venv records which one it has.

Standard library only: it runs before the venv exists.

    python3 scripts/llama_wheel.py key      [--gpu cpu|cuda] [--portable]   # the configuration's key
    python3 scripts/llama_wheel.py install  --python .venv/bin/python [...] # build if needed, install
    python3 scripts/llama_wheel.py build    --out DIR [...]                 # build if needed, copy to DIR
    python3 scripts/llama_wheel.py sources  --dest DIR                      # the patched sources (llama-server)
    python3 scripts/llama_wheel.py version | cmake-args | cflags            # for other builds alike

Every build compiles the pinned sdist with patches/llama.cpp/*.patch applied to its vendored
llama.cpp (as Ollama keeps its llama.cpp patches): each patch's header says why and links the
upstream issue or PR. The patch set's content is part of the key, so a patched wheel never comes
from an unpatched cache entry, nor the other way round.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

LLAMA_CPP_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz"
MARKER = ".llama-cpp-build.json"
PATCH_DIR = Path(__file__).resolve().parent.parent / "patches" / "llama.cpp"
LLAMA_SUBDIR = "vendor/llama.cpp"  # where the patches apply, inside the unpacked sdist

X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")

# AMX is never compiled into a native build: llama.cpp's AMX kernels crash on Q4_x/Q8_0 weights
# (segfault in ggml_backend_amx_mul_mat) and have computed wrong results on Q4_0/Q4_1. With
# GGML_NATIVE=ON, -march=native turns AMX on whatever GGML_AMX_* says; GCC lets an explicit
# -mno-* win over -march, so the compiler flags are what actually removes it. The GGML_AMX_*
# options cover GGML_NATIVE=OFF builds. A portable build's "sapphirerapids" CPU variant still
# has AMX; gguf_serve/llama_backend.py never loads it unless allow_amx is set.
NO_AMX_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" if X86 else ""
NO_AMX_CMAKE = ["-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"] if X86 else []


def cmake_args(gpu: str, portable: bool, cuda_arch: str | None) -> list[str]:
    args = ["-DLLAVA_BUILD=OFF", *NO_AMX_CMAKE]
    if portable:
        # Every CPU variant as a loadable module beside libggml (llama.cpp's and Ollama's release
        # builds do this); gguf_serve/llama_backend.py picks the variant at run time.
        args += [
            "-DGGML_NATIVE=OFF",
            "-DGGML_BACKEND_DL=ON",
            "-DGGML_CPU_ALL_VARIANTS=ON",
            # STRING, not PATH: a PATH would be made absolute (the build folder); this is relative to
            # the wheel root, so the modules land inside the package, next to libllama.
            "-DGGML_BACKEND_DIR:STRING=llama_cpp/lib",
        ]
    if gpu == "cuda":
        args.append("-DGGML_CUDA=on")
        if cuda_arch:
            args.append(f"-DCMAKE_CUDA_ARCHITECTURES={cuda_arch}")
    # A user's own CMAKE_ARGS (e.g. -DGGML_BLAS=ON) come last, so they win, and are part of the key.
    return args + shlex.split(os.environ.get("CMAKE_ARGS", ""))


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return ""


def native_target() -> str:
    """What -march=native means to this compiler on this CPU: every -m option it turns on."""
    cc = os.environ.get("CC", "cc")
    out = _run([cc, "-march=native", "-Q", "--help=target"])
    enabled = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1] == "[enabled]":
            enabled.append(parts[0])
        elif len(parts) == 2 and parts[0] in ("-march=", "-mtune="):
            enabled.append(parts[0] + parts[1])
    return " ".join(sorted(enabled)) or f"unknown ({platform.processor()})"


def patch_files() -> list[Path]:
    if not PATCH_DIR.is_dir():  # a build that forgot to copy it must not build unpatched quietly
        raise SystemExit(f"llama_wheel: {PATCH_DIR} is missing (copy patches/ beside scripts/)")
    return sorted(PATCH_DIR.glob("*.patch"))


def patch_set() -> list[str]:
    """What the key knows of the patches: each one's name and a hash of its bytes."""
    return [f"{p.name}:{hashlib.sha256(p.read_bytes()).hexdigest()[:16]}" for p in patch_files()]


class PatchError(RuntimeError):
    pass


def _hunks(lines: list[str]) -> list[tuple[int, list[str], list[str]]]:
    """(old start line, old lines, new lines) of each hunk of one file's unified diff."""
    hunks: list[tuple[int, list[str], list[str]]] = []
    for line in lines:
        if line.startswith("@@"):
            start = int(line.split()[1].lstrip("-").split(",")[0])
            hunks.append((start, [], []))
        elif hunks and line[:1] in (" ", "-", "+"):
            _, old, new = hunks[-1]
            if line[0] != "+":
                old.append(line[1:])
            if line[0] != "-":
                new.append(line[1:])
        elif hunks and line == "":  # a blank context line whose leading space an editor removed
            hunks[-1][1].append("")
            hunks[-1][2].append("")
    return hunks


def apply_patch(patch: Path, root: Path) -> list[str]:
    """Apply one unified diff (paths a/... b/..., relative to `root`) exactly; the files it changed.

    Standard library only (no `patch` or `git` in the build images). A hunk whose lines are not
    found as they are, near where the diff says or anywhere else once, is an error: a patch that
    does not fit the pinned sources fails the build instead of building something else.
    """
    text = patch.read_text().splitlines()
    files: list[tuple[str, list[str]]] = []
    for i, line in enumerate(text):
        if line.startswith("--- a/") and i + 1 < len(text) and text[i + 1].startswith("+++ b/"):
            files.append((text[i + 1][6:].split("\t")[0].strip(), []))
        elif files and not line.startswith("+++ b/"):
            files[-1][1].append(line)
    if not files:
        raise PatchError(f"{patch.name}: no file in it")
    changed = []
    for rel, body in files:
        target = root / rel
        if not target.is_file():
            raise PatchError(f"{patch.name}: {rel} is not in the sources")
        lines = target.read_text().split("\n")
        delta = 0
        for start, old, new in _hunks(body):
            at = start - 1 + delta
            if lines[at : at + len(old)] != old:
                found = [i for i in range(len(lines)) if lines[i : i + len(old)] == old]
                if len(found) != 1:
                    raise PatchError(f"{patch.name}: a hunk at {rel}:{start} does not fit the sources")
                at = found[0]
            lines[at : at + len(old)] = new
            delta = at + len(new) - (start - 1 + len(old))
        target.write_text("\n".join(lines))
        changed.append(rel)
    return changed


def unpack_sources(sdist: Path, dest: Path) -> Path:
    """The sdist unpacked under `dest` with every patch applied; its top folder (a fresh copy)."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist) as tar:
        top = dest / tar.getnames()[0].split("/")[0]
        if top.exists():
            shutil.rmtree(top)  # never patch twice
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:  # Python before 3.11.4
            tar.extractall(dest)
    for p in patch_files():
        for rel in apply_patch(p, top / LLAMA_SUBDIR):
            print(f"llama_wheel: {p.name}: patched {LLAMA_SUBDIR}/{rel}", flush=True)
    return top


def configuration(gpu: str, portable: bool, cuda_arch: str | None) -> dict[str, object]:
    cc = os.environ.get("CC", "cc")
    config: dict[str, object] = {
        "llama_cpp_python": LLAMA_CPP_VERSION,
        "platform": sysconfig.get_platform(),
        "compiler": _run([cc, "--version"]).splitlines()[:1],
        "gpu": gpu,
        "portable": portable,
        "cmake_args": cmake_args(gpu, portable, cuda_arch),
        "cflags": NO_AMX_FLAGS,
        "patches": patch_set(),
    }
    if not portable:
        # A native wheel is only good for CPUs that -march=native resolves the same way.
        config["native_target"] = native_target()
    if gpu == "cuda":
        config["nvcc"] = _run(["nvcc", "--version"]).strip().splitlines()[-1:]
    return config


def config_key(config: dict[str, object]) -> str:
    blob = json.dumps(config, sort_keys=True).encode()
    kind = ("portable" if config["portable"] else "native") + "-" + str(config["gpu"])
    return f"{kind}-{hashlib.sha256(blob).hexdigest()[:12]}"


def cache_root() -> Path:
    base = os.environ.get("GGUF_SERVE_WHEEL_CACHE")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "gguf-serve" / "wheels"


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Two `make install`s at once build a configuration once, not twice into one folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def sdist_path(root: Path) -> Path:
    """Where fetch_sdist keeps the pinned sdist (tests unpack llama.cpp's own sources from it)."""
    return root / "sdist" / SDIST_NAME


def fetch_sdist(root: Path, sdist: Path | None) -> Path:
    if sdist is not None:
        return sdist
    target = sdist_path(root)
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                "-d", str(target.parent), f"llama-cpp-python=={LLAMA_CPP_VERSION}",
            ],
            check=True,
        )  # fmt: skip
    return target


def ensure_wheel(config: dict[str, object], sdist: Path | None, isolated: bool = True) -> Path:
    root = cache_root()
    key = config_key(config)
    folder = root / key
    with locked(root / f"{key}.lock"):
        wheels = sorted(folder.glob("llama_cpp_python-*.whl"))
        if wheels:
            return wheels[-1]
        source = fetch_sdist(root, sdist)
        env = dict(os.environ, CMAKE_ARGS=" ".join(config["cmake_args"]))  # type: ignore[arg-type]
        if NO_AMX_FLAGS:
            env["CFLAGS"] = f"{os.environ.get('CFLAGS', '')} {NO_AMX_FLAGS}".strip()
            env["CXXFLAGS"] = f"{os.environ.get('CXXFLAGS', '')} {NO_AMX_FLAGS}".strip()
        print(f"llama_wheel: compiling llama-cpp-python {LLAMA_CPP_VERSION} for {key} (minutes)", flush=True)
        print(f"llama_wheel: CMAKE_ARGS={env['CMAKE_ARGS']}", flush=True)
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            tree = unpack_sources(source, Path(tmp) / "src")
            # --no-cache-dir: never read or write pip's wheel cache for this package (see above).
            # isolated=False: use the build tools already installed (a machine with no registry).
            offline = [] if isolated else ["--no-build-isolation"]
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "wheel",
                    "--no-cache-dir",
                    "--no-deps",
                    *offline,
                    "-w",
                    tmp,
                    str(tree),
                ],
                env=env,
                check=True,
            )
            built = sorted(Path(tmp).glob("llama_cpp_python-*.whl"))
            if not built:
                raise SystemExit("llama_wheel: pip wheel produced no wheel")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            final = folder / built[0].name
            shutil.move(str(built[0]), final)  # the wheel appears whole or not at all
        return final


def installed_key(python: Path) -> str | None:
    with contextlib.suppress(OSError, ValueError, KeyError):
        return str(json.loads((python.parent.parent / MARKER).read_text())["key"])
    return None


def install(config: dict[str, object], python: Path, sdist: Path | None) -> None:
    key = config_key(config)
    venv_marker = python.parent.parent / MARKER
    probe = subprocess.run([str(python), "-c", "import llama_cpp"], capture_output=True)
    if installed_key(python) == key and probe.returncode == 0:
        print(f"llama_wheel: {key} already installed")
        return
    wheel = ensure_wheel(config, sdist)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(wheel)], check=True
    )
    venv_marker.write_text(json.dumps({"key": key, "wheel": str(wheel), "config": config}, indent=2) + "\n")
    print(f"llama_wheel: installed {wheel}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "command",
        choices=["key", "install", "build", "sources", "show", "version", "cmake-args", "cflags"],
    )
    parser.add_argument("--gpu", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--portable", action="store_true", help="all CPU variants, chosen at run time")
    parser.add_argument("--cuda-arch", default=None, help="CMAKE_CUDA_ARCHITECTURES, e.g. 90 for H100/H200")
    parser.add_argument("--python", type=Path, help="the venv's python (install)")
    parser.add_argument("--out", type=Path, help="copy the wheel here (build)")
    parser.add_argument("--dest", type=Path, help="unpack the patched sources here (sources)")
    parser.add_argument("--sdist", type=Path, help="a local llama-cpp-python sdist (offline builds)")
    parser.add_argument(
        "--no-build-isolation",
        action="store_true",
        help="build with the installed scikit-build-core (offline)",
    )
    args = parser.parse_args()
    if args.command == "version":
        print(LLAMA_CPP_VERSION)
        return
    if args.command in ("cmake-args", "cflags"):  # for llama.cpp's own server, built alike
        print(
            " ".join(cmake_args(args.gpu, args.portable, args.cuda_arch))
            if args.command == "cmake-args"
            else NO_AMX_FLAGS
        )
        return
    if args.command == "sources":  # llama.cpp's own server, from the same patched sources
        if args.dest is None:
            parser.error("sources needs --dest")
        top = unpack_sources(fetch_sdist(cache_root(), args.sdist), args.dest)
        print(top / LLAMA_SUBDIR)
        return
    config = configuration(args.gpu, args.portable, args.cuda_arch)
    if args.command == "key":
        print(config_key(config))
    elif args.command == "show":
        print(json.dumps({"key": config_key(config), **config}, indent=2, sort_keys=True))
    elif args.command == "install":
        if args.python is None:
            parser.error("install needs --python")
        install(config, args.python, args.sdist)
    else:
        if args.out is None:
            parser.error("build needs --out")
        wheel = ensure_wheel(config, args.sdist, isolated=not args.no_build_isolation)
        args.out.mkdir(parents=True, exist_ok=True)
        shutil.copy2(wheel, args.out / wheel.name)
        print(args.out / wheel.name)


if __name__ == "__main__":
    main()
