"""Fine-tuning: start a run from a checkpoint (``finetune.init_from``) and build its method.

:func:`prepare` loads the checkpoint (an official ``.pth``, a ``.safetensors`` under any
name set we read, or a run directory) with the model config inferred from its shapes plus
the fields shapes cannot tell that the run config sets explicitly; a shape-defining
``model.*`` key set explicitly that contradicts the checkpoint is a ConfigError naming it.
It resolves the tokenizer (the checkpoint's: a run directory's own ``tokenizer.json``, else
World for vocabulary 65536 and bytes for 256, unless ``data.tokenizer`` is set) and builds
the :class:`~rwkv_jax.train.methods.Method`: ``full`` (every parameter, the official
groups), ``lora`` (adapters attached in place, :mod:`rwkv_jax.lora`) or ``state``.

What the run directory gets at the end (:meth:`Finetune.export`): ``model.safetensors`` +
``config.json`` + ``tokenizer.json`` always (LoRA: the merged weights; state tuning: the
unchanged base), plus ``lora.safetensors`` (LoRA) or ``state.npz`` (state tuning).
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Any

import jax
import numpy as np
from flax import nnx

from rwkv_jax import lora as lora_lib
from rwkv_jax.config import ConfigError
from rwkv_jax.model.functional import dotted_name
from rwkv_jax.rundir import RunDir
from rwkv_jax.train.config import RunConfig
from rwkv_jax.train.methods import Full, LoRA, State

# model fields a checkpoint's shapes cannot tell: a fine-tune may set these
UNSHAPED = ("ln_eps", "ln_x_eps", "param_dtype", "compute_dtype", "wkv_impl", "chunk_size")


@dataclasses.dataclass
class Finetune:
    """A run's starting checkpoint and what trains.

    path: ``finetune.init_from`` as given; file: the checkpoint file it names; model: the
    loaded model (with fresh adapters for LoRA); method: the Method; tokenizer: what the
    data is tokenized with (a Tokenizer, or the explicit ``data.tokenizer`` spec)."""

    cfg: Any                 # FinetuneConfig
    path: pathlib.Path
    file: pathlib.Path
    model: Any
    method: Any
    tokenizer: Any
    targets: tuple[str, ...] = ()      # LoRA: the target regexes used
    trained_in_full: tuple[str, ...] = ()  # LoRA: the train_also parameters, by name

    def check_tokenizer(self, tokenizer) -> None:
        """ConfigError when the data's tokenizer has ids the checkpoint's vocabulary lacks."""
        V = self.model.config.vocab_size
        if tokenizer is not None and tokenizer.vocab_size > V:
            raise ConfigError(f"data.tokenizer: {tokenizer.name!r} has {tokenizer.vocab_size} "
                              f"ids, but the checkpoint {self.path} has a vocabulary of {V}; "
                              "use the tokenizer it was trained with (leave data.tokenizer "
                              "unset to follow the checkpoint)")

    def export(self, run_dir: RunDir, model, trainable, tokenizer) -> list[str]:
        """Write what the module docstring lists; ``model``: the trained model on the host,
        ``trainable``: the method's trained part (the state tuning's state). Returns the
        file names written."""
        if isinstance(self.method, LoRA):
            written = run_dir.write_model(lora_lib.merge(model), tokenizer)
            lora_lib.save(run_dir / RunDir.LORA, model, base=self.file, targets=self.targets,
                          trained_in_full=self.trained_in_full)
            return [*written, RunDir.LORA]
        written = run_dir.write_model(model, tokenizer)
        if isinstance(self.method, State):
            from rwkv_jax.state import save_state
            save_state(run_dir / RunDir.STATE, self.method.initial_state(trainable, 1), model)
            written.append(RunDir.STATE)
        return written


def _load_base(cfg: RunConfig):
    """The checkpoint's model and file, with the explicit unshaped fields applied and the
    explicit shape-defining ones checked against it."""
    from rwkv_jax import checkpoint
    ft = cfg.finetune
    explicit = {k: v for k, v in cfg.model_explicit if v is not None}
    overrides = {k: v for k, v in explicit.items() if k in UNSHAPED}
    path = pathlib.Path(ft.init_from).expanduser()
    try:
        file = RunDir(path).checkpoint_file()
        shapes_cfg = checkpoint.infer_config(
            checkpoint.to_official_names(checkpoint.read_tensors(file)))
    except checkpoint.CheckpointError as e:
        raise ConfigError(f"finetune.init_from: {e}") from None
    for key in sorted(set(explicit) - set(UNSHAPED)):  # before the (slower) model build
        want, have = explicit[key], getattr(shapes_cfg, key, None)
        if want != have:
            raise ConfigError(
                f"model.{key}={want!r} contradicts finetune.init_from {path} ({key}={have!r}, "
                f"from its tensor shapes); remove model.{key} (a fine-tune takes its model "
                f"from the checkpoint; only {', '.join('model.' + k for k in UNSHAPED)} may "
                "be set)")
    try:  # the settable fields, checked against the checkpoint's version
        shapes_cfg.replace(**overrides)
    except ConfigError as e:
        raise ConfigError(f"model.{e}") from None
    try:
        model = checkpoint.load(path, **overrides)
    except checkpoint.CheckpointError as e:
        raise ConfigError(f"finetune.init_from: {e}") from None
    return path, file, model


def _tokenizer(cfg: RunConfig, path: pathlib.Path, vocab_size: int):
    """The explicit ``data.tokenizer`` spec, else the checkpoint's tokenizer."""
    if "data.tokenizer" in cfg.explicit:
        return cfg.data.tokenizer
    from rwkv_jax.tokenizers import TokenizerError, resolve_tokenizer
    try:
        return resolve_tokenizer(None, model_path=path if path.is_dir() else None,
                                 vocab_size=vocab_size)
    except TokenizerError as e:
        raise ConfigError(f"data.tokenizer: the checkpoint's tokenizer is unknown ({e}); set "
                          "data.tokenizer") from None


def prepare(cfg: RunConfig) -> Finetune:
    """Load ``cfg.finetune.init_from`` and build the method (see the module docstring).
    ConfigError naming the key for every bad setting."""
    ft = cfg.finetune
    path, file, model = _load_base(cfg)
    tokenizer = _tokenizer(cfg, path, model.config.vocab_size)
    targets: tuple[str, ...] = ()
    trained_in_full: tuple[str, ...] = ()
    if ft.method == "full":
        method = Full()
    elif ft.method == "state":
        method = State(model.config, shift=ft.state_shift)
    else:
        targets = ft.lora_targets if ft.lora_targets is not None else \
            lora_lib.default_targets(model.config.version)
        try:
            lora_lib.attach(model, rank=ft.lora_rank, alpha=ft.lora_alpha, targets=targets,
                            dropout=ft.lora_dropout, seed=cfg.train.seed)
        except ValueError as e:
            raise ConfigError(f"finetune.lora_targets: {e}") from None
        method = LoRA(train_also=ft.train_also)
        _, trainable, _ = method.split(model)
        names = [dotted_name(p) for p, _ in nnx.to_flat_state(trainable)]
        trained_in_full = tuple(n for n in names if not n.endswith((".lora_A", ".lora_B")))
        for p in ft.train_also:
            if not any(re.fullmatch(p, n) for n in trained_in_full):
                raise ConfigError(f"finetune.train_also: {p!r} matches no parameter of this "
                                  f"{model.config.spec.title} model")
    return Finetune(ft, path, file, model, method, tokenizer, tuple(targets), trained_in_full)


def parameter_count(tree) -> int:
    """Elements of every array in ``tree``."""
    return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree))
