"""``rwkv-jax info MODEL [--verify]``: the config inferred from a checkpoint and its
parameter count; ``--verify`` checks the whole file first (:func:`rwkv_jax.verify`)."""

from __future__ import annotations

import argparse

from rwkv_jax.cli.args import existing_model

HELP = "show the config inferred from a checkpoint (--verify: check it thoroughly)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=existing_model,
                   help="checkpoint: official .pth, .safetensors or run directory")
    p.add_argument("--verify", action="store_true",
                   help="read every byte: zip CRCs of a .pth, the safetensors header against "
                        "the file, tensor bounds, NaN/inf, keys and shapes; prints each "
                        "problem and exits 1 if there is one")


def run(args: argparse.Namespace) -> int:
    from rwkv_jax.checkpoint import model_tensors, verify
    from rwkv_jax.cli.common import load_model
    if args.verify:
        problems = verify(args.model)
        for line in problems:
            print(f"problem: {line}")
        if problems:
            return 1
        print(f"{args.model}: verified (CRCs, header, bounds, finite values, keys and shapes)")
    args.quiet = True  # stdout is the report; no load log line
    model = load_model(args, args.model)
    n = sum(v.size for v in model_tensors(model).values())
    for k, v in model.config.to_dict().items():
        print(f"{k:14s} {v}")
    print(f"{'parameters':14s} {n:,}")
    return 0
