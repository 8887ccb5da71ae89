from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.server import ServerProcess


@pytest.fixture(scope="session")
def demo_process() -> Iterator[ServerProcess]:
    """The demo profile (SmolLM2 chat, MiniLM embedding + rerank), as `make run` serves it."""
    server = ServerProcess("demo")
    try:
        server.wait_ready(timeout=600)
        yield server
    finally:
        code = server.stop()
        assert code == 0, f"server exited with {code} on SIGTERM:\n{server.log_tail()}"


@pytest.fixture(scope="session")
def demo_server(demo_process: ServerProcess) -> str:
    return demo_process.base_url


@pytest.fixture(scope="session")
def demo_url(demo_server: str) -> str:
    return demo_server + "/v1"
