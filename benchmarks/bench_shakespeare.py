"""Char-level tiny Shakespeare at nanoGPT's CPU budget: validation loss, parameters, wall time.

Runs ``rwkv-jax train --config configs/shakespeare-char.yaml data.path=... out_dir=...`` in a
subprocess (a fresh ``out_dir`` per run, so nothing resumes) and reports the final validation
loss (nats/char over the whole last 10% of the text), the parameter count (nanoGPT's 4x128
transformer: 0.80M), wall time of the whole command (start-up, tokenizing, compiling, the
evaluations and the export included, as nanoGPT's 78 s) and peak resident memory.

The budget stays nanoGPT's: context 64, batch 12, 2000 iterations. Each ``--variant`` adds
command-line overrides on top of the config; variants run one after the other::

    python benchmarks/bench_shakespeare.py
    python benchmarks/bench_shakespeare.py --variant "lr4e-3=optimizer.lr=4e-3 optimizer.lr_final=4e-4" \\
        --variant "l2wrap-off=train.l2wrap=false" --json out/shakespeare.json

With ``--nanogpt PATH`` (a checkout of karpathy/nanoGPT; its code is not part of this
project) nanoGPT's own ``train.py`` runs in the same session, alternated with ours for
``--rounds`` rounds, with the CPU recipe of its README (4 layers x 128, context 64, batch 12,
2000 iterations, ``--device=cpu --compile=False --eval_iters=20 --dropout=0.0``) and
``--nanogpt-python`` (an interpreter with torch). The data is the same file, split as
nanoGPT's ``data/shakespeare_char/prepare.py`` splits it (first 90% train, sorted-char vocab),
written by this script (prepare.py would download the text)::

    python benchmarks/bench_shakespeare.py --nanogpt ~/src/nanoGPT --rounds 2

Anchor (docs/benchmarks.md): nanoGPT 4 layers x 128, 0.80M parameters, val loss 1.8857 in
78 s wall on this 2-core machine (2 torch threads). Target: val loss <= 1.80, and the whole
command's wall time at most nanoGPT's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NANOGPT = {"val_loss": 1.8857, "params": 0.80e6, "wall_s": 78.0}
TARGET = 1.80
# nanoGPT's budget; a variant may not change these
FIXED = {"data.ctx_len": 64, "train.batch_size": 12, "train.max_steps": 2000,
         "train.grad_accum": 1}


def count_params(path: str) -> int:
    """Number of parameters in the exported ``model.safetensors``."""
    from safetensors import safe_open
    n = 0
    with safe_open(path, framework="numpy") as f:
        for k in f.keys():  # noqa: SIM118  (a safetensors handle, not a dict)
            shape = f.get_slice(k).get_shape()
            size = 1
            for d in shape:
                size *= d
            n += size
    return n


def run_one(name: str, overrides: list[str], args) -> dict:
    """One training run in a subprocess; returns its measurements."""
    for ov in overrides:
        key = ov.split("=", 1)[0]
        if key in FIXED:
            raise SystemExit(f"variant {name}: {key} is part of the fixed budget")
    out_dir = os.path.join(args.out_root, name)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)  # a fresh run, never a resume
    # not ``-m rwkv_jax.cli``: as __main__ the CLI module would miss the registered commands
    cmd = [sys.executable, "-c", "import sys; from rwkv_jax.cli import main; sys.exit(main())",
           "train", "--config", args.config,
           f"data.path={args.data}", f"out_dir={out_dir}", "logging.progress=false",
           *overrides]
    env = dict(os.environ)
    if args.threads == 1:
        cmd = ["taskset", "-c", "0"] + cmd
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                            "intra_op_parallelism_threads=1").strip()
    load0 = os.getloadavg()
    print(f"[{name}] {' '.join(cmd)}", file=sys.stderr, flush=True)
    log_path = os.path.join(args.out_root, f"{name}.log")
    os.makedirs(args.out_root, exist_ok=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    load1 = os.getloadavg()
    res = {"name": name, "overrides": overrides, "rc": rc, "wall_s": wall,
           "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_gb": usage.ru_maxrss / 2**20,
           "load_avg_start": load0, "load_avg_end": load1, "log": log_path, "out_dir": out_dir}
    if rc != 0:
        with open(log_path) as f:
            res["error_tail"] = f.read()[-2000:]
        print(f"[{name}] failed (exit {rc}); see {log_path}", file=sys.stderr)
        return res
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    evals = [r for r in recs if "val_loss" in r]
    res["val_curve"] = {r["step"]: round(r["val_loss"], 4) for r in evals}
    res["val_loss"] = evals[-1]["val_loss"]
    res["train_loss_last"] = recs[-1]["train_loss"]
    res["tokens_per_s"] = [r["tokens_per_s"] for r in recs][len(recs) // 2]  # a mid-run value
    res["params"] = count_params(os.path.join(out_dir, "model.safetensors"))
    print(f"[{name}] val {res['val_loss']:.4f}, {res['params'] / 1e6:.3f}M params, "
          f"{wall:.0f} s", file=sys.stderr, flush=True)
    return res


NANOGPT_ARGS = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
                "--eval_iters=20", "--log_interval=100", "--block_size=64", "--batch_size=12",
                "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000",
                "--lr_decay_iters=2000", "--dropout=0.0"]


def prepare_nanogpt_data(checkout: str, text_path: str) -> None:
    """nanoGPT's shakespeare_char files from ``text_path``: train.bin / val.bin (uint16 ids of
    the first 90% / last 10%) and meta.pkl (vocab_size, stoi, itos), the layout its train.py
    reads."""
    import pickle

    import numpy as np
    d = os.path.join(checkout, "data", "shakespeare_char")
    with open(text_path) as f:
        text = f.read()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], np.uint16)
    n = int(len(text) * 0.9)
    ids[:n].tofile(os.path.join(d, "train.bin"))
    ids[n:].tofile(os.path.join(d, "val.bin"))
    with open(os.path.join(d, "meta.pkl"), "wb") as f:
        pickle.dump({"vocab_size": len(chars), "stoi": stoi,
                     "itos": dict(enumerate(chars))}, f)


def run_nanogpt(args, round_no: int) -> dict:
    """nanoGPT's own train.py in a subprocess (its checkout as cwd); wall time of the whole
    command and the last ``step N: ... val loss X`` line it prints."""
    out = os.path.join(args.out_root, f"nanogpt-{round_no}")
    cmd = [args.nanogpt_python, "train.py", *NANOGPT_ARGS, f"--out_dir={out}"]
    if args.threads == 1:
        cmd = ["taskset", "-c", "0"] + cmd
    log_path = os.path.join(args.out_root, f"nanogpt-{round_no}.log")
    os.makedirs(args.out_root, exist_ok=True)
    print(f"[nanogpt {round_no}] {' '.join(cmd)}", file=sys.stderr, flush=True)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=args.nanogpt, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    res = {"name": f"nanogpt-{round_no}", "rc": os.waitstatus_to_exitcode(status),
           "wall_s": wall, "peak_rss_gb": usage.ru_maxrss / 2**20, "load_avg_start": load0,
           "log": log_path}
    with open(log_path) as f:
        lines = [ln for ln in f if ln.startswith("step ") and "val loss" in ln]
    if res["rc"] == 0 and lines:
        res["val_loss"] = float(lines[-1].rsplit("val loss", 1)[1].strip(" ,\n"))
    print(f"[nanogpt {round_no}] val {res.get('val_loss')}, {wall:.0f} s", file=sys.stderr,
          flush=True)
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=os.path.join(REPO, "configs", "shakespeare-char.yaml"))
    p.add_argument("--data", default="/work/shared/data/tinyshakespeare.txt")
    p.add_argument("--variant", action="append", default=[],
                   help='"NAME=key=value key=value ..." (repeatable); default: the config as is')
    p.add_argument("--no-baseline", action="store_true",
                   help="with --variant: skip the run of the config as is")
    p.add_argument("--threads", type=int, default=2, choices=[1, 2],
                   help="1: taskset -c 0 and single-threaded XLA; 2: XLA's default pool")
    p.add_argument("--out-root", default=os.path.join(tempfile.gettempdir(), "rwkv_jax_bench",
                                                      "shakespeare"))
    p.add_argument("--nanogpt", help="a karpathy/nanoGPT checkout: run it in the same session")
    p.add_argument("--nanogpt-python", default=_common.OFFICIAL_PYTHON,
                   help="the interpreter (with torch) for nanoGPT")
    p.add_argument("--rounds", type=int, default=1,
                   help="with --nanogpt: alternate the two commands this many times")
    p.add_argument("--json", help="write all results to this file")
    args = p.parse_args(argv)
    args.config = os.path.abspath(args.config)
    args.data = os.path.abspath(args.data)

    runs = [] if (args.variant and args.no_baseline) else [("config", [])]
    for v in args.variant:
        name, _, rest = v.partition("=")
        runs.append((name, rest.split()))
    env = _common.env_info(("jax", "jaxlib", "flax", "optax", "numpy"))
    results, peers = [], []
    if args.nanogpt:
        args.nanogpt = os.path.abspath(os.path.expanduser(args.nanogpt))
        prepare_nanogpt_data(args.nanogpt, args.data)
    for round_no in range(args.rounds if args.nanogpt else 1):
        results += [run_one(name if round_no == 0 else f"{name}-{round_no}", ov, args)
                    for name, ov in runs]
        if args.nanogpt:
            peers.append(run_nanogpt(args, round_no))

    print(f"char-level tiny Shakespeare, context 64, batch 12, 2000 iterations, "
          f"threads={args.threads}; config {os.path.relpath(args.config, REPO)}")
    print(_common.format_env(env))
    rows = [["nanoGPT 4x128 (torch, docs/benchmarks.md)", f"{NANOGPT['params'] / 1e6:.2f}M",
             f"{NANOGPT['val_loss']:.4f}", f"{NANOGPT['wall_s']:.0f}", "-", "-", "-"]]
    for r in peers:
        rows.append([f"{r['name']}: nanoGPT's own code, same session", "0.80M",
                     f"{r['val_loss']:.4f}" if "val_loss" in r else f"failed ({r['rc']})",
                     f"{r['wall_s']:.0f}", f"{r['peak_rss_gb']:.2f}", "-",
                     " ".join(f"{x:.1f}" for x in r["load_avg_start"])])
    for r in results:
        if r["rc"] != 0:
            rows.append([r["name"], "-", f"failed ({r['rc']})", "-", "-", "-", "-"])
            continue
        load = " ".join(f"{x:.1f}" for x in r["load_avg_start"])
        rows.append([f"{r['name']}: {' '.join(r['overrides']) or '(as configured)'}",
                     f"{r['params'] / 1e6:.3f}M", f"{r['val_loss']:.4f}", f"{r['wall_s']:.0f}",
                     f"{r['peak_rss_gb']:.2f}", f"{r['tokens_per_s']:.0f}", load])
    print(_common.markdown_table(
        ["run", "params", "val loss (nats/char)", "wall s", "peak RSS GB", "train tok/s",
         "load avg at start"], rows))
    print(f"\ntarget: val loss <= {TARGET} with <= 0.80M parameters; "
          f"val loss over the whole validation split (last 10%).")
    ok = [r for r in results if r["rc"] == 0]
    if peers and ok and all("val_loss" in r for r in peers):
        ours = sorted(r["wall_s"] for r in ok)[len(ok) // 2]
        theirs = sorted(r["wall_s"] for r in peers)[len(peers) // 2]
        print(f"\nwall time, median of the rounds: rwkv-jax {ours:.0f} s, nanoGPT {theirs:.0f} s "
              f"-> rwkv-jax takes {ours / theirs:.2f}x nanoGPT's time")
    for r in results:
        if r.get("val_curve"):
            print(f"{r['name']} val curve: {r['val_curve']}")
    if args.json:
        _common.write_json(args.json, {"args": vars(args), "env": env, "nanogpt": NANOGPT,
                                       "target": TARGET, "results": results,
                                       "nanogpt_runs": peers})


if __name__ == "__main__":
    main()
