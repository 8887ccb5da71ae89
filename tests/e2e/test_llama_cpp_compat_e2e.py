"""llama.cpp's own server tests for the Responses and Anthropic routes
(tools/server/tests/unit/test_compat_*.py in the pinned llama-cpp-python sources), run
unchanged against gguf-serve.

The test files are read from the pinned sdist at test time and run with a stand-in for their
`utils` module: `server.start()` is a no-op and requests go to one gguf-serve process that
serves the demo chat model also under the names the tests send ("test", "gpt-4.1").
Tests that need llama-server itself (its telemetry fields, /apply-template, template files,
models downloaded from Hugging Face) are skipped, each with the reason; so are the places
where gguf-serve answers differently on purpose (see SKIPPED).
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import tarfile
import tempfile
import types
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
import pytest

from tests.e2e.server import REPO, ServerProcess
from tests.fixtures.llama_cpp_sources import cached_sdist, unpacked_sources

pytestmark = pytest.mark.e2e

UNIT = PurePosixPath("tools", "server", "tests", "unit")
FILES = ("test_compat_oai_responses.py", "test_compat_anthropic.py")

SKIPPED = {
    "test_responses_stream_with_llama_telemetry": "llama-server's own telemetry fields "
    "(timings_per_token, return_progress) are not part of the Responses API",
    "test_anthropic_tool_result_with_image": "llama-server answers an image sent to a text-only model "
    "with a 500; gguf-serve answers 400 (a client error) with the same 'image input is not supported'",
    "test_anthropic_vision_format_accepted": "as test_anthropic_tool_result_with_image: 400, not 500",
    "test_anthropic_vision_base64_with_multimodal_model": "downloads the tinygemma3 vision model",
    "test_anthropic_empty_messages": "llama-server answers an empty messages list with 200; "
    "gguf-serve, like Anthropic's API, with a 400",
    "test_anthropic_thinking_history_in_count_tokens": "serves llama-server's Qwen3 template file "
    "(models/templates) with the stories model; the demo model's template renders no reasoning",
    "test_anthropic_thinking_history_in_template": "POST /apply-template is llama-server's own route",
    "test_anthropic_thinking_with_reasoning_model": "downloads DeepSeek-R1-Distill-Qwen-7B (slow upstream)",
}
# These check the stories260K model's words (match_regex("(Suddenly)+", text)); against the
# demo model the stand-in match_regex checks only that there is text. Every other assertion runs.
MODEL_TEXT = {"test_responses_with_openai_library", "test_responses_stream_with_openai_library"}


def _test_dir() -> Path | None:
    src = unpacked_sources(REPO)
    if src is not None and (src / UNIT / FILES[0]).is_file():
        return src / UNIT
    sdist = cached_sdist()
    if sdist is None:
        return None
    dest = Path(tempfile.gettempdir()) / "gguf-serve-llama-cpp-tests" / sdist.name
    if not all((dest / f).is_file() for f in FILES):
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdist, "r|gz") as tar:
            for member in tar:
                path = PurePosixPath(member.name)
                if (
                    member.isfile()
                    and path.name in FILES
                    and path.parent.as_posix().endswith(UNIT.as_posix())
                ):
                    src_file = tar.extractfile(member)
                    assert src_file is not None
                    (dest / path.name).write_bytes(src_file.read())
    return dest


TEST_DIR = _test_dir()


def _cases() -> list[Any]:
    if TEST_DIR is None:
        return [
            pytest.param(None, None, marks=pytest.mark.skip(reason="the pinned llama.cpp sources are absent"))
        ]
    cases = []
    for name in FILES:
        text = (TEST_DIR / name).read_text()
        for fn in re.findall(r"^def (test_\w+)\(", text, flags=re.MULTILINE):
            marks = [pytest.mark.skip(reason=SKIPPED[fn])] if fn in SKIPPED else []
            cases.append(pytest.param(name, fn, marks=marks, id=f"{name[:-3]}::{fn}"))
    return cases


class _Response:
    def __init__(self, r: httpx.Response) -> None:
        self.headers = dict(r.headers)
        self.status_code = r.status_code
        self.body: Any = r.json() if r.content else None


class ServerError(Exception):
    def __init__(self, code: int, body: Any) -> None:
        super().__init__(code, body)
        self.code = code
        self.body = body


class _Server:
    """What the tests use of utils.ServerProcess, pointed at a running gguf-serve."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        host, port = base_url.removeprefix("http://").rsplit(":", 1)
        self.server_host, self.server_port = host, int(port)

    def start(self, timeout_seconds: int = 0) -> None:
        pass

    def stop(self) -> None:
        pass

    def make_request(
        self, method: str, path: str, data: Any = None, headers: dict[str, str] | None = None, **_: Any
    ) -> _Response:
        return _Response(httpx.request(method, self.base_url + path, json=data, headers=headers, timeout=300))

    def make_stream_request(
        self, method: str, path: str, data: Any = None, headers: dict[str, str] | None = None, **_: Any
    ) -> Iterator[dict[str, Any]]:
        with httpx.stream(method, self.base_url + path, json=data, headers=headers, timeout=300) as r:
            if r.status_code != 200:
                r.read()
                raise ServerError(r.status_code, r.json())
            for line in r.iter_lines():
                if "[DONE]" in line:
                    break
                if line.startswith("data: "):
                    yield json.loads(line[6:])


def _utils(server: _Server, text_only: bool) -> types.ModuleType:
    mod = types.ModuleType("utils")

    class ServerPreset:
        @staticmethod
        def tinyllama2() -> _Server:
            return server

        @staticmethod
        def tinygemma3() -> _Server:
            return server

    def match_regex(regex: str, text: str) -> bool:
        if text_only:
            return bool(text.strip())
        return re.search(regex, text, flags=re.IGNORECASE | re.MULTILINE | re.DOTALL) is not None

    mod.__dict__.update(
        ServerPreset=ServerPreset,
        ServerProcess=_Server,
        ServerError=ServerError,
        match_regex=match_regex,
        __all__=["ServerPreset", "ServerProcess", "ServerError", "match_regex"],
    )
    return mod


@pytest.fixture(scope="module")
def compat_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The demo profile, its chat model also named as llama.cpp's tests name it, /slots on."""
    text = (REPO / "profiles" / "demo.toml").read_text()
    chat_id = 'id = "smollm2-135m-instruct"\n'
    assert chat_id in text
    text = text.replace(chat_id, chat_id + 'hidden_aliases = ["test", "gpt-4.1"]\n', 1)
    profile = tmp_path_factory.mktemp("compat") / "compat.toml"
    profile.write_text("slots_endpoint = true\n" + text)
    server = ServerProcess(str(profile))
    try:
        server.wait_ready(timeout=600)
        yield server.base_url
    finally:
        assert server.stop() == 0, server.log_tail()


@pytest.mark.parametrize(("file", "name"), _cases())
def test_llama_cpp_server_test(compat_server: str, file: str, name: str) -> None:
    assert TEST_DIR is not None
    server = _Server(compat_server)
    saved = sys.modules.get("utils")
    sys.modules["utils"] = _utils(server, text_only=name in MODEL_TEXT)
    try:
        spec = importlib.util.spec_from_file_location(f"llama_cpp_{file[:-3]}", TEST_DIR / file)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            sys.modules.pop("utils", None)
        else:
            sys.modules["utils"] = saved
    module.server = server  # what the file's autouse fixture sets
    getattr(module, name)()


def test_slots_when_enabled(compat_server: str) -> None:
    slots = httpx.get(compat_server + "/slots", timeout=30).json()
    assert [s["id"] for s in slots] == list(range(8))
    assert all(s["n_ctx"] == 2048 and s["is_processing"] is False for s in slots)
