"""Draw every benchmark's headline ratios (bench/results/*.json) as one PNG: docs/benchmarks.png.

    .venv/bin/python -m bench.chart [--results bench/results] [--out docs/benchmarks.png]

`make bench` runs it last; alone it redraws from the stored figures. One horizontal bar per
metric, grouped by peer, on a log axis (a ratio of 2 and one of 0.5 are the same distance from
1.0); a line at 1.0 (level with the peer), a marker at each goal, and bars coloured by the CPU
they were measured on, since the stored figures need not come from one machine.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image  # matplotlib's own dependency

from bench.results import RESULTS, read

DOCS_PNG = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.png"
COLOURS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860"]


def load(results_dir: Path) -> list[dict[str, Any]]:
    """Every entry of every results file, with the file's bench name, in file order."""
    entries: list[dict[str, Any]] = []
    for path in sorted(results_dir.glob("*.json")):
        entries += [{**e, "bench": path.stem} for e in read(path)]
    return entries


def by_peer(entries: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for e in entries:
        groups.setdefault(e["peer_name"], []).append(e)
    return groups


def draw(entries: list[dict[str, Any]], out: Path) -> Path:
    if not entries:
        raise ValueError("no results to draw")
    cpus = list(dict.fromkeys(e["cpu"] for e in entries))
    colour = {cpu: COLOURS[i % len(COLOURS)] for i, cpu in enumerate(cpus)}
    # rows top to bottom: a heading per peer, then its metrics
    rows: list[tuple[str, dict[str, Any] | None]] = []
    for peer, group in by_peer(entries).items():
        rows.append((f"against {peer}", None))
        rows += [(f"{e['metric']} [{e['bench']}]", e) for e in group]

    legend_h = 0.2 * (1 + (len(cpus) + 1) // 2)  # inches: the CPU legend, two to a line, at the bottom
    fig_h = 1.6 + 0.27 * len(rows) + legend_h
    fig = Figure(figsize=(11, fig_h), dpi=80)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_xscale("log")
    ys = list(range(len(rows)))[::-1]
    for y, (_, e) in zip(ys, rows, strict=True):
        if e is None:
            continue
        # a bar grows from 1.0 (level with the peer) towards its ratio, either way
        left, right = sorted((1.0, e["ratio"]))
        ax.barh(y, right - left, left=left, height=0.7, color=colour[e["cpu"]])
        value = f" {e['ratio']:.2f}x " if e["ratio"] < 10 else f" {e['ratio']:.0f}x "
        ax.text(e["ratio"], y, value, va="center", ha="left" if e["ratio"] >= 1 else "right", fontsize=8)
        if e.get("goal") is not None:
            ax.plot(e["goal"], y, marker="D", color="black", markersize=5, linestyle="none")
    ax.set_yticks(ys, [label for label, _ in rows], fontsize=8)
    for tick, (_, e) in zip(ax.get_yticklabels(), rows, strict=True):
        if e is None:
            tick.set_fontweight("bold")
    ax.axvline(1.0, color="black", linewidth=1)
    # room for the value labels beyond the longest bars on either side
    xs = [e["ratio"] for e in entries] + [e["goal"] for e in entries if e.get("goal") is not None] + [1.0]
    ax.set_xlim(min(xs) / 4, max(xs) * 4)
    ax.set_xlabel("times better than the peer (log scale; > 1: ours is better; diamond: the goal)")
    dates = {cpu: sorted({e["date"] for e in entries if e["cpu"] == cpu}) for cpu in cpus}
    when = [f"{cpu}: {d[0]}" + (f" to {d[-1]}" if len(d) > 1 else "") for cpu, d in dates.items()]
    ax.set_title("gguf-serve against its peers\n" + "\n".join(when), fontsize=10)
    # under the x label, out of the bars' way
    fig.legend(
        handles=[Patch(color=colour[c], label=c) for c in cpus], fontsize=8, loc="lower center", ncols=2
    )
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout(rect=(0, legend_h / fig_h, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    # a few colours and grey text: as a 64-colour palette PNG it is a third the size (docs/ is in git)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")  # long titles and labels are not cut off
    Image.open(buf).convert("RGB").quantize(colors=64).save(out, format="png", optimize=True)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--out", type=Path, default=DOCS_PNG)
    args = ap.parse_args(argv)
    print(f"wrote {draw(load(args.results), args.out)}")


if __name__ == "__main__":
    main()
