"""The GPU path, end to end, in one run: convert, serve with every layer offloaded, check, measure.

Runs on the lent GPU machine from bench/gpu_check.sh (after it has built llama.cpp with CUDA),
and here with `--cpu` to test every step but the GPU itself:

1. seeded Qwen3 checkpoints (torch + transformers): tiny chat, embedding and reranker models,
   and a chat model with Qwen3-0.6B's layer shapes (hidden 1024, 28 layers, GQA 16/8, head_dim
   128) for a decode figure that means something;
2. `gguf-serve convert` each to GGUF (Q8_0; the 0.6B-shaped one Q4_K_M);
3. a profile with n_gpu_layers = -1 (chat, rerank) and "auto" (embedding), served;
4. checks through the openai SDK and httpx: chat (plain and streamed), embeddings (unit
   norm), rerank, /stats naming the GPU device (not with --cpu);
5. decode tokens/s of the 0.6B-shaped model at 1 and 4 streams, every layer offloaded vs none.

Prints one JSON summary and writes it to OUT/gpu-check.json. Exit 0 only if every check passed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import openai

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.e2e.server import ServerProcess  # noqa: E402
from tests.fixtures import tiny_checkpoints as tc  # noqa: E402

# Qwen3-0.6B's published shapes (config.json), with the tiny test vocabulary.
QWEN3_06B_SHAPE = {
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
}
# For --cpu on a 2-core machine: same structure, small enough to run in seconds.
SMALL_SHAPE = {**QWEN3_06B_SHAPE, "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4}


def write_shaped_chat(dest: Path, shape: dict[str, int]) -> Path:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tc.write_tokenizer(dest)
    base = tc._qwen3_config(dest, tied=True).to_dict()
    for derived in ("layer_types", "transformers_version", "architectures"):
        base.pop(derived, None)
    config = Qwen3Config(**{**base, **shape, "max_position_embeddings": 4096})
    model = tc._seeded(Qwen3ForCausalLM(config), seed=7)
    tc._save(model, dest, dtype=torch.bfloat16)
    return dest


def convert(src: Path, models: Path, name: str, quant: str) -> Path:
    subprocess.run(
        [sys.executable, "-m", "gguf_serve", "convert", str(src), "--name", name, "--quant", quant,
         "--models-dir", str(models)],
        check=True,
        cwd=REPO,
    )  # fmt: skip
    return models / name / f"{name}-{quant}.gguf"


def write_profile(path: Path, models: Path, files: dict[str, Path]) -> None:
    def entry(mid: str, role: str, layers: str, extra: str = "") -> str:
        rel = files[mid].relative_to(models)
        return (
            f'[[models]]\nid = "{mid}"\nrole = "{role}"\nfile = "{rel}"\nn_ctx = 2048\n'
            f"n_gpu_layers = {layers}\n{extra}\n"
        )

    path.write_text(
        f'models_dir = "{models}"\n\n'
        + entry("qwen3-0.6b-shape", "chat", "-1", "parallel = 4\n")
        + entry("qwen3-tiny-chat", "chat", "-1", "parallel = 2\n")
        + entry("qwen3-tiny-embedding", "embedding", '"auto"')
        + entry("qwen3-tiny-reranker", "rerank", "-1")
    )


def eog_bias(path: Path) -> dict[str, float]:
    """Keep random weights from stopping early: end-of-generation tokens get -100."""
    from gguf_serve.engine.llama_runtime import LlamaModel

    model = LlamaModel(path, n_gpu_layers=0)
    try:
        return {str(t): -100.0 for t in range(model.n_vocab) if model.is_eog(t)}
    finally:
        model.close()


def checks(base: str, gpu: bool) -> dict[str, Any]:
    client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=120)
    out: dict[str, Any] = {}
    listed = [m.id for m in client.models.list().data]
    assert listed[0] == "qwen3-0.6b-shape", listed
    reply = client.chat.completions.create(
        model="qwen3-tiny-chat", messages=[{"role": "user", "content": "Hello"}], max_tokens=16
    )
    assert reply.usage and reply.usage.completion_tokens > 0
    out["chat_tokens"] = reply.usage.completion_tokens
    chunks = list(
        client.chat.completions.create(
            model="qwen3-tiny-chat",
            messages=[{"role": "user", "content": "Count"}],
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage and chunks[-1].usage.completion_tokens > 0
    out["stream_chunks"] = len(chunks)
    emb = client.embeddings.create(model="qwen3-tiny-embedding", input=["a cat", "a dog", "a car", "雨"])
    norms = [sum(x * x for x in d.embedding) ** 0.5 for d in emb.data]
    assert len(norms) == 4 and all(abs(n - 1.0) < 1e-3 for n in norms), norms
    out["embedding_dim"] = len(emb.data[0].embedding)
    rerank = httpx.post(
        base + "/v1/rerank",
        json={"model": "qwen3-tiny-reranker", "query": "cat", "documents": ["a kitten", "a truck", "rain"]},
        timeout=60,
    )
    rerank.raise_for_status()
    results = rerank.json()["results"]
    assert sorted(r["index"] for r in results) == [0, 1, 2], results
    out["rerank_scores"] = [round(r["relevance_score"], 4) for r in results]
    runtime = httpx.get(base + "/stats", timeout=10).json()["runtime"]
    out["runtime"] = {
        k: runtime[k] for k in ("build", "cpu_model", "cpu_variant", "amx", "repack", "devices")
    }
    if gpu:
        assert any(d["kind"] == "gpu" for d in runtime["devices"]), runtime["devices"]
    return out


async def decode_rate(base: str, streams: int, tokens: int, bias: dict[str, float]) -> float:
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=600)

    async def one(i: int) -> int:
        reply = await client.chat.completions.create(
            model="qwen3-0.6b-shape",
            messages=[{"role": "user", "content": f"Tell story number {i}."}],
            max_tokens=tokens,
            temperature=0.7,
            logit_bias=bias,  # type: ignore[arg-type]
        )
        return reply.usage.completion_tokens if reply.usage else 0

    await one(0)  # warm-up
    t0 = time.perf_counter()
    counts = await asyncio.gather(*(one(i) for i in range(streams)))
    return sum(counts) / (time.perf_counter() - t0)


def serve(profile: Path, log: Path, *args: str) -> ServerProcess:
    server = ServerProcess(str(profile), *args, log=log)
    try:
        server.wait_ready(timeout=600)
    except BaseException:
        print(server.log_tail(60), file=sys.stderr)
        server.stop()
        raise
    return server


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpu", action="store_true", help="no GPU: test the steps, small shapes")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/results")))
    parser.add_argument("--work", type=Path, default=None, help="keep checkpoints and GGUFs here")
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="gguf-serve-gpu-check-"))
    models = work / "models"
    summary: dict[str, Any] = {"mode": "cpu" if args.cpu else "gpu"}
    t0 = time.perf_counter()
    sources = {
        "qwen3-tiny-chat": lambda d: tc.write_qwen3_chat(d),
        "qwen3-tiny-embedding": lambda d: tc.write_qwen3_embedding(d),
        "qwen3-tiny-reranker": lambda d: tc.write_qwen3_reranker(d, tied=False),
        "qwen3-0.6b-shape": lambda d: write_shaped_chat(d, SMALL_SHAPE if args.cpu else QWEN3_06B_SHAPE),
    }
    files: dict[str, Path] = {}
    for name, write in sources.items():
        src = work / "checkpoints" / name
        if not (src / "config.json").exists():
            write(src)
        quant = "Q4_K_M" if name == "qwen3-0.6b-shape" else "Q8_0"
        files[name] = models / name / f"{name}-{quant}.gguf"
        if not files[name].exists():
            convert(src, models, name, quant)
    summary["prepare_s"] = round(time.perf_counter() - t0, 1)
    profile = work / "gpu-check.toml"
    write_profile(profile, models, files)

    server = serve(profile, args.out / "server-offload.log")
    try:
        summary["checks"] = checks(server.base_url, gpu=not args.cpu)
        bias = eog_bias(files["qwen3-0.6b-shape"])
        rates: dict[str, float] = {}
        for streams in (1, 4):
            rates[f"offload_all_{streams}"] = asyncio.run(
                decode_rate(server.base_url, streams, args.tokens, bias)
            )
    finally:
        code = server.stop()
    summary["clean_exit_offload"] = code == 0
    cpu_server = serve(profile, args.out / "server-cpu.log", "--n-gpu-layers", "0")
    try:
        for streams in (1, 4):
            rates[f"cpu_only_{streams}"] = asyncio.run(
                decode_rate(cpu_server.base_url, streams, args.tokens, bias)
            )
    finally:
        cpu_server.stop()
    summary["decode_tok_s"] = {k: round(v, 1) for k, v in rates.items()}
    summary["total_s"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(summary, indent=2)
    (args.out / "gpu-check.json").write_text(text + "\n")
    print(text)
    if not summary["clean_exit_offload"]:
        raise SystemExit("the offloaded server did not exit cleanly on SIGTERM")


if __name__ == "__main__":
    main()
