"""The training step of a config, alone: milliseconds per step, run as ``Trainer.fit`` runs it.

Builds the real :class:`rwkv_jax.train.trainer.Trainer` from a config file plus overrides
(the data, model, optimizer, schedule and loss exactly as ``rwkv-jax train`` would run them),
compiles its steps, then times ``--rounds`` rounds of ``--steps`` steps each, dispatched as
the training loop dispatches them: ``train.steps_per_call`` steps per call of the compiled
``train_steps`` (``--variant "one=train.steps_per_call=1"``: one dispatch per step). The
batches are made beforehand, so data preparation is not timed; the device is waited on once
per round.
Each ``--variant NAME=OVERRIDES`` (repeatable) builds another trainer with those overrides
added; variants are timed round-robin so load drift hits them alike. XLA flags are the
environment's: compare flag settings by running the script once per ``XLA_FLAGS`` value. ::

    python benchmarks/bench_step.py                               # configs/shakespeare-char.yaml
    python benchmarks/bench_step.py --variant "bf16=model.compute_dtype=bfloat16" \\
        --variant "assoc=model.wkv_impl=associative"

This is the seam behind ``bench_shakespeare.py``'s wall time: 2000 such steps plus start-up,
compilation and the evaluations. nanoGPT's own per-iteration time is in its log.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=os.path.join(REPO, "configs", "shakespeare-char.yaml"))
    p.add_argument("--data", default=os.path.join(REPO, "..", "shared", "data",
                                                  "tinyshakespeare.txt"))
    p.add_argument("--variant", action="append", default=[],
                   help="NAME=OVERRIDE [OVERRIDE ...] (repeatable)")
    p.add_argument("--no-baseline", action="store_true", help="time only the variants")
    p.add_argument("--steps", type=int, default=128, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--json")
    args = p.parse_args(argv)

    import jax
    from rwkv_jax.train.config import load_config
    from rwkv_jax.train.trainer import Trainer

    cases = [] if args.no_baseline else [("config", [])]
    for v in args.variant:
        name, _, rest = v.partition("=")
        cases.append((name, rest.split()))
    out_root = tempfile.mkdtemp(prefix="rwkv_jax_step_")
    runs = {}
    try:
        for name, overrides in cases:
            cfg = load_config(args.config, [f"data.path={args.data}",
                                            f"out_dir={os.path.join(out_root, name)}",
                                            *overrides])
            tr = Trainer(cfg)
            k = min(tr.steps_per_call, args.steps)
            batches = [(tr.global_batches(i, min(k, args.steps - i), k), min(k, args.steps - i))
                       for i in range(0, args.steps, k)]
            t0 = time.perf_counter()
            state, out = tr.run_steps(tr.state, *batches[0])
            jax.block_until_ready(out)
            runs[name] = {"trainer": tr, "state": state, "batches": batches,
                          "compile_s": time.perf_counter() - t0, "ms": []}
        for _ in range(args.rounds):
            for name in runs:
                r = runs[name]
                t0 = time.perf_counter()
                state = r["state"]
                for b, n in r["batches"]:
                    state, out = r["trainer"].run_steps(state, b, n)
                jax.block_until_ready(out)
                r["state"] = state
                r["ms"].append((time.perf_counter() - t0) / args.steps * 1e3)
    finally:
        shutil.rmtree(out_root, ignore_errors=True)

    print(_common.format_env(_common.env_info(("jax", "jaxlib", "flax", "optax", "numpy"))))
    print(f"config {args.config}; {args.rounds} rounds of {args.steps} steps; XLA_FLAGS="
          f"{os.environ.get('XLA_FLAGS', '')!r}; {_common.load_line()}")
    base = statistics.median(runs["config"]["ms"]) if "config" in runs else None
    rows = []
    for name, r in runs.items():
        med = statistics.median(r["ms"])
        rows.append([name, f"{med:.1f}", " / ".join(f"{x:.1f}" for x in r["ms"]),
                     _common.ratio(med, base), f"{r['compile_s']:.1f}"])
    print(_common.markdown_table(["case", "ms/step (median)", "rounds", "x config",
                                  "compile + first call s"], rows))
    if args.json:
        _common.write_json(args.json, {name: {k: r[k] for k in ("ms", "compile_s")}
                                       for name, r in runs.items()})


if __name__ == "__main__":
    main()
