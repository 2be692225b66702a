"""Small helpers shared by the benchmark scripts: timing, environment info, tables, JSON.

Nothing here imports JAX or torch, so a helper process of another virtual environment can
use it too; versions are read from the installed package metadata.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import time
from typing import Any, Callable, Sequence


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """Run ``fn()`` once (it must block until its work is done): (wall s, process CPU s).

    CPU time counts every thread of the process, so ``cpu / wall`` is the number of cores
    the call kept busy (below 1 when the machine is shared and the process waited).
    """
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def bench(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 5) -> dict[str, Any]:
    """Call ``fn`` ``warmup`` times untimed (compilation), then time it ``repeats`` times.

    Returns ``{"median_s", "min_s", "times_s", "cpu_util"}``; ``cpu_util`` is the median
    of CPU time / wall time per repetition.
    """
    for _ in range(warmup):
        fn()
    runs = [timed(fn) for _ in range(repeats)]
    return summarize(runs)


def summarize(runs: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """Median/min of ``(wall, cpu)`` pairs as returned by :func:`timed`."""
    walls = [w for w, _ in runs]
    return {"median_s": statistics.median(walls), "min_s": min(walls), "times_s": walls,
            "cpu_util": statistics.median(c / w for w, c in runs if w > 0)}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def env_info(packages: Sequence[str] = ("jax", "jaxlib", "flax", "numpy", "torch")) -> dict:
    """Python, CPU and package versions of the current interpreter (None = not installed)."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        pass
    isa = [x for x in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {x}" in flags]
    return {
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "isa": isa,
        "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "packages": {p: _version(p) for p in packages},
    }


def format_env(info: dict) -> str:
    """One human-readable line per item of :func:`env_info`."""
    pk = ", ".join(f"{k} {v}" for k, v in info["packages"].items() if v)
    load = info.get("load_avg")
    return "\n".join([
        f"CPU: {info['cpu']} ({info['cpu_count']} logical CPUs; {' '.join(info['isa'])})",
        f"Python {info['python']}; {pk}",
        f"load average at start: {' '.join(f'{x:.2f}' for x in load)}" if load else "",
    ]).strip()


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(map(str, headers)) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON (parent directories created)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")


class Worker:
    """A benchmark worker subprocess speaking one JSON line per request and per reply.

    Each implementation runs in its own process (its own threads, pinning and environment),
    so peers measured in one run never share an interpreter.
    """

    def __init__(self, cmd: Sequence[str], env: dict[str, str]):
        self.cmd = list(cmd)
        self.proc = subprocess.Popen(self.cmd, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        self.info = None

    def recv(self) -> Any:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker died (exit {self.proc.wait()}): {' '.join(self.cmd)}")
        return json.loads(line)

    def request(self, **msg: Any) -> Any:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        return self.recv()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()
