"""Does a quantized KV cache keep the answers? On real weights (the demo's SmolLM2-135M), per
prompt: greedy text with f16 and with q8_0 KV, and, teacher-forced on f16's greedy continuation,
how often the top-1 token agrees with f32 KV and the largest logit difference.

    python -m bench.bench_kv_types [--tokens 64] [--types f16,q8_0]
"""

from __future__ import annotations

import argparse

import numpy as np
import numpy.typing as npt

from gguf_serve.engine.llama_runtime import Batch, ContextParams, LlamaContext, LlamaModel, usable_cpus
from tests.e2e.server import demo_chat_gguf

PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France? Explain its history briefly.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWrite a short poem about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nList three uses of Python in data science.<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time, in a small village by the sea, there lived an old fisherman. " * 20,
]


def context(model: LlamaModel, kv: str) -> LlamaContext:
    n = usable_cpus()
    params = ContextParams(
        n_ctx=2048,
        n_batch=2048,
        n_ubatch=512,
        n_seq_max=1,
        n_threads=n,
        n_threads_batch=n,
        type_k=kv,
        type_v=kv,
    )
    return LlamaContext(model, params)


def greedy(model: LlamaModel, kv: str, prompt: list[int], n: int) -> list[int]:
    ctx, batch = context(model, kv), Batch(2048)
    for i, t in enumerate(prompt):
        batch.add(t, i, 0, i == len(prompt) - 1)
    ctx.decode(batch)
    out: list[int] = []
    for pos in range(len(prompt), len(prompt) + n):
        out.append(int(np.argmax(ctx.logits(batch.n_tokens - 1))))
        batch.clear()
        batch.add(out[-1], pos, 0, True)
        ctx.decode(batch)
    ctx.close()
    batch.free()
    return out


def all_logits(model: LlamaModel, kv: str, tokens: list[int]) -> npt.NDArray[np.float32]:
    ctx, batch = context(model, kv), Batch(2048)
    for i, t in enumerate(tokens):
        batch.add(t, i, 0, True)
    ctx.decode(batch)
    logits = np.stack([ctx.logits(i).copy() for i in range(len(tokens))])
    ctx.close()
    batch.free()
    return logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument(
        "--types", default="f16,q8_0", help="KV types to compare with f32 (the first: the greedy text)"
    )
    args = ap.parse_args()
    kinds = args.types.split(",")
    model = LlamaModel(demo_chat_gguf())
    for prompt in PROMPTS:
        tokens = model.tokenize(prompt)
        texts = {kv: model.detokenize(greedy(model, kv, tokens, args.tokens)) for kv in kinds}
        seq = tokens + greedy(model, kinds[0], tokens, args.tokens)
        ref = all_logits(model, "f32", seq)[len(tokens) - 1 :]
        row = [f"{len(tokens)} prompt tokens + {args.tokens}"]
        for kv in kinds:
            logits = all_logits(model, kv, seq)[len(tokens) - 1 :]
            agree = float(np.mean(logits.argmax(1) == ref.argmax(1)))
            same = "same greedy text" if texts[kv] == texts[kinds[0]] else "greedy text differs"
            row.append(
                f"{kv}: {same}, top-1 = f32 KV's {agree:.0%}, max |dlogit| {np.abs(logits - ref).max():.3f}"
            )
        print("; ".join(row), flush=True)
    model.close()


if __name__ == "__main__":
    main()
