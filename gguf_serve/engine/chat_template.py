"""Render chat messages with the model's own Jinja chat template (from the GGUF)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from gguf_serve.engine.requests import InvalidRequest

# Used when a GGUF carries no template: ChatML, which Qwen and SmolLM speak.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# What render() passes the template itself, and the environment's globals: a client's
# chat_template_kwargs may not replace these (`messages: []` or `range: 1` breaks rendering).
_TEMPLATE_ARGS = ("messages", "tools", "add_generation_prompt", "bos_token", "eos_token")
RESERVED_TEMPLATE_KWARGS = frozenset(
    (*_TEMPLATE_ARGS, "raise_exception", "strftime_now", *ImmutableSandboxedEnvironment().globals)
)


def check_template_kwargs(kwargs: dict[str, Any]) -> None:
    """chat_template_kwargs may add variables, not replace the renderer's own."""
    reserved = sorted(RESERVED_TEMPLATE_KWARGS.intersection(kwargs))
    if reserved:
        raise InvalidRequest(
            f"chat_template_kwargs may not set {', '.join(reserved)}: the server passes these itself",
            "chat_template_kwargs",
        )


def _raise(message: str) -> None:
    raise InvalidRequest(f"chat template: {message}")


def _tojson(
    value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False
) -> str:
    # transformers' tojson: no HTML escaping, unicode kept as is.
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        path = Path(source)
        if "{" not in source and path.suffix in (".jinja", ".j2", ".txt") and path.is_file():
            source = path.read_text(encoding="utf-8")
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"chat template does not parse: {e}") from e
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        check_template_kwargs(kwargs)
        try:
            return self._template.render(
                messages=messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **kwargs,
            )
        except InvalidRequest:
            raise
        except (
            jinja2.TemplateError,
            TypeError,
            ValueError,
            AttributeError,
            LookupError,
            ArithmeticError,
        ) as e:
            # The template ran on what the client sent (messages, tools, kwargs): its failure
            # is a bad request, not a server error.
            raise InvalidRequest(f"chat template failed on these messages: {e}", "messages") from e
