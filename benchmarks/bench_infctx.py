"""Memory of one compiled training step with rows in chunks (``train.chunk_len``, "infctx").

For each ``ctx_len:chunk_len`` case the full optimizer step (:func:`rwkv_jax.train.step.
train_step`: forward, backward, AdamW) of a small RWKV-7 is jitted, lowered and compiled
(nothing runs), and XLA's ``compiled.memory_analysis()`` is read: ``temp`` is the scratch
the step needs beyond its inputs and outputs (the activations kept for the backward live
here), ``args``/``out`` the state and batch in and out, ``peak`` = args + out + temp -
aliased (the donated state's buffers reused for the output). chunk_len 0 = whole rows.
On CPU the analysis is of the CPU program; a GPU's differs in detail, not in scaling. ::

    python benchmarks/bench_infctx.py
    python benchmarks/bench_infctx.py --cases 8192:256,8192:1024,1024:0 --batch 2
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
from flax import nnx

import rwkv_jax
from rwkv_jax.model.functional import tree_names
from rwkv_jax.model.lm import RWKV
from rwkv_jax.train import methods, optim
from rwkv_jax.train.config import OptimizerConfig
from rwkv_jax.train.state import TrainState
from rwkv_jax.train.step import Batch, StepSpec, train_step


def analyse(cfg, batch: int, ctx_len: int, chunk_len: int, chunk_grad: str) -> dict:
    """Compile one train step for ``[1, batch, ctx_len]`` batches; its memory analysis."""
    method = methods.Full()
    graphdef, params, frozen = method.split(RWKV(cfg, rngs=nnx.Rngs(0)))
    tx = optim.make_optimizer(params, tree_names(params), cfg.version, OptimizerConfig())
    spec = StepSpec(graphdef=graphdef, method=method, tx=tx, lr=lambda step: 1e-3,
                    chunk_len=chunk_len, chunk_grad=chunk_grad)
    state = jax.eval_shape(lambda p, f: TrainState.create(p, f, tx, 0), params, frozen)
    ids = jax.ShapeDtypeStruct((1, batch, ctx_len), jnp.int32)
    micro = Batch(ids, ids, jax.ShapeDtypeStruct((1, batch, ctx_len), jnp.float32))
    t0 = time.perf_counter()
    compiled = jax.jit(functools.partial(train_step, spec=spec),
                       donate_argnums=0).lower(state, micro).compile()
    seconds = time.perf_counter() - t0
    m = compiled.memory_analysis()
    mib = 1 / 2**20
    return {"ctx_len": ctx_len, "chunk_len": chunk_len, "compile_s": seconds,
            "temp_mib": m.temp_size_in_bytes * mib, "args_mib": m.argument_size_in_bytes * mib,
            "out_mib": m.output_size_in_bytes * mib,
            "peak_mib": (m.argument_size_in_bytes + m.output_size_in_bytes
                         + m.temp_size_in_bytes - m.alias_size_in_bytes) * mib}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="1024:0,8192:256,8192:0",
                   help="comma-separated ctx_len:chunk_len (0 = whole rows)")
    p.add_argument("--shape", default="4,256,256", help="n_layer,n_embd,vocab of the RWKV-7")
    p.add_argument("--batch", type=int, default=1, help="rows per micro-batch")
    p.add_argument("--chunk-grad", default="full", choices=("full", "truncated"))
    args = p.parse_args(argv)
    n_layer, n_embd, vocab = map(int, args.shape.split(","))
    cfg = rwkv_jax.RWKVConfig(version="7", n_layer=n_layer, n_embd=n_embd, vocab_size=vocab,
                              head_size=64)
    print(f"RWKV-7 L{n_layer} C{n_embd} V{vocab}, batch {args.batch}, chunk_grad "
          f"{args.chunk_grad}, jax {jax.__version__} on {jax.default_backend()} "
          f"(wkv {cfg.resolved_impl.value})")
    print(f"{'ctx_len':>8} {'chunk_len':>9} {'temp MiB':>10} {'args MiB':>9} {'out MiB':>8} "
          f"{'peak MiB':>9} {'compile s':>9}")
    for case in args.cases.split(","):
        ctx, chunk = map(int, case.split(":"))
        r = analyse(cfg, args.batch, ctx, chunk, args.chunk_grad)
        print(f"{ctx:>8} {chunk:>9} {r['temp_mib']:>10.1f} {r['args_mib']:>9.1f} "
              f"{r['out_mib']:>8.1f} {r['peak_mib']:>9.1f} {r['compile_s']:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
