"""The cpu profile at real scale: Qwen3-4B-Instruct-2507 (Q4_K_M), Qwen3-Embedding-0.6B and
Qwen3-Reranker-0.6B (Q8_0) at their published shapes, with Qwen's real vocabulary and random
seeded weights (docs/real-scale-rehearsal.md makes the files).

    make bench REAL=1            # = python -m bench.bench_real [--llama-server PATH] [--only ...]

Opt-in: the files take ~10 GB and minutes to make, and these runs take tens of minutes on 2
cores. Each comparison runs in one process, sides interleaved or back to back, so what to read
is the ratio, not the times (the machine is shared and noisy):

- convert: each step of `make convert` per model (write the F16 GGUF, quantize, verify) in
  a child process: wall time and peak memory, anonymous (the process's own) apart from
  file-backed (mmap'd weights, which the kernel can drop).
- serve: the whole profile (`--profile`): RSS of the API process and its engine processes
  with all three loaded, and after the smoke workload (a chat stream, a 16-text embedding, a
  64-document rerank, 4 concurrent chats), anonymous apart from file-backed, per process.
- decode: tok/s at 1 and 4 streams vs llama-server on the same Q4_K_M file (its -np 4).
- rag: system prompt + ~3,000 tokens of passages + a question: TTFT cold, and for a second
  question on the same passages (prefix reused); llama-server's the same way.
- embed: texts/s for 16-text requests of ~300-token chunks, Q8_0 and F16, vs
  sentence-transformers (torch, float32) on the same safetensors.
- rerank: 64 documents of ~200 tokens, latency vs transformers computing P(yes) the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import llama_cpp

from bench import bench_chat, bench_embed, bench_rag
from bench.results import Ratio, record
from bench.servers import BenchServer, llama_server, rss_mib, tree_memory
from gguf_serve.engine.llama_backend import read_cpu
from gguf_serve.engine.llama_runtime import LlamaModel, usable_cpus
from gguf_serve.engine.qwen3_prompts import fill, rerank_template
from tests.e2e.server import REPO, ServerProcess
from tests.fixtures.qwen3_checkpoints import modelscope_dir

PROFILE = REPO / "profiles" / "cpu.toml"
CHAT, EMBED, RERANK = "qwen3-4b-instruct", "qwen3-embedding-0.6b", "qwen3-reranker-0.6b"
REPOS = {EMBED: "Qwen/Qwen3-Embedding-0.6B", RERANK: "Qwen/Qwen3-Reranker-0.6B"}
QUERY = "Which passage talks about retrieval latency and the search index?"


def profile_models() -> dict[str, dict[str, Any]]:
    data = tomllib.loads(PROFILE.read_text(encoding="utf-8"))
    return {m["id"]: m for m in data["models"]}


def gguf(model_id: str, quant: str | None = None) -> Path:
    """The file the cpu profile serves for `model_id` (or its sibling of another type)."""
    path = REPO / "models" / profile_models()[model_id]["file"]
    if quant:
        stem = path.stem.rsplit("-", 1)[0]
        path = path.with_name(f"{stem}-{quant}.gguf")
    if not path.is_file():
        sys.exit(f"{path} is missing: make the rehearsal files first (docs/real-scale-rehearsal.md)")
    return path


def sub_profile(ids: list[str], file_override: dict[str, Path] | None = None) -> Path:
    """profiles/cpu.toml with only `ids` (and their settings), in a temporary file."""
    text = PROFILE.read_text(encoding="utf-8")
    head, *blocks = text.split("[[models]]")
    keep = []
    for block in blocks:
        mid = tomllib.loads("[[models]]" + block)["models"][0]["id"]
        if mid in ids:
            if file_override and mid in file_override:
                lines = [
                    f'file = "{file_override[mid]}"' if ln.startswith("file = ") else ln
                    for ln in block.splitlines()
                ]
                block = "\n".join(lines) + "\n"
            keep.append("[[models]]" + block)
    out = Path(tempfile.mkdtemp(prefix="bench-real-")) / "profile.toml"
    out.write_text(head + "".join(keep), encoding="utf-8")
    return out


def ours(ids: list[str], file_override: dict[str, Path] | None = None) -> ServerProcess:
    return ServerProcess(str(sub_profile(ids, file_override)))


def generation_bias(path: Path) -> dict[int, float]:
    """End-of-generation and control tokens biased away: random weights then make exactly
    max_tokens of plain text on both servers (no <think>/<tool_call> parsing on ours)."""
    model = LlamaModel(path, vocab_only=True)
    try:
        control = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
        return {
            t: -100.0
            for t in range(model.n_vocab)
            if model.is_eog(t) or llama_cpp.llama_vocab_get_attr(model.vocab, t) & control
        }
    finally:
        model.close()


def words_for_tokens(path: Path, tokens: int, make: Callable[[int], str]) -> int:
    """How many words `make(n_words)` needs to be about `tokens` tokens with this vocabulary."""
    model = LlamaModel(path, vocab_only=True)
    try:
        probe = 400
        per_word = len(model.tokenize(make(probe), add_special=False)) / probe
    finally:
        model.close()
    return max(1, round(tokens / per_word))


def chat_servers(args: argparse.Namespace, path: Path) -> list[ServerProcess | BenchServer]:
    """Ours on the profile's chat entry and, when given, llama-server with that entry's slots,
    per-slot context and batches (its prompt cache at its default)."""
    servers: list[ServerProcess | BenchServer] = [ours([CHAT])]
    if args.llama_server:
        m = profile_models()[CHAT]
        slots, n_batch = m["parallel"], m["n_batch"]
        servers.append(
            llama_server(
                args.llama_server,
                path,
                "-np",
                str(slots),
                "-c",
                str(m["n_ctx"] * slots),
                "-b",
                str(n_batch),
                "-ub",
                str(m.get("n_ubatch", n_batch)),
            )
        )
    return servers


# --- convert: each step per model, with its memory ---------------------------------------------
RECIPE = {
    CHAT: ("Qwen/Qwen3-4B-Instruct-2507", "Q4_K_M"),
    EMBED: (REPOS[EMBED], "Q8_0"),
    RERANK: (REPOS[RERANK], "Q8_0"),
}


def measured(code: str) -> tuple[float, float, float]:
    """Run `code` in a child Python: (wall s, peak anonymous RSS MiB, peak file-backed RSS MiB),
    polled from /proc (ru_maxrss cannot tell a process's own memory from mmap'd file pages)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    anon = file = 0.0
    while proc.poll() is None:
        anon = max(anon, rss_mib(proc.pid, "RssAnon"))
        file = max(file, rss_mib(proc.pid, "RssFile"))
        time.sleep(0.2)
    if proc.returncode != 0:
        sys.exit(f"convert step failed ({proc.returncode}): {code}")
    return time.perf_counter() - t0, anon, file


def convert(args: argparse.Namespace) -> list[str]:
    lines = [
        "### convert: each step of `make convert`, per model, in a child process",
        "",
        "| model | checkpoint GB | step | wall s | peak anonymous RSS MiB | peak file-backed RSS MiB |",
        "|---|---:|---|---:|---:|---:|",
    ]
    tmp = Path(tempfile.mkdtemp(prefix="bench-real-convert-", dir=REPO / "models"))
    for mid, (repo, quant) in RECIPE.items():
        src = modelscope_dir(args.cache, repo)
        size = sum(p.stat().st_size for p in src.glob("*.safetensors")) / 1e9
        f16, q = tmp / f"{mid}-F16.gguf", tmp / f"{mid}-{quant}.gguf"
        role = profile_models()[mid]["role"]
        steps = {
            "write F16": "from gguf_serve.convert.converter import convert_checkpoint as c; "
            f"c(Path({str(src)!r}), Path({str(f16)!r}), 'f16')",
            f"quantize {quant}": "from gguf_serve.convert.quantize import quantize_gguf as q; "
            f"q(Path({str(f16)!r}), Path({str(q)!r}), {quant!r})",
            f"verify {quant}": "from gguf_serve.convert.verify import verify_gguf as v; "
            f"assert v(Path({str(q)!r}), Path({str(src)!r}), {role!r})['ok']",
        }
        for step, code in steps.items():
            wall, anon, file = measured("from pathlib import Path; " + code)
            lines.append(f"| {mid} | {size:.1f} | {step} | {wall:.0f} | {anon:.0f} | {file:.0f} |")
            print("  " + lines[-1], flush=True)
        f16.unlink(missing_ok=True)
        q.unlink(missing_ok=True)
    tmp.rmdir()
    return [*lines, ""]


# --- serve: the whole profile, the API process and its engine processes -----------------------
def serve(args: argparse.Namespace) -> list[str]:
    server = ServerProcess(args.profile)
    try:
        t0 = time.perf_counter()
        server.wait_ready(1800)
        ready_s = time.perf_counter() - t0
        loaded = tree_memory(server.proc.pid)
        bias = {str(t): v for t, v in generation_bias(gguf(CHAT)).items()}

        def chat(c: httpx.Client, content: str, stream: bool) -> None:
            body = {"model": CHAT, "messages": [{"role": "user", "content": content}], "max_tokens": 16}
            body |= {"logit_bias": bias, "stream": stream}
            c.post("/v1/chat/completions", json=body).raise_for_status()

        with httpx.Client(base_url=server.base_url, timeout=1800) as c:
            chat(c, "Hello", stream=True)
            texts = bench_embed.make_texts(16, 230, seed=1)
            c.post("/v1/embeddings", json={"model": EMBED, "input": texts}).raise_for_status()
            docs = bench_embed.make_texts(64, 150, seed=2)
            c.post("/v1/rerank", json={"model": RERANK, "query": QUERY, "documents": docs}).raise_for_status()
            with ThreadPoolExecutor(4) as pool:  # 4 concurrent chats: every slot busy at once
                prompts = bench_embed.make_texts(4, 120, seed=3)
                list(pool.map(lambda t: chat(c, t, stream=False), prompts))
        after = tree_memory(server.proc.pid)
        lines = [
            ln.split("] ", 1)[-1] for ln in server.log_tail(2000).splitlines() if "memory, llama.cpp" in ln
        ]
    finally:
        server.stop()

    def total(rows: list[dict[str, Any]], key: str) -> float:
        return sum(float(r[key]) for r in rows)

    table = ["| process | RSS MiB | anonymous | file-backed | peak (VmHWM) |", "|---|---:|---:|---:|---:|"]
    for r in after:
        table.append(
            f"| {r['cmd']} | {r['VmRSS']:,.0f} | {r['RssAnon']:,.0f} | {r['RssFile']:,.0f} | {r['VmHWM']:,.0f} |"
        )
    table.append(
        f"| **all processes** | **{total(after, 'VmRSS'):,.0f}** | {total(after, 'RssAnon'):,.0f} | "
        f"{total(after, 'RssFile'):,.0f} | {total(after, 'VmHWM'):,.0f} |"
    )
    return [
        f"### serve: `gguf-serve --profile {args.profile}`, the API process and its engine processes",
        "",
        f"Ready in {ready_s:.0f} s. RSS of the process tree with all models loaded: "
        f"{total(loaded, 'VmRSS'):,.0f} MiB; after a chat stream, a 16-text embedding, a 64-document "
        f"rerank and 4 concurrent chats: {total(after, 'VmRSS'):,.0f} MiB.",
        "",
        *table,
        "",
        *[f"- {ln}" for ln in lines],
        "",
    ]


# --- decode: tok/s at 1 and 4 streams vs llama-server ----------------------------------------
def decode(args: argparse.Namespace) -> list[str]:
    path = gguf(CHAT)
    bias = generation_bias(path)
    servers = chat_servers(args, path)
    rates: dict[tuple[int, int], list[float]] = {}
    try:
        for s in servers:
            s.wait_ready(1800)
            asyncio.run(bench_chat.http_streams(s.base_url, 1, 4, bias, CHAT))  # warm up
        for _ in range(args.repeat):
            for k in (1, 4):
                for i, s in enumerate(servers):
                    rate, _ = asyncio.run(bench_chat.http_streams(s.base_url, k, args.tokens, bias, CHAT))
                    rates.setdefault((i, k), []).append(rate)
                    print(f"  decode: server {i}, {k} streams: {rate:.2f} tok/s", flush=True)
    finally:
        for s in servers:
            s.stop()
    lines = [
        f"### decode: {path.name}, {args.tokens} new tokens per stream, medians of {args.repeat} interleaved rounds",
        "",
        "| streams | gguf-serve tok/s | llama-server tok/s | gguf-serve / llama-server |",
        "|---|---:|---:|---:|",
    ]
    ratios = []
    for k in (1, 4):
        a = statistics.median(rates[(0, k)])
        b = statistics.median(rates[(1, k)]) if (1, k) in rates else None
        lines.append(f"| {k} | {a:.2f} | {b:.2f} | {a / b:.2f}x |" if b else f"| {k} | {a:.2f} | | |")
        if b:  # issue 10: the same decode tok/s as llama-server
            streams = f"{k} stream{'s' * (k > 1)}"
            ratios.append(
                Ratio(f"Qwen3-4B decode tok/s, {streams}", a, b, "llama-server", "tok/s", "higher", 1.0)
            )
    if ratios:
        record("real", ratios)
    return [*lines, ""]


# --- rag: TTFT cold and with the passages cached ---------------------------------------------
def rag(args: argparse.Namespace) -> list[str]:
    path = gguf(CHAT)
    bias = {str(t): int(v) for t, v in generation_bias(path).items()}
    n_words = words_for_tokens(path, args.rag_tokens, lambda n: bench_rag.passage(0, n))
    servers = chat_servers(args, path)
    cold: list[list[float]] = [[] for _ in servers]
    warm: list[list[float]] = [[] for _ in servers]
    cached: list[int] = []
    prompt_tokens = 0
    try:
        for s in servers:
            s.wait_ready(1800)
        clients = [bench_rag.Client(s.base_url, 8, bias, CHAT) for s in servers]
        for c in clients:
            c.ask([{"role": "user", "content": "warm up"}])
        for conv in range(args.rag_conversations):
            doc = bench_rag.passage(500 + conv, n_words)  # a new passage: the first question is cold
            for i, c in enumerate(clients):
                for q, into in ((0, cold[i]), (1, warm[i])):
                    msgs: list[Any] = [
                        {"role": "system", "content": bench_rag.SYSTEM},
                        {"role": "user", "content": f"{doc}\n\nQuestion: {bench_rag.QUESTIONS[q]}"},
                    ]
                    sample = c.ask(msgs)
                    into.append(sample.ttft)
                    if i == 0:
                        prompt_tokens = sample.prompt_tokens
                        if q == 1:
                            cached.append(sample.cached_tokens)
                print(
                    f"  rag: conversation {conv}, server {i}: cold {cold[i][-1]:.1f} s, "
                    f"second question {warm[i][-1]:.1f} s",
                    flush=True,
                )
    finally:
        for s in servers:
            s.stop()
    lines = [
        f"### rag: {prompt_tokens} prompt tokens (system + passages + question), 8 new tokens, "
        f"medians of {args.rag_conversations} conversations",
        "",
        "| | TTFT cold s | TTFT second question s | second / cold |",
        "|---|---:|---:|---:|",
    ]
    for i, name in enumerate(["gguf-serve", "llama-server"][: len(servers)]):
        c, w = statistics.median(cold[i]), statistics.median(warm[i])
        lines.append(f"| {name} | {c:.2f} | {w:.2f} | {w / c:.3f} |")
    # issue 10: the second question <= 0.2 x cold; cold no slower than llama-server
    c0 = statistics.median(cold[0])
    ratios = [Ratio("Qwen3-4B RAG TTFT, second question", statistics.median(warm[0]), c0, "first question (cold prompt)", "s", "lower", 5.0)]  # fmt: skip
    if len(servers) > 1:
        ratios.append(Ratio("Qwen3-4B RAG TTFT, cold prompt", c0, statistics.median(cold[1]), "llama-server", "s", "lower", 1.0))  # fmt: skip
    record("real", ratios)
    if len(servers) > 1:
        ratio = statistics.median(cold[0]) / statistics.median(cold[1])
        lines.append(
            f"\nCold TTFT gguf-serve / llama-server: {ratio:.2f}x. Cached tokens on our second "
            f"questions: {cached}."
        )
    return [*lines, ""]


# --- embed: texts/s vs sentence-transformers ---------------------------------------------------
class STEmbedder:
    """Qwen3-Embedding as its model card runs it in sentence-transformers: last-token pooling,
    normalised, float32 on the CPU with our thread count."""

    def __init__(self, model_dir: Path) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        try:  # sentence-transformers >= 6 moved the modules
            from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
        except ImportError:
            from sentence_transformers.models import Normalize, Pooling, Transformer

        torch.set_num_threads(usable_cpus())
        word = Transformer(str(model_dir), model_kwargs={"dtype": torch.float32})
        dim = getattr(word, "get_embedding_dimension", word.get_word_embedding_dimension)()
        self.st = SentenceTransformer(
            modules=[word, Pooling(dim, pooling_mode="lasttoken"), Normalize()], device="cpu"
        )

    def rate(self, texts: list[str]) -> float:
        t0 = time.perf_counter()
        self.st.encode(texts, batch_size=16)
        return len(texts) / (time.perf_counter() - t0)


async def embed_rate(url: str, texts: list[str]) -> float:
    async with httpx.AsyncClient(base_url=url, timeout=1800) as client:
        t0 = time.perf_counter()
        for i in range(0, len(texts), 16):
            r = await client.post("/v1/embeddings", json={"model": EMBED, "input": texts[i : i + 16]})
            r.raise_for_status()
        return len(texts) / (time.perf_counter() - t0)


def embed(args: argparse.Namespace) -> list[str]:
    files = {quant: gguf(EMBED, quant) for quant in args.embed_quants.split(",")}
    n_words = words_for_tokens(gguf(EMBED), 300, lambda n: bench_embed.make_texts(1, n, seed=9)[0])
    texts = bench_embed.make_texts(args.embed_texts, n_words, seed=1)
    st = STEmbedder(modelscope_dir(args.cache, REPOS[EMBED]))
    st.rate(texts[:4])  # warm up
    sides: dict[str, list[float]] = {"st": []}
    for quant, path in files.items():
        server = ours([EMBED], {EMBED: path})
        try:
            server.wait_ready(1800)
            asyncio.run(embed_rate(server.base_url, texts[:4]))  # warm up
            for _ in range(args.heavy_repeat):
                sides.setdefault(quant, []).append(asyncio.run(embed_rate(server.base_url, texts)))
                sides["st"].append(st.rate(texts))
                print(
                    f"  embed: {quant} {sides[quant][-1]:.2f} texts/s, sentence-transformers "
                    f"{sides['st'][-1]:.2f}",
                    flush=True,
                )
        finally:
            server.stop()
    med = {k: statistics.median(v) for k, v in sides.items()}
    # issue 19: >= 1.2 x sentence-transformers
    record(
        "real",
        [
            Ratio(f"Qwen3-Embedding-0.6B texts/s, {q}", med[q], med["st"], "sentence-transformers", "texts/s", "higher", 1.2)
            for q in files
        ],
    )  # fmt: skip
    return [
        f"### embed: {len(texts)} texts of ~300 tokens in requests of 16, medians of {args.heavy_repeat} rounds each",
        "",
        "| | texts/s | vs sentence-transformers |",
        "|---|---:|---:|",
        *[f"| gguf-serve, {q} | {med[q]:.2f} | {med[q] / med['st']:.2f}x |" for q in files],
        f"| sentence-transformers, float32 | {med['st']:.2f} | 1.00x |",
        "",
    ]


# --- rerank: latency vs transformers P(yes) -----------------------------------------------------
class HFReranker:
    """Qwen3-Reranker as its model card scores: the rerank prompt, P("yes") vs P("no") at the
    last position, batches of 8, left padding; float32 on the CPU with our thread count."""

    def __init__(self, model_dir: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(usable_cpus())
        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(str(model_dir), padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        self.yes = self.tok.convert_tokens_to_ids("yes")
        self.no = self.tok.convert_tokens_to_ids("no")
        self.template = rerank_template()

    def scores(self, query: str, docs: list[str]) -> list[float]:
        out: list[float] = []
        prompts = [fill(self.template, query=query, document=d) for d in docs]
        with self.torch.inference_mode():
            for i in range(0, len(prompts), 8):
                batch = self.tok(prompts[i : i + 8], padding=True, return_tensors="pt")
                logits = self.model(**batch, logits_to_keep=1).logits[:, -1, :]
                pair = self.torch.stack([logits[:, self.no], logits[:, self.yes]], dim=1)
                out += self.torch.softmax(pair, dim=1)[:, 1].tolist()
        return out


def rerank(args: argparse.Namespace) -> list[str]:
    files = {quant: gguf(RERANK, quant) for quant in args.rerank_quants.split(",")}
    n_words = words_for_tokens(gguf(RERANK), 200, lambda n: bench_embed.make_texts(1, n, seed=9)[0])
    docs = bench_embed.make_texts(64, n_words, seed=2)
    hf = HFReranker(modelscope_dir(args.cache, REPOS[RERANK]))
    hf.scores(QUERY, docs[:2])  # warm up
    sides: dict[str, list[float]] = {"hf": []}
    for quant, path in files.items():
        server = ours([RERANK], {RERANK: path})
        try:
            server.wait_ready(1800)
            with httpx.Client(base_url=server.base_url, timeout=1800) as c:
                body = {"model": RERANK, "query": QUERY, "documents": docs[:2]}
                c.post("/v1/rerank", json=body).raise_for_status()  # warm up
                for _ in range(args.heavy_repeat):
                    t0 = time.perf_counter()
                    c.post("/v1/rerank", json={**body, "documents": docs}).raise_for_status()
                    sides.setdefault(quant, []).append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    hf.scores(QUERY, docs)
                    sides["hf"].append(time.perf_counter() - t0)
                    print(
                        f"  rerank: {quant} {sides[quant][-1]:.1f} s, transformers {sides['hf'][-1]:.1f} s",
                        flush=True,
                    )
        finally:
            server.stop()
    med = {k: statistics.median(v) for k, v in sides.items()}
    b = med["hf"]
    # issue 19: >= 1.2 x transformers
    record(
        "real",
        [
            Ratio(f"Qwen3-Reranker-0.6B, 64 documents, {q}", med[q], b, "transformers", "s", "lower", 1.2)
            for q in files
        ],
    )  # fmt: skip
    return [
        f"### rerank: 64 documents of ~200 tokens, one request, medians of {args.heavy_repeat} interleaved rounds",
        "",
        "| | latency s | vs transformers |",
        "|---|---:|---:|",
        *[
            f"| gguf-serve, {files[q].name} | {med[q]:.2f} | {b / med[q]:.2f}x {'faster' if med[q] < b else 'the speed'} |"
            for q in files
        ],
        f"| transformers P(yes), float32, batches of 8 | {b:.2f} | |",
        "",
    ]


SECTIONS: dict[str, Callable[[argparse.Namespace], list[str]]] = {
    "convert": convert,
    "serve": serve,
    "decode": decode,
    "rag": rag,
    "embed": embed,
    "rerank": rerank,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--llama-server", metavar="PATH", help="llama.cpp's llama-server, for decode and rag")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated, from {', '.join(SECTIONS)}")
    ap.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("MODELSCOPE_CACHE", REPO / "models" / ".modelscope")),
        help="the ModelScope cache the checkpoints were generated into (for the torch sides)",
    )
    ap.add_argument("--profile", default="cpu", help="serve: the profile (a name or a TOML path)")
    ap.add_argument("--tokens", type=int, default=48, help="new tokens per decode stream")
    ap.add_argument("--repeat", type=int, default=2, help="rounds of the decode benchmark")
    ap.add_argument(
        "--heavy-repeat",
        type=int,
        default=1,
        help="rounds of embed and rerank (~1-4 minutes each on 2 cores)",
    )
    ap.add_argument("--rag-tokens", type=int, default=3000)
    ap.add_argument(
        "--rag-conversations", type=int, default=1, help="each: a cold and a cached ~3,000-token prompt"
    )
    ap.add_argument("--embed-texts", type=int, default=32)
    ap.add_argument(
        "--embed-quants", default="Q8_0,F16", help="embed: the files' types (beside the profile's)"
    )
    ap.add_argument(
        "--rerank-quants", default="Q8_0", help="rerank: the files' types, each against transformers"
    )
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "real-scale.md")
    args = ap.parse_args()
    unknown = set(args.only.split(",")) - set(SECTIONS)
    if unknown:
        sys.exit(
            f"--only: unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}"
        )
    load0 = os.getloadavg()[0]
    cpu, features = read_cpu()
    lines = [
        f"## Real scale, {usable_cpus()} CPUs ({cpu} [{' '.join(features)}], {platform.machine()})",
        "",
        f"Command: `python -m bench.bench_real {' '.join(sys.argv[1:])}`",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.only.split(","):
        print(f"=== {name}", flush=True)
        section = SECTIONS[name](args)
        print("\n".join(section), flush=True)
        lines += section
        # written after every part: a long run stopped half-way keeps what it measured
        args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    lines.append(f"Load average {load0:.2f} before / {os.getloadavg()[0]:.2f} after.")
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
