"""Argument types and groups shared by the commands.

Every type here checks its value while the command line is parsed, so a bad value is one
``rwkv-jax CMD: error: argument --X: ...`` line (exit 2) before anything is loaded or JAX
is imported. Nothing here imports JAX or the model code.
"""

from __future__ import annotations

import argparse
import math
import os
import stat
import sys
from collections.abc import Callable

Type = Callable[[str], object]


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line, ``PROG: error: MESSAGE``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _named(name: str, fn):
    fn.__name__ = name  # argparse names the type in "invalid <name> value" messages
    return fn


# ---- numbers -------------------------------------------------------------------------------
def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _subject(name: str | None) -> str:
    return f"{name} must be" if name else "must be"


def int_at_least(lo: int, name: str | None = None) -> Type:
    """An integer ``>= lo``; ``name`` (the library's name of the value) leads the message."""

    def parse(text: str) -> int:
        value = _int(text)
        if value < lo:
            raise argparse.ArgumentTypeError(f"{_subject(name)} >= {lo}, got {value}")
        return value

    return _named(f"int>={lo}", parse)


def finite_float(text: str) -> float:
    """Any finite float (no nan / inf)."""
    return _float(text)


def float_in(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
             hi_open: bool = False, name: str | None = None) -> Type:
    """A finite float in the interval ``lo..hi`` (closed unless ``*_open``; None = unbounded);
    ``name`` (the library's name of the value) leads the message."""
    left = "(" if lo_open else "["
    right = ")" if hi_open else "]"
    where = (f"> {lo}" if lo_open else f">= {lo}") if hi is None else \
        f"in {left}{lo}, {hi}{right}"

    def parse(text: str) -> float:
        value = _float(text)
        below = lo is not None and (value <= lo if lo_open else value < lo)
        above = hi is not None and (value >= hi if hi_open else value > hi)
        if below or above:
            raise argparse.ArgumentTypeError(f"{_subject(name)} {where}, got {text}")
        return value

    return _named("float", parse)


def id_list(text: str) -> tuple[int, ...] | None:
    """``auto`` -> None, ``none`` -> (), ``ID[,ID...]`` -> the non-negative token ids."""
    if text == "auto":
        return None
    if text == "none":
        return ()
    try:
        ids = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected auto, none or comma-separated token ids, got {text!r}") from None
    if any(i < 0 for i in ids):
        raise argparse.ArgumentTypeError(f"token ids must be >= 0, got {text!r}")
    return ids


def separator(text: str) -> int | str | None:
    """``auto`` -> "auto", ``none`` -> None, else a token id >= 0."""
    if text in ("auto", "none"):
        return None if text == "none" else "auto"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected auto, none or a token id, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"token id must be >= 0, got {value}")
    return value


# ---- paths ---------------------------------------------------------------------------------
def _stat(text: str) -> os.stat_result:
    try:
        return os.stat(text)
    except FileNotFoundError:
        raise argparse.ArgumentTypeError(f"{text}: no such file or directory") from None
    except NotADirectoryError:
        raise argparse.ArgumentTypeError(f"{text}: a parent is not a directory") from None
    except OSError as e:
        raise argparse.ArgumentTypeError(f"{text}: {e.strerror or e}") from None


def existing_file(text: str) -> str:
    """An existing regular file (never a FIFO or device, whose open could block)."""
    mode = _stat(text).st_mode
    if stat.S_ISDIR(mode):
        raise argparse.ArgumentTypeError(f"{text}: is a directory, expected a file")
    if not stat.S_ISREG(mode):
        raise argparse.ArgumentTypeError(f"{text}: not a regular file")
    return text


def existing_model(text: str) -> str:
    """An existing checkpoint file or run directory (never a FIFO or device)."""
    mode = _stat(text).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise argparse.ArgumentTypeError(f"{text}: not a regular file or directory")
    return text


# ---- groups --------------------------------------------------------------------------------
def add_model_args(p: argparse.ArgumentParser, *, positional: bool = False) -> None:
    """``--model`` (unless the command takes it positionally) and the load overrides."""
    if not positional:
        p.add_argument("--model", required=True, type=existing_model,
                       help="checkpoint: run directory, .safetensors or official .pth")
    g = p.add_argument_group("model overrides (passed to rwkv_jax.load)")
    g.add_argument("--ln-x-eps", type=float_in(0, lo_open=True),
                   help="GroupNorm eps of v5+ ln_x (official 64e-5; the tiny v5 fixtures "
                        "need 1e-5)")
    g.add_argument("--compute-dtype", choices=("float32", "bfloat16", "float16"))
    g.add_argument("--param-dtype", choices=("float32", "bfloat16", "float16"))
    g.add_argument("--wkv-impl", help="WKV form, e.g. auto, scan, associative, chunked")


MODEL_OVERRIDES = ("ln_x_eps", "compute_dtype", "param_dtype", "wkv_impl")


def add_tokenizer_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", metavar="bytes|world|PATH",
                   help="default: the run directory's tokenizer.json, else by vocab size "
                        "(256: bytes, 65536: world; 50277 needs a tokenizer.json path)")


def add_quiet_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no log lines or progress on stderr")


def log(args: argparse.Namespace, msg: str) -> None:
    """A ``[rwkv-jax]`` log line on stderr, unless ``--quiet``."""
    if not getattr(args, "quiet", False):
        print(f"[rwkv-jax] {msg}", file=sys.stderr, flush=True)
