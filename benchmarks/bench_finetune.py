"""Fine-tuning throughput on CPU: full, LoRA and state tuning of the 169M RWKV-4 shape, one run.

For each ``--methods`` x ``--dtypes`` case, one fresh process builds the real fine-tuning
set-up (:class:`rwkv_jax.train.trainer.Trainer` with ``finetune.init_from`` a random
checkpoint of ``--shape``, official keys, the file bench_inference.py writes;
``finetune.method=<m>``; ``model.compute_dtype=<dtype>``) and reports the trainable
parameters, the optimizer-state bytes, the compile time of the train step and its tokens/s
(median of ``--steps`` after one warm-up step, ``--batch`` x ``--ctx`` tokens a step), with
the ratio to full fine-tuning at the same dtype in the same run. The data is the default
corpus (the standard library's source, bytes: vocabulary 256 < the checkpoint's, so the
model's vocabulary stays the checkpoint's). ::

    python benchmarks/bench_finetune.py --json out/finetune.json
    python benchmarks/bench_finetune.py --shape 2,64,256 --steps 2        # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def worker(args) -> dict:
    import jax
    import numpy as np

    from rwkv_jax.train.config import load_config
    from rwkv_jax.train.trainer import Trainer

    out = tempfile.mkdtemp(prefix="bench-ft-")
    cfg = load_config(None, [
        f"out_dir={out}", f"finetune.init_from={args.ckpt}", f"finetune.method={args.method}",
        f"model.compute_dtype={args.dtype}", f"train.batch_size={args.batch}",
        f"data.ctx_len={args.ctx}", "data.max_bytes=2000000", f"data.cache_dir={out}/cache",
        "logging.progress=false", "data.tokenizer=bytes"])
    t = Trainer(cfg)
    opt_bytes = sum(x.nbytes for x in jax.tree.leaves(t.state.opt_state)
                    if np.issubdtype(x.dtype, np.floating))
    batch = t.global_batch(0)
    t0 = time.perf_counter()
    compiled = t.train_step.lower(t.state, batch).compile()
    compile_s = time.perf_counter() - t0
    state, m = compiled(t.state, batch)
    jax.block_until_ready(m)
    runs = []
    for i in range(args.steps):
        b = t.global_batch(i + 1)

        def step(b=b):
            nonlocal state, m
            state, m = compiled(state, b)
            jax.block_until_ready((state, m))
        runs.append(_common.timed(step))
    s = _common.summarize(runs)
    return {"method": args.method, "dtype": args.dtype, "trainable": t.n_params,
            "total": t.n_total, "opt_bytes": opt_bytes, "compile_s": compile_s,
            "step_s": s["median_s"], "tokens_per_s": args.batch * args.ctx / s["median_s"],
            "loss": float(m["loss"])}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="12,768,50277", help="L,C,V (default: 169M shape)")
    ap.add_argument("--methods", default="full,lora,state")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    ap.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "rwkv_jax_bench"))
    ap.add_argument("--json")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    L, C, V = (int(x) for x in args.shape.split(","))
    ckpt = _common.checkpoint_path(args.cache_dir, L, C, V, 0)
    results = []
    for dtype in args.dtypes.split(","):
        for method in args.methods.split(","):
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--ckpt", ckpt,
                   "--method", method, "--dtype", dtype, "--batch", str(args.batch),
                   "--ctx", str(args.ctx), "--steps", str(args.steps)]
            print(f"[{method} {dtype}] running", file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-2000:], file=sys.stderr)
                results.append({"method": method, "dtype": dtype, "error": proc.returncode})
                continue
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    full = {r["dtype"]: r["tokens_per_s"] for r in results
            if r["method"] == "full" and "tokens_per_s" in r}
    print(f"fine-tuning throughput, RWKV-4 L{L} C{C} V{V}, batch {args.batch} x ctx {args.ctx}, "
          f"median of {args.steps} steps; {_common.load_line()}")
    print(_common.format_env(_common.env_info(("jax", "jaxlib", "flax", "optax", "numpy"))))
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["method"], r["dtype"], "failed", "-", "-", "-", "-", "-"])
            continue
        rows.append([r["method"], r["dtype"], f"{r['trainable']:,}",
                     f"{r['opt_bytes'] / 2**20:.1f}", f"{r['compile_s']:.0f}",
                     f"{r['tokens_per_s']:.0f}",
                     _common.ratio(r["tokens_per_s"], full.get(r["dtype"])), f"{r['loss']:.3f}"])
    print(_common.markdown_table(["method", "compute dtype", "trainable params",
                                  "optimizer MiB", "compile s", "tokens/s", "x full",
                                  "last loss"], rows))
    if args.json:
        _common.write_json(args.json, {"args": vars(args), "results": results})


if __name__ == "__main__":
    main()
