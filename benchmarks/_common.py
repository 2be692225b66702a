"""Small helpers shared by the benchmark scripts: timing, environment info, tables, JSON.

Nothing here imports JAX or torch at import time (the ceiling classes import theirs when
built), so a worker process of another virtual environment can use it too; versions are read
from the installed package metadata. Also: the worker protocol (:func:`spawn_worker`,
:func:`serve`, :class:`Worker`), pinning, the same-run ceilings, and the random official-key
RWKV-4 checkpoint the inference benchmarks share.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
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


# ---- peers, pinning and worker processes ---------------------------------------------------
OFFICIAL_PYTHON = "/work/torchvenv/bin/python"  # torch 2.13 (CPU), rwkv 0.8.32, transformers
FIXTURES = "/work/shared/fixtures/tiny-rwkv"
XLA_ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def pin_prefix(threads: int, pin: bool = True) -> list[str]:
    """``taskset -c 0..threads-1`` (nothing when ``pin`` is false)."""
    return ["taskset", "-c", ",".join(map(str, range(threads)))] if pin else []


def worker_env(kind: str, threads: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of a worker: ``kind`` "jax" gets XLA single-threaded at ``threads == 1``;
    "torch" (official package / transformers) the official package's CPU settings (its own
    process sets ``torch.set_num_threads``)."""
    env = dict(os.environ)
    if kind == "jax" and threads == 1:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + XLA_ONE_THREAD).strip()
    if kind == "torch":
        env["RWKV_JIT_ON"], env["RWKV_CUDA_ON"] = env.get("RWKV_JIT_ON", "1"), "0"
    env.update(extra or {})
    return env


def spawn_worker(script: str, python: str, kind: str, argv: Sequence[str], *, threads: int,
                 pin: bool = True, env: dict[str, str] | None = None) -> "Worker":
    """Start ``python script --worker KIND argv...`` pinned to ``threads`` cores."""
    cmd = pin_prefix(threads, pin) + [python, os.path.abspath(script), "--worker", kind,
                                      "--threads", str(threads), *argv]
    return Worker(cmd, worker_env("torch" if kind in ("official", "hf") else "jax", threads,
                                  env))


def serve(make_runner: Callable[[], Any]) -> None:
    """The worker side of :class:`Worker`: build the runner, say ready, then answer requests
    ``{"op", "args", "timed"}`` with ``{"result"}`` or, when timed, ``{"wall", "cpu"}`` of the
    call. Replies go to the original stdout; everything else the process prints to stderr."""
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # library prints (and C-level output) must not corrupt the protocol
    t0 = time.perf_counter()
    runner = make_runner()
    info = {**getattr(runner, "info", {}), "setup_s": time.perf_counter() - t0,
            "env": env_info()}
    reply.write(json.dumps({"ready": True, "info": info}) + "\n")
    reply.flush()
    for line in sys.stdin:
        cmd = json.loads(line)
        fn = getattr(runner, cmd["op"])
        kw = cmd.get("args") or {}
        if cmd.get("timed"):
            wall, cpu = timed(lambda: fn(**kw))
            out = {"wall": wall, "cpu": cpu}
        else:
            out = {"result": fn(**kw)}
        reply.write(json.dumps(out, default=_jsonable) + "\n")
        reply.flush()


def _jsonable(x: Any) -> Any:
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x)}")


def ratio(x: float | None, ref: float | None) -> str:
    """``x / ref`` as "1.23x" ("-" when either is missing)."""
    return f"{x / ref:.2f}x" if x and ref else "-"


def load_line(label: str = "load average") -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return f"{label}: {' '.join(f'{x:.2f}' for x in load)}" if load else ""


# ---- ceilings: what one core does in each library (same run) -------------------------------
# name -> (description, a shape, b shape (2-D: a @ b.T, 1-D: a @ b), work per call: FLOP or
# bytes, unit). Each timed repetition makes CEILING_CALLS calls.
CEILINGS = {
    "gemm": ("fp32 GEMM [1024,768] x [3072,768]^T (prefill's FFN key)", (1024, 768),
             (3072, 768), 2 * 1024 * 768 * 3072, "GFLOP/s"),
    "gemv": ("fp32 gemv of the [50277,768] head (154 MB, weights streamed from DRAM)",
             (50277, 768), (768,), 50277 * 768 * 4, "GB/s"),
}
CEILING_CALLS = 4


class TorchCeilings:
    """:data:`CEILINGS` in torch (import torch only in a torch worker)."""

    def __init__(self):
        import torch
        self.torch = torch
        self.ops = {name: (torch.randn(*a), torch.randn(*b)) for name, (_, a, b, _, _)
                    in CEILINGS.items()}

    def ceiling(self, case: str) -> None:
        a, b = self.ops[case]
        with self.torch.no_grad():
            for _ in range(CEILING_CALLS):
                self.torch.mm(a, b.t()) if b.ndim == 2 else self.torch.mv(a, b)


class JaxCeilings:
    """:data:`CEILINGS` in XLA (import jax only in a JAX worker)."""

    def __init__(self):
        import jax
        import jax.numpy as jnp
        self.jax = jax
        key = jax.random.PRNGKey(0)
        mm = jax.jit(lambda a, b: jnp.einsum("ri,oi->ro", a, b))
        mv = jax.jit(lambda a, b: jnp.einsum("oi,i->o", a, b))
        self.ops = {name: (mm if len(bs) == 2 else mv, jax.random.normal(key, a_s),
                           jax.random.normal(key, bs))
                    for name, (_, a_s, bs, _, _) in CEILINGS.items()}
        for f, a, b in self.ops.values():
            f(a, b).block_until_ready()

    def ceiling(self, case: str) -> None:
        f, a, b = self.ops[case]
        self.jax.block_until_ready([f(a, b) for _ in range(CEILING_CALLS)])


def ceiling_rate(case: str, runs: Sequence[tuple[float, float]]) -> float:
    """GFLOP/s or GB/s of a ceiling case from its timed runs (best run)."""
    return CEILINGS[case][3] * CEILING_CALLS / min(w for w, _ in runs) / 1e9


# ---- a random official-format RWKV-4 checkpoint --------------------------------------------
def random_rwkv4(L: int, C: int, V: int, seed: int = 0) -> dict:
    """Random RWKV-4 tensors (numpy float32) under the official keys (reference §2.3) with
    sane activations.

    LayerNorms are identity (weight 1, bias 0); time_decay/time_first/time_mix follow the
    official init (§2.4); matrices are N(0, 1/in) so projections keep unit scale, with the
    two residual outputs (att.output, ffn.value) scaled down by sqrt(2L) as in GPT-2 so the
    residual stream stays O(1) through the layers.
    """
    import numpy as np
    rng = np.random.default_rng(seed)
    F = 4 * C
    f32 = np.float32

    def mat(d_out, d_in, scale=1.0):
        w = rng.standard_normal((d_out, d_in), dtype=f32)
        w *= f32(scale / math.sqrt(d_in))
        return w

    def ln(prefix):
        return {f"{prefix}.weight": np.ones(C, f32), f"{prefix}.bias": np.zeros(C, f32)}

    out_scale = 1.0 / math.sqrt(2 * L)
    h = np.arange(C, dtype=np.float64)
    ddd = h / C
    zigzag = ((h + 1) % 3) - 1
    t = {"emb.weight": rng.standard_normal((V, C), dtype=f32), **ln("blocks.0.ln0")}
    for i in range(L):
        r01 = i / (L - 1) if L > 1 else 0.0
        r10 = 1.0 - i / L
        p = f"blocks.{i}."
        t.update(ln(p + "ln1"))
        t.update(ln(p + "ln2"))
        t[p + "att.time_decay"] = (-5 + 8 * (h / (C - 1)) ** (0.7 + 1.3 * r01)).astype(f32)
        t[p + "att.time_first"] = (math.log(0.3) + 0.5 * zigzag).astype(f32)
        for name, val in (("k", ddd ** r10), ("v", ddd ** r10 + 0.3 * r01),
                          ("r", ddd ** (0.5 * r10))):
            t[f"{p}att.time_mix_{name}"] = val.astype(f32).reshape(1, 1, C)
        for name in ("key", "value", "receptance"):
            t[f"{p}att.{name}.weight"] = mat(C, C)
        t[p + "att.output.weight"] = mat(C, C, out_scale)
        t[p + "ffn.time_mix_k"] = (ddd ** r10).astype(f32).reshape(1, 1, C)
        t[p + "ffn.time_mix_r"] = (ddd ** r10).astype(f32).reshape(1, 1, C)
        t[p + "ffn.key.weight"] = mat(F, C)
        t[p + "ffn.receptance.weight"] = mat(C, C)
        t[p + "ffn.value.weight"] = mat(C, F, out_scale)
    t.update(ln("ln_out"))
    t["head.weight"] = mat(V, C)
    return t


def checkpoint_path(cache_dir: str, L: int, C: int, V: int, seed: int) -> str:
    """Path of the cached random RWKV-4 ``.pth`` (official keys), written on first use (needs
    rwkv_jax: call it from the driver, not a torch worker)."""
    path = os.path.join(cache_dir, f"rwkv4-random-L{L}-C{C}-V{V}-seed{seed}.pth")
    if not os.path.exists(path):
        from rwkv_jax.io.pth import write_pth
        os.makedirs(cache_dir, exist_ok=True)
        t0 = time.perf_counter()
        write_pth(random_rwkv4(L, C, V, seed), path)  # atomic (temp file + rename)
        print(f"wrote {path} ({os.path.getsize(path) / 2**20:.0f} MiB) in "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return path


def token_ids(n: int, V: int, seed: int) -> list[int]:
    """The same pseudo-random token ids in every worker."""
    import numpy as np
    return np.random.default_rng(seed).integers(0, V, size=n).tolist()
