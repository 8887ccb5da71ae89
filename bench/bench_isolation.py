"""What the engine-process boundary costs: the demo profile served with engines in their own
processes (the default) against the same tree with engines inside the API process
(`engine_isolation = "thread"`), and optionally against an older commit, all up at once and
measured in turns (A, B, C, A, B, C, ...) so the machine's drift falls on every server alike.

    .venv/bin/python -m bench.bench_isolation [--before REV] [--repeat 3] [--tokens 64]

Measured per server: chat aggregate tok/s and TTFT p50 at 1 and 8 streams, embedding texts/s
(16-text requests from 4 clients), and RAG follow-up TTFT p50 (a ~1,500-token passage asked
about again, restored from the slot or the prompt cache).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from bench.bench_chat import http_streams, pct
from bench.bench_embed import http_embed_rate, make_texts
from bench.bench_rag import QUESTIONS, SYSTEM, Client, eog_bias, passage
from bench.results import Ratio, record
from bench.servers import BenchServer
from gguf_serve.engine.llama_runtime import usable_cpus
from tests.e2e.server import REPO, demo_chat_gguf, free_port

STREAMS = (1, 8)


@dataclass
class Figures:
    name: str
    tok_s: dict[int, list[float]] = field(default_factory=lambda: {k: [] for k in STREAMS})
    ttft: dict[int, list[float]] = field(default_factory=lambda: {k: [] for k in STREAMS})
    embed: list[float] = field(default_factory=list)
    rag_followup: list[float] = field(default_factory=list)


def headline(ours: Figures, peer: Figures) -> list[Ratio]:
    """The process mode against one other server. Issue 18: the boundary costs nothing
    measurable against the tree before (goal 1.0); the thread mode is only for reference."""
    name = "engines in threads (this tree)" if peer.name == "thread" else f"the tree {peer.name}"
    goal = 1.0 if peer.name.startswith("before") else None
    out = []
    for k in STREAMS:
        streams = f"{k} stream{'s' * (k > 1)}"
        tok_s = statistics.median(ours.tok_s[k]), statistics.median(peer.tok_s[k])
        ttft = pct(ours.ttft[k], 0.5) * 1000, pct(peer.ttft[k], 0.5) * 1000
        out.append(Ratio(f"chat tok/s, {streams}", *tok_s, name, "tok/s", "higher", goal))
        out.append(Ratio(f"TTFT p50, {streams}", *ttft, name, "ms", "lower", goal))
    embed = statistics.median(ours.embed), statistics.median(peer.embed)
    rag = pct(ours.rag_followup, 0.5) * 1000, pct(peer.rag_followup, 0.5) * 1000
    out.append(Ratio("embeddings texts/s", *embed, name, "texts/s", "higher", goal))
    out.append(Ratio("RAG follow-up TTFT p50", *rag, name, "ms", "lower", goal))
    return out


def server(name: str, cwd: Path, env: dict[str, str]) -> BenchServer:
    port = free_port()
    cmd = [sys.executable, "-m", "gguf_serve", "serve", "--profile", "demo", "--port", str(port)]
    return BenchServer(name, cmd, port, cwd=cwd, env=env)


def checkout(rev: str) -> Path:
    """A worktree of `rev` that shares this checkout's models/ (the demo's converted MiniLM)."""
    where = Path(tempfile.mkdtemp(prefix="bench-before-"))
    subprocess.run(["git", "worktree", "add", "--detach", str(where), rev], cwd=REPO, check=True)
    if (REPO / "models").is_dir():
        (where / "models").symlink_to(REPO / "models")
    return where


def round_of(
    servers: list[BenchServer], figures: list[Figures], args: argparse.Namespace, r: int, bias: dict[str, int]
) -> None:
    bias_ids = {int(k): float(v) for k, v in bias.items()}
    for k in STREAMS:
        for s, f in zip(servers, figures, strict=True):
            rate, ttfts = asyncio.run(http_streams(s.base_url, k, args.tokens, bias_ids))
            f.tok_s[k].append(rate)
            f.ttft[k] += ttfts
    texts = make_texts(args.texts, 120, seed=r)
    for s, f in zip(servers, figures, strict=True):
        f.embed.append(asyncio.run(http_embed_rate(s.base_url, texts, 4)))
    doc = passage(1000 + r, 1300)
    for s, f in zip(servers, figures, strict=True):
        client = Client(s.base_url, 8, bias)
        for q in range(3):
            sample = client.ask(
                [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": f"{doc}\n\nQuestion: {QUESTIONS[q]}"},
                ]
            )
            if q > 0:
                f.rag_followup.append(sample.ttft)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", metavar="REV", help="also serve this commit (a temporary worktree)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--texts", type=int, default=128)
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    before = checkout(args.before) if args.before else None
    servers = [
        server("process", REPO, {"GGUF_SERVE_ENGINE_ISOLATION": "process"}),
        server("thread", REPO, {"GGUF_SERVE_ENGINE_ISOLATION": "thread"}),
    ]
    if before is not None:
        servers.append(server(f"before ({args.before})", before, {}))
    figures = [Figures(s.name) for s in servers]
    try:
        for s in servers:
            s.wait_ready(600)
        for s in servers:  # warm up
            asyncio.run(http_streams(s.base_url, 1, 8, {}))
        bias = eog_bias(demo_chat_gguf())
        for r in range(args.repeat):
            round_of(servers, figures, args, r, bias)
    finally:
        for s in servers:
            s.stop()
        if before is not None:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=REPO, check=False)
            shutil.rmtree(before, ignore_errors=True)
    print(
        f"\nengine isolation, demo profile, {args.repeat} interleaved rounds, {args.tokens} tokens per stream, "
        f"{usable_cpus()} CPUs ({platform.processor() or platform.machine()}), "
        f"load average {load_before:.2f} before / {os.getloadavg()[0]:.2f} after"
    )
    head = [f"chat tok/s, {k} stream{'s' * (k > 1)}" for k in STREAMS] + [
        f"TTFT p50 ms, {k} stream{'s' * (k > 1)}" for k in STREAMS
    ]
    print("| server | " + " | ".join([*head, "embeddings texts/s", "RAG follow-up TTFT p50 ms"]) + " |")
    print("|---" * (len(head) + 3) + "|")
    base = figures[0]
    for f in figures:
        cells = [f"{statistics.median(f.tok_s[k]):.1f}" for k in STREAMS]
        cells += [f"{pct(f.ttft[k], 0.5) * 1000:.0f}" for k in STREAMS]
        cells += [f"{statistics.median(f.embed):.1f}", f"{pct(f.rag_followup, 0.5) * 1000:.0f}"]
        print(f"| {f.name} | " + " | ".join(cells) + " |")
    ratios: list[Ratio] = []
    for f in figures[1:]:
        ratio = [statistics.median(base.tok_s[k]) / statistics.median(f.tok_s[k]) for k in STREAMS]
        ttft = [pct(base.ttft[k], 0.5) / pct(f.ttft[k], 0.5) for k in STREAMS]
        print(
            f"\nprocess / {f.name}: chat tok/s {', '.join(f'{x:.2f}' for x in ratio)} (1, 8 streams); "
            f"TTFT {', '.join(f'{x:.2f}' for x in ttft)}; embeddings {statistics.median(base.embed) / statistics.median(f.embed):.2f}; "
            f"RAG follow-up TTFT {pct(base.rag_followup, 0.5) / pct(f.rag_followup, 0.5):.2f}"
        )
        ratios += headline(base, f)
    record("isolation", ratios, load_avg=load_before)


if __name__ == "__main__":
    main()
