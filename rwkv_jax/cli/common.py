"""Model and tokenizer loading shared by ``generate``, ``eval``, ``convert`` and ``info``.

Heavy modules (JAX, the model) are imported inside the functions, never at import time.
"""

from __future__ import annotations

import argparse
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


def given_tokenizer(model_path, spec: str | None):
    """The tokenizer that needs no model: ``spec`` (bytes, world, a tokenizer.json or a run
    directory), else the run directory's own; None when only the vocabulary size can tell.
    Call it before loading the model so that a bad ``--tokenizer`` fails first."""
    from rwkv_jax.rundir import RunDir
    from rwkv_jax.tokenizers import resolve_tokenizer
    if spec is not None:
        return resolve_tokenizer(spec)
    if model_path is not None and (pathlib.Path(model_path) / RunDir.TOKENIZER).is_file():
        return resolve_tokenizer(None, model_path=model_path)
    return None


def fit_tokenizer(tok, vocab_size: int):
    """``tok`` (or, when None, the tokenizer inferred from ``vocab_size``: 256 -> bytes,
    65536 -> world), checked to fit a model of ``vocab_size`` ids."""
    from rwkv_jax.tokenizers import resolve_tokenizer
    return resolve_tokenizer(tok, vocab_size=vocab_size)


def resolve_tokenizer(model_path, spec: str | None, vocab_size: int):
    """The tokenizer for a model: :func:`given_tokenizer`, else inferred from ``vocab_size``."""
    return fit_tokenizer(given_tokenizer(model_path, spec), vocab_size)
