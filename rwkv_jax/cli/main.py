"""The ``rwkv-jax`` parser, its command table and dispatch.

Each command is a module with ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``
(optionally ``USES_JAX = False`` and an ``INTERRUPTED`` message); :data:`COMMANDS` lists
them in the order ``--help`` shows. Parsing imports none of JAX: a command's ``run`` imports
what it needs, after the persistent compilation cache is configured.
"""

from __future__ import annotations

import argparse
import types

from rwkv_jax import __version__
from rwkv_jax.cli import compile_cache, convert, generate, info, prepare, train
from rwkv_jax.cli import eval as eval_command
from rwkv_jax.cli.args import Parser
from rwkv_jax.cli.errors import run_command

COMMANDS: dict[str, types.ModuleType] = {
    "train": train,
    "generate": generate,
    "eval": eval_command,
    "convert": convert,
    "prepare": prepare,
    "info": info,
}

_NO_CACHE_HELP = "do not read or write the persistent compilation cache"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="rwkv-jax",
        description="RWKV language models in JAX/Flax: train, run and convert checkpoints.",
        epilog=f"Compilation cache: {compile_cache.HELP}.")
    parser.add_argument("--version", action="version", version=f"rwkv-jax {__version__}")
    parser.add_argument("--no-compile-cache", action="store_true", help=_NO_CACHE_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.HELP, description=command.HELP)
        command.add_arguments(p)
        if getattr(command, "USES_JAX", True):
            # also accepted after the command; SUPPRESS keeps a top-level flag from being reset
            p.add_argument("--no-compile-cache", action="store_true",
                           default=argparse.SUPPRESS, help=_NO_CACHE_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``rwkv-jax`` with ``argv`` (default ``sys.argv[1:]``); the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors (already printed)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if args.command is None:
        parser.print_help()
        return 0
    command = COMMANDS[args.command]

    def run(a: argparse.Namespace) -> int:
        if getattr(command, "USES_JAX", True):
            compile_cache.configure(disabled_by_flag=a.no_compile_cache)
        return command.run(a)

    return run_command(args.command, run, args,
                       interrupted=getattr(command, "INTERRUPTED", "interrupted"))
