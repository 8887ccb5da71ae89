"""One table entry per supported Hugging Face architecture.

Each entry says which GGUF architecture it becomes, which hyperparameters go to which GGUF
keys beyond the common ones, how HF tensor names are normalised before gguf.TensorNameMap
maps them, and which per-tensor transforms apply. The values follow llama.cpp's own
convert_hf_to_gguf.py so every llama.cpp-based runtime loads the files.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import gguf
import numpy as np

from gguf_serve.convert.errors import ConvertError
from gguf_serve.engine.qwen3_prompts import rerank_template
from gguf_serve.settings import Role

HParams = dict[str, Any]
Array = np.ndarray[Any, Any]

# The Qwen3-Reranker prompt, stored as the named chat template "rerank" (as llama.cpp does).
QWEN3_RERANK_TEMPLATE = rerank_template()


def find_hparam(hp: HParams, keys: tuple[str, ...]) -> Any:
    return next((hp[k] for k in keys if k in hp), None)


def _common_hparams(w: gguf.GGUFWriter, hp: HParams) -> None:
    """TextModel.set_gguf_parameters: the keys every text architecture writes."""
    w.add_block_count(hp["num_hidden_layers"])
    if (n_ctx := find_hparam(hp, ("max_position_embeddings", "n_positions", "max_length"))) is not None:
        w.add_context_length(n_ctx)
    w.add_embedding_length(hp["hidden_size"])
    if (n_ff := hp.get("intermediate_size")) is not None:
        w.add_feed_forward_length(n_ff)
    w.add_head_count(hp["num_attention_heads"])
    if (n_kv := hp.get("num_key_value_heads")) is not None:
        w.add_head_count_kv(n_kv)
    rope = hp.get("rope_parameters") or hp.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type"))
    factor = rope.get("factor")
    if rope_type == "linear" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(factor)
    elif rope_type == "yarn" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(factor)
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    elif rope_type not in (None, "default"):
        # llama3 scaling needs a generated rope_freqs tensor, which this converter does not write
        raise ConvertError(f"config.json: rope scaling type {rope_type!r} is not supported")
    if (theta := rope.get("rope_theta", hp.get("rope_theta"))) is not None:
        w.add_rope_freq_base(theta)
    if (eps := hp.get("rms_norm_eps")) is not None:
        w.add_layer_norm_rms_eps(eps)
    if (eps := hp.get("layer_norm_eps")) is not None:
        w.add_layer_norm_eps(eps)
    if (head_dim := hp.get("head_dim")) is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)


def _llama_hparams(w: gguf.GGUFWriter, hp: HParams) -> None:
    w.add_vocab_size(hp["vocab_size"])
    w.add_rope_dimension_count(hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"])


def _bert_hparams(w: gguf.GGUFWriter, hp: HParams) -> None:
    w.add_causal_attention(False)


def _llama_permute(name: str, data: Array, hp: HParams) -> Array:
    """Undo the HF rotary permutation of q/k (LlamaModel.permute in llama.cpp's converter)."""
    n_head = hp["num_attention_heads"]
    if name.endswith(("q_proj.weight", "q_proj.bias")):
        heads = n_head
    elif name.endswith(("k_proj.weight", "k_proj.bias")):
        heads = hp.get("num_key_value_heads") or n_head
    else:
        return data
    return (
        data.reshape(heads, 2, data.shape[0] // heads // 2, *data.shape[1:])
        .swapaxes(1, 2)
        .reshape(data.shape)
    )


def _bert_rename(name: str) -> str | None:
    if name.startswith("bert."):
        name = name[5:]
    if name.endswith(".gamma"):
        name = name[:-6] + ".weight"
    if name.endswith(".beta"):
        name = name[:-5] + ".bias"
    if name in ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"):
        return None
    if name.startswith(("cls.predictions", "cls.seq_relationship")):
        return None
    return name


def _decoder_rename(name: str) -> str | None:
    if name.endswith(".rotary_emb.inv_freq"):
        return None
    return name


@dataclass(frozen=True)
class ArchSpec:
    hf_arch: str
    gguf_arch: gguf.MODEL_ARCH
    tokenizer: Literal["bpe", "wordpiece"]
    roles: tuple[Role, ...]
    extra_hparams: Callable[[gguf.GGUFWriter, HParams], None] | None = None
    rename: Callable[[str], str | None] = _decoder_rename
    transform: Callable[[str, Array, HParams], Array] | None = None

    @property
    def gguf_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


TABLE: dict[str, ArchSpec] = {
    spec.hf_arch: spec
    for spec in (
        ArchSpec("Qwen3ForCausalLM", gguf.MODEL_ARCH.QWEN3, "bpe", ("chat", "embedding", "rerank")),
        ArchSpec("Qwen3Model", gguf.MODEL_ARCH.QWEN3, "bpe", ("embedding",)),
        ArchSpec("Qwen3ForSequenceClassification", gguf.MODEL_ARCH.QWEN3, "bpe", ("rerank",)),
        ArchSpec("Qwen2ForCausalLM", gguf.MODEL_ARCH.QWEN2, "bpe", ("chat", "embedding")),
        ArchSpec("Qwen2Model", gguf.MODEL_ARCH.QWEN2, "bpe", ("embedding",)),
        ArchSpec(
            "LlamaForCausalLM",
            gguf.MODEL_ARCH.LLAMA,
            "bpe",
            ("chat",),
            extra_hparams=_llama_hparams,
            transform=_llama_permute,
        ),
        ArchSpec(
            "BertModel",
            gguf.MODEL_ARCH.BERT,
            "wordpiece",
            ("embedding",),
            extra_hparams=_bert_hparams,
            rename=_bert_rename,
        ),
    )
}


def lookup(config: HParams, config_path: Path) -> ArchSpec:
    archs = config.get("architectures") or []
    for a in archs:
        if a in TABLE:
            return TABLE[a]
    got = ", ".join(archs) or "none given"
    raise ConvertError(
        f"{config_path}: architecture {got} is not supported; supported: {', '.join(sorted(TABLE))}"
    )


def sentence_transformers_pooling(model_dir: Path) -> gguf.PoolingType | None:
    """The pooling named by a sentence-transformers modules.json (1_Pooling/config.json)."""
    modules = model_dir / "modules.json"
    if not modules.is_file():
        return None
    try:
        entries = json.loads(modules.read_text(encoding="utf-8"))
        path = next((m["path"] for m in entries if str(m.get("type", "")).endswith("Pooling")), None)
        if path is None:
            return None
        cfg = json.loads((model_dir / path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConvertError(
            f"{model_dir}: cannot read the sentence-transformers pooling config: {e}"
        ) from None
    if cfg.get("pooling_mode_mean_tokens"):
        return gguf.PoolingType.MEAN
    if cfg.get("pooling_mode_cls_token"):
        return gguf.PoolingType.CLS
    if cfg.get("pooling_mode_lasttoken"):
        return gguf.PoolingType.LAST
    mode = cfg.get("pooling_mode")
    modes = {"mean": gguf.PoolingType.MEAN, "cls": gguf.PoolingType.CLS, "lasttoken": gguf.PoolingType.LAST}
    if mode in modes:
        return modes[mode]
    raise ConvertError(f"{model_dir}/{path}/config.json: only mean, cls and last-token pooling are supported")


def detect_role(model_dir: Path, config: HParams, spec: ArchSpec, has_lm_head: bool, hint: str = "") -> Role:
    """chat, embedding or rerank, from the checkpoint's own files (llama.cpp uses the same hints)."""
    if spec.roles == ("embedding",) or spec.roles == ("rerank",):
        return spec.roles[0]
    hints = " ".join([model_dir.name, str(config.get("_name_or_path", "")), hint]).lower()
    readme = model_dir / "README.md"
    readme_text = readme.read_text(encoding="utf-8", errors="replace").lower() if readme.is_file() else ""
    if "rerank" in spec.roles and ("reranker" in hints or "# qwen3-reranker" in readme_text):
        return "rerank"
    if "embedding" in spec.roles and (
        sentence_transformers_pooling(model_dir) is not None or ("embedding" in hints and not has_lm_head)
    ):
        return "embedding"
    return "chat"
