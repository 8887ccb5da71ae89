"""`make bench`: every benchmark in turn (chat, RAG prompt reuse, embeddings/rerank, conversion).

When `make llama-server` has built llama.cpp's C++ server from the same pinned sources, the chat
and embedding benchmarks measure it in the same run as the reference.

`make bench REAL=1` (`python -m bench --real`) runs the real-scale benchmarks instead, on the
cpu profile's Qwen3-shaped files (bench/bench_real.py, docs/real-scale-rehearsal.md).

Either way the headline ratios land in bench/results/*.json and, last, in docs/benchmarks.png
(bench/chart.py; `python -m bench.chart` redraws it alone).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

LLAMA_SERVER = Path(__file__).resolve().parents[1] / "build" / "llama.cpp" / "bin" / "llama-server"
reference = ["--llama-server", str(LLAMA_SERVER)] if LLAMA_SERVER.is_file() else []

suite = (
    [("bench.bench_real", reference)]
    if "--real" in sys.argv[1:]
    else [
        ("bench.bench_chat", reference),
        ("bench.bench_rag", reference),
        ("bench.bench_isolation", []),
        ("bench.bench_embed", reference),
        ("bench.bench_mixed", []),
        ("bench.bench_convert", []),
    ]
)
for name, args in suite:
    if importlib.util.find_spec(name) is None:
        continue
    print(f"\n=== {name} {' '.join(args)}", flush=True)
    sys.argv = [name, *args]
    importlib.import_module(name).main()

# Last: every ratio the benchmarks recorded (bench/results/*.json), drawn as docs/benchmarks.png.
print("\n=== bench.chart", flush=True)
importlib.import_module("bench.chart").main([])
