"""Time every WKV form, the Pallas kernels included, fwd and fwd+bwd, against FLA's kernels.

    python benchmarks/bench_kernels.py                          # B=8 T=4096 C=2048 (GPU shape)
    python benchmarks/bench_kernels.py --versions 7 --forms pallas chunked --json out.json
    python benchmarks/bench_kernels.py --B 1 --T 64 --C 128 --no-fla   # a CPU smoke run

Forms: RWKV-4 scan / associative / pallas (fp32, like the official CUDA kernel's numbers);
RWKV-6 scan / chunked / pallas and RWKV-7 scan / chunked / pallas (bf16 inputs, fp32 state;
v6/v7 heads of ``--head-size``). RWKV-6's associative form is left out: it materialises a
[B, T, H, N, N] float32 state per token (17 GB at the default shape). flash-linear-attention's
chunk_rwkv6 / chunk_rwkv7 run first, in their own process (benchmarks/bench_fla.py; torch
must not meet JAX's preallocated GPU memory), when ``fla`` is importable.

Each entry is jitted, run once (compile + first run, reported) and ``--warmup - 1`` more
times, then timed ``--repeats`` times; the median is printed in ms with its ratio to the
same version's Pallas kernel. Forward+backward is ``jax.grad`` of <y, gy> + <state, gs>
w.r.t. every input and the initial state. An entry that fails (or would start after
``--deadline-s``) is recorded with its reason and the run goes on. On a CPU the kernels run
in interpret mode: their times there say nothing about the kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import bench, env_info  # noqa: E402

from rwkv_jax.kernels.wkv4 import wkv4_pallas  # noqa: E402
from rwkv_jax.kernels.wkv6 import wkv6_pallas  # noqa: E402
from rwkv_jax.kernels.wkv7 import wkv7_pallas  # noqa: E402
from rwkv_jax.ops.wkv4 import Wkv4State, wkv4_associative, wkv4_scan  # noqa: E402
from rwkv_jax.ops.wkv6 import wkv6_chunked, wkv6_scan  # noqa: E402
from rwkv_jax.ops.wkv7 import wkv7_chunked, wkv7_scan  # noqa: E402

FORMS = {
    4: {"pallas": wkv4_pallas, "associative": wkv4_associative, "scan": wkv4_scan},
    6: {"pallas": wkv6_pallas, "chunked": wkv6_chunked, "scan": wkv6_scan},
    7: {"pallas": wkv7_pallas, "chunked": wkv7_chunked, "scan": wkv7_scan},
}


def make_inputs(version, B, T, C, N, dtype, seed=0):
    """Model-like inputs and cotangents (numpy -> device arrays). v4: ``(w, u, k, v,
    state)``; v6: ``(r, w, k, v, u, S0)``; v7: ``(r, w, k, v, a, b, S0)``."""
    rng = np.random.default_rng(seed)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    if version == 4:
        w = -np.exp(rng.uniform(np.log(1e-3), np.log(3.0), C))
        k, v = rng.standard_normal((2, B, T, C))
        state = Wkv4State(f32(rng.standard_normal((B, C))), f32(rng.uniform(0.5, 2, (B, C))),
                          f32(rng.standard_normal((B, C))))
        args = (f32(w), f32(rng.uniform(-1, 1, C)), cast(k), cast(v), state)
        cot = (f32(rng.standard_normal((B, T, C))), *(f32(rng.standard_normal((B, C)))
                                                      for _ in range(3)))
        return args, cot
    H = C // N
    shape = (B, T, H, N)
    S0 = f32(0.1 * rng.standard_normal((B, H, N, N)))
    cot = (f32(rng.standard_normal(shape)), f32(rng.standard_normal((B, H, N, N))))
    r, v = rng.standard_normal((2, *shape))
    if version == 6:
        w = -np.exp(rng.uniform(np.log(1e-3), np.log(3.0), shape))
        k = rng.standard_normal(shape)
        return (cast(r), cast(w), cast(k), cast(v), f32(0.5 * rng.standard_normal((H, N))),
                S0), cot
    kk = rng.standard_normal(shape)
    kk /= np.linalg.norm(kk, axis=-1, keepdims=True)
    w = -np.exp(-0.5) / (1 + np.exp(-rng.standard_normal(shape)))
    k = rng.standard_normal(shape) / np.sqrt(N)
    return (cast(r), cast(w), cast(k), cast(v), cast(-kk),
            cast(kk * rng.uniform(size=shape)), S0), cot


def build(f):
    """(jitted forward, jitted forward+backward) of a form ``f(*args) -> (y, state)``."""
    def loss(args, cot):
        y, s = f(*args)
        leaves = jax.tree_util.tree_leaves(s)
        return (jnp.sum(y.astype(jnp.float32) * cot[0])
                + sum(jnp.sum(x * g) for x, g in zip(leaves, cot[1:])))
    return jax.jit(f), jax.jit(jax.grad(loss))


def run_fla(a):
    """bench_fla.py in its own process: (rows, errors, versions seen there)."""
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                        "bench_fla.py"),
           "--B", str(a.B), "--T", str(a.T), "--C", str(a.C), "--head-size", str(a.head_size),
           "--warmup", str(a.warmup), "--repeats", str(a.repeats),
           "--versions", *[str(v) for v in a.versions if v in (6, 7)]]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.fla_timeout_s,
                           check=False)
        out = json.loads(p.stdout.strip().splitlines()[-1])
        return out["results"], out["errors"], {k: out.get(k) for k in ("fla", "torch", "device")}
    except Exception as e:  # noqa: BLE001 - recorded with the results
        tail = getattr(e, "stderr", None) or ""
        tail = (tail.decode(errors="replace") if isinstance(tail, bytes) else tail)[-500:]
        return [], [f"bench_fla.py failed: {type(e).__name__}: {e} {tail}"], {}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, default=8)
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--C", type=int, default=2048)
    p.add_argument("--head-size", type=int, default=64)
    p.add_argument("--versions", type=int, nargs="+", default=[4, 6, 7], choices=[4, 6, 7])
    p.add_argument("--forms", nargs="+", default=None,
                   help="subset of pallas, scan, associative (v4), chunked (v6/v7)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="v6/v7 sequence inputs (v4 always float32)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--deadline-s", type=float, default=float("inf"),
                   help="start no new entry after this many seconds")
    p.add_argument("--no-fla", action="store_true")
    p.add_argument("--fla-timeout-s", type=float, default=150)
    p.add_argument("--json", metavar="PATH")
    a = p.parse_args(argv)
    t_start = time.perf_counter()

    rows, errors, fla_env = [], [], {}
    if not a.no_fla and any(v in (6, 7) for v in a.versions):  # before JAX takes the GPU
        rows, errors, fla_env = run_fla(a)
        for r in rows:
            print(f"  v{r['version']} fla {r['pass']:8s} {r['median_ms']:9.2f} ms",
                  file=sys.stderr, flush=True)

    inputs = {}
    # the kernels first, the slow lax.scan forms last: what the deadline cuts is least needed
    order = ("pallas", "chunked", "associative", "scan")
    entries = [(v, name) for name in order for v in a.versions if name in FORMS[v]
               and (not a.forms or name in a.forms)]
    for version, name in entries:
        dtype = jnp.float32 if version == 4 else jnp.dtype(a.dtype)
        if version not in inputs:
            inputs[version] = make_inputs(version, a.B, a.T, a.C, a.head_size, dtype)
        args, cot = inputs[version]
        fwd, fwd_bwd = build(FORMS[version][name])
        for pass_, fn, fn_args in (("fwd", fwd, args), ("fwd+bwd", fwd_bwd, (args, cot))):
            if time.perf_counter() - t_start > a.deadline_s:
                errors.append(f"v{version} {name} {pass_}: skipped (deadline)")
                continue
            try:
                t0 = time.perf_counter()
                jax.block_until_ready(fn(*fn_args))
                first = time.perf_counter() - t0
                res = bench(lambda fn=fn, fn_args=fn_args: jax.block_until_ready(fn(*fn_args)),
                            warmup=max(a.warmup - 1, 0), repeats=a.repeats)
            except Exception as e:  # noqa: BLE001
                tb = " | ".join(traceback.format_exc().strip().splitlines()[-3:])
                errors.append(f"v{version} {name} {pass_}: {type(e).__name__}: "
                              f"{str(e)[:300]} | {tb[:600]}")
                continue
            rows.append({"version": version, "form": name, "pass": pass_,
                         "dtype": jnp.dtype(dtype).name, "median_ms": res["median_s"] * 1e3,
                         "runs_ms": [t * 1e3 for t in res["times_s"]],
                         "compile_and_first_s": first})
            print(f"  v{version} {name:11s} {pass_:8s} {res['median_s'] * 1e3:9.2f} ms "
                  f"(first call {first:6.1f} s)", file=sys.stderr, flush=True)
    rows.sort(key=lambda r: (r["version"], order.index(r["form"]) if r["form"] in order else -1))

    for r in rows:
        base = next((b["median_ms"] for b in rows if b["version"] == r["version"]
                     and b["form"] == "pallas" and b["pass"] == r["pass"]), None)
        r["ratio_to_pallas"] = r["median_ms"] / base if base else None

    dev = jax.devices()[0]
    print(f"WKV forms, B={a.B} T={a.T} C={a.C} (v6/v7: {a.C // a.head_size} heads of "
          f"{a.head_size}), median of {a.repeats} ms; device {dev.platform}:{dev.device_kind}, "
          f"jax {jax.__version__}; ratio = time / the Pallas kernel's (same version, pass)")
    print("| version | form | dtype | fwd ms | x pallas | fwd+bwd ms | x pallas |")
    print("|---|---|---|---:|---:|---:|---:|")
    seen = []
    for r in rows:
        key = (r["version"], r["form"])
        if key in seen:
            continue
        seen.append(key)
        cells = []
        for pass_ in ("fwd", "fwd+bwd"):
            m = next((x for x in rows if (x["version"], x["form"], x["pass"]) == (*key, pass_)),
                     None)
            ratio = m and m["ratio_to_pallas"]
            cells += [f"{m['median_ms']:.2f}" if m else "-", f"{ratio:.2f}" if ratio else "-"]
        print(f"| {key[0]} | {key[1]} | {r['dtype']} | " + " | ".join(cells) + " |")
    for e in errors:
        print(f"NOTE: {e}")

    if a.json:
        payload = {"config": {k: getattr(a, k) for k in ("B", "T", "C", "head_size", "versions",
                                                         "dtype", "warmup", "repeats")},
                   "device": f"{dev.platform}:{dev.device_kind}", "env": env_info(),
                   "fla": fla_env, "results": rows, "errors": errors,
                   "wall_s": time.perf_counter() - t_start}
        with open(a.json, "w") as fh:
            json.dump(payload, fh, indent=2)
            fh.write("\n")


if __name__ == "__main__":
    main()
