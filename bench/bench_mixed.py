"""Mixed RAG load, shaped like RAGFlow (issue 19, item 4): an ingest of document chunks in
16-text embedding requests while users chat and send query embeddings and reranks, against
each of those alone on the idle server.

    .venv/bin/python -m bench.bench_mixed [--chunks 200] [--profile demo] [--out FILE]

Phases, on one server: idle query embeddings (one sentence each, one at a time), idle chat
(`--chat-users` streams at once), idle ingest (`--chunks` texts in requests of 16 from
`--ingest-clients` clients); then everything at once until the ingest is done: the ingest,
`--chat-users` users chatting in a loop, `--query-users` users each sending a query embedding
then a rerank of 8 passages in a loop. The server's RSS is sampled every second throughout.
Reported: query-embedding p50/p95 under load vs idle, chat tok/s vs idle, ingest texts/s vs
idle, RSS first/max/last. Issue 19's goals: p95 <= 2x idle, chat >= 0.5x, ingest >= 0.5x, RSS
flat. Issue 19 asks for 2,000 chunks and a 10-minute run; the default here is scaled down.

Not a test: numbers depend on the machine; note the load average.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

from bench.bench_embed import make_texts
from bench.results import Ratio, record
from bench.servers import BenchServer, cpu_seconds, process_tree, rss_mib, tree_rss_mib
from tests.e2e.server import free_port

BATCH = 16
QUERIES = [
    "How do I reset my password?",
    "What is the refund policy for annual plans?",
    "Which regions does the service run in?",
    "How long are backups kept?",
    "Can I export my data as CSV?",
    "Who can see the audit log?",
]
CHAT = [
    "Summarize in three sentences why retrieval helps a language model answer questions.",
    "Write a short note to a colleague about tomorrow's meeting.",
    "Explain what an embedding is to a new engineer.",
    "List five things to check before a database migration.",
]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))] if xs else float("nan")


class Models:
    def __init__(self, url: str) -> None:
        ids = {m["id"]: m for m in httpx.get(url + "/v1/models", timeout=30).json()["data"]}
        self.chat = next(i for i in ids if "embed" not in i and "rerank" not in i)
        self.embed = next(i for i in ids if "embed" in i)
        self.rerank = next(i for i in ids if "rerank" in i)


async def query_embed(client: httpx.AsyncClient, models: Models, q: str) -> float:
    t0 = time.perf_counter()
    r = await client.post("/v1/embeddings", json={"model": models.embed, "input": [q]})
    r.raise_for_status()
    return time.perf_counter() - t0


async def rerank(client: httpx.AsyncClient, models: Models, q: str, docs: list[str]) -> float:
    t0 = time.perf_counter()
    r = await client.post("/v1/rerank", json={"model": models.rerank, "query": q, "documents": docs})
    r.raise_for_status()
    return time.perf_counter() - t0


async def chat_once(client: httpx.AsyncClient, models: Models, prompt: str, tokens: int) -> int:
    r = await client.post(
        "/v1/chat/completions",
        json={
            "model": models.chat,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": tokens,
            "ignore_eos": True,
        },
    )
    r.raise_for_status()
    return int(r.json()["usage"]["completion_tokens"])


async def ingest(client: httpx.AsyncClient, models: Models, chunks: list[str], clients: int) -> float:
    """texts/s of the whole ingest."""
    queue = [chunks[i : i + BATCH] for i in range(0, len(chunks), BATCH)]

    async def worker() -> None:
        while queue:
            batch = queue.pop(0)
            r = await client.post("/v1/embeddings", json={"model": models.embed, "input": batch})
            r.raise_for_status()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return len(chunks) / (time.perf_counter() - t0)


async def chat_rate(client: httpx.AsyncClient, models: Models, users: int, tokens: int) -> float:
    t0 = time.perf_counter()
    counts = await asyncio.gather(
        *(chat_once(client, models, CHAT[i % len(CHAT)], tokens) for i in range(users))
    )
    return sum(counts) / (time.perf_counter() - t0)


def engine_names(url: str) -> dict[int, str]:
    """pid -> the model an engine process serves, from /stats."""
    found: dict[int, str] = {}

    def walk(node: object, name: str) -> None:
        if isinstance(node, dict):
            if "engine_pid" in node:
                found.setdefault(int(node["engine_pid"]), f"engine process of {name}")
            for k, v in node.items():
                walk(v, str(k))

    walk(httpx.get(url + "/stats", timeout=30).json(), "")
    return found


def cpu_use(server_pid: int) -> dict[str, float]:
    """CPU seconds so far: the API process, each engine process, and this benchmark's clients."""
    out = {"this benchmark (the clients)": sum(os.times()[:2])}
    for p in process_tree(server_pid):
        out[str(p)] = cpu_seconds(p)
    return out


async def run_phases(url: str, args: argparse.Namespace, server_pid: int) -> dict[str, object]:
    models = Models(url)
    chunks = make_texts(args.chunks, args.words, seed=3)
    passages = make_texts(8, args.words, seed=4)
    async with httpx.AsyncClient(base_url=url, timeout=900) as client:
        # warm-up: every model once
        await query_embed(client, models, QUERIES[0])
        await rerank(client, models, QUERIES[0], passages)
        await chat_once(client, models, CHAT[0], 8)
        idle_q = [
            await query_embed(client, models, QUERIES[i % len(QUERIES)]) for i in range(args.idle_queries)
        ]
        idle_rr = [await rerank(client, models, QUERIES[i % len(QUERIES)], passages) for i in range(3)]
        idle_chat = await chat_rate(client, models, args.chat_users, args.chat_tokens)
        idle_ingest = await ingest(client, models, chunks, args.ingest_clients)

        done = asyncio.Event()
        load_q: list[float] = []
        load_rr: list[float] = []
        chat_tokens = 0

        async def chat_user(i: int) -> None:
            nonlocal chat_tokens
            while not done.is_set():
                # Not `chat_tokens += await ...`: that reads chat_tokens before the await, and the
                # users' answers, arriving meanwhile, would be lost (it counted ~1/4 of the tokens).
                n = await chat_once(client, models, CHAT[i % len(CHAT)], args.chat_tokens)
                chat_tokens += n

        async def query_user(i: int) -> None:
            rng = random.Random(i)
            while not done.is_set():
                q = rng.choice(QUERIES)
                load_q.append(await query_embed(client, models, q))
                if done.is_set():
                    break
                load_rr.append(await rerank(client, models, q, passages))
                await asyncio.sleep(rng.uniform(0.05, 0.25))  # a user reads before the next search

        async def ingest_then_stop() -> float:
            try:
                return await ingest(client, models, chunks, args.ingest_clients)
            finally:
                done.set()

        t0 = time.perf_counter()
        cpu0 = cpu_use(server_pid)
        stats0 = (await client.get("/stats")).json()["models"]
        users = [asyncio.create_task(chat_user(i)) for i in range(args.chat_users)]
        users += [asyncio.create_task(query_user(i)) for i in range(args.query_users)]
        load_ingest = await ingest_then_stop()
        await asyncio.gather(*users)  # each ends its request in flight
        wall = time.perf_counter() - t0
        cpu1 = cpu_use(server_pid)
        stats1 = (await client.get("/stats")).json()["models"]
    names = {str(p): n for p, n in engine_names(url).items()}
    names[str(server_pid)] = "API process"
    cpu = {names.get(k, k): (cpu1[k] - cpu0.get(k, 0.0)) / wall for k in cpu1}
    engines = {}
    for mid, st in stats1.items():
        d = {
            k: st.get(k, 0.0) - stats0.get(mid, {}).get(k, 0.0)
            for k in ("decodes", "decode_seconds", "sample_seconds")
        }
        if d["decodes"] > 0:
            engines[mid] = (
                f"{d['decodes']:.0f} decodes, {d['decode_seconds'] / d['decodes'] * 1000:.1f} ms each, "
                f"in decodes {d['decode_seconds'] / wall:.0%} of the phase, sampling {d['sample_seconds'] / wall:.0%}"
            )
            if "prompt_cache_bytes" in st:  # host RAM that grows up to its limit: part of the RSS
                mib = 2**20
                engines[mid] += (
                    f"; prompt cache {stats0.get(mid, {}).get('prompt_cache_bytes', 0.0) / mib:.0f} -> "
                    f"{st['prompt_cache_bytes'] / mib:.0f} MiB of {st['prompt_cache_limit_bytes'] / mib:.0f}"
                )
    return {
        "names": names,
        "engines": engines,
        "cpu": cpu,
        "idle_q": idle_q,
        "idle_rr": idle_rr,
        "idle_chat": idle_chat,
        "idle_ingest": idle_ingest,
        "load_q": load_q,
        "load_rr": load_rr,
        "load_chat": chat_tokens / wall,
        "load_ingest": load_ingest,
        "wall": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--chunks", type=int, default=200, help="texts ingested (issue 19: 2,000)")
    ap.add_argument("--words", type=int, default=120, help="words per chunk (~150 MiniLM tokens)")
    ap.add_argument("--ingest-clients", type=int, default=4)
    ap.add_argument("--chat-users", type=int, default=4)
    ap.add_argument("--query-users", type=int, default=4)
    ap.add_argument("--chat-tokens", type=int, default=64)
    ap.add_argument("--idle-queries", type=int, default=20)
    ap.add_argument("--out", type=Path, help="also write the table here")
    ap.add_argument(
        "--code",
        type=Path,
        default=None,
        help="serve the gguf_serve found in this folder (e.g. `git archive` of another commit), run from there",
    )
    args = ap.parse_args()

    load0 = f"{os.getloadavg()[0]:.2f}"
    port = free_port()
    cmd = [sys.executable, "-m", "gguf_serve", "serve", "--profile", args.profile, "--port", str(port)]
    srv = BenchServer("gguf-serve", cmd, port, *([args.code.resolve()] if args.code else []))
    rss: list[tuple[float, float]] = []
    stop = threading.Event()

    per_process: list[dict[int, float]] = []  # the first and the latest sample, per pid

    def sample() -> None:
        t0 = time.monotonic()
        while not stop.is_set():
            rss.append((time.monotonic() - t0, tree_rss_mib(srv.proc.pid)))
            now = {p: rss_mib(p) for p in process_tree(srv.proc.pid)}
            per_process[1:] = [now]
            if len(per_process) == 1:
                per_process.insert(0, now)
            stop.wait(1.0)

    try:
        srv.wait_ready()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        res = asyncio.run(run_phases(srv.base_url, args, srv.proc.pid))
    finally:
        stop.set()
        srv.stop()

    iq, lq = res["idle_q"], res["load_q"]
    assert isinstance(iq, list) and isinstance(lq, list)
    irr, lrr = res["idle_rr"], res["load_rr"]
    assert isinstance(irr, list) and isinstance(lrr, list)
    f = {k: float(v) for k, v in res.items() if isinstance(v, float)}  # type: ignore[arg-type]
    cpu, engines, names = res["cpu"], res["engines"], res["names"]
    assert isinstance(cpu, dict) and isinstance(engines, dict) and isinstance(names, dict)
    mib = [m for _, m in rss if m > 0]
    cmd_s = "python -m bench.bench_mixed " + " ".join(sys.argv[1:])
    lines = [
        f"Command: `{cmd_s.strip()}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs; load average before/after: {load0} / "
        f"{os.getloadavg()[0]:.2f}. Code: {args.code or 'this checkout'}. Profile: {args.profile}. Mixed phase: {f['wall']:.0f} s, {args.chunks} "
        f"chunks of {args.words} words in requests of {BATCH} from {args.ingest_clients} clients, "
        f"{args.chat_users} chat users ({args.chat_tokens} tokens each answer), {args.query_users} query users "
        "(a one-sentence embedding, then a rerank of 8 passages).",
        "",
        "| | idle | under mixed load | ratio | goal (issue 19) |",
        "|---|---:|---:|---:|---|",
        f"| query embedding p50 | {pct(iq, 0.5) * 1000:.0f} ms | {pct(lq, 0.5) * 1000:.0f} ms | "
        f"{pct(lq, 0.5) / pct(iq, 0.5):.1f}x | |",
        f"| query embedding p95 | {pct(iq, 0.95) * 1000:.0f} ms | {pct(lq, 0.95) * 1000:.0f} ms | "
        f"{pct(lq, 0.95) / pct(iq, 0.95):.1f}x | <= 2x |",
        f"| rerank of 8 passages p50 | {statistics.median(irr) * 1000:.0f} ms | "
        f"{(statistics.median(lrr) if lrr else float('nan')) * 1000:.0f} ms | | |",
        f"| chat tok/s ({args.chat_users} users) | {f['idle_chat']:.1f} | {f['load_chat']:.1f} | "
        f"{f['load_chat'] / f['idle_chat']:.2f}x | >= 0.5x |",
        f"| ingest texts/s | {f['idle_ingest']:.1f} | {f['load_ingest']:.1f} | "
        f"{f['load_ingest'] / f['idle_ingest']:.2f}x | >= 0.5x |",
        f"| server RSS MiB (first / max / last sample, {len(mib)} samples) | | "
        f"{mib[0]:.0f} / {max(mib):.0f} / {mib[-1]:.0f} | | flat |",
        f"| query embeddings measured | {len(iq)} | {len(lq)} | | |",
        "",
        f"CPU used in the mixed phase, in cores ({os.cpu_count()} here): "
        + ", ".join(f"{name} {cores:.2f}" for name, cores in sorted(cpu.items(), key=lambda kv: -kv[1])),
        "",
        *(f"- {mid}: {line}" for mid, line in engines.items()),
        "",
        "RSS per process, first / last sample (MiB): "
        + ", ".join(
            f"{names.get(str(p), p)} {per_process[0].get(p, 0):.0f} / {per_process[-1].get(p, 0):.0f}"
            for p in per_process[-1]
        ),
    ]
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    if args.code is None:  # another checkout's figures are not this tree's
        idle = "idle (the same server)"
        # issue 19's goals, as "times better": p95 <= 2 x idle, chat and ingest >= 0.5 x idle
        record(
            "mixed",
            [
                Ratio("query embedding p95 under mixed load", pct(lq, 0.95) * 1000, pct(iq, 0.95) * 1000, idle, "ms", "lower", 0.5),
                Ratio("chat tok/s under mixed load", f["load_chat"], f["idle_chat"], idle, "tok/s", "higher", 0.5),
                Ratio("ingest texts/s under mixed load", f["load_ingest"], f["idle_ingest"], idle, "texts/s", "higher", 0.5),
            ],
            load_avg=float(load0),
        )  # fmt: skip


if __name__ == "__main__":
    main()
