"""Check an artifact in llama.cpp: it loads, tokenizes like the HF tokenizer, and runs.

The result is a plain dict stored in the manifest. Tokenization is compared with the
checkpoint's own tokenizer.json through `tokenizers` on a fixed multilingual text set
(Chinese, English, code, emoji, special tokens).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from gguf_serve.convert import runtime
from gguf_serve.convert.errors import ConvertError
from gguf_serve.engine.llama_runtime import LlamaModel

VERIFY_TEXTS = [
    "Hello, world! This is a test of the tokenizer.",
    "我想在苹果公司工作。今天天气很好，我们去公园散步吧。",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # 12345",
    "Emoji: 🚀 ✅ 🦙🦙 😶\u200d🌫️ and accents: crème brûlée, Ελληνικά, русский.",
    "   leading spaces,\ttabs\n\nand newlines   ",
]


def _special_text(tok_json: dict[str, Any]) -> str | None:
    added = [a["content"] for a in tok_json.get("added_tokens", [])][:6]
    return " x ".join(added) + " tail" if added else None


def check_tokenizer(model: LlamaModel, model_dir: Path) -> dict[str, Any]:
    tok_path = model_dir / "tokenizer.json"
    tok = Tokenizer.from_file(str(tok_path))
    tok.no_padding()  # sentence-transformers tokenizers often pad to a fixed length
    tok.no_truncation()
    texts = list(VERIFY_TEXTS)
    special = _special_text(json.loads(tok_path.read_text(encoding="utf-8")))
    if special:
        texts.append(special)
    mismatches = []
    for text in texts:
        want = tok.encode(text).ids
        got = model.tokenize(text, add_special=True, parse_special=True)
        if want != got:
            mismatches.append(text[:40])
    return {"ok": not mismatches, "texts": len(texts), "mismatches": mismatches}


def check_run(model: LlamaModel, role: str) -> dict[str, Any]:
    toks = model.tokenize("The capital of France is", add_special=True, parse_special=True)
    if role == "chat":
        out: list[int] = []
        seq = list(toks)
        for _ in range(3):
            logits = runtime.causal_logits(model, seq)[-1]
            if not np.all(np.isfinite(logits)):
                return {"ok": False, "error": "non-finite logits"}
            nxt = int(logits.argmax())
            out.append(nxt)
            seq.append(nxt)
        return {"ok": True, "generated_ids": out}
    vec = runtime.pooled(model, [toks])[0]
    if not np.all(np.isfinite(vec)) or not np.any(vec):
        return {"ok": False, "error": "pooled output is zero or not finite"}
    if role == "rerank":
        ok = vec.shape[0] == 2 and abs(float(vec.sum()) - 1.0) < 1e-3
        return {"ok": ok, "scores": [round(float(v), 6) for v in vec]}
    return {"ok": True, "dim": int(vec.shape[0]), "norm": round(float(np.linalg.norm(vec)), 6)}


def verify_gguf(path: Path, model_dir: Path, role: str) -> dict[str, Any]:
    """{'ok': bool, 'loads': bool, 'tokenizer': {...}, 'run': {...}}; never raises for a bad model."""
    result: dict[str, Any] = {"ok": False, "loads": False}
    try:
        with runtime.load_model(path) as model:
            result["loads"] = True
            result["tokenizer"] = check_tokenizer(model, model_dir)
            result["run"] = check_run(model, role)
    except ConvertError as e:
        result["error"] = str(e)
        return result
    result["ok"] = bool(result["tokenizer"]["ok"] and result["run"]["ok"])
    return result
