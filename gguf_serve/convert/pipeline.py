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


@dataclass(frozen=True)
class ConversionPlan:
    """Step 1: what a conversion must produce, checked before anything is read or written."""

    source: str
    name: str
    outtype: str  # what the checkpoint is written as (f16 | bf16 | f32)
    base: Path  # models_dir/name/name-<OUTTYPE>.gguf, the file every quantization starts from
    quants: tuple[tuple[str, Path], ...]  # (llama.cpp type, path) beyond the base

    @property
    def out_dir(self) -> Path:
        return self.base.parent

    @property
    def base_type(self) -> str:
        return self.outtype.upper()

    @property
    def paths(self) -> list[Path]:
        return [self.base, *(p for _, p in self.quants)]


def plan_conversion(
    source: str, name: str, quants: list[str], models_dir: Path, outtype: str = "f16"
) -> ConversionPlan:
    if not name or "/" in name or name.startswith("."):
        raise ConvertError(f"invalid model name {name!r}: use a plain folder name such as Qwen3-4B")
    outtype = outtype.lower()
    if outtype not in OUTTYPES:
        raise ConvertError(f"unknown outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    types = [normalize_type(q) for q in quants]
    extra = tuple(
        (t, artifact_path(models_dir, name, t)) for t in dict.fromkeys(types) if t != outtype.upper()
    )
    return ConversionPlan(source, name, outtype, artifact_path(models_dir, name, outtype.upper()), extra)


class _Recorder:
    """Step 3: verify each built file and write it into the manifest at once, so an
    interrupted run keeps what it finished."""

    def __init__(
        self,
        plan: ConversionPlan,
        data: dict[str, Any],
        checkpoint: Path,
        result: ModelResult,
        verify: bool,
        say: Callable[[str], None] | None,
    ) -> None:
        self.plan, self.data, self.checkpoint, self.result = plan, data, checkpoint, result
        self.verify, self.say = verify, say
        self.files: dict[str, Any] = data.setdefault("files", {})

    def up_to_date(self, path: Path, type_name: str) -> None:
        entry = self.files[path.name]
        ver = (entry.get("verification") or {}).get("ok")
        self.result.artifacts.append(Artifact(path, type_name, "up to date", ver, entry["size"]))

    def record(self, path: Path, type_name: str, status: str, role: str) -> None:
        ver: dict[str, Any] | None = None
        if self.verify:
            if self.say:
                self.say(f"verify {path.name}")
            ver = verify_gguf(path, self.checkpoint, role)
            if not ver.get("loads") or not ver.get("run", {}).get("ok"):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                self.files.pop(path.name, None)
                manifest.save(self.plan.out_dir, self.data)
                raise ConvertError(f"{path.name} failed verification: {ver.get('error') or ver.get('run')}")
            if not ver["ok"]:
                log.warning("%s: tokenization differs from the HF tokenizer: %s", path.name, ver["tokenizer"])
        self.files[path.name] = manifest.file_entry(path, type_name, ver)
        manifest.save(self.plan.out_dir, self.data)
        self.result.artifacts.append(
            Artifact(path, type_name, status, ver["ok"] if ver else None, self.files[path.name]["size"])
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
    """Build models_dir/name/name-<TYPE>.gguf for the outtype and every type in quants:
    plan (names and paths), build (convert, then quantize), record (verify, manifest)."""
    plan = plan_conversion(source, name, quants, models_dir, outtype)
    data = manifest.load(plan.out_dir)
    result = ModelResult(name, str(data.get("role", role or "?")))
    if not force and all(_is_current(data, source, p) for p in plan.paths):
        done = _Recorder(plan, data, Path(), result, verify=False, say=None)
        done.up_to_date(plan.base, plan.base_type)
        for t, p in plan.quants:
            done.up_to_date(p, t)
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
    rec = _Recorder(plan, data, resolved.path, result, verify, say)
    _build_base(plan, rec, resolved.path, force, role, progress)
    _build_quants(plan, rec, force, threads)
    return result


def _build_base(
    plan: ConversionPlan, rec: _Recorder, checkpoint: Path, force: bool, role: Role | None, progress: bool
) -> None:
    """Step 2a: the checkpoint, written as the outtype GGUF."""
    if not force and _is_current(rec.data, plan.source, plan.base):
        rec.up_to_date(plan.base, plan.base_type)
    else:
        if rec.say:
            rec.say(f"convert {checkpoint} -> {plan.base}")
        conv = convert_checkpoint(
            checkpoint, plan.base, plan.outtype, name=plan.name, role=role, progress=progress
        )
        rec.data["role"], rec.data["arch"] = conv.role, conv.arch
        rec.record(plan.base, plan.base_type, "converted", conv.role)
    rec.result.role = str(rec.data.get("role") or role or "chat")


def _build_quants(plan: ConversionPlan, rec: _Recorder, force: bool, threads: int | None) -> None:
    """Step 2b: every other type, quantized from the base file."""
    for t, dst in plan.quants:
        if not force and _is_current(rec.data, plan.source, dst):
            rec.up_to_date(dst, t)
            continue
        if rec.say:
            rec.say(f"quantize {plan.base.name} -> {dst.name}")
        quantize_gguf(plan.base, dst, t, threads)
        rec.record(dst, t, "quantized", rec.result.role)


def ensure_converted(source: str, name: str, quant: str, models_dir: Path) -> Path:
    """models_dir/name/name-<QUANT>.gguf, converting (and quantizing, verifying, writing the manifest)
    only when it is missing or out of date. quant is a llama.cpp type name (F16, Q8_0, Q4_K_M, ...);
    F32/F16/BF16 are written directly, other types are quantized from the F16 file."""
    q = normalize_type(quant)
    outtype = q.lower() if q.lower() in OUTTYPES else "f16"
    convert_model(source, name, [q], models_dir, outtype=outtype)
    return artifact_path(models_dir, name, q)
