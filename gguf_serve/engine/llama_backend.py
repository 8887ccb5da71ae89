"""The one place that starts llama.cpp in this process: log routing, CPU variant, kernel safety.

Everything that loads a model (the engines, the converter's verification, the kernel check)
calls `init_backend()` first. It decides three things that depend on the machine:

- **Which CPU backend runs.** A portable build (`PORTABLE=1 make install`, the Docker images)
  ships every x86-64 CPU variant of ggml as a module; llama.cpp's own loader would take the
  best-scoring one, which on a 4th-gen-or-later Xeon is the AMX variant. We score the variants
  the same way but skip those with AMX unless `allow_amx` is set, and load the winner ourselves.
  A native build (`make install`) has one CPU backend compiled in, without AMX.
- **Whether weights use extra buffer types** (CPU repack, AMX). If the CPU backend that got
  loaded has AMX kernels (a llama-cpp-python built elsewhere) on a CPU with AMX, and AMX is not
  allowed, weights load without extra buffer types: slower, but no crash and no wrong logits.
- **What to tell the user.** `BackendInfo` names the CPU, its features, the variant, the kernel
  paths and the devices, for the start-up log and GET /stats.

llama.cpp's AMX kernels segfault in ggml_backend_amx_mul_mat on Q4_x/Q8_0 weights and have
computed wrong results on Q4_0/Q4_1 (upstream issues); `gguf-serve check-kernels` and
tests/test_kernel_paths.py compare every kernel path against the plain one.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

import llama_cpp as llama

from gguf_serve.engine.memory import note_log_line

log = logging.getLogger("gguf_serve.llama")

# The ISA extensions that decide llama.cpp's CPU kernels, as /proc/cpuinfo names them.
CPU_FEATURES = (
    "avx",
    "avx2",
    "fma",
    "f16c",
    "bmi2",
    "avx_vnni",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vbmi",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)
DEVICE_KINDS = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    description: str
    kind: str
    memory_total_mib: int
    memory_free_mib: int


@dataclass(frozen=True)
class BackendInfo:
    """What this process runs on: one line in the start-up log, one object in /stats."""

    build: str  # "native" (one CPU backend compiled in) or "portable" (CPU variants as modules)
    cpu_model: str
    cpu_features: list[str]  # host features from CPU_FEATURES
    cpu_variant: str  # the ggml CPU variant loaded ("built-in" for a native build)
    ggml: dict[str, dict[str, str]]  # llama_print_system_info, per backend
    repack: bool  # weights may be repacked for this CPU (extra buffer types on)
    amx: str  # "on", or "off (why)"
    extra_buffer_types: bool
    devices: list[DeviceInfo] = field(default_factory=list)

    def summary(self) -> str:
        gpus = [
            f"{d.name} ({d.description}, {d.memory_total_mib} MiB)" for d in self.devices if d.kind != "cpu"
        ]
        return (
            f"CPU {self.cpu_model} [{' '.join(self.cpu_features) or 'no AVX'}]; ggml {self.build} build, "
            f"CPU variant {self.cpu_variant}; repack {'on' if self.repack else 'off'}; AMX {self.amx}; "
            f"GPU: {', '.join(gpus) if gpus else 'none'}"
        )

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


_lock = threading.Lock()
_info: BackendInfo | None = None
_log_callback: object | None = None  # keep the ctypes callback alive


def _route_llama_logs() -> None:
    """Send llama.cpp's own logging to Python logging instead of stderr (once per process)."""
    global _log_callback
    levels = {3: logging.WARNING, 4: logging.ERROR}  # GGML_LOG_LEVEL_WARN/ERROR; INFO/DEBUG/CONT -> debug

    @llama.llama_log_callback
    def _cb(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        if text:
            line = text.decode("utf-8", "replace").rstrip()
            note_log_line(line)  # buffer sizes, for the per-model memory line (engine/memory.py)
            log.log(levels.get(level, logging.DEBUG), "%s", line)

    _log_callback = _cb
    llama.llama_log_set(_cb, ctypes.c_void_p(0))


def read_cpu() -> tuple[str, list[str]]:
    """The CPU's model name and which of CPU_FEATURES it has (Linux /proc/cpuinfo)."""
    model, flags = "unknown", set[str]()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown":
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return model, [f for f in CPU_FEATURES if f in flags]


def parse_system_info(text: str) -> dict[str, dict[str, str]]:
    """'CPU : SSE3 = 1 | AVX2 = 1 | ... | CUDA : ARCHS = 900 | ...' -> {backend: {feature: value}}."""
    out: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for part in text.split("|"):
        part = part.strip()
        if not part:
            continue
        if " : " in part:
            name, _, part = part.partition(" : ")
            current = out.setdefault(name.strip(), {})
        key, _, value = part.partition("=")
        if current is not None and key.strip():
            current[key.strip()] = value.strip()
    return out


# --- ggml's backend registry, through libggml (llama-cpp-python binds only libllama) ------------
class _Feature(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("value", ctypes.c_char_p)]


_libggml_handle: ctypes.CDLL | None = None


def _libggml() -> ctypes.CDLL:
    """The libggml that libllama itself uses (its registry is the one that counts).

    A wheel unpacks libggml.so, .so.0 and .so.0.x as three copies, and dlopen by path loads a
    second instance of whichever one libllama did not take (llama-cpp-python's own `_ggml` handle
    opens libggml.so; libllama's NEEDED is libggml.so.0). A backend registered there is invisible
    to libllama, which then searches for backends itself. So open the soname libllama resolved.
    """
    global _libggml_handle
    if _libggml_handle is None:
        lib_dir = backend_lib_dir()
        path = next((p for p in (lib_dir / "libggml.so.0", lib_dir / "libggml.so") if p.exists()), None)
        _libggml_handle = ctypes.CDLL(str(path) if path else "libggml.so.0")
    lib = _libggml_handle
    lib.ggml_backend_load.argtypes = [ctypes.c_char_p]
    lib.ggml_backend_load.restype = ctypes.c_void_p
    lib.ggml_backend_reg_count.restype = ctypes.c_size_t
    lib.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    lib.ggml_backend_dev_get.restype = ctypes.c_void_p
    for fn in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
        getattr(lib, fn).argtypes = [ctypes.c_void_p]
        getattr(lib, fn).restype = ctypes.c_char_p
    lib.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_type.restype = ctypes.c_int
    lib.ggml_backend_dev_memory.argtypes = [
        ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_size_t),
        ctypes.POINTER(ctypes.c_size_t),
    ]
    lib.ggml_backend_dev_memory.restype = None
    return lib


def backend_lib_dir() -> Path:
    return Path(llama.__file__).parent / "lib"


def cpu_variant_files(lib_dir: Path) -> list[Path]:
    """The CPU variant modules of a portable build (empty for a native build)."""
    return sorted(lib_dir.glob("libggml-cpu-*.so"))


def _variant_name(path: Path) -> str:
    return path.name.removeprefix("libggml-cpu-").removesuffix(".so")


def _module_features(lib: ctypes.CDLL, module: ctypes.CDLL) -> dict[str, str]:
    """The features a backend module was compiled with (ggml_backend_get_features)."""
    module.ggml_backend_init.restype = ctypes.c_void_p
    reg = module.ggml_backend_init()
    if not reg:
        return {}
    addr = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_get_features")
    if not addr:
        return {}
    get_features = ctypes.CFUNCTYPE(ctypes.POINTER(_Feature), ctypes.c_void_p)(addr)
    features = get_features(reg)
    out: dict[str, str] = {}
    i = 0
    while features[i].name:
        out[features[i].name.decode()] = (features[i].value or b"").decode()
        i += 1
    return out


@dataclass(frozen=True)
class VariantCandidate:
    path: Path
    score: int  # ggml_backend_score(): the module's own check of this CPU; 0 = cannot run here
    has_amx: bool


def pick_variant(candidates: list[VariantCandidate], allow_amx: bool) -> VariantCandidate:
    """llama.cpp's rule (the highest score this CPU runs), minus AMX variants unless allowed."""
    runnable = sorted((c for c in candidates if c.score > 0), key=lambda c: c.score, reverse=True)
    for c in runnable:
        if c.has_amx and not allow_amx:
            log.info(
                "skipping CPU variant %s: its AMX kernels are not trusted (allow_amx = false)", c.path.name
            )
            continue
        return c
    names = ", ".join(c.path.name for c in candidates) or "none"
    raise RuntimeError(f"no ggml CPU variant runs on this CPU (found: {names})")


def choose_cpu_variant(variants: list[Path], allow_amx: bool) -> tuple[Path, int]:
    """Score each variant module as ggml_backend_load_best does, then pick_variant."""
    lib = _libggml()
    candidates: list[VariantCandidate] = []
    for path in variants:
        try:
            module = ctypes.CDLL(str(path), mode=ctypes.RTLD_LOCAL)
        except OSError as e:
            log.warning("cannot open CPU variant %s: %s", path.name, e)
            continue
        module.ggml_backend_score.restype = ctypes.c_int
        score = int(module.ggml_backend_score())
        has_amx = score > 0 and _module_features(lib, module).get("AMX_INT8") == "1"
        candidates.append(VariantCandidate(path, score, has_amx))
    chosen = pick_variant(candidates, allow_amx)
    return chosen.path, chosen.score


def _load_portable(lib_dir: Path, allow_amx: bool) -> str:
    lib = _libggml()
    # GPU and other backends first, as ggml_backend_load_all does; then one CPU variant.
    for path in sorted(lib_dir.glob("libggml-*.so")):
        name = path.name.removeprefix("libggml-").removesuffix(".so")
        if name.startswith("cpu") or name == "base" or not name:
            continue
        if not lib.ggml_backend_load(str(path).encode()):
            log.warning("ggml backend %s did not load (no device or driver?)", path.name)
    path, score = choose_cpu_variant(cpu_variant_files(lib_dir), allow_amx)
    if not lib.ggml_backend_load(str(path).encode()):
        raise RuntimeError(f"ggml could not load the CPU backend {path}")
    log.debug("CPU variant %s (score %d)", path.name, score)
    return _variant_name(path)


def _devices() -> list[DeviceInfo]:
    lib = _libggml()
    out = []
    for i in range(int(lib.ggml_backend_dev_count())):
        dev = lib.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        out.append(
            DeviceInfo(
                name=(lib.ggml_backend_dev_name(dev) or b"").decode(),
                description=(lib.ggml_backend_dev_description(dev) or b"").decode(),
                kind=DEVICE_KINDS.get(int(lib.ggml_backend_dev_type(dev)), "other"),
                memory_total_mib=total.value >> 20,
                memory_free_mib=free.value >> 20,
            )
        )
    return out


def amx_policy(amx_built: bool, amx_host: bool, allow_amx: bool) -> tuple[bool, str]:
    """(extra buffer types on?, what to say about AMX) for this build on this CPU."""
    if not amx_built:
        return True, "off (not built)" if amx_host else "off (CPU has no AMX)"
    if not amx_host:
        return True, "off (CPU has no AMX)"
    if allow_amx:
        return True, "on (allow_amx = true)"
    # A llama.cpp with AMX kernels on an AMX CPU: extra buffer types off keeps weights on the plain
    # path. Costs the repack speed-up; `make install` builds without AMX and keeps it.
    log.warning(
        "this llama.cpp build has AMX kernels, which crash or compute wrong results on quantized "
        "weights; loading weights without extra buffer types (no AMX, no repack). "
        "Rebuild with `make install` (AMX off) or set allow_amx = true to override."
    )
    return False, "off (this build has AMX kernels: extra buffer types disabled)"


def _decide(
    build: str, variant: str, allow_amx: bool, cpu_model: str, cpu_features: list[str]
) -> BackendInfo:
    ggml = parse_system_info(llama.llama_print_system_info().decode("utf-8", "replace"))
    cpu = ggml.get("CPU", {})
    extra, amx = amx_policy(cpu.get("AMX_INT8") == "1", "amx_int8" in cpu_features, allow_amx)
    return BackendInfo(
        build=build,
        cpu_model=cpu_model,
        cpu_features=cpu_features,
        cpu_variant=variant,
        ggml=ggml,
        repack=extra and cpu.get("REPACK") == "1",
        amx=amx,
        extra_buffer_types=extra,
        devices=_devices(),
    )


def init_backend(allow_amx: bool = False) -> BackendInfo:
    """Start llama.cpp once for this process; later calls return what the first decided."""
    global _info
    with _lock:
        if _info is None:
            _route_llama_logs()
            cpu_model, cpu_features = read_cpu()
            lib_dir = backend_lib_dir()
            if cpu_variant_files(lib_dir):
                build, variant = "portable", _load_portable(lib_dir, allow_amx)
            else:
                build, variant = "native", "built-in"
            llama.llama_backend_init()  # loads nothing more once a backend is registered
            _info = _decide(build, variant, allow_amx, cpu_model, cpu_features)
        elif allow_amx and not _info.amx.startswith("on") and "amx_int8" in _info.cpu_features:
            log.warning("allow_amx asked for after llama.cpp started without AMX; ignored")
        return _info


def extra_buffer_types() -> bool:
    """Whether weights may use extra buffer types (repack, AMX) in this process."""
    return init_backend().extra_buffer_types
