"""Does this machine's CPU kernel path compute what the plain path computes, for one GGUF file?

llama.cpp picks kernels by CPU and build: weights may be repacked for AVX2/AVX-512 ("extra
buffer types") or, on AMX CPUs with an AMX build, multiplied by AMX tiles. Some of those paths
have been broken upstream: a crash, or garbage logits. This check decodes the same tokens twice,
once through the path the server uses and once with extra buffer types off (the plain kernels),
and compares the logits at every position:

- a long prompt decoded in one call (several ubatches: the shape that crashed AMX), and
- a batch of several sequences decoded together (what continuous batching does).

Repacked kernels legitimately differ a little (rounding), broken ones give garbage, so the
check compares logits (cosine, argmax), never generated text.

Run it as `gguf-serve check-kernels FILE...`, which runs each file in a child process so that
a kernel that crashes is reported, not fatal. This module's main is that child.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from gguf_serve.engine.llama_backend import init_backend
from gguf_serve.engine.llama_runtime import Batch, ContextParams, LlamaContext, LlamaModel, usable_cpus

# Repack vs plain, measured: AVX-512 Q4_0 mean cosine 0.9997, same argmax 99%; AVX2 (EPYC) Q4_0 0.9998
# (min 0.986, argmax 93% over the 4-sequence batch), Q4_K_M 0.9992 (min 0.968, argmax 97%). Broken paths
# give cosine near 0 or NaN, so the bounds sit well below the first and far above the second.
MIN_MEAN_COSINE = 0.99
MIN_COSINE = 0.90
MIN_ARGMAX_AGREEMENT = 0.80

LONG_PROMPT_TOKENS = 700
N_SEQUENCES = 4
SEQUENCE_TOKENS = 48

_TEXT = (
    "Retrieval-augmented generation answers a question from passages found in a document store. "
    "The passages are long, the questions short, and the same system prompt opens every request. "
    "北京是中国的首都，上海是最大的城市。 Numbers: 3.14159, 2718, 0x1F; code: def f(x): return x * 2. "
)


@dataclass(frozen=True)
class KernelCheckResult:
    file: str
    weight_type: str
    positions: int
    mean_cosine: float
    min_cosine: float
    argmax_agreement: float
    ok: bool
    cpu_variant: str
    amx: str
    repack: bool

    def line(self) -> str:
        verdict = "ok" if self.ok else "FAIL"
        return (
            f"{verdict} {self.weight_type} {Path(self.file).name}: {self.positions} positions, mean cosine "
            f"{self.mean_cosine:.5f}, min {self.min_cosine:.4f}, same argmax {self.argmax_agreement:.1%} "
            f"(CPU variant {self.cpu_variant}, repack {'on' if self.repack else 'off'}, AMX {self.amx})"
        )


def _prompts(model: LlamaModel) -> tuple[list[int], list[list[int]]]:
    ids = model.tokenize(_TEXT * 40, add_special=False, parse_special=False)
    long = ids[:LONG_PROMPT_TOKENS]
    seqs = [ids[100 + 37 * i : 100 + 37 * i + SEQUENCE_TOKENS] for i in range(N_SEQUENCES)]
    return long, seqs


def _all_logits(model: LlamaModel, sequences: list[list[int]]) -> npt.NDArray[np.float32]:
    """Decode the sequences together in one llama_decode; logits of every position, in order."""
    n_tokens = sum(len(s) for s in sequences)
    params = ContextParams(
        n_ctx=max(1024, n_tokens * len(sequences)),
        n_batch=n_tokens,
        n_ubatch=min(512, n_tokens),
        n_seq_max=len(sequences),
        n_threads=usable_cpus(),
        n_threads_batch=usable_cpus(),
        kv_unified=True,
    )
    ctx = LlamaContext(model, params)
    batch = Batch(n_tokens, len(sequences))
    try:
        for seq_id, tokens in enumerate(sequences):
            for pos, token in enumerate(tokens):
                batch.add(token, pos, seq_id, logits=True)
        ctx.decode(batch)
        return np.stack([ctx.logits(i).copy() for i in range(n_tokens)])
    finally:
        batch.free()
        ctx.close()


def compare_logits(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> tuple[float, float, float]:
    """(mean cosine, min cosine, argmax agreement) over positions (rows); NaN/inf anywhere: all 0."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    if not (np.isfinite(a64).all() and np.isfinite(b64).all()):
        return 0.0, 0.0, 0.0
    denom = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    cos = np.einsum("ij,ij->i", a64, b64) / np.maximum(denom, 1e-30)
    agree = float(np.mean(a.argmax(axis=1) == b.argmax(axis=1)))
    return float(cos.mean()), float(cos.min()), agree


def passes(mean_cosine: float, min_cosine: float, argmax_agreement: float) -> bool:
    return (
        mean_cosine >= MIN_MEAN_COSINE
        and min_cosine >= MIN_COSINE
        and argmax_agreement >= MIN_ARGMAX_AGREEMENT
    )


def check_file(path: Path) -> KernelCheckResult:
    info = init_backend()
    under_test = LlamaModel(path)  # the path the server takes on this machine
    reference = LlamaModel(path, extra_buffer_types=False)
    try:
        weight_type = (under_test.meta("general.file_type") or "?").strip()
        weight_type = _FILE_TYPES.get(weight_type, weight_type)
        long, seqs = _prompts(under_test)
        results = [
            compare_logits(_all_logits(under_test, shape), _all_logits(reference, shape))
            for shape in ([long], seqs)
        ]
    finally:
        under_test.close()
        reference.close()
    mean = min(r[0] for r in results)
    low = min(r[1] for r in results)
    agree = min(r[2] for r in results)
    ok = passes(mean, low, agree)
    return KernelCheckResult(
        file=str(path),
        weight_type=weight_type,
        positions=len(long) + sum(len(s) for s in seqs),
        mean_cosine=mean,
        min_cosine=low,
        argmax_agreement=agree,
        ok=ok,
        cpu_variant=info.cpu_variant,
        amx=info.amx,
        repack=info.repack,
    )


# general.file_type (llama_ftype) -> the name people use; the rest print as numbers.
_FILE_TYPES = {"0": "F32", "1": "F16", "2": "Q4_0", "3": "Q4_1", "7": "Q8_0", "15": "Q4_K_M", "25": "IQ4_NL"}


def crash_message(path: Path, returncode: int) -> str:
    """A child that died: name the file, the signal and what this CPU and build run."""
    import signal

    from gguf_serve.engine.llama_backend import read_cpu

    model, features = read_cpu()
    try:
        why = f"signal {signal.Signals(-returncode).name}" if returncode < 0 else f"exit code {returncode}"
    except ValueError:
        why = f"signal {-returncode}"
    return (
        f"CRASH {path.name}: the kernel check died with {why} while decoding; CPU {model} "
        f"[{' '.join(features)}]. This CPU's kernel path is broken for this weight type."
    )


def run_checks(files: list[Path], allow_amx: bool = False) -> tuple[int, list[str]]:
    """Check each file in a child process (a crash is a result, not the end). (failures, lines)."""
    import subprocess

    failures, lines = 0, []
    for path in files:
        cmd = [sys.executable, "-m", "gguf_serve.engine.kernel_check", str(path)]
        if allow_amx:
            cmd.append("--allow-amx")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        last = proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else []
        if proc.returncode in (0, 1) and last:
            result = KernelCheckResult(**json.loads(last[0]))
            lines.append(result.line())
            failures += 0 if result.ok else 1
        elif proc.returncode < 0:
            lines.append(crash_message(path, proc.returncode))
            failures += 1
        else:
            err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            lines.append(f"ERROR {path.name}: {err}")
            failures += 1
    return failures, lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="compare this CPU's kernel path with the plain one")
    parser.add_argument("file", type=Path)
    parser.add_argument("--allow-amx", action="store_true")
    args = parser.parse_args(argv)
    init_backend(allow_amx=args.allow_amx)
    result = check_file(args.file)
    print(json.dumps(asdict(result)), flush=True)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
