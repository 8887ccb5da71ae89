"""A thin, typed layer over llama.cpp's C API (through llama-cpp-python's ctypes bindings).

Everything in the engine that talks to llama.cpp goes through here, so the rest of the
engine deals in Python ints, bytes and numpy arrays. ctypes releases the GIL during each
foreign call, so a decode on a scheduler thread never blocks the event loop.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import llama_cpp as llama
import numpy as np
import numpy.typing as npt

from gguf_serve.engine.llama_backend import init_backend

if TYPE_CHECKING:
    from gguf_serve.engine.cpu_budget import CpuShare

log = logging.getLogger("gguf_serve.llama")

GGUF_MAGIC = b"GGUF"

POOLING_TYPES = {"unspecified": -1, "none": 0, "mean": 1, "cls": 2, "last": 3, "rank": 4}
POOLING_NAMES = {v: k for k, v in POOLING_TYPES.items()}
# Architectures whose graphs turn causal attention off in code, whatever the GGUF says
# (src/models/*.cpp: `hparams.causal_attn = false`).
NON_CAUSAL_ARCHITECTURES = frozenset({"gemma-embedding", "rnd1", "dream", "llada", "llada-moe"})

# ggml_type ids for KV cache types (ggml.h).
GGML_TYPES = {
    "f32": 0,
    "f16": 1,
    "q4_0": 2,
    "q4_1": 3,
    "q5_0": 6,
    "q5_1": 7,
    "q8_0": 8,
    "iq4_nl": 20,
    "bf16": 30,
}

FLASH_ATTN = {"auto": -1, False: 0, True: 1}


class ModelLoadError(RuntimeError):
    """The GGUF file cannot be loaded; the message says which file and why."""


class DecodeError(RuntimeError):
    """llama_decode failed (e.g. no KV cache slot for the batch)."""


def check_gguf_header(path: Path) -> None:
    """Fail early, with a clear message, on files that are not GGUF (llama.cpp would abort)."""
    try:
        with path.open("rb") as f:
            head = f.read(8)
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e.strerror}") from e
    if len(head) < 8 or head[:4] != GGUF_MAGIC:
        raise ModelLoadError(
            f"{path} is not a GGUF file (bad magic {head[:4]!r}); re-download or re-convert it"
        )


def file_types() -> dict[str, int]:
    """llama.cpp file type names (Q4_K_M, Q8_0, F16, ...) -> LLAMA_FTYPE values."""
    types: dict[str, int] = {}
    for attr in dir(llama):
        if attr.startswith("LLAMA_FTYPE_MOSTLY_"):
            types[attr.removeprefix("LLAMA_FTYPE_MOSTLY_")] = int(getattr(llama, attr))
    types["F32"] = int(llama.LLAMA_FTYPE_ALL_F32)
    return types


def usable_cpus() -> int:
    """CPUs this process may run on (cgroup/affinity aware on Linux): llama.cpp's thread count."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


class LlamaModel:
    """Loaded weights and vocabulary. Thread-safe for read-only use (tokenize, metadata)."""

    def __init__(
        self,
        path: Path,
        n_gpu_layers: int = 0,
        use_mmap: bool = True,
        extra_buffer_types: bool | None = None,
        vocab_only: bool = False,
    ) -> None:
        """`extra_buffer_types`: None follows the backend's decision (see llama_backend);
        False forces the plain kernels, the reference the kernel-path check compares with.
        `vocab_only`: metadata and vocabulary without the weights (tokenizer checks)."""
        backend = init_backend()
        check_gguf_header(path)
        self.path = path
        params = llama.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        params.vocab_only = vocab_only
        params.use_extra_bufts = (
            backend.extra_buffer_types if extra_buffer_types is None else extra_buffer_types
        )
        # This llama.cpp has `load_mode` where older ones had `use_mmap` (which we set before,
        # and which this version silently ignored: every file was mapped).
        params.load_mode = llama.LLAMA_LOAD_MODE_MMAP if use_mmap else llama.LLAMA_LOAD_MODE_NONE
        ptr = llama.llama_model_load_from_file(str(path).encode(), params)
        if not ptr:
            raise ModelLoadError(
                f"llama.cpp could not load {path} (corrupt or unsupported GGUF; see the log above)"
            )
        self.ptr = ptr
        self.vocab = llama.llama_model_get_vocab(ptr)
        self.n_vocab = int(llama.llama_vocab_n_tokens(self.vocab))
        self.n_ctx_train = int(llama.llama_model_n_ctx_train(ptr))
        self.n_embd = int(llama.llama_model_n_embd(ptr))
        self.n_layer = int(llama.llama_model_n_layer(ptr))
        self.size_bytes = int(llama.llama_model_size(ptr))
        self.n_params = int(llama.llama_model_n_params(ptr))
        # Outputs of a classifier head: a rank-pooling model's scores per sequence.
        self.n_cls_out = int(llama.llama_model_n_cls_out(ptr))
        self.bos = int(llama.llama_vocab_bos(self.vocab))
        self.eos = int(llama.llama_vocab_eos(self.vocab))
        self.add_bos = bool(llama.llama_vocab_get_add_bos(self.vocab))
        self.add_eos = bool(llama.llama_vocab_get_add_eos(self.vocab))
        self._piece_cache: dict[int, bytes] = {}
        # The share of the server's CPU budget that contexts on these weights decode with
        # (cpu_budget.py); None: each context keeps the thread counts it was made with.
        self.cpu: CpuShare | None = None

    # --- metadata -------------------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        n = llama.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):  # a long value (chat templates): ask again with room for it
            buf = ctypes.create_string_buffer(n + 1)
            llama.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace")

    def chat_template(self, name: str | None = None) -> str | None:
        raw = llama.llama_model_chat_template(self.ptr, name.encode() if name else None)
        return raw.decode("utf-8", "replace") if raw else None

    @property
    def architecture(self) -> str:
        return self.meta("general.architecture") or "unknown"

    @property
    def causal_attention(self) -> bool:
        """Whether a token attends only to the tokens before it (decoders), as llama.cpp
        decides it: `{arch}.attention.causal`, true when absent (BERT files say false)."""
        arch = self.architecture
        return arch not in NON_CAUSAL_ARCHITECTURES and self.meta(f"{arch}.attention.causal") != "false"

    @property
    def pooling_type(self) -> str:
        value = self.meta(f"{self.architecture}.pooling_type")
        return POOLING_NAMES.get(int(value), "none") if value is not None else "none"

    def classifier_labels(self) -> list[str]:
        out: list[str] = []
        for i in range(self.n_cls_out):
            raw = llama.llama_model_cls_label(self.ptr, i)
            out.append(raw.decode("utf-8", "replace") if raw else str(i))
        return out

    # --- vocabulary -------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 8
        buf = (llama.llama_token * n_max)()
        n = llama.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:
            n_max = -n
            buf = (llama.llama_token * n_max)()
            n = llama.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, parse_special)
        return list(buf[:n])

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        """The bytes a token stands for. Cached: the vocabulary never changes."""
        key = token if not special else -token - 1
        piece = self._piece_cache.get(key)
        if piece is None:
            buf = ctypes.create_string_buffer(64)
            n = llama.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = llama.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
            piece = buf.raw[:n]
            self._piece_cache[key] = piece
        return piece

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> str:
        return b"".join(self.token_bytes(t, special) for t in tokens).decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        return bool(llama.llama_vocab_is_eog(self.vocab, token))

    def token_id(self, text: str) -> int | None:
        """The id of a text that is exactly one token, else None."""
        ids = self.tokenize(text, add_special=False, parse_special=True)
        return ids[0] if len(ids) == 1 else None

    def close(self) -> None:
        if getattr(self, "ptr", None):
            llama.llama_model_free(self.ptr)
            self.ptr = None


@dataclass(frozen=True)
class ContextParams:
    n_ctx: int
    n_batch: int
    n_ubatch: int
    n_seq_max: int
    n_threads: int
    n_threads_batch: int
    embeddings: bool = False
    pooling: str = "unspecified"
    flash_attn: bool | str = "auto"
    type_k: str = "f16"
    type_v: str = "f16"
    kv_unified: bool = False


class LlamaContext:
    """One llama.cpp context (KV cache + compute buffers). Use from one thread only."""

    def __init__(self, model: LlamaModel, p: ContextParams) -> None:
        self.model = model
        cp = llama.llama_context_default_params()
        cp.n_ctx = p.n_ctx
        cp.n_batch = p.n_batch
        cp.n_ubatch = p.n_ubatch
        cp.n_seq_max = p.n_seq_max
        cp.n_threads = p.n_threads
        cp.n_threads_batch = p.n_threads_batch
        cp.embeddings = p.embeddings
        cp.pooling_type = POOLING_TYPES[p.pooling]
        cp.flash_attn_type = FLASH_ATTN[p.flash_attn]
        cp.type_k = GGML_TYPES[p.type_k]
        cp.type_v = GGML_TYPES[p.type_v]
        cp.kv_unified = p.kv_unified
        cp.no_perf = True
        ptr = llama.llama_init_from_model(model.ptr, cp)
        if not ptr:
            raise ModelLoadError(
                f"llama.cpp could not create a context for {model.path} (n_ctx={p.n_ctx}, "
                f"n_seq_max={p.n_seq_max}): out of memory? lower n_ctx or parallel"
            )
        self.ptr = ptr
        self.params = p
        self.n_ctx = int(llama.llama_n_ctx(ptr))
        self.n_ctx_seq = self.n_ctx if p.kv_unified else self.n_ctx // max(1, p.n_seq_max)
        self.memory = llama.llama_get_memory(ptr)
        self.n_vocab = model.n_vocab
        self.cpu = model.cpu
        self.threads = (p.n_threads, p.n_threads_batch)  # what the next decode runs with

    def decode(self, batch: Batch) -> None:
        rc = self._run(llama.llama_decode, batch)
        if rc != 0:
            raise DecodeError(f"llama_decode returned {rc} for a batch of {batch.n_tokens} tokens")

    def encode(self, batch: Batch) -> None:
        rc = self._run(llama.llama_encode, batch)
        if rc != 0:
            raise DecodeError(f"llama_encode returned {rc} for a batch of {batch.n_tokens} tokens")

    def _run(self, call: Callable[[Any, Any], int], batch: Batch) -> int:
        """One decode or encode, with this context's share of the CPU budget while it runs."""
        share = self.cpu
        if share is None:
            return call(self.ptr, batch.raw)
        n = share.claim()
        threads = (min(n, self.params.n_threads), min(n, self.params.n_threads_batch))
        if threads != self.threads:
            llama.llama_set_n_threads(self.ptr, *threads)
            self.threads = threads
        try:
            return call(self.ptr, batch.raw)
        finally:
            share.release()

    def logits(self, i: int) -> npt.NDArray[np.float32]:
        """The logits row of batch index i (a view into llama.cpp's buffer: copy to keep)."""
        ptr = llama.llama_get_logits_ith(self.ptr, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def seq_embedding(self, seq_id: int, n: int) -> npt.NDArray[np.float32]:
        ptr = llama.llama_get_embeddings_seq(self.ptr, seq_id)
        if not ptr:
            raise DecodeError(f"no pooled embedding for sequence {seq_id}")
        return np.ctypeslib.as_array(ptr, shape=(n,)).copy()

    def seq_rm(self, seq_id: int, p0: int = 0, p1: int = -1) -> bool:
        return bool(llama.llama_memory_seq_rm(self.memory, seq_id, p0, p1))

    def seq_cp(self, src: int, dst: int) -> None:
        """Give `dst` all of `src`'s KV (between KV streams llama.cpp copies at the next decode)."""
        llama.llama_memory_seq_cp(self.memory, src, dst, -1, -1)

    def clear(self) -> None:
        llama.llama_memory_clear(self.memory, True)

    # --- per-sequence state: the KV cells of one sequence, to host RAM and back -------------
    def seq_state_size(self, seq_id: int) -> int:
        return int(llama.llama_state_seq_get_size(self.ptr, seq_id))

    def seq_state(self, seq_id: int, out: npt.NDArray[np.uint8] | None = None) -> npt.NDArray[np.uint8]:
        """A copy of sequence `seq_id`'s KV state, written into `out` (exactly
        seq_state_size bytes) or into a new buffer."""
        size = self.seq_state_size(seq_id)
        buf = np.empty(size, dtype=np.uint8) if out is None else out
        if buf.nbytes != size or not buf.flags.c_contiguous:
            raise ValueError(f"sequence {seq_id}'s state is {size} bytes, the buffer {buf.nbytes}")
        n = llama.llama_state_seq_get_data(
            self.ptr, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), size, seq_id
        )
        if n != size:
            raise DecodeError(f"llama_state_seq_get_data wrote {n} of {size} bytes for sequence {seq_id}")
        return buf

    def set_seq_state(self, seq_id: int, state: npt.NDArray[np.uint8]) -> bool:
        """Replace sequence `seq_id`'s KV with a saved state (from any sequence of this
        context). False when llama.cpp cannot place it; the sequence is then empty."""
        ptr = state.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        n = llama.llama_state_seq_set_data(self.ptr, ptr, state.nbytes, seq_id)
        if n != state.nbytes:
            self.seq_rm(seq_id)
            return False
        return True

    def close(self) -> None:
        if getattr(self, "ptr", None):
            llama.llama_free(self.ptr)
            self.ptr = None


class Batch:
    """A reusable llama_batch: tokens of many sequences decoded in one call."""

    def __init__(self, capacity: int, n_seq_max: int = 1) -> None:
        self.capacity = capacity
        self.n_seq_max = n_seq_max  # sequences one token may belong to
        self.raw = llama.llama_batch_init(capacity, 0, n_seq_max)
        self.n_tokens = 0

    def clear(self) -> None:
        self.n_tokens = 0
        self.raw.n_tokens = 0

    def add(self, token: int, pos: int, seq_id: int | Sequence[int], logits: bool) -> int:
        """Append one token, of one sequence or (a shared prefix) of several, at most the
        batch's n_seq_max; returns its index in the batch (for logits/embeddings)."""
        i = self.n_tokens
        if i >= self.capacity:
            raise OverflowError("batch is full")
        raw = self.raw
        raw.token[i] = token
        raw.pos[i] = pos
        if isinstance(seq_id, int):
            raw.n_seq_id[i] = 1
            raw.seq_id[i][0] = seq_id
        else:
            if len(seq_id) > self.n_seq_max:
                raise OverflowError(f"a token of {len(seq_id)} sequences; this batch holds {self.n_seq_max}")
            raw.n_seq_id[i] = len(seq_id)
            for k, s in enumerate(seq_id):
                raw.seq_id[i][k] = s
        raw.logits[i] = logits
        self.n_tokens = i + 1
        raw.n_tokens = self.n_tokens
        return i

    def free(self) -> None:
        if self.raw is not None:
            llama.llama_batch_free(self.raw)
            self.raw = None

    @property
    def space(self) -> int:
        return self.capacity - self.n_tokens
