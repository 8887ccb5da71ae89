"""Each bad input gives one clear message and leaves no half-written file."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import gguf
import pytest
from typer import Typer
from typer.testing import CliRunner

from gguf_serve.convert.commands import register
from gguf_serve.convert.converter import convert_checkpoint
from gguf_serve.convert.errors import ConvertError
from gguf_serve.convert.pipeline import convert_model


@pytest.fixture
def chat_copy(tiny_checkpoint, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_checkpoint("qwen3_chat"), tmp_path / "ckpt"))


def _no_gguf_left(folder: Path) -> None:
    if folder.exists():
        left = [p.name for p in folder.rglob("*") if p.suffix == ".gguf" or ".tmp-" in p.name]
        assert left == []


def test_missing_source(tmp_path: Path):
    with pytest.raises(ConvertError, match="no such folder"):
        convert_model(str(tmp_path / "nope"), "x", ["F16"], tmp_path / "models")


def test_truncated_safetensors(chat_copy: Path, tmp_path: Path):
    st = chat_copy / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    with pytest.raises(ConvertError, match="truncated"):
        convert_model(str(chat_copy), "x", ["F16"], tmp_path / "models")
    _no_gguf_left(tmp_path / "models")


def test_corrupt_safetensors_header(chat_copy: Path, tmp_path: Path):
    st = chat_copy / "model.safetensors"
    data = bytearray(st.read_bytes())
    data[8:20] = b"not json at!"
    st.write_bytes(bytes(data))
    with pytest.raises(ConvertError, match="corrupt"):
        convert_model(str(chat_copy), "x", ["F16"], tmp_path / "models")


def test_missing_shard(tiny_checkpoint, tmp_path: Path):
    ckpt = Path(shutil.copytree(tiny_checkpoint("llama"), tmp_path / "ckpt"))
    next(iter(sorted(ckpt.glob("model-*.safetensors")))).unlink()
    with pytest.raises(ConvertError, match="missing checkpoint shard"):
        convert_model(str(ckpt), "x", ["F16"], tmp_path / "models")


def test_unknown_architecture_lists_supported(chat_copy: Path, tmp_path: Path):
    cfg = json.loads((chat_copy / "config.json").read_text())
    cfg["architectures"] = ["MambaForCausalLM"]
    (chat_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ConvertError, match=r"MambaForCausalLM is not supported; supported: .*Qwen3ForCausalLM"
    ):
        convert_model(str(chat_copy), "x", ["F16"], tmp_path / "models")


def test_tensor_without_mapping(chat_copy: Path, tmp_path: Path):
    from safetensors.numpy import load_file, save_file

    st = chat_copy / "model.safetensors"
    tensors = load_file(st)
    tensors["model.mystery_adapter.weight"] = tensors["model.norm.weight"].copy()
    save_file(tensors, st)
    with pytest.raises(ConvertError, match=r"'model\.mystery_adapter\.weight'.*no GGUF mapping"):
        convert_model(str(chat_copy), "x", ["F16"], tmp_path / "models")
    _no_gguf_left(tmp_path / "models")


def test_unknown_quant_type(chat_copy: Path, tmp_path: Path):
    with pytest.raises(ConvertError, match=r"unknown quantization type 'Q9_X'.*Q4_K_M"):
        convert_model(str(chat_copy), "x", ["Q9_X"], tmp_path / "models")


def test_full_disk_leaves_nothing(chat_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    calls = {"n": 0}
    real = gguf.GGUFWriter.write_tensor_data

    def failing(self, tensor, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, tensor, *a, **k)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", failing)
    out = tmp_path / "out"
    with pytest.raises(ConvertError, match="disk full"):
        convert_checkpoint(chat_copy, out / "x-F16.gguf", "f16")
    _no_gguf_left(out)


def test_cli_error_is_one_line_exit_2(tmp_path: Path):
    app = Typer()

    @app.callback()
    def _root() -> None:
        pass

    register(app)
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "missing"), "--models-dir", str(tmp_path)])
    assert result.exit_code == 2
    err_lines = [ln for ln in result.output.splitlines() if ln.startswith("gguf-serve: error:")]
    assert len(err_lines) == 1 and "no such folder" in err_lines[0]
    assert "Traceback" not in result.output
    result = CliRunner().invoke(
        app,
        [
            "convert",
            str(Path(__file__).parents[2] / "convert" / "qwen3-rag.toml"),
            "--models",
            "nope",
            "--models-dir",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 2 and "no model named nope" in result.output
