"""Stream tensors into a GGUF file, one tensor in memory at a time, atomically.

The tensor directory (names, shapes, types, sizes) is written first from the plan, then
each tensor is produced, converted and appended, and its memory released. The file is
written under a temporary name in the destination folder and renamed into place only when
complete, so a crash, an error or a full disk never leaves a half-written .gguf behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from gguf_serve.convert.errors import ConvertError

Q = gguf.GGMLQuantizationType
OUTTYPES: dict[str, tuple[Q, gguf.LlamaFileType]] = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
}
_ITEMSIZE = {Q.F32: 4, Q.F16: 2, Q.BF16: 2}


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: its GGUF name, HF-order shape, output type and how to make its data."""

    name: str
    shape: tuple[int, ...]
    qtype: Q
    produce: Callable[[], np.ndarray[Any, Any]]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * _ITEMSIZE[self.qtype]


@contextlib.contextmanager
def atomic_path(dst: Path) -> Iterator[Path]:
    """A temporary path beside dst that becomes dst only if the block succeeds."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, dst)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ConvertError(
                f"disk full while writing {dst}; free space in {dst.parent} and run again"
            ) from None
        raise ConvertError(f"cannot write {dst}: {e.strerror or e}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_gguf(
    dst: Path,
    arch: str,
    write_kv: Callable[[gguf.GGUFWriter], None],
    plans: Sequence[TensorPlan],
    progress: Callable[[int], None] | None = None,
) -> None:
    """Write the GGUF at dst: metadata from write_kv, then every planned tensor in order."""
    with atomic_path(dst) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            write_kv(writer)
            for p in plans:
                dtype = np.float16 if p.qtype == Q.F16 else np.float32
                writer.add_tensor_info(p.name, p.shape, np.dtype(dtype), p.nbytes, raw_dtype=p.qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for p in plans:
                data = p.produce()
                if tuple(data.shape) != p.shape:
                    raise ConvertError(f"tensor {p.name}: produced shape {data.shape}, planned {p.shape}")
                out = gguf.quants.quantize(np.ascontiguousarray(data), p.qtype)
                del data
                writer.write_tensor_data(out)
                del out
                if progress is not None:
                    progress(p.nbytes)
        finally:
            writer.close()
