"""Chat decode speed: one stream through HTTP vs in-process llama.cpp, and 1/2/4/8 concurrent streams.

    .venv/bin/python -m bench.bench_chat [--tokens 128] [--repeat 2]

Both sides load the same GGUF with the same threads and sampling (temperature 0.7); end-of-
generation tokens are biased away so every stream makes exactly --tokens tokens. Ratios in one
run are what to compare: this machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import time

import openai

from gguf_serve.engine.llama_runtime import usable_cpus
from tests.e2e.server import ServerProcess, demo_chat_gguf

MODEL = "smollm2-135m-instruct"
PROMPTS = [
    f"Write a long story about a {w}."
    for w in ("dragon", "robot", "river", "city", "garden", "ship", "mountain", "library")
]


def eog_bias(llm: object) -> dict[int, float]:
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)  # type: ignore[attr-defined]
    n = llama_cpp.llama_vocab_n_tokens(vocab)
    return {t: -100.0 for t in range(n) if llama_cpp.llama_vocab_is_eog(vocab, t)}


def in_process(tokens: int) -> tuple[float, dict[int, float]]:
    from llama_cpp import Llama

    llm = Llama(str(demo_chat_gguf()), n_ctx=2048, n_threads=usable_cpus(), n_batch=512, verbose=False)
    bias = eog_bias(llm)
    llm.create_chat_completion([{"role": "user", "content": "warm up"}], max_tokens=8)
    t0 = time.perf_counter()
    n = 0
    for chunk in llm.create_chat_completion(
        [{"role": "user", "content": PROMPTS[0]}],
        max_tokens=tokens,
        temperature=0.7,
        stream=True,
        logit_bias=bias,
    ):
        if chunk["choices"][0]["delta"].get("content"):
            n += 1
    rate = n / (time.perf_counter() - t0)
    del llm
    return rate, bias


async def http_streams(base: str, k: int, tokens: int, bias: dict[int, float]) -> tuple[float, list[float]]:
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=600)
    ttfts: list[float] = []

    async def one(i: int) -> int:
        t0 = time.perf_counter()
        first = None
        n = 0
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            max_tokens=tokens,
            temperature=0.7,
            stream=True,
            stream_options={"include_usage": True},
            logit_bias={str(t): v for t, v in bias.items()},
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content and first is None:
                first = time.perf_counter() - t0
            if chunk.usage:
                n = chunk.usage.completion_tokens
        ttfts.append(first or 0.0)
        return n

    t0 = time.perf_counter()
    try:
        counts = await asyncio.gather(*(one(i) for i in range(k)))
    finally:
        await client.close()
    return sum(counts) / (time.perf_counter() - t0), ttfts


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--profile", default="demo", help="a profile whose chat model is " + MODEL)
    args = ap.parse_args()
    inproc, bias = in_process(args.tokens)
    server = ServerProcess(args.profile)
    rows = []
    try:
        server.wait_ready(600)
        asyncio.run(http_streams(server.base_url, 1, 8, bias))  # warm up
        for k in (1, 2, 4, 8):
            rates, ttfts = [], []
            for _ in range(args.repeat):
                r, t = asyncio.run(http_streams(server.base_url, k, args.tokens, bias))
                rates.append(r)
                ttfts += t
            rows.append((k, statistics.median(rates), pct(ttfts, 0.5), pct(ttfts, 0.99)))
    finally:
        server.stop()
    one = rows[0][1]
    print(
        f"\nchat decode, {args.tokens} new tokens, temperature 0.7, SmolLM2-135M Q4_1, "
        f"{usable_cpus()} CPUs ({platform.processor() or platform.machine()})"
    )
    print(f"in-process llama-cpp-python, 1 stream: {inproc:.1f} tok/s")
    print("| streams | aggregate tok/s | vs 1 stream | vs in-process | TTFT p50 ms | TTFT p99 ms |")
    print("|---|---|---|---|---|---|")
    for k, rate, p50, p99 in rows:
        print(
            f"| {k} | {rate:.1f} | {rate / one:.2f}x | {rate / inproc:.2f} | {p50 * 1000:.0f} | {p99 * 1000:.0f} |"
        )


if __name__ == "__main__":
    main()
