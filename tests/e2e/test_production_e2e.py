"""Production behaviour against a real server: keys, limits, 429, lazy load / idle unload,
bad input, a bounded mixed load, and a graceful SIGTERM drain (loopback only)."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.server import ServerProcess, demo_chat_gguf

pytestmark = pytest.mark.e2e

KEY = "test-key-123"
SMOL_GGUF = demo_chat_gguf()
PROFILE = f"""
[limits]
max_body_bytes = 1048576
max_messages = 50
max_queue = 2
request_timeout_s = 120

[[models]]
id = "smol"
file = "{SMOL_GGUF}"
n_ctx = 1024
parallel = 2

[[models]]
id = "smol-lazy"
file = "{SMOL_GGUF}"
n_ctx = 512
parallel = 1
lazy_load = true
keep_alive = 1
"""
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def prod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    profile = tmp_path_factory.mktemp("prod") / "prod.toml"
    profile.write_text(PROFILE)
    server = ServerProcess(str(profile), "--api-key", KEY)
    try:
        server.wait_ready(timeout=300)
        yield server
    finally:
        server.stop()


def test_api_keys(prod: ServerProcess) -> None:
    url = prod.base_url + "/v1/chat/completions"
    body = {"model": "smol", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    missing = httpx.post(url, json=body)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    wrong = httpx.post(url, json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert httpx.post(url, json=body, headers=AUTH, timeout=60).status_code == 200
    assert httpx.post(url, json=body, headers={"x-api-key": KEY}, timeout=60).status_code == 200
    assert httpx.get(prod.base_url + "/health").status_code == 200
    assert httpx.get(prod.base_url + "/metrics").status_code == 401
    assert KEY not in prod.log_tail(400)


def test_api_keys_with_the_anthropic_and_ollama_clients(prod: ServerProcess) -> None:
    import anthropic
    import ollama

    hello = [{"role": "user", "content": "hi"}]
    # The anthropic SDK sends its key as x-api-key.
    msg = anthropic.Anthropic(base_url=prod.base_url, api_key=KEY, max_retries=0).messages.create(
        model="smol", max_tokens=2, messages=hello
    )
    assert msg.usage.output_tokens > 0
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=prod.base_url, api_key="nope", max_retries=0).messages.create(
            model="smol", max_tokens=2, messages=hello
        )
    keyed = ollama.Client(host=prod.base_url, headers=AUTH)
    assert keyed.chat(model="smol", messages=hello, options={"num_predict": 2}).done
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=prod.base_url).list()
    assert e.value.status_code == 401 and "API key" in e.value.error


def test_body_limit_and_message_limit(prod: ServerProcess) -> None:
    big = {"model": "smol", "messages": [{"role": "user", "content": "x" * 2_000_000}]}
    r = httpx.post(prod.base_url + "/v1/chat/completions", json=big, headers=AUTH)
    assert r.status_code == 413 and r.json()["error"]["message"]
    many = {"model": "smol", "messages": [{"role": "user", "content": "hi"}] * 51, "max_tokens": 1}
    r = httpx.post(prod.base_url + "/v1/chat/completions", json=many, headers=AUTH)
    assert r.status_code == 400 and "50 messages" in r.json()["error"]["message"]


def _stats(prod: ServerProcess) -> dict[str, dict[str, float]]:
    return httpx.get(prod.base_url + "/stats", headers=AUTH, timeout=10).json()["models"]


def test_queue_full_is_429_with_retry_after_and_everything_drains(prod: ServerProcess) -> None:
    client = openai.AsyncOpenAI(base_url=prod.base_url + "/v1", api_key=KEY, max_retries=0, timeout=120)

    async def one(i: int) -> str:
        try:
            stream = await client.chat.completions.create(
                model="smol",
                messages=[{"role": "user", "content": f"story {i}"}],
                max_tokens=60,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            async for _ in stream:
                pass
            return "ok"
        except openai.RateLimitError as e:
            assert int(e.response.headers["retry-after"]) >= 1
            assert e.body["code"] == "queue_full"  # type: ignore[index]
            return "429"

    async def run() -> list[str]:
        try:
            return list(await asyncio.gather(*(one(i) for i in range(10))))
        finally:
            await client.close()

    results = asyncio.run(run())
    # 2 slots + 2 queued are served; the rest are told to come back.
    assert results.count("ok") >= 4 and results.count("429") >= 1
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = _stats(prod)["smol"]
        if stats["busy_slots"] == 0 and stats["queue_depth"] == 0:
            break
        time.sleep(0.2)
    assert stats["busy_slots"] == 0 and stats["queue_depth"] == 0


def test_lazy_load_and_idle_unload(prod: ServerProcess) -> None:
    def lazy_state() -> bool:
        models = httpx.get(prod.base_url + "/v1/models", headers=AUTH).json()["data"]
        return next(m for m in models if m["id"] == "smol-lazy")["loaded"]

    r = httpx.post(
        prod.base_url + "/v1/chat/completions",
        json={"model": "smol-lazy", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
        headers=AUTH,
        timeout=120,
    )
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 20  # keep_alive = 1 s, checked every 5 s
    while time.monotonic() < deadline and lazy_state():
        time.sleep(0.5)
    assert not lazy_state()
    # and it comes back on demand
    r = httpx.post(
        prod.base_url + "/v1/chat/completions",
        json={"model": "smol-lazy", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
        headers=AUTH,
        timeout=120,
    )
    assert r.status_code == 200 and lazy_state()


def test_sigterm_finishes_in_flight_stream_then_exits_0(prod: ServerProcess) -> None:
    received: list[str] = []
    done = threading.Event()

    def reader() -> None:
        with httpx.stream(
            "POST",
            prod.base_url + "/v1/chat/completions",
            json={
                "model": "smol",
                "messages": [{"role": "user", "content": "story"}],
                "max_tokens": 80,
                "stream": True,
                "ignore_eos": True,
            },
            headers=AUTH,
            timeout=120,
        ) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    received.append(line)
        done.set()

    t = threading.Thread(target=reader)
    t.start()
    while len(received) < 3:
        time.sleep(0.05)
    prod.proc.send_signal(signal.SIGTERM)
    t.join(timeout=120)
    assert done.is_set() and received[-1] == "data: [DONE]"
    assert json.loads(received[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert prod.proc.wait(timeout=60) == 0


# --- against the demo server: bad input and a bounded mixed load --------------------------------


@pytest.mark.parametrize(
    ("path", "content", "status"),
    [
        (
            "/v1/chat/completions",
            b'{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
            400,
        ),
        ("/v1/chat/completions", b"[1, 2, 3]", 400),
        (
            "/v1/chat/completions",
            json.dumps(
                {
                    "model": "smollm2-135m-instruct",
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 10**9,
                }
            ).encode(),
            400,
        ),
        (
            "/v1/chat/completions",
            json.dumps(
                {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "hi"}] * 5000}
            ).encode(),
            400,
        ),
        (
            "/v1/chat/completions",
            json.dumps(
                {"model": "smollm2-135m-instruct", "messages": [{"role": "wizard", "content": "hi"}]}
            ).encode(),
            400,
        ),
        ("/v1/chat/completions", b"x" * (20 * 1024 * 1024), 413),
        ("/v1/embeddings", json.dumps({"model": "all-minilm-l6-v2", "input": {"a": 1}}).encode(), 400),
        ("/v1/rerank", json.dumps({"model": "all-minilm-l6-v2-rerank", "query": 5}).encode(), 400),
        ("/v1/completions", json.dumps({"model": "smollm2-135m-instruct", "prompt": [10**9]}).encode(), 400),
        ("/v1/nope", b"{}", 404),
    ],
)
def test_bad_input_is_4xx_and_server_keeps_serving(
    demo_server: str, path: str, content: bytes, status: int
) -> None:
    r = httpx.post(
        demo_server + path, content=content, headers={"content-type": "application/json"}, timeout=60
    )
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]
    ok = httpx.post(
        demo_server + "/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": "still alive"}, timeout=60
    )
    assert ok.status_code == 200


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_mixed_load_only_expected_statuses_and_resources_return(demo_process: ServerProcess) -> None:
    base = demo_process.base_url
    rng = random.Random(7)
    warm = httpx.post(
        base + "/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": ["warm"] * 16}, timeout=60
    )
    assert warm.status_code == 200
    rss_before = _rss_kb(demo_process.proc.pid)
    statuses: list[int] = []

    async def one(client: httpx.AsyncClient, i: int) -> None:
        kind = rng.choice(["chat", "stream", "cancel", "embed", "rerank"])
        if kind in ("chat", "stream", "cancel"):
            body = {
                "model": "smollm2-135m-instruct",
                "messages": [{"role": "user", "content": f"Tell me about {i}"}],
                "max_tokens": 24,
                "stream": kind != "chat",
            }
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                statuses.append(r.status_code)
                n = 0
                async for _ in r.aiter_lines():
                    n += 1
                    if kind == "cancel" and n >= 3:
                        break  # the client goes away midway
        elif kind == "embed":
            r = await client.post(
                "/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": [f"text {i} " * 20] * 16}
            )
            statuses.append(r.status_code)
        else:
            docs = [f"document {j} about topic {i}" for j in range(16)]
            r = await client.post(
                "/v1/rerank",
                json={"model": "all-minilm-l6-v2-rerank", "query": f"topic {i}", "documents": docs},
            )
            statuses.append(r.status_code)

    async def run() -> None:
        sem = asyncio.Semaphore(32)
        async with httpx.AsyncClient(base_url=base, timeout=300) as client:

            async def bounded(i: int) -> None:
                async with sem:
                    await one(client, i)

            await asyncio.gather(*(bounded(i) for i in range(200)))

    asyncio.run(asyncio.wait_for(run(), timeout=900))
    assert len(statuses) == 200
    assert set(statuses) <= {200, 429, 503}, sorted(set(statuses))
    assert statuses.count(200) >= 100
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        chat = httpx.get(base + "/stats", timeout=10).json()["models"]["smollm2-135m-instruct"]
        if chat["busy_slots"] == 0 and chat["queue_depth"] == 0:
            break
        time.sleep(0.5)
    assert chat["busy_slots"] == 0 and chat["queue_depth"] == 0
    rss_after = _rss_kb(demo_process.proc.pid)
    assert rss_after < rss_before * 1.5 + 200_000, (rss_before, rss_after)
