"""`gguf-serve chat`: a terminal chat client for a running server (streaming, history)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
from rich.console import Console
from rich.markup import escape

HELP = "/clear forgets the conversation, /quit (or Ctrl-D) leaves."


class ChatClientError(Exception):
    """A failure to show the user in one line."""


def api_root(base_url: str) -> str:
    """The server root, whether the user typed http://h:8000, http://h:8000/ or http://h:8000/v1."""
    root = base_url.strip().rstrip("/")
    if root.endswith("/v1"):
        root = root[: -len("/v1")]
    if "://" not in root:
        root = "http://" + root
    return root


def error_message(response: httpx.Response) -> str:
    try:
        body = json.loads(response.read())
        message = body["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.reason_phrase or "error"
    return f"server answered {response.status_code}: {message}"


def pick_chat_model(models: list[dict[str, Any]]) -> str | None:
    """The first chat model of /v1/models; models without a role count as chat (other servers)."""
    for m in models:
        role = m.get("role") or m.get("model_type")
        if role in (None, "chat", "llm") and m.get("id"):
            return str(m["id"])
    return None


def parse_sse(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    """("reasoning" | "content", text) pieces of an OpenAI chat completion stream."""
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            return
        try:
            chunk = json.loads(data)
        except ValueError:
            continue
        if "error" in chunk:
            err = chunk["error"]
            raise ChatClientError(err.get("message", str(err)) if isinstance(err, dict) else str(err))
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("reasoning_content"):
                yield "reasoning", delta["reasoning_content"]
            if delta.get("content"):
                yield "content", delta["content"]


class ChatSession:
    def __init__(self, client: httpx.Client, model: str, system: str | None) -> None:
        self.client = client
        self.model = model
        self.system = system
        self.history: list[dict[str, str]] = []

    def clear(self) -> None:
        self.history = []

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def send(self, text: str) -> Iterator[tuple[str, str]]:
        """Stream the answer; the turn joins the history only when the answer completed."""
        self.history.append({"role": "user", "content": text})
        answer: list[str] = []
        body = {"model": self.model, "messages": self.messages(), "stream": True}
        try:
            with self.client.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    raise ChatClientError(error_message(r))
                for kind, piece in parse_sse(r.iter_lines()):
                    if kind == "content":
                        answer.append(piece)
                    yield kind, piece
        except BaseException:
            self.history.pop()  # a failed or interrupted turn is not remembered
            raise
        # Reasoning is not sent back: chat templates of reasoning models drop it from history.
        self.history.append({"role": "assistant", "content": "".join(answer)})


def _list_models(client: httpx.Client) -> list[dict[str, Any]]:
    r = client.get("/v1/models")
    if r.status_code != 200:
        raise ChatClientError(error_message(r))
    data = r.json().get("data")
    return data if isinstance(data, list) else []


def run_chat(base_url: str, model: str | None, api_key: str | None, system: str | None) -> None:
    console = Console(highlight=False)
    root = api_root(base_url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    timeout = httpx.Timeout(10.0, read=None)  # generation may pause long between tokens on a CPU
    with httpx.Client(base_url=root, headers=headers, timeout=timeout) as client:
        try:
            if model is None:
                model = pick_chat_model(_list_models(client))
                if model is None:
                    raise ChatClientError(f"the server at {root} serves no chat model")
        except httpx.TransportError as e:
            reason = escape(str(e) or type(e).__name__)
            hint = "Is `gguf-serve serve` running?"
            console.print(f"[red]cannot reach gguf-serve at {root}: {reason}. {hint}[/red]")
            raise SystemExit(1) from None
        except ChatClientError as e:
            console.print(f"[red]{escape(str(e))}[/red]")
            raise SystemExit(1) from None

        session = ChatSession(client, model, system)
        console.print(f"[bold]{model}[/bold] at {root}. {HELP}")
        while True:
            try:
                text = console.input("[bold green]> [/bold green]").strip()
            except EOFError:
                console.print()
                return
            except KeyboardInterrupt:
                console.print()
                continue
            if not text:
                continue
            if text in ("/quit", "/exit", "/q"):
                return
            if text == "/clear":
                session.clear()
                console.print("[dim]conversation cleared[/dim]")
                continue
            if text.startswith("/") and text.split()[0] in ("/help", "/?"):
                console.print(HELP)
                continue
            _answer(console, session, text, root)


def _answer(console: Console, session: ChatSession, text: str, root: str) -> None:
    last = None
    try:
        for kind, piece in session.send(text):
            if kind != last and last == "reasoning":
                console.print()
            console.print(piece, style="dim" if kind == "reasoning" else None, end="", markup=False)
            last = kind
        console.print()
    except KeyboardInterrupt:
        console.print("\n[dim](interrupted)[/dim]")
    except httpx.TransportError as e:
        console.print(f"\n[red]lost the connection to {root}: {escape(str(e))}[/red]")
    except ChatClientError as e:
        console.print(f"\n[red]{escape(str(e))}[/red]")
