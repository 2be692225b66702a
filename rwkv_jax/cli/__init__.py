"""The ``rwkv-jax`` command: a thin layer over the library, one module per command.

* :mod:`.main`: the parser, the command table and dispatch.
* :mod:`.errors`: the one place where errors become ``rwkv-jax CMD: error: ...`` + exit 2.
* :mod:`.args`: shared argument types (checked while parsing) and argument groups.
* :mod:`.common`: model and tokenizer loading shared by the inference commands.
* :mod:`.compile_cache`: the persistent XLA compilation cache the CLI turns on.
* :mod:`.train`, :mod:`.generate`, :mod:`.eval`, :mod:`.convert`, :mod:`.prepare`,
  :mod:`.info`: one command each: ``HELP``, ``add_arguments(parser)``, ``run(args) -> int``.

Importing this package, building the parser and parsing arguments never import JAX; a
command's ``run`` imports what it needs.
"""

from rwkv_jax.cli.main import COMMANDS, build_parser, main

__all__ = ["COMMANDS", "build_parser", "main"]
