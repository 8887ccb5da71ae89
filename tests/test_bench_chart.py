"""bench/results.py writes the benchmarks' headline ratios, bench/chart.py draws them: the format
is checked where it is written, and the committed figures draw (docs/benchmarks.png)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from bench import chart, results
from bench.results import Ratio, record

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def fixed_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    # the CPU name comes from llama.cpp's helper; a fixed one keeps the test about the format
    monkeypatch.setattr(results, "cpu_name", lambda: "Test CPU @ 1.00GHz")


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, "not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_two_results_files_draw_one_png(tmp_path: Path) -> None:
    record(
        "chat",
        [
            Ratio("chat tok/s, 1 stream", 74.7, 76.9, "llama-server", "tok/s", "higher"),
            Ratio("chat tok/s, 8 streams", 87.4, 83.3, "llama-server", "tok/s", "higher", 1.0),
        ],
        load_avg=1.0,
        results_dir=tmp_path,
    )
    record(
        "mixed",
        [Ratio("query embedding p95", 473, 14, "idle (the same server)", "ms", "lower", 0.5)],
        results_dir=tmp_path,
    )
    entries = chart.load(tmp_path)
    assert [(e["bench"], e["metric"]) for e in entries] == [
        ("chat", "chat tok/s, 1 stream"),
        ("chat", "chat tok/s, 8 streams"),
        ("mixed", "query embedding p95"),
    ]
    # "times better": ours / peer where higher is better, peer / ours where lower is
    assert entries[1]["ratio"] == pytest.approx(87.4 / 83.3, rel=1e-3)
    assert entries[2]["ratio"] == pytest.approx(14 / 473, rel=1e-3)
    assert entries[0]["cpu"] == "Test CPU @ 1.00GHz" and entries[0]["load_avg"] == 1.0
    assert entries[0]["command"].startswith("python -m ")

    out = chart.draw(entries, tmp_path / "docs" / "benchmarks.png")
    width, height = png_size(out)
    assert width > 400 and height > 200


def test_a_run_replaces_its_own_figures_and_keeps_the_others(tmp_path: Path) -> None:
    def one(metric: str, ours: float) -> Ratio:
        return Ratio(metric, ours, 10.0, "transformers", "s", "lower")

    record("real", [one("rerank", 20.0), one("embed", 5.0)], results_dir=tmp_path)
    record("real", [one("rerank", 8.0)], results_dir=tmp_path)
    entries = results.read(tmp_path / "real.json")
    assert [(e["metric"], e["ours"]) for e in entries] == [("rerank", 8.0), ("embed", 5.0)]


@pytest.mark.parametrize(
    "bad",
    [
        Ratio("rerank", -1.0, 10.0, "transformers", "s", "lower"),
        Ratio("rerank", 1.0, 0.0, "transformers", "s", "lower"),
        Ratio("texts/s", 1.0, 0.0, "transformers", "texts/s", "higher"),
        Ratio("rerank", float("nan"), 10.0, "transformers", "s", "lower"),
        Ratio("rerank", 1.0, 10.0, "transformers", "s", "faster"),  # type: ignore[arg-type]
        Ratio("", 1.0, 10.0, "transformers", "s", "lower"),
        Ratio("rerank", 1.0, 10.0, "transformers", "s", "lower", goal=0.0),
    ],
)
def test_the_writer_rejects_a_malformed_entry_and_writes_nothing(tmp_path: Path, bad: Ratio) -> None:
    with pytest.raises(ValueError):
        record("real", [Ratio("ok", 1.0, 2.0, "transformers", "s", "lower"), bad], results_dir=tmp_path)
    assert not (tmp_path / "real.json").exists()


def test_a_hand_edited_entry_must_still_add_up(tmp_path: Path) -> None:
    record(
        "embed",
        [Ratio("texts/s", 16.4, 19.5, "sentence-transformers", "texts/s", "higher")],
        results_dir=tmp_path,
    )
    path = tmp_path / "embed.json"
    data = json.loads(path.read_text())
    data["entries"][0]["ratio"] = 1.19  # the peer's figure over ours: the wrong way round
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="ratio"):
        chart.load(tmp_path)
    data["entries"][0].pop("ratio")
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="lacks 'ratio'"):
        chart.load(tmp_path)


def test_nothing_to_draw_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        chart.draw([], tmp_path / "x.png")


def test_the_committed_figures_are_valid_and_drawn_next_to_the_tables() -> None:
    entries = chart.load(results.RESULTS)
    assert {e["bench"] for e in entries} >= {"chat", "embed", "rag", "real", "mixed", "isolation"}
    png_size(ROOT / "docs" / "benchmarks.png")
    assert (ROOT / "docs" / "benchmarks.png").stat().st_size < 150_000
    assert "](benchmarks.png)" in (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
