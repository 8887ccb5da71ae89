"""How every `gguf-serve` command reports a failure: one line on stderr, no traceback."""

from __future__ import annotations

import typer


def fail(message: str, code: int = 2) -> typer.Exit:
    """`raise fail("...")`: the message as `gguf-serve: error: ...`, then exit with `code`."""
    typer.echo(f"gguf-serve: error: {message}", err=True)
    return typer.Exit(code)
