"""The house rules between layers, read from the import statements (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "gguf_serve"


def imports(folder: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for path in sorted((PKG / folder).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
        out[str(path.relative_to(PKG))] = names
    return out


def offenders(folder: str, forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{file}: {name}"
        for file, names in imports(folder).items()
        for name in sorted(names)
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    ]


def test_engine_imports_neither_http_nor_the_converter() -> None:
    assert (
        offenders("engine", ("fastapi", "starlette", "sse_starlette", "gguf_serve.api", "gguf_serve.convert"))
        == []
    )


def test_api_never_touches_llama_cpp() -> None:
    assert (
        offenders("api", ("llama_cpp", "gguf_serve.engine.llama_runtime", "gguf_serve.engine.llama_backend"))
        == []
    )
