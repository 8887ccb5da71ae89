"""Conversion recipes: TOML files listing the models `make convert` builds.

[[model]]
name = "Qwen3-Embedding-0.6B"              # output folder and file stem
source = "modelscope:Qwen/Qwen3-Embedding-0.6B"
quant = ["Q8_0"]                           # llama.cpp types; the outtype file is always kept
outtype = "f16"                            # optional: f16 (default) | bf16 | f32
role = "embedding"                         # optional: chat | embedding | rerank (default: detected)
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf_serve.convert.errors import ConvertError

_KEYS = {"name", "source", "quant", "outtype", "role", "note"}


@dataclass(frozen=True)
class RecipeEntry:
    name: str
    source: str
    quant: list[str] = field(default_factory=lambda: ["Q8_0"])
    outtype: str = "f16"
    role: str | None = None


def _entry(path: Path, i: int, raw: Any) -> RecipeEntry:
    where = f"{path}: model #{i + 1}"
    if not isinstance(raw, dict):
        raise ConvertError(f"{where}: expected a [[model]] table")
    unknown = set(raw) - _KEYS
    if unknown:
        raise ConvertError(
            f"{where}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(_KEYS))}"
        )
    for key in ("name", "source"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise ConvertError(f"{where}: {key} must be a non-empty string")
    quant = raw.get("quant", ["Q8_0"])
    if isinstance(quant, str):
        quant = [q for q in quant.split(",") if q]
    if not isinstance(quant, list) or not all(isinstance(q, str) for q in quant):
        raise ConvertError(f'{where}: quant must be a list of type names such as ["Q4_K_M"]')
    role = raw.get("role")
    if role not in (None, "chat", "embedding", "rerank"):
        raise ConvertError(f"{where}: role must be chat, embedding or rerank")
    return RecipeEntry(raw["name"], raw["source"], list(quant), str(raw.get("outtype", "f16")).lower(), role)


def load_recipe(path: Path) -> list[RecipeEntry]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConvertError(f"recipe {path} not found") from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConvertError(f"recipe {path}: {e}") from None
    models = data.get("model")
    if not isinstance(models, list) or not models:
        raise ConvertError(f"recipe {path}: no [[model]] entries")
    entries = [_entry(path, i, raw) for i, raw in enumerate(models)]
    names = [e.name for e in entries]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConvertError(f"recipe {path}: duplicate model name(s) {', '.join(dupes)}")
    return entries


def select(entries: list[RecipeEntry], names: list[str] | None, path: Path) -> list[RecipeEntry]:
    if not names:
        return entries
    known = {e.name: e for e in entries}
    missing = [n for n in names if n not in known]
    if missing:
        raise ConvertError(
            f"recipe {path}: no model named {', '.join(missing)}; choose from {', '.join(known)}"
        )
    return [known[n] for n in names]
