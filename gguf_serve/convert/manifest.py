"""manifest.json beside the artifacts of one model: provenance, checksums, verification.

{"name", "source", "revision", "role", "arch", "converter", "source_files": {path: {size, sha256}},
 "files": {"NAME-Q8_0.gguf": {"type", "size", "sha256", "verification", "created"}}}
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 8 * 1024 * 1024) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def source_fingerprint(model_dir: Path) -> dict[str, int]:
    """Sizes of the checkpoint's relevant files: cheap, and changes when the checkpoint does."""
    out: dict[str, int] = {}
    for p in sorted(model_dir.rglob("*")):
        if p.is_file() and (p.suffix in (".safetensors", ".json", ".txt", ".jinja")):
            out[str(p.relative_to(model_dir))] = p.stat().st_size
    return out


def load(model_out_dir: Path) -> dict[str, Any]:
    path = model_out_dir / MANIFEST
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save(model_out_dir: Path, data: dict[str, Any]) -> None:
    """Atomic: a reader sees the old or the new manifest, never half of one."""
    model_out_dir.mkdir(parents=True, exist_ok=True)
    tmp = model_out_dir / f".{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, model_out_dir / MANIFEST)


def file_entry(path: Path, type_name: str, verification: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "type": type_name,
        "size": path.stat().st_size,
        "sha256": sha256_file(path),
        "verification": verification,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
