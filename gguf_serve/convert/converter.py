"""A checkpoint folder -> one GGUF file (F32, F16 or BF16): config, vocab, tensor plan, write."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from gguf_serve import __version__ as _pkg_version
from gguf_serve.convert.architectures import (
    QWEN3_RERANK_TEMPLATE,
    ArchSpec,
    HParams,
    Role,
    _common_hparams,
    detect_role,
    lookup,
    sentence_transformers_pooling,
)
from gguf_serve.convert.checkpoint import Checkpoint, TensorRef
from gguf_serve.convert.errors import ConvertError
from gguf_serve.convert.tokenizer import Vocab, load_vocab, write_vocab
from gguf_serve.convert.writer import OUTTYPES, Q, TensorPlan, write_gguf

CONVERTER_VERSION = f"gguf-serve {_pkg_version} (convert 1)"

# Tensors llama.cpp keeps in F32 whatever the file type (prepare_tensors in convert_hf_to_gguf.py).
_ALWAYS_F32 = (gguf.MODEL_TENSOR.POS_EMBD, gguf.MODEL_TENSOR.TOKEN_TYPES)


@dataclass(frozen=True)
class Converted:
    path: Path
    arch: str
    role: Role
    n_tensors: int
    n_bytes: int


def read_config(model_dir: Path) -> HParams:
    path = model_dir / "config.json"
    if not path.is_file():
        raise ConvertError(f"{model_dir}: no config.json; is this a Hugging Face checkpoint folder?")
    try:
        config: HParams = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConvertError(f"{path}: not valid JSON: {e}") from None
    if "text_config" in config:
        config = {**config, **config["text_config"]}
    return config


def _out_type(spec: ArchSpec, new_name: str, shape: tuple[int, ...], outtype: Q) -> Q:
    if len(shape) <= 1 or new_name.endswith("_norm.weight") or not new_name.endswith(".weight"):
        return Q.F32
    for key in _ALWAYS_F32:
        if key in gguf.MODEL_TENSORS[spec.gguf_arch] and new_name == gguf.TENSOR_NAMES[key] + ".weight":
            return Q.F32
    return outtype


def _loader(ref: TensorRef, name: str, spec: ArchSpec, hp: HParams) -> Any:
    def load() -> np.ndarray[Any, Any]:
        data = ref.load()
        return spec.transform(name, data, hp) if spec.transform is not None else data

    return load


def _rows_loader(ref: TensorRef, rows: list[int]) -> Any:
    def load() -> np.ndarray[Any, Any]:
        return np.stack([ref.load()[r] for r in rows])

    return load


def plan_tensors(
    ckpt: Checkpoint, spec: ArchSpec, hp: HParams, role: Role, vocab: Vocab, outtype: Q
) -> list[TensorPlan]:
    tmap = gguf.get_tensor_name_map(spec.gguf_arch, hp["num_hidden_layers"])
    rerank_rows: list[int] = []
    tied = bool(hp.get("tie_word_embeddings", False))
    if role == "rerank":
        yes, no = vocab.token_id("yes"), vocab.token_id("no")
        if yes is None or no is None:
            raise ConvertError(
                "reranker: the tokenizer has no single 'yes' and 'no' tokens for the rank head"
            )
        rerank_rows = [yes, no]  # label order [yes, no]: llama.cpp's softmax puts P(yes) first
        if not tied and not any(r.name.endswith("lm_head.weight") for r in ckpt):
            tied = True  # no lm_head in the checkpoint: the head is the embedding matrix
    plans: list[TensorPlan] = []
    cls_name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.CLS_OUT] + ".weight"
    for ref in ckpt:
        name = spec.rename(ref.name)
        if name is None:
            continue
        if rerank_rows and (
            (tied and name.endswith("embed_tokens.weight")) or (not tied and name.endswith("lm_head.weight"))
        ):
            plans.append(TensorPlan(cls_name, (2, ref.shape[1]), outtype, _rows_loader(ref, rerank_rows)))
            if not tied:
                continue  # the LM head itself is not part of a rank-pooling model
        new_name = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise ConvertError(
                f"tensor {ref.name!r} ({ref.path.name}) has no GGUF mapping for {spec.hf_arch}; "
                "the checkpoint does not match its config.json architecture"
            )
        plans.append(
            TensorPlan(
                new_name,
                ref.shape,
                _out_type(spec, new_name, ref.shape, outtype),
                _loader(ref, name, spec, hp),
            )
        )
    seen: set[str] = set()
    for p in plans:
        if p.name in seen:
            raise ConvertError(f"two checkpoint tensors map to the GGUF tensor {p.name}")
        seen.add(p.name)
    return plans


def _embedding_eos(vocab: Vocab) -> None:
    """Qwen3-Embedding pools the last token, which must be <|endoftext|>: make llama.cpp append it."""
    special = vocab.special
    if special.add_special_token.get("eos"):
        return
    eot_id = vocab.token_id("<|endoftext|>")
    if eot_id is None:
        return
    old = special.special_token_ids.get("eos")
    if old is not None and old != eot_id:
        special.special_token_ids.setdefault("eot", old)
    special.special_token_ids["eos"] = eot_id
    special.add_special_token["eos"] = True


class _CardDir(type(Path())):  # type: ignore[misc]
    """A checkpoint folder whose name reads with "." where ModelScope's cache wrote "___"
    (Qwen3-Embedding-0___6B), so gguf-py's name heuristics see the model's real name."""

    @property
    def name(self) -> str:
        return super().name.replace("___", ".")


def general_metadata(model_dir: Path, name: str | None, n_params: int) -> gguf.Metadata:
    """general.* as llama.cpp's converter fills them (prepare_metadata): gguf-py's model-card
    and folder-name heuristics, the size label, and general.sampling.* from generation_config.json."""
    meta = gguf.Metadata.load(None, _CardDir(model_dir), name, n_params)
    if meta.name is None:
        meta.name = model_dir.name.replace("___", ".")
    if meta.size_label is None and n_params > 0:
        meta.size_label = gguf.size_label(n_params, n_params, 0, 0)
    return meta


def convert_checkpoint(
    model_dir: Path,
    dst: Path,
    outtype: str = "f16",
    name: str | None = None,
    role: Role | None = None,
    progress: bool = False,
) -> Converted:
    """Convert the safetensors checkpoint in model_dir to dst (written atomically)."""
    if outtype not in OUTTYPES:
        raise ConvertError(f"unknown outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    qtype, ftype = OUTTYPES[outtype]
    config = read_config(model_dir)
    spec = lookup(config, model_dir / "config.json")
    ckpt = Checkpoint(model_dir)
    has_lm_head = any(r.name.endswith("lm_head.weight") for r in ckpt)
    role = role or detect_role(model_dir, config, spec, has_lm_head, hint=name or "")
    if role not in spec.roles:
        raise ConvertError(f"{spec.hf_arch} checkpoints cannot be converted as a {role} model")
    vocab = load_vocab(model_dir, config.get("vocab_size"))
    pooling = sentence_transformers_pooling(model_dir)
    if role == "embedding" and spec.gguf_arch != gguf.MODEL_ARCH.BERT:
        pooling = pooling or gguf.PoolingType.LAST
        if pooling == gguf.PoolingType.LAST:
            _embedding_eos(vocab)
    plans = plan_tensors(ckpt, spec, config, role, vocab, qtype)

    meta = general_metadata(model_dir, name, sum(int(np.prod(p.shape)) for p in plans))

    def write_kv(w: gguf.GGUFWriter) -> None:
        w.add_type(gguf.GGUFType.MODEL)
        meta.set_gguf_meta_model(w)
        _common_hparams(w, config)
        if spec.extra_hparams is not None:
            spec.extra_hparams(w, config)
        if pooling is not None and role != "rerank":
            w.add_pooling_type(pooling)
        if role == "rerank":
            w.add_pooling_type(gguf.PoolingType.RANK)
            w.add_classifier_output_labels(["yes", "no"])
            w.add_chat_template([{"name": "rerank", "template": QWEN3_RERANK_TEMPLATE}])
        w.add_file_type(ftype)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_vocab(w, vocab, config.get("type_vocab_size"))

    total = sum(p.nbytes for p in plans)
    bar: Any = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"write {dst.name}", leave=False)
    try:
        write_gguf(dst, spec.gguf_name, write_kv, plans, progress=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    return Converted(dst, spec.gguf_name, role, len(plans), dst.stat().st_size)
