"""RWKV-4 CPU inference speed: rwkv_jax against the official ``rwkv`` pip package, one run.

Measures, at batch 1 on a random checkpoint of the 169M shape (L12 C768 V50277, F=4C):

* prefill: ``--prefill`` tokens (default 1024) from the empty state, logits of the last
  token only (what the official ``model.forward(tokens, None)`` returns), tokens/s;
* decode: ``--decode`` greedy steps (default 64) of one token each, from the state after a
  ``--prompt``-token prompt, tokens/s (the argmax is part of the step in both).

Implementations: ``official`` (``rwkv`` 0.8.x, strategy "cpu fp32", TorchScript on,
``RWKV_JIT_ON=1``, run with ``--official-python``), and rwkv_jax as ``fp32``, ``bf16``
(``compute_dtype="bfloat16"``: matmuls in bf16, fp32 parameters) and ``bf16w``
(``param_dtype`` and ``compute_dtype`` bf16). rwkv_jax is measured only through its public
call, as a user runs it: ``model = rwkv_jax.load(path)``; prefill
``logits, state = model(tokens, logits_to_keep=1)`` from the empty state; decode
``model(token [1, 1], state, logits_to_keep=1)`` then an argmax on the host, one call per
token (each call validates its tokens on the host, so every step synchronises, as the
official package's ``int(torch.argmax(...))`` does).

Each implementation lives in its own worker process; all are loaded, compiled and warmed up
(``--warmup`` calls, then one check call whose last-token logits and greedy tokens are compared
with the official package's) before any timing, then the repetitions are interleaved
round-robin so that load drift on a shared machine hits every implementation alike; a case
whose timed calls exceed ``--max-op-seconds`` gets no more repeats. The median is reported, with each implementation's ratio to the official package in the
same run, and ``cpu util`` = process CPU time / wall time (cores kept busy).

Threads: ``--threads 1`` runs every worker under ``taskset -c 0``; the official worker sets
``torch.set_num_threads(1)``, the JAX worker gets
``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1`` (the pinning
is what enforces one core; cpu util <= 1.0 confirms it). ``--threads N`` pins to cores
0..N-1, ``torch.set_num_threads(N)`` and leaves XLA's default pool (one thread per core).

    python benchmarks/bench_inference.py --threads 1 --repeats 5 --json out/inf_t1.json
    python benchmarks/bench_inference.py --shape 6,512,256 --threads 2
    python benchmarks/bench_inference.py --shape 2,64,256 --prefill 64 --decode 8 \
        --repeats 2 --impls official,fp32,bf16w          # smoke test (~1 min)

The random checkpoint is written once with official key names (``write_pth``) under
``--cache-dir`` and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

JAX_VARIANTS = {
    "fp32": {},
    "bf16": {"compute_dtype": "bfloat16"},
    "bf16w": {"param_dtype": "bfloat16", "compute_dtype": "bfloat16"},
}
LABELS = {
    "official": "official rwkv (torch, cpu fp32, JIT)",
    "fp32": "rwkv_jax fp32",
    "bf16": "rwkv_jax compute bf16 (fp32 params)",
    "bf16w": "rwkv_jax bf16 params + compute",
}
CEILINGS = _common.CEILINGS


# ---- workers ------------------------------------------------------------------------------
class OfficialRunner(_common.TorchCeilings):
    """The official ``rwkv`` package, strategy "cpu fp32" (TorchScript per RWKV_JIT_ON)."""

    def __init__(self, args):
        import torch
        torch.set_num_threads(args.threads)
        from rwkv.model import RWKV
        super().__init__()
        self.model = RWKV(model=args.ckpt, strategy="cpu fp32", verbose=False)
        self.tokens, self.n_decode = args.tokens, args.decode
        self.logits0, self.state0 = self.model.forward(args.prompt_tokens, None)
        self.info = {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                     "rwkv": _common._version("rwkv"),
                     "RWKV_JIT_ON": os.environ.get("RWKV_JIT_ON"),
                     "mkldnn": torch.backends.mkldnn.is_available()}

    def prefill(self, variant):
        logits, _ = self.model.forward(self.tokens, None)
        return logits

    def decode(self, variant, steps=None):
        logits, state = self.logits0, [s.clone() for s in self.state0]
        out = []
        for _ in range(steps or self.n_decode):
            tok = int(self.torch.argmax(logits))
            out.append(tok)
            logits, state = self.model.forward([tok], state)  # mutates `state` in place
        return out

    def check(self, variant):
        return {"logits": self.prefill(variant).float().numpy().tolist(),
                "decode": self.decode(variant)}


class JaxRunner(_common.JaxCeilings):
    """rwkv_jax variants through the public call only (``rwkv_jax.load`` + ``model(...)``)."""

    def __init__(self, args):
        import jax

        import rwkv_jax

        super().__init__()
        self.n_decode = args.decode
        self.tokens = np.asarray([args.tokens], np.int32)
        prompt = np.asarray([args.prompt_tokens], np.int32)
        self.models, self.start = {}, {}
        for variant in args.variants:
            model = rwkv_jax.load(args.ckpt, **JAX_VARIANTS[variant])
            self.models[variant] = model
            self.start[variant] = model(prompt, logits_to_keep=1)
        self.info = {"jax": jax.__version__, "backend": jax.default_backend(),
                     "rwkv_jax": os.path.dirname(rwkv_jax.__file__),
                     "devices": [str(d) for d in jax.devices()],
                     "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}

    def prefill(self, variant):
        logits, _ = self.models[variant](self.tokens, logits_to_keep=1)
        return np.asarray(logits)[0, -1]  # the host copy waits for the result

    def decode(self, variant, steps=None):
        model = self.models[variant]
        logits, state = self.start[variant]
        out = []
        for _ in range(steps or self.n_decode):
            tok = int(np.argmax(np.asarray(logits)[0, -1]))
            out.append(tok)
            logits, state = model(np.asarray([[tok]], np.int32), state, logits_to_keep=1)
        self.jax.block_until_ready(state)
        return out

    def check(self, variant):
        return {"logits": np.asarray(self.prefill(variant), np.float32).tolist(),
                "decode": self.decode(variant)}


def worker_main(args) -> None:
    """Serve the driver's requests (see :func:`_common.serve`)."""
    args.tokens = _common.token_ids(args.prefill, args.vocab, args.seed)
    args.prompt_tokens = _common.token_ids(args.prompt, args.vocab, args.seed + 1)
    args.variants = args.variants.split(",")

    def make():
        runner = OfficialRunner(args) if args.worker == "official" else JaxRunner(args)
        for v in args.variants:
            for _ in range(args.warmup):
                runner.prefill(v)
                runner.decode(v, steps=8)  # compiles / lets TorchScript profile the step
        return runner

    _common.serve(make)


# ---- driver -------------------------------------------------------------------------------
def spawn(kind, variants, args, ckpt, V):
    python = args.official_python if kind == "official" else args.jax_python
    argv = ["--variants", ",".join(variants), "--ckpt", ckpt, "--vocab", str(V),
            "--prefill", str(args.prefill), "--prompt", str(args.prompt),
            "--decode", str(args.decode), "--warmup", str(args.warmup), "--seed", str(args.seed)]
    return _common.spawn_worker(__file__, python, kind, argv, threads=args.threads,
                                pin=not args.no_pin)


TARGETS = {("fp32", "prefill"): 1.1, ("bf16w", "prefill"): 3.0}


def print_bounds(results, ceilings, L, C, V, args) -> dict:
    """What each rwkv_jax number reaches of its ceiling measured in this run: prefill as
    GFLOP/s of the block matmuls (2 x 13·L·C² FLOP per token; the head runs for the last
    token only) against XLA's fp32 GEMM, decode as weight bytes streamed per second (blocks +
    head, once per token) against XLA's gemv of the head."""
    n_block = 13 * L * C * C
    out, lines = {}, []
    for v, r in results.items():
        if v == "official" or v not in JAX_VARIANTS:
            continue
        width = 2 if JAX_VARIANTS[v].get("param_dtype") == "bfloat16" else 4
        gflops = r["prefill"]["tokens_per_s"] * 2 * n_block / 1e9
        gbs = r["decode"]["tokens_per_s"] * width * (n_block + V * C) / 1e9
        out[v] = {"prefill_gflop_per_s": gflops, "decode_weight_gb_per_s": gbs}
        gemm, gemv = ceilings.get("jax:gemm"), ceilings.get("jax:gemv")
        pre = f"prefill {gflops:.0f} GFLOP/s" + (f" ({gflops / gemm:.0%} of XLA's fp32 GEMM)"
                                                 if gemm else "")
        dec = f"decode streams {gbs:.1f} GB/s of weights" + (
            f" ({gbs / gemv:.0%} of the gemv ceiling)" if gemv else "")
        lines.append(f"* {LABELS[v]}: {pre}; {dec}")
    for (v, op), target in TARGETS.items():
        got = results.get(v, {}).get("vs_official", {}).get(op)
        if got is not None:
            lines.append(f"* target {LABELS[v]} {op} >= {target}x official: {got:.2f}x "
                         f"({'met' if got >= target else 'not met'})")
    if lines:
        print("\nBounds (same run):\n" + "\n".join(lines))
    return out


def compare(ref, out):
    """Prefill last-logit error relative to the reference's std, and greedy-token agreement."""
    a, b = np.asarray(ref["logits"]), np.asarray(out["logits"])
    agree = 0
    for x, y in zip(ref["decode"], out["decode"]):
        if x != y:
            break
        agree += 1
    return {"max_abs_err_over_std": float(np.max(np.abs(a - b)) / np.std(a)),
            "decode_prefix_agree": agree}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="12,768,50277", help="L,C,V (default: 169M shape)")
    p.add_argument("--threads", type=int, default=1, help="cores/threads per implementation")
    p.add_argument("--impls", default="official,fp32,bf16,bf16w")
    p.add_argument("--prefill", type=int, default=1024)
    p.add_argument("--prompt", type=int, default=16, help="prompt length before decoding")
    p.add_argument("--decode", type=int, default=64, help="decode steps per repetition")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed calls per case before timing (the check run adds one)")
    p.add_argument("--max-op-seconds", type=float, default=20.0,
                   help="stop repeating a case once its timed calls add up to this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "rwkv_jax_bench"))
    p.add_argument("--official-python", default=_common.OFFICIAL_PYTHON)
    p.add_argument("--jax-python", default=sys.executable)
    p.add_argument("--no-pin", action="store_true", help="do not taskset the workers")
    p.add_argument("--no-ceilings", action="store_true",
                   help="skip the GEMM/gemv ceiling measurements")
    p.add_argument("--json", help="write all results to this file")
    # internal: worker mode
    p.add_argument("--worker", choices=["official", "jax"], help=argparse.SUPPRESS)
    p.add_argument("--variants", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker_main(args)

    L, C, V = (int(x) for x in args.shape.split(","))
    impls = args.impls.split(",")
    unknown = set(impls) - set(LABELS)
    if unknown:
        p.error(f"unknown --impls {sorted(unknown)}; valid: {', '.join(LABELS)}")
    if args.threads > (os.cpu_count() or 1):
        p.error(f"--threads {args.threads} > {os.cpu_count()} CPUs")
    env = _common.env_info()  # load average at the start
    ckpt = _common.checkpoint_path(args.cache_dir, L, C, V, args.seed)

    workers = {}
    if "official" in impls:
        workers["official"] = spawn("official", ["official"], args, ckpt, V)
    jax_variants = [v for v in impls if v in JAX_VARIANTS]
    if jax_variants:
        workers["jax"] = spawn("jax", jax_variants, args, ckpt, V)
    owner = {v: ("official" if v == "official" else "jax") for v in impls}
    t_start = time.perf_counter()
    for w in workers.values():  # nothing is timed until every worker is compiled and warm
        w.info = w.recv()["info"]
    print(f"workers ready after {time.perf_counter() - t_start:.0f} s", file=sys.stderr)

    checks = {v: workers[owner[v]].request(op="check", args={"variant": v})["result"]
              for v in impls}
    runs = {(v, op): [] for v in impls for op in ("prefill", "decode")}
    order = list(impls)
    for r in range(args.repeats):
        for v in order:
            for op in ("prefill", "decode"):
                if sum(w for w, _ in runs[(v, op)]) > args.max_op_seconds:
                    continue  # a very slow case gets fewer repeats (see the "reps" column)
                out = workers[owner[v]].request(op=op, args={"variant": v}, timed=True)
                runs[(v, op)].append((out["wall"], out["cpu"]))
        order = order[1:] + order[:1]  # rotate: no implementation always runs first
        print(f"round {r + 1}/{args.repeats} done at {time.perf_counter() - t_start:.0f} s",
              file=sys.stderr)
    ceil = {(name, case): [] for name in workers for case in CEILINGS}
    if not args.no_ceilings:
        for _ in range(args.repeats):
            for name, w in workers.items():
                for case in CEILINGS:
                    out = w.request(op="ceiling", args={"case": case}, timed=True)
                    ceil[(name, case)].append((out["wall"], out["cpu"]))
    for w in workers.values():
        w.close()

    n_tok = {"prefill": args.prefill, "decode": args.decode}
    results = {}
    for v in impls:
        res = {"label": LABELS[v]}
        for op in ("prefill", "decode"):
            s = _common.summarize(runs[(v, op)])
            s["tokens_per_s"] = n_tok[op] / s["median_s"]
            res[op] = s
        if "official" in impls:
            res["check_vs_official"] = compare(checks["official"], checks[v])
        results[v] = res
    if "official" in impls:
        for v in impls:
            results[v]["vs_official"] = {op: results[v][op]["tokens_per_s"]
                                         / results["official"][op]["tokens_per_s"] for op in n_tok}

    print(f"RWKV-4 L{L} C{C} V{V} (F={4 * C}), batch 1, random weights; threads={args.threads}"
          f"{'' if args.no_pin else ' (taskset -c ' + ','.join(map(str, range(args.threads))) + ')'}")
    print(_common.format_env(env))
    for name, w in workers.items():
        info = {k: x for k, x in w.info.items() if k != "env"}
        print(f"{name} worker: {json.dumps(info)}")
    print(f"prefill {args.prefill} tokens (last-token logits); decode {args.decode} greedy steps "
          f"after a {args.prompt}-token prompt; median of {args.repeats} interleaved repeats "
          f"after {args.warmup} warm-up call(s) and a check run\n")
    rows = []
    for v in impls:
        r = results[v]
        ratio = r.get("vs_official") or {}
        chk = r.get("check_vs_official") or {}
        rows.append([
            r["label"],
            f"{r['prefill']['tokens_per_s']:.0f}",
            f"{ratio['prefill']:.2f}x" if ratio else "-",
            f"{r['decode']['tokens_per_s']:.1f}",
            f"{ratio['decode']:.2f}x" if ratio else "-",
            f"{r['prefill']['cpu_util']:.2f} / {r['decode']['cpu_util']:.2f}",
            f"{len(r['prefill']['times_s'])} / {len(r['decode']['times_s'])}",
            f"{chk['max_abs_err_over_std']:.1e} / {chk['decode_prefix_agree']}" if chk else "-",
        ])
    print(_common.markdown_table(
        ["implementation", "prefill tok/s", "vs official", "decode tok/s", "vs official",
         "cpu util (pre/dec)", "reps", "logit err / greedy agree"], rows))
    print("\nlogit err: max |logit - official| / std(official) on the prefill's last token; "
          f"greedy agree: leading decode tokens equal to the official's (of {args.decode}).")
    ceilings = {}
    if not args.no_ceilings:
        rows = []
        for name in workers:
            lib = "torch" if name == "official" else "XLA"
            for case, (desc, _, _, _, unit) in CEILINGS.items():
                s_ = _common.summarize(ceil[(name, case)])
                rate = _common.ceiling_rate(case, ceil[(name, case)])
                ceilings[f"{name}:{case}"] = rate
                rows.append([f"{lib}: {desc}, {unit}", f"{rate:.1f}", f"{s_['cpu_util']:.2f}"])
        print("\nCeilings, each library on this core in this run (best of the repeats):\n")
        print(_common.markdown_table(["what", "rate", "cpu util"], rows))
        if "official" in workers and "jax" in workers:
            print(f"\nXLA/torch: fp32 GEMM "
                  f"{ceilings['jax:gemm'] / ceilings['official:gemm']:.2f}x, fp32 weight "
                  f"streaming {ceilings['jax:gemv'] / ceilings['official:gemv']:.2f}x")
    bounds = print_bounds(results, ceilings, L, C, V, args)
    print(_common.load_line("load average at the end"))
    if args.json:
        _common.write_json(args.json, {"ceilings": ceilings, "bounds": bounds,
            "shape": {"L": L, "C": C, "V": V}, "args": vars(args), "env": env,
            "workers": {k: {"cmd": w.cmd, "info": w.info} for k, w in workers.items()},
            "results": results})


if __name__ == "__main__":
    main()
