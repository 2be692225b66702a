"""RWKV-4 CPU inference speed: rwkv_jax against the official ``rwkv`` pip package, one run.

Measures, at batch 1 on a random checkpoint of the 169M shape (L12 C768 V50277, F=4C):

* prefill: ``--prefill`` tokens (default 1024) from the empty state, logits of the last
  token only (what the official ``model.forward(tokens, None)`` returns), tokens/s;
* decode: ``--decode`` greedy steps (default 64) of one token each, from the state after a
  ``--prompt``-token prompt, tokens/s (the argmax is part of the step in both).

Implementations: ``official`` (``rwkv`` 0.8.x, strategy "cpu fp32", TorchScript on,
``RWKV_JIT_ON=1``, run with ``--official-python``), and rwkv_jax as ``fp32``, ``bf16``
(``compute_dtype="bfloat16"``: matmuls in bf16, fp32 parameters) and ``bf16w``
(``param_dtype`` and ``compute_dtype`` bf16). rwkv_jax runs as ``jax.jit`` of a pure function
of ``(params, tokens, state)`` built with ``nnx.split``/``nnx.merge`` (``nnx.jit`` re-walks
the module graph on every call, which costs ~ms per decode step).

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

    python benchmarks/bench_inference.py --threads 1 --json out/bench_t1.json
    python benchmarks/bench_inference.py --shape 6,512,256 --threads 2

The random checkpoint is written once with official key names (``write_pth``) under
``--cache-dir`` and reused.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

OFFICIAL_PYTHON = "/work/torchvenv/bin/python"
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
# Ceilings measured by each worker in its own library, same run: what one core can do.
# name -> (description, operand shapes a, b: a @ b.T for a 2-D b, else a @ b; the work per call
# in FLOP or bytes). Each timed repetition makes CEILING_CALLS calls.
CEILINGS = {
    "gemm": ("fp32 GEMM [1024,768] x [3072,768]^T (prefill's FFN key), GFLOP/s",
             (1024, 768), (3072, 768), 2 * 1024 * 768 * 3072),
    "gemv": ("fp32 gemv of the [50277,768] head (154 MB, weights streamed from DRAM), GB/s",
             (50277, 768), (768,), 50277 * 768 * 4),
}
CEILING_CALLS = 4
XLA_ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


# ---- random official-format checkpoint ----------------------------------------------------
def random_rwkv4(L: int, C: int, V: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random RWKV-4 tensors under the official keys (reference §2.3) with sane activations.

    LayerNorms are identity (weight 1, bias 0); time_decay/time_first/time_mix follow the
    official init (§2.4); matrices are N(0, 1/in) so projections keep unit scale, with the
    two residual outputs (att.output, ffn.value) scaled down by sqrt(2L) as in GPT-2 so the
    residual stream stays O(1) through the layers.
    """
    rng = np.random.default_rng(seed)
    F = 4 * C
    f32 = np.float32

    def mat(d_out, d_in, scale=1.0):
        w = rng.standard_normal((d_out, d_in), dtype=f32)
        w *= f32(scale / math.sqrt(d_in))
        return w

    def ln(prefix):
        return {f"{prefix}.weight": np.ones(C, f32), f"{prefix}.bias": np.zeros(C, f32)}

    out_scale = 1.0 / math.sqrt(2 * L)
    h = np.arange(C, dtype=np.float64)
    ddd = h / C
    zigzag = ((h + 1) % 3) - 1
    t = {"emb.weight": rng.standard_normal((V, C), dtype=f32), **ln("blocks.0.ln0")}
    for i in range(L):
        r01 = i / (L - 1) if L > 1 else 0.0
        r10 = 1.0 - i / L
        p = f"blocks.{i}."
        t.update(ln(p + "ln1"))
        t.update(ln(p + "ln2"))
        t[p + "att.time_decay"] = (-5 + 8 * (h / (C - 1)) ** (0.7 + 1.3 * r01)).astype(f32)
        t[p + "att.time_first"] = (math.log(0.3) + 0.5 * zigzag).astype(f32)
        for name, val in (("k", ddd ** r10), ("v", ddd ** r10 + 0.3 * r01),
                          ("r", ddd ** (0.5 * r10))):
            t[f"{p}att.time_mix_{name}"] = val.astype(f32).reshape(1, 1, C)
        for name in ("key", "value", "receptance"):
            t[f"{p}att.{name}.weight"] = mat(C, C)
        t[p + "att.output.weight"] = mat(C, C, out_scale)
        t[p + "ffn.time_mix_k"] = (ddd ** r10).astype(f32).reshape(1, 1, C)
        t[p + "ffn.time_mix_r"] = (ddd ** r10).astype(f32).reshape(1, 1, C)
        t[p + "ffn.key.weight"] = mat(F, C)
        t[p + "ffn.receptance.weight"] = mat(C, C)
        t[p + "ffn.value.weight"] = mat(C, F, out_scale)
    t.update(ln("ln_out"))
    t["head.weight"] = mat(V, C)
    return t


def checkpoint_path(cache_dir: str, L: int, C: int, V: int, seed: int) -> str:
    """Path of the cached random checkpoint, written on first use."""
    path = os.path.join(cache_dir, f"rwkv4-random-L{L}-C{C}-V{V}-seed{seed}.pth")
    if not os.path.exists(path):
        from rwkv_jax.io.pth import write_pth
        os.makedirs(cache_dir, exist_ok=True)
        t0 = time.perf_counter()
        write_pth(random_rwkv4(L, C, V, seed), path)  # atomic (temp file + rename)
        print(f"wrote {path} ({os.path.getsize(path) / 2**20:.0f} MiB) in "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return path


def token_ids(n: int, V: int, seed: int) -> list[int]:
    """The same pseudo-random token ids in every worker."""
    return np.random.default_rng(seed).integers(0, V, size=n).tolist()


# ---- workers ------------------------------------------------------------------------------
class OfficialRunner:
    """The official ``rwkv`` package, strategy "cpu fp32" (TorchScript per RWKV_JIT_ON)."""

    def __init__(self, args):
        os.environ.setdefault("RWKV_JIT_ON", "1")
        os.environ["RWKV_CUDA_ON"] = "0"
        import torch
        torch.set_num_threads(args.threads)
        from rwkv.model import RWKV
        self.torch = torch
        self.model = RWKV(model=args.ckpt, strategy="cpu fp32", verbose=False)
        self.tokens, self.prompt = args.tokens, args.prompt_tokens
        self.n_decode = args.decode
        self.logits0, self.state0 = self.model.forward(self.prompt, None)
        self.info = {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                     "rwkv": _common._version("rwkv"),
                     "RWKV_JIT_ON": os.environ["RWKV_JIT_ON"],
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

    def ceiling(self, case):
        """torch's own rates on this core: see :data:`CEILINGS`."""
        torch = self.torch
        if not hasattr(self, "_ceil"):
            self._ceil = {name: (torch.randn(*a), torch.randn(*b)) for name, (_, a, b, _)
                          in CEILINGS.items()}
        a, b = self._ceil[case]
        with torch.no_grad():
            for _ in range(CEILING_CALLS):
                torch.mm(a, b.t()) if b.ndim == 2 else torch.mv(a, b)


class JaxRunner:
    """rwkv_jax variants, each a ``jax.jit`` of a pure function of ``(params, tokens, state)``."""

    def __init__(self, args):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        import rwkv_jax

        self.jax = jax
        self.n_decode = args.decode
        self.tokens = jnp.asarray([args.tokens], jnp.int32)
        prompt = jnp.asarray([args.prompt_tokens], jnp.int32)
        self.fns = {}
        for variant in args.variants:
            model = rwkv_jax.load(args.ckpt, **JAX_VARIANTS[variant])
            graphdef, params = nnx.split(model)

            @jax.jit
            def prefill(params, tokens, graphdef=graphdef):
                # last-token logits only, as the official forward(tokens, None) returns
                m = nnx.merge(graphdef, params)
                h, state = m.hidden(tokens)
                return m.head(h[:, -1]).astype(jnp.float32), state

            @jax.jit
            def step(params, tok, state, graphdef=graphdef):
                m = nnx.merge(graphdef, params)
                logits, state = m(tok[:, None], state)
                logits = logits[:, -1]
                return jnp.argmax(logits, axis=-1).astype(jnp.int32), state

            logits0, state0 = prefill(params, prompt)
            tok0 = jnp.argmax(logits0, axis=-1).astype(jnp.int32)
            self.fns[variant] = (params, prefill, step, tok0, state0)
        self.info = {"jax": jax.__version__, "backend": jax.default_backend(),
                     "rwkv_jax": os.path.dirname(rwkv_jax.__file__),
                     "devices": [str(d) for d in jax.devices()],
                     "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}

    def prefill(self, variant):
        params, prefill, *_ = self.fns[variant]
        logits, _ = prefill(params, self.tokens)
        return self.jax.block_until_ready(logits)

    def decode(self, variant, steps=None):
        params, _, step, tok, state = self.fns[variant]
        toks = []
        for _ in range(steps or self.n_decode):  # async dispatch: no host sync inside the loop
            toks.append(tok)
            tok, state = step(params, tok, state)
        self.jax.block_until_ready(state)
        return toks

    def check(self, variant):
        return {"logits": np.asarray(self.prefill(variant), np.float32)[0].tolist(),
                "decode": [int(t[0]) for t in self.decode(variant)]}

    def ceiling(self, case):
        """XLA's own rates on this core: see :data:`CEILINGS`."""
        jax, jnp = self.jax, self.jax.numpy
        if not hasattr(self, "_ceil"):
            key = jax.random.PRNGKey(0)
            mm = jax.jit(lambda a, b: jnp.einsum("ri,oi->ro", a, b))
            mv = jax.jit(lambda a, b: jnp.einsum("oi,i->o", a, b))
            self._ceil = {name: (mm if len(bs) == 2 else mv, jax.random.normal(key, a_s),
                                 jax.random.normal(key, bs))
                          for name, (_, a_s, bs, _) in CEILINGS.items()}
            for f, a, b in self._ceil.values():
                f(a, b).block_until_ready()
        f, a, b = self._ceil[case]
        out = [f(a, b) for _ in range(CEILING_CALLS)]
        jax.block_until_ready(out)


def worker_main(args) -> None:
    """Serve JSON commands on stdin; replies go to the original stdout, all else to stderr."""
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # library prints (and C-level output) must not corrupt the protocol
    args.tokens = token_ids(args.prefill, args.vocab, args.seed)
    args.prompt_tokens = token_ids(args.prompt, args.vocab, args.seed + 1)
    args.variants = args.variants.split(",")
    t0 = time.perf_counter()
    runner = OfficialRunner(args) if args.worker == "official" else JaxRunner(args)
    for v in args.variants:
        for _ in range(args.warmup):
            runner.prefill(v)
            runner.decode(v, steps=8)  # compiles / lets TorchScript profile the step
    info = {**runner.info, "setup_s": time.perf_counter() - t0, "env": _common.env_info()}
    reply.write(json.dumps({"ready": True, "info": info}) + "\n")
    reply.flush()
    for line in sys.stdin:
        cmd = json.loads(line)
        fn = getattr(runner, cmd["op"])
        if cmd["op"] == "check":
            out = fn(cmd["variant"])
        else:
            arg = cmd["case"] if cmd["op"] == "ceiling" else cmd["variant"]
            wall, cpu = _common.timed(lambda fn=fn, arg=arg: fn(arg))
            out = {"wall": wall, "cpu": cpu}
        reply.write(json.dumps(out) + "\n")
        reply.flush()


# ---- driver -------------------------------------------------------------------------------
def spawn(kind, variants, args, ckpt, V):
    pin = [] if args.no_pin else ["taskset", "-c", ",".join(map(str, range(args.threads)))]
    python = args.official_python if kind == "official" else args.jax_python
    cmd = pin + [python, os.path.abspath(__file__), "--worker", kind,
                 "--variants", ",".join(variants), "--ckpt", ckpt, "--vocab", str(V),
                 "--threads", str(args.threads), "--prefill", str(args.prefill),
                 "--prompt", str(args.prompt), "--decode", str(args.decode),
                 "--warmup", str(args.warmup), "--seed", str(args.seed)]
    env = dict(os.environ)
    if kind == "official":
        env["RWKV_JIT_ON"], env["RWKV_CUDA_ON"] = "1", "0"
    elif args.threads == 1:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + XLA_ONE_THREAD).strip()
    return _common.Worker(cmd, env)


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
    p.add_argument("--official-python", default=OFFICIAL_PYTHON)
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
    ckpt = checkpoint_path(args.cache_dir, L, C, V, args.seed)

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

    checks = {v: workers[owner[v]].request(op="check", variant=v) for v in impls}
    runs = {(v, op): [] for v in impls for op in ("prefill", "decode")}
    order = list(impls)
    for r in range(args.repeats):
        for v in order:
            for op in ("prefill", "decode"):
                if sum(w for w, _ in runs[(v, op)]) > args.max_op_seconds:
                    continue  # a very slow case gets fewer repeats (see the "reps" column)
                out = workers[owner[v]].request(op=op, variant=v)
                runs[(v, op)].append((out["wall"], out["cpu"]))
        order = order[1:] + order[:1]  # rotate: no implementation always runs first
        print(f"round {r + 1}/{args.repeats} done at {time.perf_counter() - t_start:.0f} s",
              file=sys.stderr)
    ceil = {(name, case): [] for name in workers for case in CEILINGS}
    if not args.no_ceilings:
        for _ in range(args.repeats):
            for name, w in workers.items():
                for case in CEILINGS:
                    out = w.request(op="ceiling", case=case)
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

    env = _common.env_info()
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
            for case, (desc, _, _, work) in CEILINGS.items():
                s_ = _common.summarize(ceil[(name, case)])
                rate = work * CEILING_CALLS / s_["min_s"] / 1e9
                ceilings[f"{name}:{case}"] = rate
                rows.append([f"{lib}: {desc}", f"{rate:.1f}", f"{s_['cpu_util']:.2f}"])
        print("\nCeilings, each library on this core in this run (best of the repeats):\n")
        print(_common.markdown_table(["what", "rate", "cpu util"], rows))
        if "official" in workers and "jax" in workers:
            print(f"\nXLA/torch: fp32 GEMM "
                  f"{ceilings['jax:gemm'] / ceilings['official:gemm']:.2f}x, fp32 weight "
                  f"streaming {ceilings['jax:gemv'] / ceilings['official:gemv']:.2f}x")
    if args.json:
        _common.write_json(args.json, {"ceilings": ceilings,
            "shape": {"L": L, "C": C, "V": V}, "args": vars(args), "env": env,
            "workers": {k: {"cmd": w.cmd, "info": w.info} for k, w in workers.items()},
            "results": results})


if __name__ == "__main__":
    main()
