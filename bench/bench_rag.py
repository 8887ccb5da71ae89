"""RAG-shaped chat traffic: long retrieved passages, one shared system prompt, follow-ups.

    .venv/bin/python -m bench.bench_rag [--passage-words 1300] [--followups 2] [--llama-server PATH]

Two scenarios, each against gguf-serve (demo profile, 8 slots) and, when given, llama.cpp's
llama-server on the same GGUF (-np 8, its defaults otherwise: host-RAM prompt cache on):

- rag: N conversations (fewer, then more than the 8 slots), each a distinct ~1,500-token
  passage after a shared system prompt. First every conversation's first question, then
  M rounds of follow-ups, round robin, so each follow-up comes back after other users'.
  Follow-ups ask a new question about the same passage (RAGFlow re-sends the passages).
- multi-turn: conversations with each answer appended before the next question.

Requests run one at a time, so TTFT is the prefill (or its reuse), not queueing; the servers
take turns request by request, so a shared machine's drift falls on both alike. End-of-
generation tokens are biased away so every answer has --max-tokens tokens on both servers.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
from openai.types.chat import ChatCompletionMessageParam

from bench.results import Ratio, record
from bench.servers import BenchServer, llama_server, rss_mib
from gguf_serve.engine.llama_runtime import LlamaModel, usable_cpus
from tests.e2e.server import ServerProcess, demo_chat_gguf
from tests.fixtures import rag_text

MODEL = "smollm2-135m-instruct"
SLOTS = 8
SYSTEM = (
    "You are the assistant of a knowledge base. Answer the user's question using only the "
    "passages below; say so when they do not contain the answer."
)
WORDS = [
    *rag_text.WORDS,
    "tunnel",
    "village",
    "ember",
    "island",
    "pillar",
    "forest",
    "beacon",
    "mirror",
    "cellar",
    "anchor",
    "willow",
    "summit",
    "prairie",
]
QUESTIONS = [
    "What is the passage about?",
    "Which word appears most often?",
    "Name three places it mentions.",
    "Summarise it in one sentence.",
]


def passage(seed: int, n_words: int) -> str:
    rng = random.Random(seed)
    sentences: list[str] = []
    while sum(len(s.split()) for s in sentences) < n_words:
        sentences.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 16))).capitalize() + ".")
    return f"[Document {seed}]\n" + " ".join(sentences)


def eog_bias(gguf: Path) -> dict[str, int]:
    model = LlamaModel(gguf)
    try:
        return {str(t): -100 for t in range(model.n_vocab) if model.is_eog(t)}
    finally:
        model.close()


@dataclass
class Sample:
    ttft: float
    prompt_tokens: int
    cached_tokens: int
    answer: str
    reusable: int = 0  # prompt tokens of this conversation's previous request


@dataclass
class Scenario:
    name: str
    first: list[Sample] = field(default_factory=list)
    follow: list[Sample] = field(default_factory=list)
    cache: dict[str, float] = field(default_factory=dict)
    rss_mib: float = 0.0


class Client:
    def __init__(self, base: str, max_tokens: int, bias: dict[str, int], model: str = MODEL) -> None:
        self.client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=1800)
        self.model = model
        self.max_tokens = max_tokens
        self.bias = bias

    def ask(self, messages: list[ChatCompletionMessageParam]) -> Sample:
        t0 = time.perf_counter()
        ttft: float | None = None
        parts: list[str] = []
        usage: Any = None
        stream = self.client.chat.completions.create(
            model=self.model,
            messages=messages,
            max_tokens=self.max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            logit_bias=self.bias,
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                if ttft is None:
                    ttft = time.perf_counter() - t0
                parts.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                usage = chunk.usage
        details = getattr(usage, "prompt_tokens_details", None)
        cached = int(getattr(details, "cached_tokens", 0) or 0)
        return Sample(
            ttft or time.perf_counter() - t0, usage.prompt_tokens if usage else 0, cached, "".join(parts)
        )


def rag(clients: list[Client], n_conv: int, followups: int, n_words: int, seed: int) -> list[Scenario]:
    """One scenario on every server, request by request in turn, so the machine's drift
    (this one is shared) falls on all of them alike."""
    scs = [Scenario(f"rag, {n_conv} conversations") for _ in clients]
    docs = [passage(seed + i, n_words) for i in range(n_conv)]

    def msgs(i: int, q: int) -> list[ChatCompletionMessageParam]:
        return [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"{docs[i]}\n\nQuestion: {QUESTIONS[q % len(QUESTIONS)]}"},
        ]

    last: list[list[Sample]] = [[] for _ in clients]
    for i in range(n_conv):
        for c, sc, prev in zip(clients, scs, last, strict=True):
            sc.first.append(c.ask(msgs(i, 0)))
            prev.append(sc.first[-1])
    for q in range(1, followups + 1):
        for i in range(n_conv):
            for c, sc, prev in zip(clients, scs, last, strict=True):
                s = c.ask(msgs(i, q))
                s.reusable, prev[i] = prev[i].prompt_tokens, s
                sc.follow.append(s)
    return scs


def multi_turn(clients: list[Client], n_conv: int, turns: int, n_words: int, seed: int) -> list[Scenario]:
    """Each server's conversations carry its own answers; requests alternate as in rag()."""
    scs = [Scenario(f"multi-turn, {n_conv} conversations") for _ in clients]
    convs: list[list[list[ChatCompletionMessageParam]]] = [
        [[{"role": "system", "content": f"{SYSTEM}\n\n{passage(seed + i, n_words)}"}] for i in range(n_conv)]
        for _ in clients
    ]
    last = [[0] * n_conv for _ in clients]
    for t in range(turns):
        for i in range(n_conv):
            for c, sc, conv, prev in zip(clients, scs, convs, last, strict=True):
                conv[i].append({"role": "user", "content": QUESTIONS[t % len(QUESTIONS)]})
                s = c.ask(conv[i])
                s.reusable, prev[i] = prev[i], s.prompt_tokens
                conv[i].append({"role": "assistant", "content": s.answer})
                (sc.first if t == 0 else sc.follow).append(s)
    return scs


def cache_metrics(base: str) -> dict[str, float]:
    """gguf-serve's prompt cache counters from /metrics (llama-server exports none)."""
    try:
        text = httpx.get(base + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("gguf_serve_prompt_cache_") and f'model="{MODEL}"' in line:
            name = line.split("{", 1)[0].removeprefix("gguf_serve_prompt_cache_").removesuffix("_total")
            out[name] = float(line.rsplit(" ", 1)[1])
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))] if xs else float("nan")


def run_scenarios(
    servers: list[ServerProcess | BenchServer], args: argparse.Namespace, bias: dict[str, int]
) -> list[list[Scenario]]:
    """Every scenario on every server; the result has one list of scenarios per server."""
    clients = [Client(s.base_url, args.max_tokens, bias) for s in servers]
    for c in clients:
        c.ask([{"role": "user", "content": "warm up"}])
    out: list[list[Scenario]] = [[] for _ in servers]
    plans = [(n, "rag") for n in args.conversations] + [(args.multi_turn, "multi")]
    for k, (n, kind) in enumerate(plans):
        before = [cache_metrics(s.base_url) for s in servers]
        seed = 1000 * (k + 1)  # distinct passages per scenario: first questions are cold
        if kind == "rag":
            scs = rag(clients, n, args.followups, args.passage_words, seed)
        else:
            scs = multi_turn(clients, n, args.followups + 1, args.passage_words, seed)
        for server, sc, b, results in zip(servers, scs, before, out, strict=True):
            after = cache_metrics(server.base_url)
            sc.cache = {
                k2: v - b.get(k2, 0.0) if k2 in ("hits", "misses", "restored_tokens") else v
                for k2, v in after.items()
            }
            sc.rss_mib = rss_mib(server.proc.pid)
            results.append(sc)
        print(f"  {scs[0].name} done", flush=True)
    return out


def server_name(server: ServerProcess | BenchServer) -> str:
    return server.name if isinstance(server, BenchServer) else "gguf-serve"


def report(name: str, scenarios: list[Scenario]) -> None:
    print(f"\n{name}")
    print(
        "| scenario | prompt tokens | first TTFT p50 / p99 ms | follow-up TTFT p50 / p99 ms | "
        "follow-up / first (p50) | follow-ups reusing >= 90% of the previous prompt | prompt cache hits / misses | cache RAM MiB | RSS MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for sc in scenarios:
        f = [s.ttft * 1000 for s in sc.first]
        u = [s.ttft * 1000 for s in sc.follow]
        reuse = sum(1 for s in sc.follow if s.cached_tokens >= 0.9 * s.reusable) / max(1, len(sc.follow))
        ptoks = statistics.median(s.prompt_tokens for s in sc.first)
        hm = f"{sc.cache['hits']:.0f} / {sc.cache['misses']:.0f}" if "hits" in sc.cache else "n/a"
        ram = (
            f"{sc.cache['bytes'] / 2**20:.0f} of {sc.cache['limit_bytes'] / 2**20:.0f}"
            if "bytes" in sc.cache
            else "n/a"
        )
        print(
            f"| {sc.name} | {ptoks:.0f} | {pct(f, 0.5):.0f} / {pct(f, 0.99):.0f} | {pct(u, 0.5):.0f} / {pct(u, 0.99):.0f} "
            f"| {pct(u, 0.5) / pct(f, 0.5):.3f} | {reuse:.0%} | {hm} | {ram} | {sc.rss_mib:.0f} |"
        )


def follow_up_p50_ms(sc: Scenario) -> float:
    return pct([s.ttft * 1000 for s in sc.follow], 0.5)


def compare(ours: tuple[str, list[Scenario]], ref: tuple[str, list[Scenario]]) -> list[Ratio]:
    print(f"\n{ours[0]} / {ref[0]}, TTFT p50 (below 1: {ours[0]} is faster)")
    print("| scenario | first questions | follow-ups |")
    print("|---|---|---|")
    ratios = []
    for a, b in zip(ours[1], ref[1], strict=True):
        first = pct([s.ttft for s in a.first], 0.5) / pct([s.ttft for s in b.first], 0.5)
        follow = pct([s.ttft for s in a.follow], 0.5) / pct([s.ttft for s in b.follow], 0.5)
        print(f"| {a.name} | {first:.2f} | {follow:.2f} |")
        # issue 11: follow-ups no slower than llama-server's
        metric = f"RAG follow-up TTFT p50, {a.name}"
        ratios.append(Ratio(metric, follow_up_p50_ms(a), follow_up_p50_ms(b), ref[0], "ms", "lower", 1.0))
    return ratios


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--passage-words", type=int, default=1300, help="~1,500 tokens with the demo tokenizer")
    ap.add_argument("--conversations", type=lambda s: [int(x) for x in s.split(",")], default=[4, 12])
    ap.add_argument("--multi-turn", type=int, default=10, help="conversations in the multi-turn scenario")
    ap.add_argument("--followups", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--profile", default="demo", help="a profile whose chat model is " + MODEL)
    ap.add_argument("--llama-server", metavar="PATH", help="also measure llama.cpp's llama-server binary")
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    bias = eog_bias(demo_chat_gguf())
    servers: list[ServerProcess | BenchServer] = [ServerProcess(args.profile)]
    if args.llama_server:
        # the demo profile's 8 slots of 2048 tokens and batches; its prompt cache (--cache-ram) at its default
        servers.append(
            llama_server(
                args.llama_server, demo_chat_gguf(), "-np", "8", "-c", "16384", "-b", "512", "-ub", "512"
            )
        )
    try:
        for server in servers:
            server.wait_ready(600)
        # One request at a time: each server runs alone on the CPU while it answers.
        results = list(
            zip([server_name(s) for s in servers], run_scenarios(servers, args, bias), strict=True)
        )
    finally:
        for server in servers:
            server.stop()
    print(
        f"\nRAG chat, ~{args.passage_words}-word passages, {args.followups} follow-ups, {args.max_tokens} new tokens, "
        f"greedy, SmolLM2-135M Q4_1, {usable_cpus()} CPUs ({platform.processor() or platform.machine()}), "
        f"load average {load_before:.2f} before / {os.getloadavg()[0]:.2f} after"
    )
    for name, scenarios in results:
        report(name, scenarios)
    # issue 11: a follow-up's TTFT <= 0.1 x its first question's (cold prompt)
    ratios = [
        Ratio(
            f"RAG follow-up TTFT p50, {sc.name}",
            follow_up_p50_ms(sc),
            pct([s.ttft * 1000 for s in sc.first], 0.5),
            "first question (cold prompt)",
            "ms",
            "lower",
            10.0,
        )
        for sc in results[0][1]
    ]
    if len(results) == 2:
        ratios += compare(results[0], results[1])
    record("rag", ratios, load_avg=load_before)


if __name__ == "__main__":
    main()
