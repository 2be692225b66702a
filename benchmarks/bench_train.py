"""RWKV-4 CPU training throughput: rwkv_jax's trainer step against Hugging Face transformers.

One optimizer step = forward + backward + gradient clipping + AdamW update on a batch of
``--batch`` x ``--ctx`` random tokens, timed as tokens/s (median of the timed steps, compile
and the first step excluded). Implementations, all on the same shape in the same run:

* ``hf``: transformers ``RwkvForCausalLM`` (its pure-PyTorch CPU WKV loop), config with
  ``rescale_every=0``, ``attention_hidden_size=C``, ``intermediate_size=4C``, untied head,
  ``torch.optim.AdamW`` + ``clip_grad_norm_(1.0)``, cross-entropy in fp32; run with
  ``--hf-python`` (a virtual environment with torch and transformers).
* ``fp32``, ``bf16``: rwkv_jax's own jitted ``Trainer._train_step`` (official AdamW groups,
  L2Wrap, clipping, non-finite guard), built from ``load_config(None, overrides)``; ``bf16``
  is ``model.compute_dtype=bfloat16`` (bf16 matmuls, fp32 master weights, fp32 WKV).
* profiling variants (``--impls``): ``fp32-assoc``/``bf16-assoc`` (``model.wkv_impl=
  associative``), ``fp32-nowkv``/``bf16-nowkv`` (the WKV op replaced by ``y = v`` inside this
  benchmark process only: the step without the recurrence), ``wkv`` (the WKV-4 ``lax.scan``
  alone, forward+backward, for all L layers at the step's shape).

The JAX worker also times a ``--matmul``-cubed matmul at fp32 and bf16 (and the torch worker at
fp32) in the same round-robin, to give model FLOP utilisation::

    MFU = 6 · N_matmul · tokens/s / matmul FLOP/s (same dtype, same threads)

where ``N_matmul`` counts every matrix multiplied per token (blocks' r/k/v/output and
channel-mix key/receptance/value, plus the head; not the embedding lookup, LayerNorms or
mixing vectors). WKV-4 adds ~30 elementwise FLOPs per channel per token (fwd+bwd), under
0.1% of 6·N_matmul at these shapes, so it is left out.

Threads: ``--threads 1`` pins every worker with ``taskset -c 0``, ``torch.set_num_threads(1)``
and ``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1``;
``--threads 2`` pins to cores 0,1, ``torch.set_num_threads(2)`` and XLA's default pool.
All workers are built, compiled and warmed up before any timing; the timed calls then run
round-robin (order rotated each round) so load drift hits every implementation alike. The
load average is recorded at the start and the end. ::

    python benchmarks/bench_train.py --threads 1 --json out/train_t1.json
    python benchmarks/bench_train.py --shape 12,768,50277 --batch 1 --ctx 1024 --threads 2
    python benchmarks/bench_train.py --impls fp32,fp32-nowkv,wkv,fp32-assoc   # where time goes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common

HF_PYTHON = "/work/torchvenv/bin/python"
XLA_ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
JAX_VARIANTS = {
    "fp32": [],
    "bf16": ["model.compute_dtype=bfloat16"],
    "fp32-assoc": ["model.wkv_impl=associative"],
    "bf16-assoc": ["model.compute_dtype=bfloat16", "model.wkv_impl=associative"],
    "fp32-nowkv": [],
    "bf16-nowkv": ["model.compute_dtype=bfloat16"],
}
LABELS = {
    "hf": "HF transformers RwkvForCausalLM (torch fp32)",
    "fp32": "rwkv_jax fp32",
    "bf16": "rwkv_jax bf16 compute (fp32 master)",
    "fp32-assoc": "rwkv_jax fp32, associative WKV",
    "bf16-assoc": "rwkv_jax bf16, associative WKV",
    "fp32-nowkv": "rwkv_jax fp32 without WKV (y = v)",
    "bf16-nowkv": "rwkv_jax bf16 without WKV (y = v)",
    "wkv": "WKV-4 lax.scan alone, fwd+bwd, L layers",
}
MATMULS = {"jax": ("mm_fp32", "mm_bf16"), "hf": ("mm_fp32",)}
MM_REPS = 4  # matmuls per timed call: a longer call averages out a shared machine's load


def n_matmul(L: int, C: int, V: int, F: int) -> int:
    """Weights multiplied per token: 4C² (time-mix) + 2CF + C² (channel-mix) per layer, + head."""
    return L * (4 * C * C + 2 * C * F + C * C) + C * V


def random_batch(B: int, T: int, V: int, seed: int):
    rng = np.random.default_rng(seed)
    tok = rng.integers(0, V, size=(B, T + 1)).astype(np.int32)
    return tok[:, :-1], tok[:, 1:]


# ---- workers ------------------------------------------------------------------------------
class HFRunner:
    """transformers RwkvForCausalLM on CPU: forward, fp32 cross-entropy, backward, AdamW."""

    def __init__(self, args):
        import torch
        import transformers
        from transformers import RwkvConfig, RwkvForCausalLM
        torch.set_num_threads(args.threads)
        torch.manual_seed(args.seed)
        L, C, V = args.L, args.C, args.V
        cfg = RwkvConfig(vocab_size=V, context_length=args.ctx, hidden_size=C,
                         num_hidden_layers=L, attention_hidden_size=C, intermediate_size=4 * C,
                         rescale_every=0, tie_word_embeddings=False, use_cache=False)
        self.torch, self.V = torch, V
        self.model = RwkvForCausalLM(cfg)
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.99),
                                     eps=1e-8, weight_decay=0.0)
        x, y = random_batch(args.batch, args.ctx, V, args.seed)
        self.x, self.y = torch.from_numpy(x).long(), torch.from_numpy(y).long()
        n = args.matmul
        self.a, self.b = torch.randn(n, n), torch.randn(n, n)
        self.info = {"torch": torch.__version__, "transformers": transformers.__version__,
                     "torch_threads": torch.get_num_threads(),
                     "params": sum(p.numel() for p in self.model.parameters()),
                     "wkv_path": "rwkv_linear_attention_cpu (no CUDA kernel on CPU)"}
        self.last_loss = None

    def run(self, case):
        torch = self.torch
        if case == "mm_fp32":
            for _ in range(MM_REPS):
                torch.mm(self.a, self.b)
            return
        out = self.model(input_ids=self.x, use_cache=False)
        loss = torch.nn.functional.cross_entropy(out.logits.float().reshape(-1, self.V),
                                                 self.y.reshape(-1))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.last_loss = loss.item()


class JaxRunner:
    """rwkv_jax Trainers (one per variant); each step is the trainer's own jitted step."""

    def __init__(self, args):
        import jax
        import jax.numpy as jnp

        import rwkv_jax
        from rwkv_jax.train.config import load_config
        from rwkv_jax.train.trainer import Batches, Trainer

        self.jax, self.jnp = jax, jnp
        L, C, V, B, T = args.L, args.C, args.V, args.batch, args.ctx
        x, y = random_batch(B, T, V, args.seed)
        self.trainers, self.batches = {}, {}
        self.info = {"jax": jax.__version__, "backend": jax.default_backend(),
                     "rwkv_jax": os.path.dirname(rwkv_jax.__file__),
                     "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""), "compile_s": {}}
        tokenizer = type("Vocab", (), {"vocab_size": V})()
        dummy = np.zeros(T + 2, np.int32)  # the trainer's data is never read: batches are fixed
        for variant in args.variants:
            if variant == "wkv":
                self._init_wkv(args)
                continue
            overrides = [f"model.n_layer={L}", f"model.n_embd={C}", f"model.vocab_size={V}",
                         f"model.ffn_dim={4 * C}", f"data.ctx_len={T}",
                         f"train.batch_size={B}", f"out_dir={args.cache_dir}/unused",
                         *JAX_VARIANTS[variant], *args.jax_override]
            cfg = load_config(None, overrides)
            if variant.endswith("-nowkv"):
                self._patch_nowkv()
            tr = Trainer(cfg, batches=Batches(dummy, dummy, tokenizer, cfg))
            if variant.endswith("-nowkv"):
                self._unpatch_nowkv()
            xs = jax.device_put(x[None], tr.batch_sharding)
            ys = jax.device_put(y[None], tr.batch_sharding)
            t0 = time.perf_counter()
            # lower + compile here (inside the patch for -nowkv), so timing excludes it
            if variant.endswith("-nowkv"):
                self._patch_nowkv()
            tr._train_step = tr._train_step.lower(tr.params, tr.opt_state, xs, ys,
                                                  np.float32(1e-4)).compile()
            if variant.endswith("-nowkv"):
                self._unpatch_nowkv()
            self.info["compile_s"][variant] = time.perf_counter() - t0
            self.trainers[variant] = tr
            self.batches[variant] = (xs, ys)
            self.info.setdefault("params", tr.n_params)
        n = args.matmul
        key = jax.random.PRNGKey(0)
        a32 = jax.random.normal(key, (n, n), jnp.float32)
        b32 = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
        # fp32 accumulation and output, as rwkv_jax's Linear asks for: XLA:CPU sends this
        # bf16 dot to oneDNN/AMX; a bf16-output dot takes a slow path (~5x slower here)
        mm = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
        self.mm = {"mm_fp32": (mm, a32, b32),
                   "mm_bf16": (mm, a32.astype(jnp.bfloat16), b32.astype(jnp.bfloat16))}
        self.last_loss = {}

    def _patch_nowkv(self):
        import rwkv_jax.model.rwkv4 as m4
        self._orig_wkv4 = m4.wkv4
        m4.wkv4 = lambda w, u, k, v, state, impl=None: (v, state)

    def _unpatch_nowkv(self):
        import rwkv_jax.model.rwkv4 as m4
        m4.wkv4 = self._orig_wkv4

    def _init_wkv(self, args):
        """The WKV-4 lax.scan alone, fwd+bwd, over L independent layers of [B, T, C]."""
        jax, jnp = self.jax, self.jnp
        from rwkv_jax.ops.wkv4 import wkv4_scan
        L, B, T, C = args.L, args.batch, args.ctx, args.C
        ks = jax.random.normal(jax.random.PRNGKey(2), (L, B, T, C), jnp.float32)
        vs = jax.random.normal(jax.random.PRNGKey(3), (L, B, T, C), jnp.float32)
        w = -jnp.exp(jnp.linspace(-5.0, 3.0, C))
        u = jnp.full((C,), -1.2)

        def loss(k, v):
            total = 0.0
            for i in range(L):
                y, _ = wkv4_scan(w, u, k[i], v[i])
                total = total + jnp.sum(y)
            return total

        t0 = time.perf_counter()
        self.wkv_fn = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(ks, vs).compile()
        self.info["compile_s"]["wkv"] = time.perf_counter() - t0
        self.wkv_args = (ks, vs)

    def run(self, case):
        jax = self.jax
        if case in self.mm:
            fn, a, b = self.mm[case]
            for _ in range(MM_REPS):
                fn(a, b).block_until_ready()
            return
        if case == "wkv":
            jax.block_until_ready(self.wkv_fn(*self.wkv_args))
            return
        tr = self.trainers[case]
        xs, ys = self.batches[case]
        # the step donates params and opt_state: keep the returned ones
        tr.params, tr.opt_state, out = tr._train_step(tr.params, tr.opt_state, xs, ys,
                                                      np.float32(1e-4))
        jax.block_until_ready((tr.params, out))
        self.last_loss[case] = float(out["loss"])


def worker_main(args) -> None:
    """Serve JSON commands on stdin; replies go to the original stdout, all else to stderr."""
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # library prints must not corrupt the protocol
    args.variants = args.variants.split(",")
    t0 = time.perf_counter()
    runner = HFRunner(args) if args.worker == "hf" else JaxRunner(args)
    cases = args.variants + list(MATMULS[args.worker])
    for case in cases:
        for _ in range(args.warmup):
            runner.run(case)
    info = {**runner.info, "setup_s": time.perf_counter() - t0, "env": _common.env_info()}
    reply.write(json.dumps({"ready": True, "info": info}) + "\n")
    reply.flush()
    for line in sys.stdin:
        cmd = json.loads(line)
        case = cmd["case"]
        wall, cpu = _common.timed(lambda case=case: runner.run(case))
        loss = runner.last_loss if args.worker == "hf" else runner.last_loss.get(cmd["case"])
        reply.write(json.dumps({"wall": wall, "cpu": cpu, "loss": loss}) + "\n")
        reply.flush()


# ---- driver -------------------------------------------------------------------------------
def spawn(kind, variants, args):
    pin = [] if args.no_pin else ["taskset", "-c", ",".join(map(str, range(args.threads)))]
    python = args.hf_python if kind == "hf" else args.jax_python
    cmd = pin + [python, os.path.abspath(__file__), "--worker", kind,
                 "--variants", ",".join(variants), "--shape", args.shape,
                 "--batch", str(args.batch), "--ctx", str(args.ctx),
                 "--threads", str(args.threads), "--warmup", str(args.warmup),
                 "--matmul", str(args.matmul), "--seed", str(args.seed),
                 "--cache-dir", args.cache_dir]
    for ov in args.jax_override:
        cmd += ["--jax-override", ov]
    env = dict(os.environ)
    if kind == "jax" and args.threads == 1:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + XLA_ONE_THREAD).strip()
    return _common.Worker(cmd, env)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="6,512,256", help="L,C,V (default L6 C512 V256)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--threads", type=int, default=1, help="cores/threads per implementation")
    p.add_argument("--impls", default="hf,fp32,bf16",
                   help=f"comma-separated, of: {', '.join(LABELS)}")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per implementation")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after compiling")
    p.add_argument("--max-case-seconds", type=float, default=90.0,
                   help="stop repeating a case once its timed calls add up to this")
    p.add_argument("--matmul", type=int, default=2048, help="n of the n^3 matmul ceiling")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jax-override", action="append", default=[],
                   help="extra load_config override for every rwkv_jax variant (repeatable)")
    p.add_argument("--cache-dir", default="/tmp/rwkv_jax_bench")
    p.add_argument("--hf-python", default=HF_PYTHON)
    p.add_argument("--jax-python", default=sys.executable)
    p.add_argument("--no-pin", action="store_true", help="do not taskset the workers")
    p.add_argument("--json", help="write all results to this file")
    p.add_argument("--worker", choices=["hf", "jax"], help=argparse.SUPPRESS)
    p.add_argument("--variants", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.L, args.C, args.V = (int(x) for x in args.shape.split(","))
    if args.worker:
        return worker_main(args)

    L, C, V, B, T = args.L, args.C, args.V, args.batch, args.ctx
    impls = args.impls.split(",")
    unknown = set(impls) - set(LABELS)
    if unknown:
        p.error(f"unknown --impls {sorted(unknown)}; valid: {', '.join(LABELS)}")
    if args.threads > (os.cpu_count() or 1):
        p.error(f"--threads {args.threads} > {os.cpu_count()} CPUs")
    load_start = os.getloadavg()
    workers, owner = {}, {}
    if "hf" in impls:
        workers["hf"] = spawn("hf", ["hf"], args)
    jax_variants = [v for v in impls if v != "hf"]
    if jax_variants:
        workers["jax"] = spawn("jax", jax_variants, args)
    cases = []
    for kind, w in workers.items():
        for c in (["hf"] if kind == "hf" else jax_variants) + list(MATMULS[kind]):
            name = c if c in LABELS else f"{kind}:{c}"
            owner[name] = (kind, c)
            cases.append(name)
    t_start = time.perf_counter()
    for w in workers.values():  # nothing is timed until every worker is compiled and warm
        w.info = w.recv()["info"]
    print(f"workers ready after {time.perf_counter() - t_start:.0f} s", file=sys.stderr)

    runs = {c: [] for c in cases}
    losses = {c: [] for c in cases}
    order = list(cases)
    for r in range(args.repeats):
        for c in order:
            if sum(w for w, _ in runs[c]) > args.max_case_seconds:
                continue  # a very slow case gets fewer repeats (see "steps")
            kind, case = owner[c]
            out = workers[kind].request(case=case)
            runs[c].append((out["wall"], out["cpu"]))
            losses[c].append(out["loss"])
        order = order[1:] + order[:1]
        print(f"round {r + 1}/{args.repeats} done at {time.perf_counter() - t_start:.0f} s "
              f"(load {os.getloadavg()[0]:.2f})", file=sys.stderr)
    for w in workers.values():
        w.close()
    load_end = os.getloadavg()

    tokens = B * T
    nmm = n_matmul(L, C, V, 4 * C)
    flops_mm = 2 * args.matmul ** 3 * MM_REPS
    results = {}
    for c in cases:
        s = _common.summarize(runs[c])
        cpu_s = statistics.median(cpu for _, cpu in runs[c])
        if c.endswith(("mm_fp32", "mm_bf16")):
            s["gflop_per_s"] = flops_mm / s["median_s"] / 1e9
            s["gflop_per_cpu_s"] = flops_mm / cpu_s / 1e9
        else:
            s["tokens_per_s"] = tokens / s["median_s"]
            s["tokens_per_cpu_s"] = tokens / cpu_s
            s["step_s"] = s["median_s"]
            s["loss_first_last"] = [losses[c][0], losses[c][-1]] if losses[c] else None
        results[c] = s
    ceil = {"fp32": results.get("jax:mm_fp32", {}).get("gflop_per_s"),
            "bf16": results.get("jax:mm_bf16", {}).get("gflop_per_s"),
            "torch_fp32": results.get("hf:mm_fp32", {}).get("gflop_per_s")}
    hf_tps = results.get("hf", {}).get("tokens_per_s")
    for c in [c for c in cases if "tokens_per_s" in results[c]]:
        r = results[c]
        r["label"] = LABELS[c]
        r["model_gflop_per_s"] = 6 * nmm * r["tokens_per_s"] / 1e9
        if c == "hf":
            ref = ceil["torch_fp32"]
        else:
            ref = ceil["bf16"] if c.startswith("bf16") else ceil["fp32"]
        if c != "wkv" and ref:
            r["mfu"] = r["model_gflop_per_s"] / ref
            if c == "hf" and ceil["fp32"]:
                r["mfu_vs_xla_fp32"] = r["model_gflop_per_s"] / ceil["fp32"]
        if hf_tps:
            r["vs_hf"] = r["tokens_per_s"] / hf_tps
    for c in ("fp32", "bf16"):  # share of the step spent in the recurrence
        if c in results and f"{c}-nowkv" in results:
            results[c]["wkv_share"] = 1 - results[f"{c}-nowkv"]["step_s"] / results[c]["step_s"]

    env = _common.env_info(("jax", "jaxlib", "flax", "optax", "numpy"))
    env["load_avg_start"], env["load_avg_end"] = load_start, load_end
    pin = "" if args.no_pin else f" (taskset -c {','.join(map(str, range(args.threads)))})"
    print(f"RWKV-4 L{L} C{C} V{V} (F={4 * C}), training step at batch {B} x ctx {T} "
          f"({tokens} tokens), random tokens; threads={args.threads}{pin}")
    print(_common.format_env(env))
    print(f"load average: start {' '.join(f'{x:.2f}' for x in load_start)}, "
          f"end {' '.join(f'{x:.2f}' for x in load_end)}")
    for name, w in workers.items():
        info = {k: x for k, x in w.info.items() if k != "env"}
        print(f"{name} worker: {json.dumps(info)}")
    print(f"N_matmul = {nmm / 1e6:.2f}M (blocks {(nmm - C * V) / 1e6:.2f}M + head "
          f"{C * V / 1e6:.2f}M); model FLOPs/token = 6·N_matmul = {6 * nmm / 1e6:.0f} MFLOP; "
          f"median of up to {args.repeats} interleaved steps after {args.warmup} warm-up\n")
    rows = []
    for c in cases:
        r = results[c]
        if "tokens_per_s" not in r:
            continue
        mfu = f"{100 * r['mfu']:.0f}%" if "mfu" in r else "-"
        if "mfu_vs_xla_fp32" in r:
            mfu += f" ({100 * r['mfu_vs_xla_fp32']:.0f}% of XLA fp32)"
        hf_cpu = results.get("hf", {}).get("tokens_per_cpu_s")
        rows.append([r["label"], f"{r['step_s']:.3f}", f"{r['tokens_per_s']:.0f}",
                     f"{r['vs_hf']:.2f}x" if "vs_hf" in r else "-", mfu,
                     f"{r['tokens_per_cpu_s']:.0f}",
                     f"{r['tokens_per_cpu_s'] / hf_cpu:.2f}x" if hf_cpu else "-",
                     f"{r['cpu_util']:.2f}", len(r["times_s"])])
    print(_common.markdown_table(["implementation", "step s", "tokens/s", "vs HF", "MFU",
                                  "tokens/cpu-s", "vs HF (cpu-s)", "cpu util", "steps"], rows))
    mm_rows = [[c, f"{results[c]['gflop_per_s']:.0f}", f"{results[c]['gflop_per_cpu_s']:.0f}",
                f"{results[c]['cpu_util']:.2f}", len(results[c]["times_s"])]
               for c in cases if "gflop_per_s" in results[c]]
    print()
    print(_common.markdown_table([f"matmul {args.matmul}^3", "GFLOP/s", "GFLOP/cpu-s",
                                  "cpu util", "reps"], mm_rows))
    print("\nMFU = 6·N_matmul·tokens/s / matmul FLOP/s of the same dtype and library "
          "(HF: torch fp32 matmul; in parentheses against XLA's fp32 matmul); bf16 matmul "
          "with fp32 accumulation/output. tokens/cpu-s: tokens per second of process CPU "
          "time, less sensitive to other processes on a shared machine; cpu util = CPU "
          "time / wall (below the thread count: the process waited for a core).")
    for c in ("fp32", "bf16"):
        if "wkv_share" in results.get(c, {}):
            print(f"{c}: WKV share of the step (1 - nowkv/full) = "
                  f"{100 * results[c]['wkv_share']:.0f}%")
    if args.json:
        _common.write_json(args.json, {
            "shape": {"L": L, "C": C, "V": V, "F": 4 * C, "batch": B, "ctx": T},
            "n_matmul": nmm, "args": vars(args), "env": env,
            "workers": {k: {"cmd": w.cmd, "info": w.info} for k, w in workers.items()},
            "results": results})


if __name__ == "__main__":
    main()
