"""What a model's llama.cpp buffers take, in llama.cpp's own numbers.

llama.cpp reports each buffer it allocates in its log ("CPU_REPACK model buffer size = ...",
"CPU KV buffer size = ...", "CPU compute buffer size = ..."); its C API has no other way to
ask (llama_get_memory_breakdown returns a C++ std::map). The log callback (llama_backend)
hands every line to `note_log_line`, and `buffer_sizes()` collects the ones this thread logs
while it loads a model and creates its contexts: one breakdown per model for the start-up log.
The estimate made before loading (KV cache and weights) is gpu_fit.estimate_memory.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

# "load_tensors:   CPU_REPACK model buffer size =  1234.56 MiB", "llama_kv_cache:        CPU KV
# buffer size =   896.00 MiB", "llama_context:        CPU compute buffer size = ...", "...  output
# buffer size = ...".
_BUFFER_LINE = re.compile(r"(\S+)\s+(model|KV|compute|output) buffer size =\s*([0-9.]+) MiB")
MIB = 2**20

_local = threading.local()


@dataclass
class MemoryBreakdown:
    """Bytes per (kind, buffer name), kind one of model, KV, compute, output."""

    buffers: dict[tuple[str, str], int] = field(default_factory=dict)

    def add(self, kind: str, name: str, n_bytes: int) -> None:
        self.buffers[(kind, name)] = self.buffers.get((kind, name), 0) + n_bytes

    def total(self, kind: str | None = None) -> int:
        return sum(n for (k, _), n in self.buffers.items() if kind is None or k == kind)

    def summary(self) -> str:
        """'weights 2,315 MiB (CPU_Mapped 166, CPU_REPACK 2,149), KV 1,152 MiB, ...'."""
        parts = []
        for kind, label in (("model", "weights"), ("KV", "KV"), ("compute", "compute"), ("output", "output")):
            names = {name: n for (k, name), n in self.buffers.items() if k == kind}
            if not names:
                continue
            part = f"{label} {self.total(kind) / MIB:,.0f} MiB"
            if kind == "model" or len(names) > 1:
                part += " (" + ", ".join(f"{name} {n / MIB:,.0f}" for name, n in names.items()) + ")"
            parts.append(part)
        return ", ".join(parts) + f"; {self.total() / MIB:,.0f} MiB in all"


def note_log_line(text: str) -> None:
    """One line of llama.cpp's log: a buffer size is added to this thread's breakdown, if any."""
    ledger: MemoryBreakdown | None = getattr(_local, "ledger", None)
    if ledger is None:
        return
    m = _BUFFER_LINE.search(text)
    if m:
        ledger.add(m.group(2), m.group(1), round(float(m.group(3)) * MIB))


@contextmanager
def buffer_sizes() -> Iterator[MemoryBreakdown]:
    """The buffers llama.cpp allocates on this thread inside the block (model and contexts)."""
    previous = getattr(_local, "ledger", None)
    ledger = MemoryBreakdown()
    _local.ledger = ledger
    try:
        yield ledger
    finally:
        _local.ledger = previous
