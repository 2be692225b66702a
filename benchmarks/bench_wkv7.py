"""Time every RWKV-7 WKV form, forward and forward+backward, on the default JAX device.

Each form is jitted, warmed up once, then timed ``--repeats`` times; the median is printed in
ms with the ratio to the ``lax.scan`` form measured in the same run. The loss for the
backward pass is ``sum(y) + sum(final_state)``, differentiated w.r.t. all seven inputs.

    python benchmarks/bench_wkv7.py                       # B=8 T=512 H=8 N=64 fp32
    python benchmarks/bench_wkv7.py --chunks 16 32 64 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from rwkv_jax.ops.wkv7 import DEFAULT_CHUNK, wkv7_chunked, wkv7_scan


def make_inputs(B, T, H, N, dtype, seed=0):
    """Model-like inputs: w ∈ (-0.6065, 0), a = -kk, b = kk·α with kk unit-norm per head."""
    rng = np.random.default_rng(seed)
    shape = (B, T, H, N)
    r = rng.normal(size=shape)
    k = rng.normal(size=shape) / np.sqrt(N)
    v = rng.normal(size=shape)
    w = -np.exp(-0.5) / (1 + np.exp(-rng.normal(size=shape)))
    kk = rng.normal(size=shape)
    kk /= np.linalg.norm(kk, axis=-1, keepdims=True)
    alpha = rng.uniform(size=shape)
    S = 0.1 * rng.normal(size=(B, H, N, N))
    xs = [jnp.asarray(x, dtype) for x in (r, w, k, v, -kk, kk * alpha)]
    return xs + [jnp.asarray(S, jnp.float32)]


def timeit(fn, args, repeats):
    jax.block_until_ready(fn(*args))  # compile + warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--time", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-size", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--chunks", type=int, nargs="+", default=[DEFAULT_CHUNK])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = p.parse_args(argv)

    xs = make_inputs(args.batch, args.time, args.heads, args.head_size, jnp.dtype(args.dtype))
    forms = {"scan": wkv7_scan}
    for c in args.chunks:
        forms[f"chunked{c}"] = lambda *x, c=c: wkv7_chunked(*x, chunk_size=c)

    def loss(f):
        def l(*x):
            y, S = f(*x)
            return jnp.sum(y.astype(jnp.float32)) + jnp.sum(S)
        return l

    rows = []
    for name, f in forms.items():
        fwd = jax.jit(f)
        bwd = jax.jit(jax.grad(loss(f), argnums=tuple(range(7))))
        rows.append({"form": name, "fwd_ms": timeit(fwd, xs, args.repeats),
                     "fwd_bwd_ms": timeit(bwd, xs, args.repeats)})
    base = rows[0]
    for row in rows:
        row["fwd_vs_scan"] = row["fwd_ms"] / base["fwd_ms"]
        row["fwd_bwd_vs_scan"] = row["fwd_bwd_ms"] / base["fwd_bwd_ms"]

    meta = {"device": str(jax.devices()[0]), "backend": jax.default_backend(),
            "B": args.batch, "T": args.time, "H": args.heads, "N": args.head_size,
            "dtype": args.dtype, "repeats": args.repeats}
    if args.json:
        print(json.dumps({"config": meta, "results": rows}, indent=2))
        return
    print(" ".join(f"{k}={v}" for k, v in meta.items()))
    print(f"{'form':<12}{'fwd ms':>10}{'x scan':>8}{'fwd+bwd ms':>13}{'x scan':>8}")
    for row in rows:
        print(f"{row['form']:<12}{row['fwd_ms']:>10.2f}{row['fwd_vs_scan']:>8.2f}"
              f"{row['fwd_bwd_ms']:>13.2f}{row['fwd_bwd_vs_scan']:>8.2f}")


if __name__ == "__main__":
    main()
