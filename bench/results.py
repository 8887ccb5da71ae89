"""The headline ratios of every benchmark, in one machine-readable place: bench/results/<bench>.json.

A benchmark calls `record(bench, [Ratio(...), ...])` where it already computes its ratios; the
figures land beside what it prints, and bench/chart.py draws them all (docs/benchmarks.png).
This module is the one place that knows the format:

    {"bench": "chat", "entries": [{"metric", "ours", "peer", "peer_name", "unit", "better",
      "ratio", "goal", "cpu", "load_avg", "date", "command", "source"}, ...]}

`ratio` is always "how many times better ours is" (ours / peer where higher is better, peer /
ours where lower is better), so > 1 means ours wins whatever the unit, and a goal such as
"p95 <= 2 x idle" is written the same way (0.5). A run replaces the entries it measured (same
metric and peer) and keeps the others, each with its own CPU and date: `--only decode` does not
wipe the embed figures, and a figure never passes for newer than it is.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

RESULTS = Path(__file__).resolve().parent / "results"

Better = Literal["higher", "lower"]
REQUIRED: dict[str, type | tuple[type, ...]] = {
    "metric": str,
    "ours": (int, float),
    "peer": (int, float),
    "peer_name": str,
    "unit": str,
    "better": str,
    "ratio": (int, float),
    "cpu": str,
    "date": str,
    "command": str,
}
OPTIONAL: dict[str, type | tuple[type, ...]] = {
    "goal": (int, float),
    "load_avg": (int, float),
    "source": str,
}


@dataclass(frozen=True)
class Ratio:
    """One comparison: `ours` against `peer` (llama-server, sentence-transformers, the tree
    before, the idle server...), both in `unit`; `goal` in the same "times better" terms."""

    metric: str
    ours: float
    peer: float
    peer_name: str
    unit: str
    better: Better
    goal: float | None = None


def times_better(ours: float, peer: float, better: Better) -> float:
    if not (ours > 0 and peer > 0):  # also NaN: check_entry then names the bad figure
        return math.nan
    return ours / peer if better == "higher" else peer / ours


def check_entry(entry: dict[str, Any]) -> None:
    """Raise ValueError unless `entry` is one the chart can draw: a malformed figure fails
    where it is written, not later in a picture that looks plausible."""
    for key, kind in REQUIRED.items():
        if key not in entry:
            raise ValueError(f"results entry lacks {key!r}: {entry}")
        if not isinstance(entry[key], kind) or isinstance(entry[key], bool):
            raise ValueError(f"results entry {key!r} has the wrong type: {entry[key]!r}")
    for key, kind in OPTIONAL.items():
        if entry.get(key) is not None and (not isinstance(entry[key], kind) or isinstance(entry[key], bool)):
            raise ValueError(f"results entry {key!r} has the wrong type: {entry[key]!r}")
    unknown = set(entry) - set(REQUIRED) - set(OPTIONAL)
    if unknown:
        raise ValueError(f"results entry has unknown keys {sorted(unknown)}")
    if not entry["metric"] or not entry["peer_name"]:
        raise ValueError(f"results entry needs a metric and a peer name: {entry}")
    if entry["better"] not in ("higher", "lower"):
        raise ValueError(f"results entry 'better' must be 'higher' or 'lower': {entry['better']!r}")
    # log-scale bars and "times better": a zero, negative or NaN figure is a broken measurement
    for key in ("ours", "peer", "ratio", "goal"):
        v = entry.get(key)
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ValueError(f"results entry {key!r} must be a positive finite number: {v!r}")
    expected = times_better(entry["ours"], entry["peer"], entry["better"])
    if not math.isclose(entry["ratio"], expected, rel_tol=0.01):
        raise ValueError(
            f"results entry ratio {entry['ratio']} is not {expected:.3g} for {entry['metric']!r}"
        )


def read(path: Path) -> list[dict[str, Any]]:
    """The entries of one results file, each checked."""
    data = json.loads(path.read_text(encoding="utf-8"))
    entries = data.get("entries") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: no 'entries' list")
    for e in entries:
        if not isinstance(e, dict):
            raise ValueError(f"{path}: an entry is not an object: {e!r}")
        check_entry(e)
    return entries


def cpu_name() -> str:
    """The CPU's model name and its widest vector unit: the same name ("AMD EPYC") covers
    AVX2-only and AVX-512 parts, and that decides the kernels and torch's GEMM alike."""
    # lazy: llama_backend imports llama_cpp, which `python -m bench.chart` does not need
    from gguf_serve.engine.llama_backend import read_cpu

    model, features = read_cpu()
    isa = "AVX-512" if "avx512f" in features else "AVX2" if "avx2" in features else ""
    return f"{model} ({isa})" if isa else model


def command_line() -> str:
    """How this run was started. Run as `python -m bench.x`, argv[0] is the file's path; run by
    bench/__main__.py (`make bench`), it is the module's name."""
    first = sys.argv[0]
    module = f"bench.{Path(first).stem}" if first.endswith(".py") else first
    return " ".join(["python -m", module, *map(shlex.quote, sys.argv[1:])])


def record(
    bench: str,
    ratios: list[Ratio],
    *,
    load_avg: float | None = None,
    results_dir: Path = RESULTS,
) -> Path:
    """Write `ratios` into results_dir/<bench>.json, replacing earlier entries of the same metric
    and peer. `load_avg`: the 1-minute load average when the run started (now if not given)."""
    when = time.strftime("%Y-%m-%d", time.gmtime())
    common = {
        "cpu": cpu_name(),
        "load_avg": round(os.getloadavg()[0] if load_avg is None else load_avg, 2),
        "date": when,
        "command": command_line(),
    }
    new = []
    for r in ratios:
        entry: dict[str, Any] = {
            "metric": r.metric,
            # 4 significant digits: more than any of these measurements can tell apart
            "ours": float(f"{r.ours:.4g}"),
            "peer": float(f"{r.peer:.4g}"),
            "peer_name": r.peer_name,
            "unit": r.unit,
            "better": r.better,
            "ratio": round(times_better(r.ours, r.peer, r.better), 4),
            "goal": r.goal,
            **common,
        }
        check_entry(entry)  # before anything is written: a bad entry leaves the file as it was
        new.append(entry)
    path = results_dir / f"{bench}.json"
    old = read(path) if path.is_file() else []
    # in place, so the chart keeps its order from run to run
    fresh = {(e["metric"], e["peer_name"]): e for e in new}
    merged = [fresh.pop((e["metric"], e["peer_name"]), e) for e in old] + list(fresh.values())
    results_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"bench": bench, "entries": merged}, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {len(new)} ratios to {path}", flush=True)
    return path
