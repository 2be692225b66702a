"""The ``rwkv-jax`` command: a thin dispatcher over the library.

Subcommands register themselves in :data:`COMMANDS`; each is ``(help, add_arguments, run)``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

import rwkv_jax

COMMANDS: dict[str, tuple[str, Callable, Callable]] = {}


def command(name: str, help: str):
    """Register ``fn(args) -> int`` as a subcommand; ``fn.add_arguments(parser)`` optional."""

    def wrap(fn):
        COMMANDS[name] = (help, getattr(fn, "add_arguments", lambda p: None), fn)
        return fn

    return wrap


def _info_args(p: argparse.ArgumentParser):
    p.add_argument("model", help="checkpoint: official .pth, .safetensors or run directory")


def _info(args) -> int:
    """Print the inferred config and parameter count of a checkpoint."""
    model = rwkv_jax.load(args.model)
    from rwkv_jax.checkpoint import model_tensors
    n = sum(v.size for v in model_tensors(model).values())
    for k, v in model.config.to_dict().items():
        print(f"{k:14s} {v}")
    print(f"{'parameters':14s} {n:,}")
    return 0


_info.add_arguments = _info_args
command("info", "show the config inferred from a checkpoint")(_info)


def build_parser() -> argparse.ArgumentParser:
    import rwkv_jax.commands  # noqa: F401  (registers the subcommands)
    import rwkv_jax.commands_infer  # noqa: F401
    parser = argparse.ArgumentParser(
        prog="rwkv-jax",
        description="RWKV language models in JAX/Flax: train, run and convert checkpoints.")
    parser.add_argument("--version", action="version", version=f"rwkv-jax {rwkv_jax.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help, description=help))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return COMMANDS[args.command][2](args)
    except (rwkv_jax.CheckpointError, rwkv_jax.ConfigError, FileNotFoundError) as e:
        print(f"rwkv-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # `python -m rwkv_jax.cli`: this file runs as __main__, a second copy of the module; the
    # subcommands register into the imported rwkv_jax.cli, so dispatch through that one
    from rwkv_jax.cli import main as _main
    sys.exit(_main())
