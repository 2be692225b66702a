"""``rwkv-jax convert IN OUT``: between official .pth, .safetensors and run directories."""

from __future__ import annotations

import argparse
import os
import pathlib

from rwkv_jax.cli.args import add_model_args, add_quiet_arg, existing_model, log

HELP = "convert a checkpoint between .pth, .safetensors and run directories"
FILE_SUFFIXES = (".pth", ".safetensors")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", type=existing_model,
                   help="official .pth, .safetensors or run directory")
    p.add_argument("output", help="OUT.pth, OUT.safetensors, or a run directory (an existing "
                                  "directory or a name without suffix): model.safetensors + "
                                  "config.json [+ tokenizer.json]")
    p.add_argument("--names", choices=("official", "hf", "fla"), default="official",
                   help="tensor names to write (hf: Hugging Face transformers RWKV-4, HF "
                        "remote-code RWKV-5/6, flash-linear-attention RWKV-7; fla: "
                        "flash-linear-attention RWKV-6/7)")
    p.add_argument("--tokenizer", metavar="bytes|world|PATH",
                   help="tokenizer.json to write into a run directory (default: the input "
                        "run directory's, else by vocab size where it is unambiguous)")
    add_model_args(p, positional=True)
    add_quiet_arg(p)


def check_output(dst: pathlib.Path) -> bool:
    """Raise ValueError unless ``dst`` can be written; True for a file output (.pth /
    .safetensors), False for a run directory. Runs before the model is loaded."""
    is_file = dst.suffix in FILE_SUFFIXES and not dst.is_dir()
    if dst.suffix in FILE_SUFFIXES and dst.is_dir():
        raise ValueError(f"{dst}: is a directory; a {dst.suffix} output must be a file")
    if not is_file:
        if dst.exists() and not dst.is_dir():
            raise ValueError(f"{dst}: exists and is not a directory")
        if dst.suffix and not dst.is_dir():
            raise ValueError(f"{dst}: unknown output suffix {dst.suffix!r}; use .pth, "
                             ".safetensors, or a directory name without a suffix")
    # what will be created lives in the nearest existing ancestor: it must be a writable dir
    target = dst if not is_file and dst.is_dir() else dst.parent
    base = target
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise ValueError(f"{dst}: cannot create it, {base} is not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ValueError(f"{dst}: cannot write in {base} (permission denied)")
    return is_file


def run(args: argparse.Namespace) -> int:
    import rwkv_jax
    from rwkv_jax.cli.common import load_model, resolve_tokenizer
    from rwkv_jax.rundir import RunDir
    src, dst = pathlib.Path(args.input), pathlib.Path(args.output)
    to_file = check_output(dst)
    model = load_model(args, src)
    if to_file:
        rwkv_jax.save(model, dst, names=args.names)
        print(f"wrote {dst}")
        return 0
    try:
        tok = resolve_tokenizer(src if src.is_dir() else None, args.tokenizer,
                                model.config.vocab_size)
    except ValueError as e:
        log(args, f"no tokenizer.json written ({e})")
        tok = None
    written = RunDir(dst).write_model(model, tok, names=args.names)
    print(f"wrote {dst}/ ({', '.join(written)})")
    return 0
