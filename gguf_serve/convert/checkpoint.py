"""Read safetensors checkpoints lazily: header first, each tensor memory-mapped on demand.

Only the header of every shard is parsed up front, so planning a conversion costs a few
kilobytes whatever the checkpoint's size; tensor data is mapped one tensor at a time and
released after use, which keeps peak memory near the largest tensor.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gguf_serve.convert.errors import ConvertError

# safetensors dtype -> (numpy storage dtype, bytes per element). BF16 is stored as uint16
# and widened to float32 on load: numpy has no bfloat16.
_DTYPES: dict[str, tuple[np.dtype[Any], int]] = {
    "F32": (np.dtype("<f4"), 4),
    "F16": (np.dtype("<f2"), 2),
    "BF16": (np.dtype("<u2"), 2),
    "F64": (np.dtype("<f8"), 8),
    # integer buffers (e.g. BERT position_ids) are never converted, but may be present
    "I64": (np.dtype("<i8"), 8),
    "I32": (np.dtype("<i4"), 4),
    "I16": (np.dtype("<i2"), 2),
    "I8": (np.dtype("i1"), 1),
    "U8": (np.dtype("u1"), 1),
    "BOOL": (np.dtype("u1"), 1),
}
_FLOAT = ("F32", "F16", "BF16", "F64")
_HEADER_MAX = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lives: file, byte offset, dtype name and shape."""

    name: str
    path: Path
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]

    def load(self) -> np.ndarray[Any, Any]:
        """The tensor as float32 (F32/F16 keep their dtype), read through a short-lived memmap."""
        if self.dtype not in _FLOAT:
            raise ConvertError(
                f"{self.path}: tensor {self.name!r} has dtype {self.dtype}; only F32/F16/BF16 weights are supported"
            )
        storage, _ = _DTYPES[self.dtype]
        count = int(np.prod(self.shape)) if self.shape else 1
        mm = np.memmap(self.path, dtype=storage, mode="r", offset=self.offset, shape=(count,))
        try:
            if self.dtype == "BF16":
                out = (mm.astype(np.uint32) << 16).view(np.float32)
            elif self.dtype == "F64":
                out = mm.astype(np.float32)
            else:
                out = np.array(mm)  # a private copy, so the mapping can go now
        finally:
            del mm
        return out.reshape(self.shape)


def _read_header(path: Path) -> dict[str, TensorRef]:
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise ConvertError(
                    f"{path}: not a safetensors file (too short: {size} bytes); download it again"
                )
            header_len = int.from_bytes(raw_len, "little")
            if header_len <= 0 or header_len > _HEADER_MAX or 8 + header_len > size:
                raise ConvertError(f"{path}: corrupt or truncated safetensors header; download it again")
            header = json.loads(f.read(header_len).decode("utf-8"))
    except OSError as e:
        raise ConvertError(f"{path}: cannot read: {e.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ConvertError(f"{path}: corrupt safetensors header (not JSON); download it again") from None
    if not isinstance(header, dict):
        raise ConvertError(f"{path}: corrupt safetensors header; download it again")
    data_start = 8 + header_len
    refs: dict[str, TensorRef] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = meta["dtype"]
            shape = tuple(int(d) for d in meta["shape"])
            begin, end = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ConvertError(f"{path}: corrupt safetensors header entry for {name!r}") from None
        if dtype not in _DTYPES:
            raise ConvertError(
                f"{path}: tensor {name!r} has dtype {dtype}; only F32/F16/BF16 checkpoints are supported"
            )
        count = int(np.prod(shape)) if shape else 1
        if end - begin != count * _DTYPES[dtype][1] or begin < 0:
            raise ConvertError(
                f"{path}: tensor {name!r} has inconsistent size in the header; download it again"
            )
        if data_start + end > size:
            raise ConvertError(
                f"{path}: truncated ({size} bytes, tensor {name!r} needs {data_start + end}); "
                "the download did not finish, fetch it again"
            )
        refs[name] = TensorRef(name, path, data_start + begin, end - begin, dtype, shape)
    return refs


class Checkpoint:
    """The tensors of a (possibly sharded) safetensors checkpoint in one folder."""

    def __init__(self, model_dir: Path) -> None:
        self.dir = model_dir
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError):
                raise ConvertError(f"{index}: not a valid safetensors index (no weight_map)") from None
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (model_dir / s).is_file()]
            if missing:
                raise ConvertError(
                    f"{model_dir}: missing checkpoint shard(s) {', '.join(missing)}; fetch them again"
                )
        else:
            weight_map = None
            shards = sorted(p.name for p in model_dir.glob("*.safetensors"))
        if not shards:
            raise ConvertError(
                f"{model_dir}: no *.safetensors files (only safetensors checkpoints are supported)"
            )
        self.shards = [model_dir / s for s in shards]
        self.tensors: dict[str, TensorRef] = {}
        for shard in self.shards:
            for name, ref in sorted(_read_header(shard).items()):
                self.tensors[name] = ref
        if weight_map is not None:
            absent = sorted(set(weight_map) - set(self.tensors))
            if absent:
                raise ConvertError(
                    f"{model_dir}: {len(absent)} tensor(s) of the index are in no shard (first: {absent[0]!r}); "
                    "fetch the checkpoint again"
                )

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[TensorRef]:
        return iter(self.tensors.values())

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())
