"""``rwkv-jax eval``: loss / perplexity / bits per byte of a text, or LAMBADA accuracy.

The result is one line (or ``--json`` object) on stdout; log lines and a progress bar
(windows of a text, documents of LAMBADA) go to stderr, none of them with ``-q``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import sys
import time

from rwkv_jax.cli.args import (add_model_args, add_quiet_arg, add_tokenizer_arg, existing_file,
                               id_list, int_at_least, log)

HELP = "loss / perplexity / bits per byte of a text, or LAMBADA accuracy of a .jsonl"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--data", required=True, type=existing_file,
                   help="text file (loss / perplexity / bits per byte), .jsonl of "
                        '{"text": ...} (LAMBADA last-word accuracy and perplexity), or a '
                        "prepared / binidx token file")
    add_tokenizer_arg(p)
    p.add_argument("--ctx-len", type=int_at_least(1), default=1024,
                   help="window length (default 1024)")
    p.add_argument("--state", choices=("carry", "reset"), default="carry",
                   help="carry (default): the state carries across windows, so the result is "
                        "one pass over the whole text; reset: every window starts from the "
                        "empty state, --batch-size windows per batch, as the trainer's "
                        "val_loss / val_bpb are computed")
    p.add_argument("--max-batches", type=int_at_least(1), default=None,
                   help="with --state reset: score only the first N batches of windows (the "
                        "trainer's train.eval_batches)")
    p.add_argument("--task", choices=("auto", "text", "lambada"), default="auto",
                   help="auto: lambada for .jsonl, else text")
    p.add_argument("--lambada-prefix", default="auto", type=id_list,
                   metavar="auto|none|ID[,ID...]",
                   help="ids before each LAMBADA context (auto: [0] for World/20B "
                        "vocabularies, none for byte/char models)")
    p.add_argument("--batch-size", type=int_at_least(1), default=16,
                   help="LAMBADA documents, or --state reset windows, per batch (default 16)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    add_quiet_arg(p)


@contextlib.contextmanager
def progress_bar(args: argparse.Namespace, unit: str = "it"):
    """A ``progress(done, total)`` callback drawing a tqdm bar on stderr (none with -q)."""
    if args.quiet:
        yield None
        return
    from tqdm import tqdm
    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit=unit, unit_scale=True, desc="eval", file=sys.stderr,
                       dynamic_ncols=True, mininterval=0.5, leave=False)
        bar.update(done - bar.n)

    try:
        yield progress
    finally:
        if bar is not None:
            bar.close()


def run(args: argparse.Namespace) -> int:
    from rwkv_jax import evaluate
    from rwkv_jax.cli.common import fit_tokenizer, given_tokenizer, load_model
    task = args.task
    if task == "auto":
        task = "lambada" if pathlib.Path(args.data).suffix == ".jsonl" else "text"
    # read and check the data and the tokenizer before the (slower) model load
    texts = evaluate.read_jsonl_texts(args.data) if task == "lambada" else None
    tok = given_tokenizer(args.model, args.tokenizer)
    model = load_model(args, args.model)
    tok = fit_tokenizer(tok, model.config.vocab_size)
    t0 = time.perf_counter()
    if task == "lambada":
        with progress_bar(args, "doc") as progress:
            res = evaluate.lambada(model, tok, texts, prefix=args.lambada_prefix,
                                   batch_size=args.batch_size, progress=progress)
        d = {"task": "lambada", **res.to_dict()}
        line = (f"lambada: accuracy {res.accuracy:.4f} ({res.n_correct}/{res.n_docs})  "
                f"perplexity {res.perplexity:.4f}  prefix {list(res.prefix)}")
    else:
        with progress_bar(args) as progress:  # the library counts tokens or windows
            res = evaluate.evaluate_file(
                model, tok, args.data, ctx_len=args.ctx_len, progress=progress,
                state_policy=args.state, batch_size=args.batch_size,
                max_batches=args.max_batches)
        d = {"task": "text", **res.to_dict()}
        how = ("state carried across windows" if res.state == "carry"
               else "every window from the empty state")
        line = (f"loss {res.loss:.4f} nats/token  perplexity {res.perplexity:.4f}  "
                f"bits/byte {res.bits_per_byte:.4f}  accuracy {res.accuracy:.4f}  "
                f"({res.n_tokens} tokens, {res.n_bytes} bytes; windows of {args.ctx_len}, "
                f"{how})")
    log(args, f"evaluated {args.data} ({task}, tokenizer {tok.name}) in "
              f"{time.perf_counter() - t0:.1f}s")
    print(json.dumps(d) if args.json else line)
    return 0
