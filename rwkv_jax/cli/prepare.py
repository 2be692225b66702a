"""``rwkv-jax prepare IN... --out PREFIX``: tokenize text / jsonl into a token file."""

from __future__ import annotations

import argparse
import pathlib
import time

from rwkv_jax.cli.args import existing_file, separator

HELP = "tokenize text / jsonl files into a token file for training or eval"
USES_JAX = False  # tokenizing is numpy only: no compilation cache, no JAX import


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="IN", type=existing_file,
                   help="text files (each one document) or .jsonl of {\"text\": ...}")
    p.add_argument("--out", required=True, metavar="PREFIX",
                   help="writes PREFIX.bin (token ids) + PREFIX.json (metadata)")
    p.add_argument("--tokenizer", required=True, metavar="bytes|char|world|PATH")
    p.add_argument("--doc-separator", default="auto", type=separator, metavar="auto|none|ID",
                   help="id after every document (auto: 0 for World/20B, none for bytes/char)")


def run(args: argparse.Namespace) -> int:
    from rwkv_jax.data import prepare
    t0 = time.perf_counter()
    src = prepare(args.inputs, args.out, args.tokenizer, doc_separator=args.doc_separator)
    print(f"wrote {src.path} + {pathlib.Path(src.path).with_suffix('.json')}: {len(src)} tokens "
          f"({src.tokens.dtype}, tokenizer {src.tokenizer.name if src.tokenizer else '?'}) "
          f"in {time.perf_counter() - t0:.1f}s")
    return 0
