"""Server processes for the benchmarks: a command that serves HTTP, with /health, on a free port."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from gguf_serve.engine.llama_runtime import usable_cpus
from tests.e2e.server import REPO, free_port


class BenchServer:
    def __init__(
        self, name: str, cmd: list[str], port: int, cwd: Path = REPO, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.base_url = f"http://127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".log", delete=False)  # noqa: SIM115  (lives as long as the server)
        self.proc = subprocess.Popen(
            cmd, cwd=cwd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {Path(self.log.name).read_text()[-2000:]}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"{self.name} did not start")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    """A /proc/PID/status memory field (VmRSS, VmHWM, RssAnon, RssFile) in MiB; 0 once it has exited."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (engine processes, their helpers), parents first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo += sorted(children.get(p, []))
    return out


def tree_memory(pid: int) -> list[dict[str, object]]:
    """Per process of `pid`'s tree: what it runs, VmRSS, RssAnon, RssFile, VmHWM (MiB)."""
    rows: list[dict[str, object]] = []
    for p in process_tree(pid):
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = ("VmRSS", "RssAnon", "RssFile", "VmHWM")
        rows.append({"pid": p, "cmd": cmd.strip()[-90:], **{f: rss_mib(p, f) for f in fields}})
    return rows


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far, all its threads; 0 once it exited."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_rss_mib(pid: int, field: str = "VmRSS") -> float:
    """rss_mib summed over a process and all its descendants: a server's API process and its
    engine processes (shared pages counted once per process, as top and ps count them)."""
    return sum(rss_mib(p, field) for p in process_tree(pid))


def llama_server(binary: str, gguf: Path, *args: str) -> BenchServer:
    """llama.cpp's C++ llama-server on `gguf` with our thread count: the reference."""
    port = free_port()
    cmd = [binary, "-m", str(gguf), "--port", str(port), "-t", str(usable_cpus()), *args]
    return BenchServer("llama-server", cmd, port)
