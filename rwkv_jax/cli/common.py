"""Model and tokenizer loading shared by ``generate``, ``eval``, ``convert`` and ``info``.

Heavy modules (JAX, the model) are imported inside the functions, never at import time.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

from rwkv_jax.cli.args import MODEL_OVERRIDES, log


def load_model(args: argparse.Namespace, path):
    """``rwkv_jax.load(path)`` with the ``--ln-x-eps`` / dtype / ``--wkv-impl`` overrides;
    logs what was loaded and how long it took."""
    import rwkv_jax
    overrides = {k: getattr(args, k) for k in MODEL_OVERRIDES
                 if getattr(args, k, None) is not None}
    t0 = time.perf_counter()
    model = rwkv_jax.load(path, **overrides)
    c = model.config
    log(args, f"loaded {path}: RWKV-{c.version} L{c.n_layer} C{c.n_embd} V{c.vocab_size} "
              f"({c.param_dtype} params, {c.compute_dtype} compute) in "
              f"{time.perf_counter() - t0:.1f}s")
    return model


def _from_file(p: pathlib.Path):
    """A ``tokenizer.json``: an rwkv-jax spec (``{"type": ...}``, what training writes) or a
    Hugging Face tokenizer file."""
    from rwkv_jax.tokenizers import HFTokenizer, tokenizer_from_dict
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{p}: not a readable tokenizer.json ({e})") from None
    if isinstance(d, dict) and d.get("type") in ("bytes", "char", "world", "hf"):
        return tokenizer_from_dict(d)
    return HFTokenizer(p)


def given_tokenizer(model_path, spec: str | None):
    """The tokenizer that needs no model: ``spec`` (bytes, world or a file), else the run
    directory's ``tokenizer.json``; None when only the vocabulary size can tell. Call it
    before loading the model so that a bad ``--tokenizer`` fails first."""
    from rwkv_jax.tokenizers import get_tokenizer
    if spec is not None:
        p = pathlib.Path(spec)
        return _from_file(p) if p.is_file() and p.suffix == ".json" else get_tokenizer(spec)
    run_tok = None if model_path is None else pathlib.Path(model_path) / "tokenizer.json"
    return _from_file(run_tok) if run_tok is not None and run_tok.is_file() else None


def fit_tokenizer(tok, vocab_size: int):
    """``tok`` (or, when None, the tokenizer inferred from ``vocab_size``: 256 -> bytes,
    65536 -> world), checked to fit a model of ``vocab_size`` ids."""
    from rwkv_jax.tokenizers import get_tokenizer
    if tok is None:
        tok = get_tokenizer(None, vocab_size=vocab_size)
    if tok.vocab_size > vocab_size:
        raise ValueError(f"tokenizer {tok.name!r} has {tok.vocab_size} ids, the model only "
                         f"{vocab_size}")
    return tok


def resolve_tokenizer(model_path, spec: str | None, vocab_size: int):
    """The tokenizer for a model: :func:`given_tokenizer`, else inferred from ``vocab_size``."""
    return fit_tokenizer(given_tokenizer(model_path, spec), vocab_size)
