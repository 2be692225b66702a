"""Batched decoding throughput on CPU: rwkv_jax's ``generate_tokens`` against its peers, one run.

Total tokens/s over all streams when B streams decode together, B in ``--batches`` (default
1, 4, 16, 64), on a random checkpoint of the 169M RWKV-4 shape (L12 C768 V50277, official
keys; the same file bench_inference.py writes). Each stream has its own ``--prompt``-token
prompt (equal lengths, so the prefill is one batch); the timed part is the ``--decode``
steps after the first token (prefill and the first step excluded).

* ``rwkv_jax`` (public API only): ``rwkv_jax.load(path)``, then
  ``rwkv_jax.generate.generate_tokens(model, prompts, max_tokens=, sampling=)``, which decodes
  every stream in one jitted step. Greedy (``Sampling(temperature=0)``) and, as a second
  row-set, sampled (``temperature=1, top_p=0.85``: the softmax, sort and cumulative sum over
  the vocabulary per stream per step).
* ``hf``: transformers ``RwkvForCausalLM.generate`` on the same weights (renamed with
  ``rwkv_jax.checkpoint.to_hf_names``), batched, greedy, ``use_cache=True``; its decode time
  is ``generate(N+1 new tokens) - generate(1 new token)``.
* ``official``: the official ``rwkv`` package (strategy "cpu fp32", TorchScript), one stream
  at a time: ``forward([token], state)`` per token, the reference every ratio is taken to
  (B streams take it B times as long).

Checks printed with the table: every batched greedy stream equals the same prompt decoded
alone (streams 0..``--check-streams``-1 against single-stream runs, and every B against the
largest B on the streams they share), and stream 0's greedy tokens against the official
package's and HF's.

Bounds from ceilings measured by the JAX worker in the same run: a step reads every weight
once (4·(13·L·C² + V·C) bytes fp32) and does 2·(13·L·C² + V·C)·B FLOP, so
``B / max(bytes / stream rate, FLOP / GEMM rate)`` tokens/s is the roofline of a step.

Threads: ``--threads 1`` (default) pins every worker with ``taskset -c 0``, single-threaded
XLA / ``torch.set_num_threads(1)``. ::

    python benchmarks/bench_decode.py --json out/decode_t1.json
    python benchmarks/bench_decode.py --variants fp32,bf16w --batches 1,16,64
    python benchmarks/bench_decode.py --shape 2,64,256 --batches 1,4 --decode 8 --repeats 1 \\
        --prompt 4                                            # smoke test (~1 min)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

JAX_VARIANTS = {
    "fp32": {},
    "bf16w": {"param_dtype": "bfloat16", "compute_dtype": "bfloat16"},
}
TARGET_B, TARGET_X = 16, 8.0  # B=16 fp32 >= 8x the official single-stream rate


def step_matrices(L: int, C: int, V: int) -> list[tuple[int, int]]:
    """``(out, in)`` of every matrix one RWKV-4 decode step multiplies by, in order: per layer
    att key/value/receptance/output and ffn receptance [C, C], ffn key [4C, C], ffn value
    [C, 4C]; then the head [V, C] (13·L·C² + V·C weights, the step's roofline bytes)."""
    per_layer = [(C, C)] * 4 + [(4 * C, C), (C, 4 * C), (C, C)]
    return per_layer * L + [(V, C)]


def prompts_for(n: int, args) -> list[list[int]]:
    return [_common.token_ids(args.prompt, args.vocab, args.seed + 100 + i) for i in range(n)]


# ---- workers ------------------------------------------------------------------------------
class JaxRunner(_common.JaxCeilings):
    """rwkv_jax through ``rwkv_jax.load`` and ``generate_tokens`` only."""

    def __init__(self, args):
        import jax

        import rwkv_jax
        from rwkv_jax.generate import Sampling, generate_tokens

        super().__init__()
        self.generate_tokens = generate_tokens
        self.samplings = {"greedy": Sampling(temperature=0.0),
                          "top_p": Sampling(temperature=1.0, top_p=0.85)}
        self.args = args
        self.prompts = prompts_for(max(args.batches), args)
        self.models = {v: rwkv_jax.load(args.ckpt, **JAX_VARIANTS[v]) for v in args.variants}
        self.info = {"jax": jax.__version__, "backend": jax.default_backend(),
                     "rwkv_jax": os.path.dirname(rwkv_jax.__file__),
                     "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}
        for v in args.variants:  # compile every (batch, greedy/sampled) step
            for b in args.batches:
                for mode in self.samplings:
                    self.decode(v, b, mode, steps=2)

    def decode(self, variant, batch, mode, steps=None):
        """``steps`` tokens per stream after the first: (seconds, CPU seconds, tokens [B][n])."""
        steps = steps or self.args.decode
        gen = self.generate_tokens(self.models[variant], self.prompts[:batch],
                                   max_tokens=steps + 1, sampling=self.samplings[mode])
        first, _ = next(gen)  # prefill + the first step: not timed
        out = [first]
        c0, t0 = time.process_time(), time.perf_counter()
        for tok, _ in gen:
            out.append(tok)  # generate_tokens hands back host arrays: each step is complete
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        return {"s": wall, "cpu": cpu, "tokens": np.stack(out, axis=1).tolist()}

    def step_matmuls(self, batch):
        """Best seconds of the step's matmuls alone at M = ``batch`` (:func:`step_matrices`,
        distinct fp32 weights, so they stream from DRAM as in a step), in XLA and in the
        ``x @ W.T`` form of ``rwkv_jax.model.layers.Linear``, one jitted program. The
        ceiling of a decode step through these kernels."""
        import jax
        import jax.numpy as jnp
        L, C, V = self.args.shape_tuple
        if not hasattr(self, "_chain"):
            rng = np.random.default_rng(1)
            self._chain_w = [jnp.asarray(rng.standard_normal(s, np.float32) * 0.02)
                             for s in step_matrices(L, C, V)]
            self._chain = jax.jit(lambda xs, ws: sum(
                jnp.einsum("ri,oi->ro", xs[w.shape[1]], w)[:, 0] for w in ws))
        xs = {n: jnp.ones((batch, n), jnp.float32) for n in (C, 4 * C)}
        return {"s": _common.bench(lambda: self._chain(xs, self._chain_w).block_until_ready(),
                                   repeats=3)["min_s"]}

    def check(self, variant, streams):
        """Batched greedy streams against single-stream runs and across batch sizes."""
        steps = self.args.decode + 1
        batched = {b: np.asarray(self.decode(variant, b, "greedy")["tokens"])
                   for b in self.args.batches}
        largest = batched[max(batched)]
        single = [np.asarray(self.decode_single(variant, i, steps)) for i in range(streams)]
        return {
            "single_vs_batched": {b: [bool(np.array_equal(t[i], single[i]))
                                      for i in range(min(streams, b))]
                                  for b, t in batched.items()},
            "vs_largest_batch": {b: bool(np.array_equal(t, largest[:b]))
                                 for b, t in batched.items()},
            "stream0": single[0].tolist(),
        }

    def decode_single(self, variant, i, steps):
        gen = self.generate_tokens(self.models[variant], [self.prompts[i]], max_tokens=steps,
                                   sampling=self.samplings["greedy"])
        return [int(t[0]) for t, _ in gen]


class HFRunner(_common.TorchCeilings):
    """transformers RwkvForCausalLM, batched ``generate`` (greedy, use_cache)."""

    def __init__(self, args):
        import torch
        import transformers
        from transformers import RwkvConfig, RwkvForCausalLM
        torch.set_num_threads(args.threads)
        transformers.logging.set_verbosity_error()
        super().__init__()
        self.torch, self.args = torch, args
        L, C, V = args.shape_tuple
        cfg = RwkvConfig(vocab_size=V, context_length=1024, hidden_size=C,
                         num_hidden_layers=L, attention_hidden_size=C, intermediate_size=4 * C,
                         layer_norm_epsilon=1e-5, rescale_every=0, tie_word_embeddings=False,
                         use_cache=True)
        self.model = RwkvForCausalLM(cfg).eval()
        with np.load(args.hf_weights) as z:
            state = {k: torch.from_numpy(np.ascontiguousarray(z[k])) for k in z.files}
        self.model.load_state_dict(state, strict=True)
        self.model.generation_config.eos_token_id = None
        self.model.generation_config.pad_token_id = 0
        self.prompts = prompts_for(max(args.batches), args)
        self.info = {"torch": torch.__version__, "transformers": transformers.__version__,
                     "torch_threads": torch.get_num_threads()}
        for b in args.batches:
            self.decode(b, steps=1)

    def _generate(self, batch, new):
        ids = self.torch.tensor(self.prompts[:batch])
        with self.torch.no_grad():
            return self.model.generate(ids, max_new_tokens=new, min_new_tokens=new,
                                       do_sample=False, use_cache=True)

    def decode(self, batch, steps=None):
        steps = steps or self.args.decode
        c0, t0 = time.process_time(), time.perf_counter()
        self._generate(batch, 1)
        c1, t1 = time.process_time(), time.perf_counter()
        out = self._generate(batch, steps + 1)
        c2, t2 = time.process_time(), time.perf_counter()
        return {"s": (t2 - t1) - (t1 - t0), "cpu": (c2 - c1) - (c1 - c0),
                "tokens": out[:, -(steps + 1):].tolist()}


class OfficialRunner(_common.TorchCeilings):
    """The official package, one stream: ``forward([token], state)`` per token."""

    def __init__(self, args):
        import torch
        torch.set_num_threads(args.threads)
        from rwkv.model import RWKV
        super().__init__()
        self.torch, self.args = torch, args
        self.model = RWKV(model=args.ckpt, strategy="cpu fp32", verbose=False)
        self.prompt = prompts_for(1, args)[0]
        self.info = {"torch": torch.__version__, "rwkv": _common._version("rwkv"),
                     "torch_threads": torch.get_num_threads(),
                     "RWKV_JIT_ON": os.environ.get("RWKV_JIT_ON")}
        self.decode(steps=4)

    def decode(self, steps=None):
        steps = steps or self.args.decode
        logits, state = self.model.forward(self.prompt, None)
        tok = int(self.torch.argmax(logits))
        out = [tok]
        logits, state = self.model.forward([tok], state)
        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(steps):
            tok = int(self.torch.argmax(logits))
            out.append(tok)
            logits, state = self.model.forward([tok], state)
        return {"s": time.perf_counter() - t0, "cpu": time.process_time() - c0,
                "tokens": [out]}

    def step_matmuls(self, batch):
        """:meth:`JaxRunner.step_matmuls` in torch (the official package's library), best of two
        layouts: ``x @ W.t()`` on [out, in] weights and ``x @ W`` on [in, out] ones."""
        torch = self.torch
        L, C, V = self.args.shape_tuple
        if not hasattr(self, "_chain_w"):
            g = torch.Generator().manual_seed(1)
            self._chain_w = [torch.randn(*s, generator=g) * 0.02 for s in step_matrices(L, C, V)]
        xs = {n: torch.ones(batch, n) for n in (C, 4 * C)}
        ws = self._chain_w
        with torch.no_grad():
            out_in = _common.bench(lambda: [xs[w.shape[1]] @ w.t() for w in ws],
                                   repeats=3)["min_s"]
            ws_t = [w.t().contiguous() for w in ws]
            in_out = _common.bench(lambda: [xs[w.shape[0]] @ w for w in ws_t],
                                   repeats=3)["min_s"]
            del ws_t
        return {"s": min(out_in, in_out), "out_in_s": out_in, "in_out_s": in_out}


RUNNERS = {"jax": JaxRunner, "hf": HFRunner, "official": OfficialRunner}


# ---- driver -------------------------------------------------------------------------------
def hf_weights(ckpt: str) -> str:
    """The checkpoint's tensors under transformers' names, as an .npz next to it."""
    path = ckpt[:-4] + "-hf.npz"
    if not os.path.exists(path):
        from rwkv_jax.checkpoint import read_tensors, to_hf_names
        tensors = {k: np.asarray(v) for k, v in to_hf_names(read_tensors(ckpt), "4").items()}
        tmp = path + ".tmp.npz"
        np.savez(tmp, **tensors)
        os.replace(tmp, path)
    return path


def agree(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="12,768,50277", help="L,C,V (default: 169M shape)")
    p.add_argument("--batches", default="1,4,16,64")
    p.add_argument("--variants", default="fp32", help=f"rwkv_jax: {', '.join(JAX_VARIANTS)}")
    p.add_argument("--peers", default="official,hf")
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--decode", type=int, default=32, help="timed steps per stream")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-op-seconds", type=float, default=60.0,
                   help="stop repeating a case once its timed calls add up to this")
    p.add_argument("--check-streams", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-pin", action="store_true")
    p.add_argument("--no-ceilings", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "rwkv_jax_bench"))
    p.add_argument("--official-python", default=_common.OFFICIAL_PYTHON)
    p.add_argument("--jax-python", default=sys.executable)
    p.add_argument("--json")
    p.add_argument("--worker", choices=list(RUNNERS), help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--hf-weights", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.shape_tuple = tuple(int(x) for x in args.shape.split(","))
    args.vocab = args.shape_tuple[2]
    args.batches = [int(b) for b in args.batches.split(",")]
    args.variants = args.variants.split(",")
    if args.worker:
        return _common.serve(lambda: RUNNERS[args.worker](args))
    bad = set(args.variants) - set(JAX_VARIANTS)
    if bad:
        p.error(f"unknown --variants {sorted(bad)}; valid: {', '.join(JAX_VARIANTS)}")
    peers = [x for x in args.peers.split(",") if x]
    if set(peers) - {"official", "hf"}:
        p.error("--peers: official and/or hf")

    env = _common.env_info()
    L, C, V = args.shape_tuple
    ckpt = _common.checkpoint_path(args.cache_dir, L, C, V, args.seed)
    common = ["--shape", args.shape, "--batches", ",".join(map(str, args.batches)),
              "--variants", ",".join(args.variants), "--prompt", str(args.prompt),
              "--decode", str(args.decode), "--seed", str(args.seed), "--ckpt", ckpt]
    workers = {"jax": _common.spawn_worker(__file__, args.jax_python, "jax", common,
                                           threads=args.threads, pin=not args.no_pin)}
    if "hf" in peers:
        workers["hf"] = _common.spawn_worker(
            __file__, args.official_python, "hf", common + ["--hf-weights", hf_weights(ckpt)],
            threads=args.threads, pin=not args.no_pin)
    if "official" in peers:
        workers["official"] = _common.spawn_worker(__file__, args.official_python, "official",
                                                   common, threads=args.threads,
                                                   pin=not args.no_pin)
    t_start = time.perf_counter()
    for w in workers.values():
        w.info = w.recv()["info"]
    print(f"workers ready after {time.perf_counter() - t_start:.0f} s", file=sys.stderr)

    checks = {v: workers["jax"].request(op="check", args={"variant": v,
                                                          "streams": args.check_streams})
              ["result"] for v in args.variants}
    cases = [("official", None, None)] if "official" in peers else []
    for b in args.batches:
        cases += [(f"jax:{v}:{mode}", b, (v, mode)) for v in args.variants
                  for mode in ("greedy", "top_p")]
        if "hf" in peers:
            cases.append(("hf", b, None))
    runs = {(name, b): [] for name, b, _ in cases}
    first_tokens = {}
    for r in range(args.repeats):
        for name, b, extra in cases:
            if sum(x["s"] for x in runs[(name, b)]) > args.max_op_seconds:
                continue
            if name == "official":
                out = workers["official"].request(op="decode")["result"]
            elif name == "hf":
                out = workers["hf"].request(op="decode", args={"batch": b})["result"]
            else:
                out = workers["jax"].request(op="decode", args={
                    "variant": extra[0], "batch": b, "mode": extra[1]})["result"]
            first_tokens.setdefault((name, b), out["tokens"][0])
            runs[(name, b)].append({"s": out["s"], "cpu": out["cpu"]})
        cases = cases[1:] + cases[:1]
        print(f"round {r + 1}/{args.repeats} done at {time.perf_counter() - t_start:.0f} s",
              file=sys.stderr)
    ceil = {}
    if not args.no_ceilings:
        for case in _common.CEILINGS:
            ceil[case] = [tuple(workers["jax"].request(op="ceiling", args={"case": case},
                                                       timed=True).values())
                          for _ in range(max(args.repeats, 3))]
    matmuls = {}  # (library, B) -> best seconds of the step's matmuls alone
    if not args.no_ceilings:
        for b in args.batches:
            for lib in ("jax", "official"):
                if lib in workers:
                    matmuls[(lib, b)] = workers[lib].request(
                        op="step_matmuls", args={"batch": b})["result"]["s"]
    for w in workers.values():
        w.close()

    def tps(name, b):
        rs = runs.get((name, b))
        if not rs:
            return None
        s = sorted(x["s"] for x in rs)[len(rs) // 2]
        return (b or 1) * args.decode / s

    official = tps("official", None)
    rates = {case: _common.ceiling_rate(case, rs) for case, rs in ceil.items()}
    weights = 13 * L * C * C + V * C
    print(f"RWKV-4 L{L} C{C} V{V}, random weights; {args.prompt}-token prompt per stream, "
          f"{args.decode} timed decode steps after the first token; median of "
          f"{args.repeats} interleaved repeats; threads={args.threads}"
          f"{'' if args.no_pin else ' (taskset)'}")
    print(_common.format_env(env))
    for name, w in workers.items():
        print(f"{name} worker: { {k: x for k, x in w.info.items() if k != 'env'} }")
    if official:
        print(f"\nofficial rwkv single stream (forward([token], state)): {official:.1f} tokens/s"
              " = 1.00x\n")
    results = {"official_single_stream_tps": official, "ceilings": rates, "rows": []}
    rows = []
    for b in args.batches:
        for v in args.variants:
            g, s_, h = tps(f"jax:{v}:greedy", b), tps(f"jax:{v}:top_p", b), tps("hf", b)
            bytes_ = (2 if v == "bf16w" else 4) * weights
            bound = None
            if rates:
                step_s = max(bytes_ / (rates["gemv"] * 1e9), 2 * weights * b /
                             (rates["gemm"] * 1e9))
                bound = b / step_s
            rows.append([b, v, f"{g:.1f}", _common.ratio(g, official), f"{s_:.1f}",
                         _common.ratio(s_, official),
                         f"{h:.1f}" if h else "-", _common.ratio(h, official),
                         f"{bound:.0f}" if bound else "-",
                         f"{g / bound:.0%}" if bound else "-"])
            results["rows"].append({"batch": b, "variant": v, "greedy_tps": g,
                                    "top_p_tps": s_, "hf_tps": h, "roofline_tps": bound})
    print(_common.markdown_table(
        ["B", "rwkv_jax", "greedy tok/s", "vs official", "top_p tok/s", "vs official",
         "HF generate tok/s", "vs official", "roofline tok/s", "of roofline"], rows))
    if rates:
        print(f"\nCeilings (XLA, this run, best of {max(args.repeats, 3)}): fp32 GEMM "
              f"{rates['gemm']:.1f} GFLOP/s, weight streaming (head gemv) {rates['gemv']:.1f} "
              f"GB/s; a step reads {4 * weights / 1e6:.0f} MB of fp32 weights and does "
              f"{2 * weights / 1e9:.2f} GFLOP per stream")
    if matmuls:
        print("\nThe step's matmuls alone at M = B (13·L·C² + V·C distinct fp32 weights from "
              "DRAM, best of 3; torch: the better of x @ W.t() and x @ W), and the tokens/s "
              "a step could reach if nothing else ran:\n")
        mrows = []
        for b in args.batches:
            row = [b]
            for lib in ("jax", "official"):
                t = matmuls.get((lib, b))
                row += [f"{t * 1e3:.1f}" if t else "-",
                        f"{b / t:.0f} ({_common.ratio(b / t, official)})" if t else "-"]
            g = tps("jax:fp32:greedy", b) if "fp32" in args.variants else None
            best = min(t for (lib, bb), t in matmuls.items() if bb == b)
            row += [f"{g * best / b:.0%}" if g else "-"]
            mrows.append(row)
            results.setdefault("step_matmuls_s", {})[b] = {
                lib: matmuls.get((lib, b)) for lib in ("jax", "official")}
        print(_common.markdown_table(
            ["B", "XLA matmuls ms", "XLA bound tok/s (vs official)", "torch matmuls ms",
             "torch bound tok/s (vs official)", "best matmuls / fp32 greedy step"], mrows))
    print("\nChecks:")
    for v, c in checks.items():
        bad = {b: ok for b, ok in c["single_vs_batched"].items() if not all(ok)}
        print(f"* {v}: batched greedy == single-stream for streams 0..{args.check_streams - 1}"
              f" at every B: {'yes' if not bad else f'NO {bad}'}; every B == the largest B on "
              f"its streams: {'yes' if all(c['vs_largest_batch'].values()) else 'NO'}")
        for peer in ("official", "hf"):
            key = ("official", None) if peer == "official" else ("hf", args.batches[0])
            if key in first_tokens:
                n = agree(c["stream0"], first_tokens[key])
                print(f"  stream 0 greedy tokens equal to {peer}'s: {n} of "
                      f"{min(len(c['stream0']), len(first_tokens[key]))} leading")
    target = tps(f"jax:fp32:greedy", TARGET_B) if "fp32" in args.variants else None
    if target and official:
        x = target / official
        print(f"* target: B={TARGET_B} fp32 >= {TARGET_X:.0f}x official single-stream: "
              f"{x:.2f}x ({'met' if x >= TARGET_X else 'not met'})")
    print(_common.load_line("load average at the end"))
    results["checks"] = checks
    if args.json:
        _common.write_json(args.json, {"args": {k: v for k, v in vars(args).items()},
                                       "env": env, "results": results,
                                       "runs": {f"{k[0]}@{k[1]}": v for k, v in runs.items()},
                                       "workers": {k: {"cmd": w.cmd, "info": w.info}
                                                   for k, w in workers.items()}})


if __name__ == "__main__":
    main()
