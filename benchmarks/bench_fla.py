"""Time flash-linear-attention's chunk_rwkv6 / chunk_rwkv7 (PyTorch + Triton), fwd and fwd+bwd.

The peer numbers for benchmarks/bench_kernels.py, which runs this in its own process (torch
and JAX each want the GPU's memory; this process imports no JAX). Needs ``fla-core`` (and
einops) importable; prints one JSON object on stdout, also when FLA is missing (the reason
is recorded per entry).

    python benchmarks/bench_fla.py --B 8 --T 4096 --C 2048 --head-size 64 --versions 6 7

Inputs are bf16 like the model's, w the log decay (v6: -exp(w_raw); v7: in (-0.6065, 0)),
a float32 initial state; fwd+bwd is ``backward`` of <o, go> + <h_T, gh> w.r.t. every input
and the initial state. Timed with CUDA events: median of ``--repeats`` after ``--warmup``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import traceback


def _time(fn, warmup, repeats):
    import torch
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), times


def _inputs(version, B, T, H, N, seed=0):
    import torch
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev, bf = "cuda", torch.bfloat16

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device=dev) * scale

    shape = (B, T, H, N)
    if version == 6:
        w = -torch.exp(torch.empty(shape, device=dev).uniform_(math.log(1e-3), math.log(3.0),
                                                                 generator=g))
        xs = {"r": rnd(*shape), "k": rnd(*shape), "v": rnd(*shape), "w": w,
              "u": rnd(H, N, scale=0.5)}
    else:
        kk = torch.nn.functional.normalize(rnd(*shape), dim=-1)
        alpha = torch.rand(shape, generator=g, device=dev)
        xs = {"r": rnd(*shape), "w": -math.exp(-0.5) * torch.sigmoid(rnd(*shape)),
              "k": rnd(*shape, scale=N ** -0.5), "v": rnd(*shape), "a": -kk, "b": kk * alpha}
    xs = {n: x.to(bf).requires_grad_() for n, x in xs.items()}
    h0 = rnd(B, H, N, N, scale=0.1).requires_grad_()
    return xs, h0


def _run(version, xs, h0):
    if version == 6:
        from fla.ops.rwkv6 import chunk_rwkv6
        return chunk_rwkv6(xs["r"], xs["k"], xs["v"], xs["w"], xs["u"], scale=1.0,
                           initial_state=h0, output_final_state=True)
    from fla.ops.rwkv7 import chunk_rwkv7
    return chunk_rwkv7(xs["r"], xs["w"], xs["k"], xs["v"], xs["a"], xs["b"], scale=1.0,
                       initial_state=h0, output_final_state=True)


def bench(version, B, T, C, N, warmup, repeats):
    import torch
    H = C // N
    xs, h0 = _inputs(version, B, T, H, N)
    o, ht = _run(version, xs, h0)
    go, gh = torch.randn_like(o), torch.randn_like(ht)
    leaves = [*xs.values(), h0]

    def fwd():
        with torch.no_grad():
            _run(version, xs, h0)

    def fwd_bwd():
        o, ht = _run(version, xs, h0)
        torch.autograd.grad((o * go).sum() + (ht * gh).sum(), leaves)

    rows = []
    for pass_, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        med, times = _time(fn, warmup, repeats)
        rows.append({"version": version, "form": "fla", "pass": pass_, "median_ms": med,
                     "runs_ms": times, "dtype": "bfloat16"})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, default=8)
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--C", type=int, default=2048)
    p.add_argument("--head-size", type=int, default=64)
    p.add_argument("--versions", type=int, nargs="+", default=[6, 7], choices=[6, 7])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    a = p.parse_args(argv)
    out = {"results": [], "errors": []}
    try:
        import fla
        import torch
        out["fla"] = getattr(fla, "__version__", "?")
        out["torch"] = torch.__version__
        out["device"] = torch.cuda.get_device_name()
    except Exception as e:  # noqa: BLE001 - recorded, the caller prints it
        out["errors"].append(f"flash-linear-attention unavailable: {type(e).__name__}: {e}")
        print(json.dumps(out))
        return
    for version in a.versions:
        try:
            out["results"] += bench(version, a.B, a.T, a.C, a.head_size, a.warmup, a.repeats)
        except Exception as e:  # noqa: BLE001
            tb = traceback.format_exc().strip().splitlines()[-3:]
            out["errors"].append(f"chunk_rwkv{version}: {type(e).__name__}: {e} | {' | '.join(tb)}")
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
