"""Time the RWKV-4 WKV forms: forward and forward+backward, jitted, on the default device.

Each form is compiled and run ``--warmup`` times before timing (compile excluded), then timed
``--repeats`` times; the table gives the median in ms and its ratio to the ``lax.scan`` form
measured in the same run (absolute times on a shared CPU are noisy; ratios are the signal).
Forward+backward is ``jax.grad`` of ``sum(y)`` w.r.t. (k, v, w, u).

    python benchmarks/bench_wkv4.py                      # B=8, T=512, C=512, fp32
    python benchmarks/bench_wkv4.py --json results.json  # also write the numbers ("-": stdout)
    python benchmarks/bench_wkv4.py --forms pallas       # the Pallas kernels (GPU: Triton)

The Pallas form is timed only when asked for (``--forms``): on CPU it runs in Pallas'
interpret mode, which says nothing about the kernel's speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from rwkv_jax.kernels.wkv4 import wkv4_pallas
from rwkv_jax.ops.wkv4 import wkv4, wkv4_associative, wkv4_scan

FORMS = {
    "scan": wkv4_scan,
    "associative": wkv4_associative,
    "wkv4[auto]": wkv4,
    "pallas": wkv4_pallas,
}
DEFAULT_FORMS = ["scan", "associative", "wkv4[auto]"]


def _inputs(B, T, C, dtype, seed=0):
    """Realistic magnitudes: per-step decay e^w in (0.05, 0.999), |k| ~ 1, v ~ N(0, 1)."""
    rng = np.random.default_rng(seed)
    w = -np.exp(rng.uniform(np.log(1e-3), np.log(3.0), C))
    u = rng.uniform(-1.0, 1.0, C)
    k = rng.standard_normal((B, T, C))
    v = rng.standard_normal((B, T, C))
    return (jnp.asarray(w, jnp.float32), jnp.asarray(u, jnp.float32),
            jnp.asarray(k, dtype), jnp.asarray(v, dtype))


def _time(fn, args, warmup, repeats):
    """(compile + first-run seconds, median ms, all ms) of a jitted ``fn(*args)``."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        jax.block_until_ready(fn(*args))
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        runs.append((time.perf_counter() - t0) * 1e3)
    return first, statistics.median(runs), runs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, default=8)
    p.add_argument("--T", type=int, default=512)
    p.add_argument("--C", type=int, default=512)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per entry (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs, compile included")
    p.add_argument("--forms", nargs="+", choices=list(FORMS), default=DEFAULT_FORMS)
    p.add_argument("--json", nargs="?", const="-", metavar="PATH",
                   help="write the results as JSON to PATH ('-' or no PATH: stdout)")
    a = p.parse_args(argv)
    if "scan" not in a.forms:
        a.forms = ["scan", *a.forms]  # the baseline of the ratios

    w, u, k, v = _inputs(a.B, a.T, a.C, jnp.dtype(a.dtype))
    results = []
    for name in a.forms:
        f = FORMS[name]
        fwd = jax.jit(lambda w, u, k, v, f=f: f(w, u, k, v)[0])
        loss = lambda k, v, w, u, f=f: jnp.sum(f(w, u, k, v)[0].astype(jnp.float32))  # noqa: E731
        bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
        for mode, fn, args in (("fwd", fwd, (w, u, k, v)), ("fwd+bwd", bwd, (k, v, w, u))):
            first, med, runs = _time(fn, args, max(a.warmup, 1), a.repeats)
            results.append({"form": name, "mode": mode, "median_ms": med, "runs_ms": runs,
                            "compile_and_first_s": first})
            print(f"  {name:12s} {mode:8s} median {med:9.2f} ms  (first call {first:5.1f} s)",
                  file=sys.stderr, flush=True)

    base = {r["mode"]: r["median_ms"] for r in results if r["form"] == "scan"}
    for r in results:
        r["ratio_to_scan"] = r["median_ms"] / base[r["mode"]]

    dev = jax.devices()[0]
    header = (f"WKV-4 B={a.B} T={a.T} C={a.C} {a.dtype}, jit, median of {a.repeats} "
              f"(warm-up {a.warmup} excluded); device {dev.platform}:{dev.device_kind}, "
              f"{os.cpu_count()} CPUs, jax {jax.__version__}")
    print(header)
    print(f"| {'form':12s} | {'fwd ms':>9s} | {'x scan':>6s} "
          f"| {'fwd+bwd ms':>10s} | {'x scan':>6s} |")
    print(f"|{'-' * 14}|{'-' * 10}:|{'-' * 7}:|{'-' * 11}:|{'-' * 7}:|")
    for name in a.forms:
        f_, b_ = (next(r for r in results if r["form"] == name and r["mode"] == m)
                  for m in ("fwd", "fwd+bwd"))
        print(f"| {name:12s} | {f_['median_ms']:9.2f} | {f_['ratio_to_scan']:6.2f} "
              f"| {b_['median_ms']:10.2f} | {b_['ratio_to_scan']:6.2f} |")

    if a.json:
        payload = {"config": {k_: getattr(a, k_) for k_ in ("B", "T", "C", "dtype", "repeats",
                                                            "warmup")},
                   "device": f"{dev.platform}:{dev.device_kind}", "cpus": os.cpu_count(),
                   "jax": jax.__version__, "python": platform.python_version(),
                   "results": results}
        text = json.dumps(payload, indent=2)
        if a.json == "-":
            print(text)
        else:
            with open(a.json, "w") as fh:
                fh.write(text + "\n")


if __name__ == "__main__":
    main()
