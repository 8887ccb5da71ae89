"""How much memory a model needs, and how many layers to offload: a number from the profile, or
`auto` from the file and free memory. One estimate (`estimate_memory`) for the start-up log,
the docs' RAM figures and `auto` fitting."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp as llama

from gguf_serve.engine.context_size import context_size
from gguf_serve.settings import ModelSettings

log = logging.getLogger("gguf_serve.gpu")

ALL_LAYERS = 999  # llama.cpp clamps to the model's layer count (+ the output layer)
KV_BYTES = {
    "f32": 4.0,
    "f16": 2.0,
    "bf16": 2.0,
    "q8_0": 34 / 32,
    "q4_0": 18 / 32,
    "q4_1": 20 / 32,
    "q5_0": 22 / 32,
    "q5_1": 24 / 32,
    "iq4_nl": 18 / 32,
}
_BLOCK = re.compile(r"^blk\.(\d+)\.")
# Weight types llama.cpp's CPU backend repacks into interleaved copies (CPU_REPACK buffers) on
# x86 with AVX2 (ggml-cpu/repack.cpp, ggml_repack_get_optimal_repack_type); ARM repacks more.
REPACKED_TYPES = frozenset({"Q4_0", "Q4_K", "IQ4_NL", "MXFP4"})
# Encoders llama.cpp runs without a KV cache (llama_model::create_memory returns none).
NO_KV_ARCHITECTURES = frozenset(
    {
        "bert",
        "jina-bert-v2",
        "jina-bert-v3",
        "nomic-bert",
        "nomic-bert-moe",
        "neo-bert",
        "eurobert",
        "modern-bert",
    }
)


@dataclass(frozen=True)
class ModelFootprint:
    layer_bytes: list[int]  # weights of each repeating block
    other_bytes: int  # embeddings, output head, norms
    n_embd_kv: int  # K (or V) width per layer per token
    n_ctx_train: int = 0  # the trained context (what n_ctx = 0 means)
    type_bytes: dict[str, int] = field(default_factory=dict)  # bytes of weights per type (Q4_K, F16, ...)
    architecture: str = ""

    @property
    def weight_bytes(self) -> int:
        return sum(self.layer_bytes) + self.other_bytes

    @property
    def repackable_bytes(self) -> int:
        """Weights of a type the CPU backend repacks (see REPACKED_TYPES)."""
        return sum(n for t, n in self.type_bytes.items() if t in REPACKED_TYPES)


def read_footprint(path: Path) -> ModelFootprint:
    from gguf import GGUFReader  # reads only the header and tensor index (memory-mapped)

    reader = GGUFReader(str(path))
    arch_field = reader.get_field("general.architecture")
    arch = bytes(arch_field.parts[-1]).decode() if arch_field else "llama"

    def num(key: str, default: int) -> int:
        f = reader.get_field(f"{arch}.{key}")
        return int(f.parts[-1][0]) if f else default

    layers: dict[int, int] = {}
    other = 0
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + int(t.n_bytes)
        m = _BLOCK.match(t.name)
        if m:
            layers[int(m.group(1))] = layers.get(int(m.group(1)), 0) + int(t.n_bytes)
        else:
            other += int(t.n_bytes)
    n_head = num("attention.head_count", 1)
    n_head_kv = num("attention.head_count_kv", n_head)
    n_embd = num("embedding_length", 0)
    head_dim = num("attention.key_length", n_embd // max(1, n_head))
    return ModelFootprint(
        [layers[i] for i in sorted(layers)],
        other,
        n_head_kv * head_dim,
        num("context_length", 0),
        types,
        arch,
    )


def kv_bytes_per_layer(fp: ModelFootprint, n_ctx_total: int, kv_type_k: str, kv_type_v: str) -> int:
    """K and V of one layer for `n_ctx_total` cells: the one KV size formula."""
    return int(n_ctx_total * fp.n_embd_kv * (KV_BYTES[kv_type_k] + KV_BYTES[kv_type_v]))


def kv_cache_bytes(fp: ModelFootprint, ms: ModelSettings) -> int:
    """The KV cache the engine allocates for `ms` (all layers, every slot)."""
    if fp.architecture in NO_KV_ARCHITECTURES:
        return 0
    n_ctx_total = context_size(ms, fp.n_ctx_train).kv_cells
    return kv_bytes_per_layer(fp, n_ctx_total, ms.cache_type_k, ms.cache_type_v) * len(fp.layer_bytes)


@dataclass(frozen=True)
class MemoryEstimate:
    """What a model takes before any request: its weights (once: repacked weights replace
    their originals when the file is not memory-mapped) and its KV cache. Compute buffers
    come on top (llama.cpp sizes them at context creation; the start-up log shows them)."""

    weights: int
    kv: int

    @property
    def total(self) -> int:
        return self.weights + self.kv


def estimate_memory(fp: ModelFootprint, ms: ModelSettings) -> MemoryEstimate:
    return MemoryEstimate(fp.weight_bytes, kv_cache_bytes(fp, ms))


def fit_layers(
    fp: ModelFootprint, n_ctx_total: int, kv_type_k: str, kv_type_v: str, free_bytes: int, reserve_bytes: int
) -> int:
    """The most blocks whose weights + KV cache fit in free memory, after a reserve for
    compute buffers; the output head goes with the last block, as llama.cpp does."""
    kv_per_layer = kv_bytes_per_layer(fp, n_ctx_total, kv_type_k, kv_type_v)
    budget = free_bytes - reserve_bytes
    n = 0
    for i, w in enumerate(fp.layer_bytes):
        cost = w + kv_per_layer + (fp.other_bytes if i == len(fp.layer_bytes) - 1 else 0)
        if cost > budget:
            break
        budget -= cost
        n += 1
    return n


def auto_layers(fp: ModelFootprint, ms: ModelSettings, free_bytes: int) -> int:
    """n_gpu_layers = auto: counted with the KV cache the engine will allocate for `ms`."""
    n_ctx_total = context_size(ms, fp.n_ctx_train).kv_cells
    reserve = max(512 * 2**20, free_bytes // 20)
    return fit_layers(fp, n_ctx_total, ms.cache_type_k, ms.cache_type_v, free_bytes, reserve)


def free_gpu_memory() -> int | None:
    """Free bytes on the first GPU (nvidia-smi); None when there is none to ask."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        return int(out.split()[0]) * 2**20
    except (subprocess.SubprocessError, ValueError, IndexError, OSError):
        return None


def choose_gpu_layers(fp: ModelFootprint, ms: ModelSettings) -> int:
    if ms.n_gpu_layers != "auto":
        return ALL_LAYERS if ms.n_gpu_layers < 0 else ms.n_gpu_layers
    if not llama.llama_supports_gpu_offload():
        log.info("model %s: n_gpu_layers=auto, but this llama.cpp build has no GPU backend: CPU only", ms.id)
        return 0
    free = free_gpu_memory()
    if free is None:
        log.warning(
            "model %s: n_gpu_layers=auto, but free GPU memory is unknown: offloading all layers", ms.id
        )
        return ALL_LAYERS
    n = auto_layers(fp, ms, free)
    log.info(
        "model %s: n_gpu_layers=auto -> %d of %d layers (%.1f GiB free, %.1f GiB of weights)",
        ms.id,
        n,
        len(fp.layer_bytes),
        free / 2**30,
        fp.weight_bytes / 2**30,
    )
    return ALL_LAYERS if n == len(fp.layer_bytes) else n
