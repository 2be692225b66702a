"""``rwkv-jax info MODEL``: the config inferred from a checkpoint and its parameter count."""

from __future__ import annotations

import argparse

from rwkv_jax.cli.args import existing_model

HELP = "show the config inferred from a checkpoint"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=existing_model,
                   help="checkpoint: official .pth, .safetensors or run directory")


def run(args: argparse.Namespace) -> int:
    from rwkv_jax.checkpoint import model_tensors
    from rwkv_jax.cli.common import load_model
    args.quiet = True  # stdout is the report; no load log line
    model = load_model(args, args.model)
    n = sum(v.size for v in model_tensors(model).values())
    for k, v in model.config.to_dict().items():
        print(f"{k:14s} {v}")
    print(f"{'parameters':14s} {n:,}")
    return 0
