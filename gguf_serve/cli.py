"""The `gguf-serve` command: serve (the default), config, chat, convert, models."""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from gguf_serve.console import fail
from gguf_serve.convert.commands import register as register_convert_commands
from gguf_serve.settings import Settings, SettingsError, load_settings

app = typer.Typer(
    add_completion=False,
    no_args_is_help=False,
    help="Serve GGUF chat, embedding and rerank models over the OpenAI API; convert checkpoints to GGUF.",
    pretty_exceptions_enable=False,
)

ProfileOpt = Annotated[
    str | None, typer.Option("--profile", "-p", help="demo | cpu | cuda | path/to/profile.toml", envvar=None)
]


def _settings(profile: str | None, **overrides: object) -> Settings:
    try:
        return load_settings(profile, **overrides)
    except SettingsError as e:
        raise fail(str(e)) from None


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


@app.command()
def serve(
    profile: ProfileOpt = None,
    host: Annotated[str | None, typer.Option(help="bind address (default 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="port (default 8000)")] = None,
    api_key: Annotated[
        list[str] | None, typer.Option("--api-key", help="accepted API key (repeatable)")
    ] = None,
    models_dir: Annotated[Path | None, typer.Option(help="where relative model files live")] = None,
    n_gpu_layers: Annotated[
        str | None, typer.Option(help="override every model's n_gpu_layers (a number, -1 = all, or auto)")
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="debug | info | warning | error")] = None,
) -> None:
    """Serve the models a profile names (the default command)."""
    import uvicorn

    from gguf_serve.api.app import create_app
    from gguf_serve.engine.llama_runtime import ModelLoadError
    from gguf_serve.engine.registry import ModelRegistry
    from gguf_serve.model_files import resolve_model_files

    settings = _settings(
        profile, host=host, port=port, api_keys=api_key or None, models_dir=models_dir, log_level=log_level
    )
    if n_gpu_layers is not None:
        value: int | str = (
            n_gpu_layers if n_gpu_layers == "auto" else _int_option("--n-gpu-layers", n_gpu_layers)
        )
        settings.models = [m.model_copy(update={"n_gpu_layers": value}) for m in settings.models]
    if not settings.models:
        raise fail("the profile names no models; add [[models]] entries or choose --profile demo")
    _setup_logging(settings.log_level)
    from gguf_serve.engine.llama_backend import init_backend

    try:
        runtime = init_backend(allow_amx=settings.allow_amx)
    except RuntimeError as e:
        raise fail(f"llama.cpp cannot start on this machine: {e}") from None
    logging.getLogger("gguf_serve").info("llama.cpp backend: %s", runtime.summary())
    try:
        settings.all_api_keys()  # an unreadable api_key_file is a start-up error
        registry = ModelRegistry(settings, resolve_model_files(settings))
    except (SettingsError, ModelLoadError) as e:
        raise fail(str(e)) from None
    exit_code = 0
    server: uvicorn.Server | None = None

    def on_fatal() -> None:
        nonlocal exit_code
        exit_code = 1
        if server is not None:
            server.should_exit = True

    config = uvicorn.Config(
        create_app(settings, registry, on_fatal, runtime.as_dict()),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,  # our own access log has the request id and the model
        timeout_graceful_shutdown=int(settings.shutdown_grace_s),
    )
    server = uvicorn.Server(config)
    # uvicorn drains in-flight requests on SIGTERM/SIGINT, then restores the previous
    # handlers and re-raises the signal: make that a clean exit 0 instead of death by signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_after_drain)
    server.run()
    if exit_code:
        raise fail("; ".join(registry.failures) or "a model failed to load", exit_code)


def _exit_after_drain(signum: int, _frame: object) -> None:
    raise SystemExit(0)


def _int_option(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise fail(f"{name} must be a number or 'auto', not {value!r}") from None


@app.command()
def config(profile: ProfileOpt = None) -> None:
    """Print the effective settings (profile < .env < environment < flags), secrets masked."""
    typer.echo(json.dumps(_settings(profile).masked_dump(), indent=2))


@app.command()
def chat(
    url: Annotated[str, typer.Option(help="server base URL")] = "http://127.0.0.1:8000",
    model: Annotated[str | None, typer.Option(help="model id (default: the first chat model)")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="GGUF_SERVE_API_KEY", help="API key")] = None,
    system: Annotated[str | None, typer.Option(help="system prompt")] = None,
) -> None:
    """A terminal chat with a running server: streaming, history, /clear, /quit."""
    from gguf_serve.chat_client import run_chat

    run_chat(url, model, api_key, system)


@app.command("check-kernels")
def check_kernels(
    files: Annotated[list[Path], typer.Argument(help="GGUF files, one per weight type you serve")],
    allow_amx: Annotated[bool, typer.Option(help="let the check use AMX kernels, if built")] = False,
) -> None:
    """Compare this CPU's kernel path (repack, AMX) with the plain one on each file's logits."""
    from gguf_serve.engine.kernel_check import run_checks
    from gguf_serve.engine.llama_backend import init_backend

    for path in files:
        if not path.is_file():
            raise fail(f"{path}: no such GGUF file")
    typer.echo(f"llama.cpp backend: {init_backend(allow_amx=allow_amx).summary()}")
    failures, lines = run_checks(files, allow_amx)
    for line in lines:
        typer.echo(line)
    if failures:
        raise typer.Exit(1)


register_convert_commands(app)  # convert, models

COMMANDS = {"serve", "config", "chat", "convert", "models", "check-kernels"}


def main() -> None:
    argv = sys.argv[1:]
    # `gguf-serve --profile demo` serves: serving is the default command.
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("--help", "-h")):
        sys.argv.insert(1, "serve")
    app()


if __name__ == "__main__":
    main()
