"""Quantize a GGUF file with libllama's llama_model_quantize (through llama_cpp)."""

from __future__ import annotations

import ctypes
from pathlib import Path

import llama_cpp

from gguf_serve.convert.errors import ConvertError
from gguf_serve.convert.writer import atomic_path
from gguf_serve.engine.llama_backend import init_backend
from gguf_serve.engine.llama_runtime import file_types as quant_types
from gguf_serve.engine.llama_runtime import usable_cpus


def normalize_type(type_name: str) -> str:
    name = type_name.strip().upper()
    if name not in quant_types():
        raise ConvertError(
            f"unknown quantization type {type_name!r}; choose one of {', '.join(sorted(quant_types()))}"
        )
    return name


def quantize_gguf(
    src: Path, dst: Path, type_name: str, threads: int | None = None, allow_requantize: bool = False
) -> Path:
    """Write dst as the type_name quantization of src (atomically); returns dst.

    `allow_requantize`: src may itself be quantized (lossy; for tests of kernel paths, not models)."""
    name = normalize_type(type_name)
    if not src.is_file():
        raise ConvertError(f"{src}: no such GGUF file to quantize")
    init_backend()  # the one log route and CPU-variant choice, as for every other llama.cpp call
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = quant_types()[name]
    # the CPUs this process may use (a container's cgroup), not the host's count
    params.nthread = threads or usable_cpus()
    params.allow_requantize = allow_requantize
    with atomic_path(dst) as tmp:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0 or not tmp.is_file():
            raise ConvertError(f"llama.cpp could not quantize {src.name} to {name} (code {rc})")
    return dst
