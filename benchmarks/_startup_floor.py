"""The floor under a warm ``rwkv-jax generate`` with two compiled programs (bench_startup.py).

A warm ``rwkv-jax generate`` runs two XLA programs: the prompt's padded prefill chunk and the
decode step. The persistent compilation cache spares it the compiles, but it still builds the
model, traces and lowers both programs, and loads both executables. This script measures what
is left when every avoidable step is gone: no model object, no tracing, no lowering, no Flax
NNX; only importing jax and flax, reading the .pth, and loading the two executables that the
CLI itself would run, serialized ahead of time, then the same greedy tokens.

    python benchmarks/_startup_floor.py prepare FIXTURE PROMPT N OUT   # once, not timed
    python benchmarks/_startup_floor.py run OUT FIXTURE                # the timed process

``prepare`` compiles the CLI's programs (``lm._apply`` on the padded prompt with its resets,
``generate.decode_step`` greedy, batch 1), each wrapped to take and return flat lists so
that loading them needs no rwkv_jax class, and pickles them with
``jax.experimental.serialize_executable`` and the weights' order. ``run`` prints the text;
bench_startup.py checks it equals the CLI's. Benchmark-only: it is no part of the package.
"""

from __future__ import annotations

import pickle
import sys


def prepare(fixture: str, prompt: str, n: int, out: str) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.experimental import serialize_executable

    import rwkv_jax
    from rwkv_jax.generate import Sampling, SamplingArrays, decode_step, sampling_arrays
    from rwkv_jax.model import functional, lm

    model = rwkv_jax.load(fixture)
    moduledef, values = functional.split(model)
    _, state_tree = nnx.split(model)
    order = [functional.dotted_name(p) for p, _ in nnx.to_flat_state(state_tree)]
    V = model.config.vocab_size
    ids = list(prompt.encode("utf-8"))
    size = lm.padded_length(len(ids)) or len(ids)
    if size not in lm.PREFILL_SIZES:
        raise SystemExit(f"a {len(ids)}-token prompt is not one chunk; use a shorter one")
    tokens = np.zeros((1, size), np.int32)
    tokens[0, size - len(ids):] = ids
    resets = np.zeros((1, size), np.bool_)
    resets[0, size - len(ids)] = True
    state_leaves, state_def = jax.tree.flatten(model.init_state(1))
    sp = sampling_arrays([Sampling(temperature=0.0)], V)

    def prefill(vals, toks, leaves, res):
        state = jax.tree.unflatten(state_def, leaves)
        logits, state = moduledef.merge(vals).forward(toks, state, logits_to_keep=1,
                                                      resets=res)
        return logits[:, -1], jax.tree.leaves(state)

    def step(vals, logits, leaves, seeds, i, active, sp_leaves):
        state = jax.tree.unflatten(state_def, leaves)
        tok, logits, state, _ = decode_step.__wrapped__(
            moduledef, vals, logits, state, None, seeds, i, active, SamplingArrays(*sp_leaves),
            greedy=True)
        return tok, logits, jax.tree.leaves(state)

    seeds, active = jnp.zeros((1,), jnp.uint32), jnp.ones((1,), jnp.bool_)
    progs = {
        "prefill": jax.jit(prefill).lower(values, tokens, state_leaves, resets).compile(),
        "step": jax.jit(step, donate_argnums=(1,)).lower(
            values, jnp.zeros((1, V), jnp.float32), state_leaves, seeds, jnp.int32(0), active,
            list(sp)).compile(),
    }
    with open(out, "wb") as f:
        pickle.dump({"order": order, "dtypes": [str(v.dtype) for v in values],
                     "tokens": tokens, "resets": resets, "n": n,
                     "state": [(x.shape, str(x.dtype)) for x in state_leaves],
                     "sampling": [np.asarray(x) for x in sp],
                     **{k: serialize_executable.serialize(c) for k, c in progs.items()}}, f)


def run(blob: str, fixture: str) -> None:
    import flax  # noqa: F401  (the import baseline is jax + flax)
    import jax
    import jax.numpy as jnp
    from jax.experimental import serialize_executable

    from rwkv_jax.io.pth import read_pth

    with open(blob, "rb") as f:
        d = pickle.load(f)
    tensors = read_pth(fixture)
    values = jax.device_put([tensors[k].astype(dt) for k, dt in zip(d["order"], d["dtypes"])])
    prefill = serialize_executable.deserialize_and_load(*d["prefill"])
    step = serialize_executable.deserialize_and_load(*d["step"])
    leaves = [jnp.zeros(shape, dt) for shape, dt in d["state"]]
    logits, leaves = prefill(values, d["tokens"], leaves, d["resets"])
    seeds, active = jnp.zeros((1,), jnp.uint32), jnp.ones((1,), jnp.bool_)
    sp = [jnp.asarray(x) for x in d["sampling"]]
    out = []
    for i in range(d["n"]):
        tok, logits, leaves = step(values, logits, leaves, seeds, jnp.int32(i), active, sp)
        out.append(int(tok[0]))
    sys.stdout.write(bytes(t for t in out if t < 256).decode("utf-8", "replace"))


if __name__ == "__main__":
    if sys.argv[1] == "prepare":
        prepare(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    else:
        run(sys.argv[2], sys.argv[3])
