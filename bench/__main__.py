"""`make bench`: every benchmark in turn (chat, embeddings/rerank, conversion)."""

from __future__ import annotations

import importlib
import sys

for name in ("bench.bench_chat", "bench.bench_embed", "bench.bench_convert"):
    if importlib.util.find_spec(name) is None:
        continue
    print(f"\n=== {name}", flush=True)
    sys.argv = [name]
    importlib.import_module(name).main()
