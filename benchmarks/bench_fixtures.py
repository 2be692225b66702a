"""Token-by-token calls on the tiny official fixtures: rwkv_jax's public call against the
official ``rwkv`` package, one run.

For each ``.pth`` in ``--fixtures`` (default /work/shared/fixtures/tiny-rwkv: RWKV-4, 5.1,
5.2, 6, 7), the time of one call that feeds one token and the state:

* rwkv_jax: ``model = rwkv_jax.load(path)`` (``ln_x_eps=1e-5`` for the rwkv5.x fixtures, as
  they were trained), then ``logits, state = model(token [1, 1], state)``;
* official: ``logits, state = model.forward([token], state)`` (strategy "cpu fp32",
  TorchScript on; ``RWKV_V7_ON=1`` for RWKV-7), one process per fixture (the package reads
  its version switches at import).

Both feed the same ``--tokens`` bytes of a fixed text, one call each, after ``--warmup``
untimed calls; the median per-call time of ``--repeats`` interleaved passes is reported, and
the final logits are compared (max |difference|). Threads: ``taskset -c 0``, one XLA / torch
thread (``--threads``). ::

    python benchmarks/bench_fixtures.py --json out/fixtures_t1.json
    python benchmarks/bench_fixtures.py --tokens 16 --repeats 1      # smoke test
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

TEXT = ("First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. "
        "First Citizen: You are all resolved rather to die than to famish? ") * 8
LN_X_EPS = {"rwkv5.1": 1e-5, "rwkv5.2": 1e-5}  # the tiny v5 models were trained with 1e-5


def overrides(stem: str) -> dict:
    return {"ln_x_eps": eps for prefix, eps in LN_X_EPS.items() if stem.startswith(prefix)}


class JaxRunner:
    def __init__(self, args):
        import jax

        import rwkv_jax
        self.jax = jax
        self.tokens = list(TEXT.encode())[:args.tokens]
        self.models, errors = {}, {}
        for path in args.paths:
            stem = os.path.basename(path)[:-4]
            try:
                self.models[stem] = rwkv_jax.load(path, **overrides(stem))
            except rwkv_jax.CheckpointError as e:  # reported in the table, the rest still run
                errors[stem] = str(e)
        self.info = {"jax": jax.__version__, "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
                     "load_errors": errors}
        for stem in self.models:
            for _ in range(args.warmup):
                self.run(stem)

    def run(self, stem):
        """Feed every token, one call each: (seconds per call, last logits); None if the
        fixture did not load."""
        if stem not in self.models:
            return None
        model, state, logits = self.models[stem], None, None
        t0 = time.perf_counter()
        for t in self.tokens:
            logits, state = model(np.asarray([[t]], np.int32), state)
        logits = np.asarray(logits)  # waits for the last call
        return {"s_per_call": (time.perf_counter() - t0) / len(self.tokens),
                "logits": logits[0, -1].tolist()}


class OfficialRunner:
    def __init__(self, args):
        stem = os.path.basename(args.paths[0])[:-4]
        if stem.startswith("rwkv7"):
            os.environ["RWKV_V7_ON"] = "1"
        import torch
        torch.set_num_threads(args.threads)
        from rwkv.model import RWKV
        self.stem = stem
        kw = {} if stem.startswith("rwkv7") else {"verbose": False}  # v7's class lacks it
        self.model = RWKV(model=args.paths[0][:-4], strategy="cpu fp32", **kw)
        self.tokens = list(TEXT.encode())[:args.tokens]
        self.info = {"torch": torch.__version__, "rwkv": _common._version("rwkv"),
                     "RWKV_JIT_ON": os.environ.get("RWKV_JIT_ON")}
        for _ in range(args.warmup):
            self.run(stem)

    def run(self, stem):
        state, logits = None, None
        t0 = time.perf_counter()
        for t in self.tokens:
            logits, state = self.model.forward([t], state)
        return {"s_per_call": (time.perf_counter() - t0) / len(self.tokens),
                "logits": logits.float().numpy().tolist()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fixtures", default=_common.FIXTURES)
    p.add_argument("--tokens", type=int, default=128, help="calls per pass")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-pin", action="store_true")
    p.add_argument("--official-python", default=_common.OFFICIAL_PYTHON)
    p.add_argument("--jax-python", default=sys.executable)
    p.add_argument("--json")
    p.add_argument("--worker", choices=["jax", "official"], help=argparse.SUPPRESS)
    p.add_argument("--paths", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.paths = args.paths.split(",")
        return _common.serve(lambda: (JaxRunner if args.worker == "jax" else
                                      OfficialRunner)(args))
    if not os.path.isdir(args.fixtures):
        p.error(f"--fixtures: no directory {args.fixtures}")
    paths = sorted(os.path.join(args.fixtures, f) for f in os.listdir(args.fixtures)
                   if f.endswith(".pth"))
    if not paths:
        p.error(f"--fixtures: no .pth files in {args.fixtures}")
    env = _common.env_info()
    common = ["--tokens", str(args.tokens), "--warmup", str(args.warmup)]
    pin = not args.no_pin
    workers = {"jax": _common.spawn_worker(__file__, args.jax_python, "jax",
                                           common + ["--paths", ",".join(paths)],
                                           threads=args.threads, pin=pin)}
    stems = [os.path.basename(x)[:-4] for x in paths]
    for stem, path in zip(stems, paths):
        workers[stem] = _common.spawn_worker(__file__, args.official_python, "official",
                                             common + ["--paths", path], threads=args.threads,
                                             pin=pin)
    for w in workers.values():
        w.info = w.recv()["info"]
    runs = {(s, impl): [] for s in stems for impl in ("jax", "official")}
    last = {}
    for _ in range(args.repeats):
        for stem in stems:
            for impl, w in (("official", workers[stem]), ("jax", workers["jax"])):
                out = w.request(op="run", args={"stem": stem})["result"]
                if out is None:
                    continue
                runs[(stem, impl)].append(out["s_per_call"])
                last[(stem, impl)] = np.asarray(out["logits"])
    for w in workers.values():
        w.close()
    print(f"one token per call, {args.tokens} calls per pass, median of {args.repeats} "
          f"interleaved passes; threads={args.threads}{'' if args.no_pin else ' (taskset)'}")
    print(_common.format_env(env))
    rows, results = [], {}
    errors = workers["jax"].info.get("load_errors", {})
    for stem in stems:
        if stem in errors:
            o = float(np.median(runs[(stem, "official")]))
            rows.append([stem, f"{o * 1e3:.2f}", "load failed", "-", errors[stem][-90:]])
            results[stem] = {"official_ms": o * 1e3, "jax_error": errors[stem]}
            continue
        j = float(np.median(runs[(stem, "jax")]))
        o = float(np.median(runs[(stem, "official")]))
        diff = float(np.abs(last[(stem, "jax")] - last[(stem, "official")]).max())
        results[stem] = {"jax_ms": j * 1e3, "official_ms": o * 1e3, "max_logit_diff": diff}
        rows.append([stem, f"{o * 1e3:.2f}", f"{j * 1e3:.2f}", f"{o / j:.2f}x", f"{diff:.1e}"])
    print(_common.markdown_table(["fixture", "official ms/call", "rwkv_jax ms/call",
                                  "speed vs official", "last logits max |diff|"], rows))
    print("\nlast logits: after the same tokens; the official package applies its built-in ln_x "
          "GroupNorm eps (64e-5) to the rwkv5.x fixtures, which were trained with (and are "
          "loaded here with) 1e-5, so they differ there by ~1e-3.")
    print(_common.load_line("load average at the end"))
    if args.json:
        _common.write_json(args.json, {"args": vars(args), "env": env, "results": results,
                                       "runs_s": {f"{s}:{i}": v for (s, i), v in runs.items()},
                                       "workers": {k: {"cmd": w.cmd, "info": w.info}
                                                   for k, w in workers.items()}})


if __name__ == "__main__":
    main()
