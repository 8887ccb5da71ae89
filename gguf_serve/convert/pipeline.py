"""Recipe entry -> artifacts: resolve the source, convert, quantize, verify, record the manifest.

`ensure_converted` is the entry point the server uses; `convert_model` is what the CLI runs.
Work is skipped when the manifest says an artifact is up to date (same source, same
converter version, same file size); `force` redoes it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf_serve.convert import manifest
from gguf_serve.convert.architectures import Role
from gguf_serve.convert.converter import CONVERTER_VERSION, convert_checkpoint
from gguf_serve.convert.errors import ConvertError
from gguf_serve.convert.quantize import normalize_type, quantize_gguf
from gguf_serve.convert.sources import resolve_checkpoint
from gguf_serve.convert.verify import verify_gguf
from gguf_serve.convert.writer import OUTTYPES

log = logging.getLogger("gguf_serve.convert")


@dataclass
class Artifact:
    path: Path
    type: str
    status: str  # "converted" | "quantized" | "up to date"
    verified: bool | None
    size: int


@dataclass
class ModelResult:
    name: str
    role: str
    artifacts: list[Artifact] = field(default_factory=list)


def artifact_path(models_dir: Path, name: str, type_name: str) -> Path:
    return models_dir / name / f"{name}-{type_name}.gguf"


def _is_current(data: dict[str, Any], source: str, path: Path) -> bool:
    entry = data.get("files", {}).get(path.name)
    return (
        path.is_file()
        and data.get("source") == source
        and data.get("converter") == CONVERTER_VERSION
        and isinstance(entry, dict)
        and entry.get("size") == path.stat().st_size
    )


def convert_model(
    source: str,
    name: str,
    quants: list[str],
    models_dir: Path,
    outtype: str = "f16",
    force: bool = False,
    role: Role | None = None,
    threads: int | None = None,
    verify: bool = True,
    progress: bool = False,
    say: Callable[[str], None] | None = None,
) -> ModelResult:
    """Build models_dir/name/name-<TYPE>.gguf for the outtype and every type in quants."""
    if not name or "/" in name or name.startswith("."):
        raise ConvertError(f"invalid model name {name!r}: use a plain folder name such as Qwen3-4B")
    outtype = outtype.lower()
    if outtype not in OUTTYPES:
        raise ConvertError(f"unknown outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    base_type = outtype.upper()
    types = [normalize_type(q) for q in quants] or [base_type]
    out_dir = models_dir / name
    data = manifest.load(out_dir)
    base = artifact_path(models_dir, name, base_type)
    wanted = [base] + [artifact_path(models_dir, name, t) for t in types if t != base_type]
    result = ModelResult(name, str(data.get("role", role or "?")))
    if not force and all(_is_current(data, source, p) for p in wanted):
        for p in wanted:
            entry = data["files"][p.name]
            ver = (entry.get("verification") or {}).get("ok")
            result.artifacts.append(Artifact(p, entry["type"], "up to date", ver, entry["size"]))
        return result

    resolved = resolve_checkpoint(source)
    fingerprint = manifest.source_fingerprint(resolved.path)
    if data.get("source_files") != fingerprint or data.get("source") != source:
        force = True  # the checkpoint changed: nothing built from the old one is current
    if force:
        data = {}
    data.update(
        {
            "name": name,
            "source": source,
            "revision": resolved.revision,
            "converter": CONVERTER_VERSION,
            "source_dir": str(resolved.path),
            "source_files": fingerprint,
        }
    )
    files: dict[str, Any] = data.setdefault("files", {})

    def record(path: Path, type_name: str, status: str, the_role: str) -> None:
        ver: dict[str, Any] | None = None
        if verify:
            if say:
                say(f"verify {path.name}")
            ver = verify_gguf(path, resolved.path, the_role)
            if not ver.get("loads") or not ver.get("run", {}).get("ok"):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                files.pop(path.name, None)
                manifest.save(out_dir, data)
                raise ConvertError(f"{path.name} failed verification: {ver.get('error') or ver.get('run')}")
            if not ver["ok"]:
                log.warning("%s: tokenization differs from the HF tokenizer: %s", path.name, ver["tokenizer"])
        files[path.name] = manifest.file_entry(path, type_name, ver)
        manifest.save(out_dir, data)
        result.artifacts.append(
            Artifact(path, type_name, status, ver["ok"] if ver else None, files[path.name]["size"])
        )

    if force or not _is_current(data, source, base):
        if say:
            say(f"convert {resolved.path} -> {base}")
        conv = convert_checkpoint(resolved.path, base, outtype, name=name, role=role, progress=progress)
        data["role"], data["arch"] = conv.role, conv.arch
        result.role = conv.role
        record(base, base_type, "converted", conv.role)
    else:
        entry = files[base.name]
        result.artifacts.append(
            Artifact(
                base, base_type, "up to date", (entry.get("verification") or {}).get("ok"), entry["size"]
            )
        )
    the_role = str(data.get("role") or role or "chat")
    result.role = the_role
    for t in types:
        if t == base_type:
            continue
        dst = artifact_path(models_dir, name, t)
        if not force and _is_current(data, source, dst):
            entry = files[dst.name]
            result.artifacts.append(
                Artifact(dst, t, "up to date", (entry.get("verification") or {}).get("ok"), entry["size"])
            )
            continue
        if say:
            say(f"quantize {base.name} -> {dst.name}")
        quantize_gguf(base, dst, t, threads)
        record(dst, t, "quantized", the_role)
    return result


def ensure_converted(source: str, name: str, quant: str, models_dir: Path) -> Path:
    """models_dir/name/name-<QUANT>.gguf, converting (and quantizing, verifying, writing the manifest)
    only when it is missing or out of date. quant is a llama.cpp type name (F16, Q8_0, Q4_K_M, ...);
    F32/F16/BF16 are written directly, other types are quantized from the F16 file."""
    q = normalize_type(quant)
    outtype = q.lower() if q.lower() in OUTTYPES else "f16"
    convert_model(source, name, [q], models_dir, outtype=outtype)
    return artifact_path(models_dir, name, q)
