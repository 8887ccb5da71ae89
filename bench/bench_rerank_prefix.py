"""Rerank with and without shared prefixes, engine only: one request of N documents to a
reranker GGUF (make_reranker, no HTTP), the batcher's `share_prefix` on or off, at each pack
size (n_ubatch), each measurement in a fresh process, in the order given, so that rounds
interleave (issue 19: every pair repeats Qwen3-Reranker's prompt, instruction and query).

    .venv/bin/python -m bench.bench_rerank_prefix --file models/Qwen3-Reranker-0.6B/Qwen3-Reranker-0.6B-Q8_0.gguf \
        [--docs 16] [--words 150] [--packs 512,1024] [--rounds 2]

Not a test: the times depend on the machine; read the ratios within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.bench_embed import make_texts
from bench.results import cpu_name

QUERY = "Which passage talks about retrieval latency and the search index?"


def measure(path: Path, docs: int, words: int, share: bool, pack: int) -> dict[str, float]:
    """In this process: one warm-up request, then the timed one."""
    from gguf_serve.engine.batcher import BatchedEngine
    from gguf_serve.engine.llama_runtime import LlamaModel
    from gguf_serve.engine.reranker import make_reranker
    from gguf_serve.settings import Limits, ModelSettings

    texts = make_texts(docs, words, seed=2)
    model = LlamaModel(path)
    ms = ModelSettings(
        id="rr",
        role="rerank",
        file=str(path),
        n_ctx=2048,
        n_batch=2048,
        n_ubatch=pack,
        parallel=16,
        express_tokens=0,
    )
    scorer = make_reranker(model, ms, Limits(), lambda _: None)  # type: ignore[arg-type,return-value]
    try:
        assert isinstance(scorer, BatchedEngine), "a head or causal scorer, not a bi-encoder"
        scorer.batcher.share_prefix = share
        asyncio.run(scorer.score(QUERY, texts[:2]))
        before = scorer.stats()
        t0 = time.perf_counter()
        res = asyncio.run(scorer.score(QUERY, texts))
        seconds = time.perf_counter() - t0
        after = scorer.stats()
    finally:
        scorer.close()
        model.close()
    return {
        "seconds": seconds,
        "prompt_tokens": float(res.prompt_tokens),
        "decoded": after["tokens"] - before["tokens"],
        "decodes": after["decodes"] - before["decodes"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--file", type=Path, required=True, help="a reranker GGUF (rank head or yes/no LM)")
    ap.add_argument("--docs", type=int, default=16)
    ap.add_argument("--words", type=int, default=150)
    ap.add_argument("--packs", default="512", help="comma-separated n_ubatch values")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # "share,pack": measure in this process
    args = ap.parse_args()
    if args.one:
        share, pack = args.one.split(",")
        print(json.dumps(measure(args.file.resolve(), args.docs, args.words, share == "1", int(pack))))
        return
    load0 = os.getloadavg()[0]
    configs = [(share, int(pack)) for pack in args.packs.split(",") for share in (False, True)]
    rows: dict[tuple[bool, int], list[dict[str, float]]] = {c: [] for c in configs}
    for _ in range(args.rounds):
        for share, pack in configs:
            cmd = [sys.executable, "-m", "bench.bench_rerank_prefix", "--file", str(args.file)]
            cmd += ["--docs", str(args.docs), "--words", str(args.words), "--one", f"{int(share)},{pack}"]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows[(share, pack)].append(json.loads(out.strip().splitlines()[-1]))
            r = rows[(share, pack)][-1]
            print(
                f"  share {share}, pack {pack}: {r['seconds']:.1f} s, {r['decoded']:.0f} tokens decoded",
                flush=True,
            )
    lines = [
        f"Command: `python -m bench.bench_rerank_prefix {' '.join(sys.argv[1:])}`  ",
        f"Machine: {cpu_name()}, {os.cpu_count()} CPUs; load average {load0:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after. {args.docs} documents of {args.words} words, one request.",
        "",
        "| prefix shared | pack | prompt tokens | tokens decoded | decodes | s (each round) | prompt tokens/s, best |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (share, pack), rs in rows.items():
        times = [r["seconds"] for r in rs]
        each = ", ".join(f"{t:.1f}" for t in times)
        lines.append(
            f"| {'yes' if share else 'no'} | {pack} | {rs[0]['prompt_tokens']:.0f} | {rs[0]['decoded']:.0f} | "
            f"{rs[0]['decodes']:.0f} | {each} | {rs[0]['prompt_tokens'] / min(times):.0f} |"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
