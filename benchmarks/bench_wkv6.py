"""Time every RWKV-5/6 WKV form, forward and forward+backward, jitted, median of runs.

    python benchmarks/bench_wkv6.py                      # B=8 T=512 H=8 N=64 fp32
    python benchmarks/bench_wkv6.py --T 256 --json       # JSON on stdout
    python benchmarks/bench_wkv6.py --json out.json      # table, and JSON written to a file

Ratios are to the scan form measured in the same run (absolute times on a shared CPU are
noisy; the load average at start is recorded). Inputs are
random with decays over the whole RWKV-6 range (lw = -exp(w_raw), w_raw in [-11.5, 5]).
The backward pass is jax.grad of <y, gy> + <S, gS> w.r.t. r, w, k, v, u and the state.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from rwkv_jax.ops.wkv6 import wkv6_associative, wkv6_chunked, wkv6_scan

FORMS = {"scan": wkv6_scan, "chunked": wkv6_chunked, "associative": wkv6_associative}


def make_inputs(B, T, H, N, seed=0):
    rng = np.random.default_rng(seed)
    r, k, v = (jnp.asarray(rng.standard_normal((B, T, H, N)), jnp.float32) for _ in range(3))
    w = jnp.asarray(-np.exp(rng.uniform(np.log(1e-5), np.log(150.0), (B, T, H, N))),
                    jnp.float32)
    u = jnp.asarray(rng.uniform(-1.0, 1.0, (H, N)), jnp.float32)
    S0 = jnp.asarray(rng.standard_normal((B, H, N, N)), jnp.float32)
    gy = jnp.asarray(rng.standard_normal((B, T, H, N)), jnp.float32)
    gS = jnp.asarray(rng.standard_normal((B, H, N, N)), jnp.float32)
    return (r, w, k, v, u, S0), (gy, gS)


def build(f):
    """(jitted forward, jitted forward+backward) for form ``f``."""
    fwd = jax.jit(f)

    def loss(args, cot):
        y, S = f(*args)
        return jnp.sum(y * cot[0]) + jnp.sum(S * cot[1])

    return fwd, jax.jit(jax.grad(loss))


def time_ms(fn, *args, repeats):
    """(compile + first run in ms, median of ``repeats`` further runs in ms)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = (time.perf_counter() - t0) * 1e3
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        runs.append((time.perf_counter() - t0) * 1e3)
    return first, statistics.median(runs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, default=8)
    p.add_argument("--T", type=int, default=512)
    p.add_argument("--H", type=int, default=8)
    p.add_argument("--N", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--forms", default="scan,chunked,associative",
                   help="comma-separated subset of " + ",".join(FORMS) + " (scan always runs)")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="write the numbers as JSON to PATH ('-' or no PATH: stdout only)")
    a = p.parse_args(argv)

    load = [round(x, 2) for x in os.getloadavg()]
    names = ["scan"] + [n for n in a.forms.split(",") if n and n != "scan"]
    args, cot = make_inputs(a.B, a.T, a.H, a.N)
    rows = []
    for name in names:
        f = FORMS[name]
        if name == "chunked":
            f = lambda *x, _cs=a.chunk_size: wkv6_chunked(*x, chunk_size=_cs)  # noqa: E731
        fwd, fwd_bwd = build(f)
        for pass_, fn, fn_args in (("fwd", fwd, args), ("fwd+bwd", fwd_bwd, (args, cot))):
            first, med = time_ms(fn, *fn_args, repeats=a.repeats)
            rows.append({"form": name, "pass": pass_, "median_ms": med, "first_call_ms": first})
    base = {r["pass"]: r["median_ms"] for r in rows if r["form"] == "scan"}
    for r in rows:
        r["ratio_to_scan"] = r["median_ms"] / base[r["pass"]]

    config = {"B": a.B, "T": a.T, "H": a.H, "N": a.N, "dtype": "float32",
              "chunk_size": a.chunk_size, "repeats": a.repeats,
              "backend": jax.default_backend(), "device": str(jax.devices()[0]),
              "jax": jax.__version__, "load_avg_at_start": load}
    if a.json == "-":
        print(json.dumps({"config": config, "results": rows}, indent=2))
        return
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"config": config, "results": rows}, f, indent=2)
            f.write("\n")
    print(" ".join(f"{k}={v}" for k, v in config.items()))
    print(f"{'form':<12} {'pass':<8} {'median ms':>10} {'vs scan':>8} {'1st call ms':>12}")
    for r in rows:
        print(f"{r['form']:<12} {r['pass']:<8} {r['median_ms']:>10.1f} "
              f"{r['ratio_to_scan']:>7.2f}x {r['first_call_ms']:>12.0f}")


if __name__ == "__main__":
    main()
