"""The running server says what llama.cpp runs on: CPU, variant, kernel paths, devices."""

from __future__ import annotations

import httpx
import pytest

from gguf_serve.engine.llama_backend import read_cpu
from tests.e2e.server import ServerProcess

pytestmark = pytest.mark.e2e


def test_stats_and_log_name_the_cpu_and_kernel_paths(demo_process: ServerProcess) -> None:
    stats = httpx.get(demo_process.base_url + "/stats", timeout=10).json()
    runtime = stats["runtime"]
    model, features = read_cpu()
    assert runtime["cpu_model"] == model
    assert runtime["cpu_features"] == features
    assert runtime["build"] in ("native", "portable")
    assert runtime["cpu_variant"]
    assert runtime["amx"].startswith(("on", "off"))
    if "amx_int8" in features:
        assert runtime["amx"].startswith("off"), "AMX kernels ran without allow_amx"
    assert isinstance(runtime["repack"], bool)
    assert "CPU" in runtime["ggml"]
    assert any(d["kind"] == "cpu" for d in runtime["devices"])

    metrics = httpx.get(demo_process.base_url + "/metrics", timeout=10).text
    info = [ln for ln in metrics.splitlines() if ln.startswith("gguf_serve_runtime_info{")]
    assert len(info) == 1 and f'cpu_variant="{runtime["cpu_variant"]}"' in info[0]

    demo_process.log_tail(1)  # flushes the log
    log = demo_process.log_path.read_text(errors="replace")  # the start-up lines, however long it ran
    assert f"llama.cpp backend: CPU {model}" in log
    assert f"AMX {runtime['amx']}" in log
