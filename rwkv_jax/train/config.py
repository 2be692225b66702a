"""Run configuration: YAML files and ``key.sub=value`` overrides -> typed frozen dataclasses.

Every section is a frozen dataclass; :func:`load_config` merges, in order, the defaults,
a YAML file and command-line overrides, and checks every key, type and value before any
work starts: ranges (:data:`_RANGES`), the WKV form against the model version, the data
path, the output directory and the tokenizer spec. An error (ConfigError) names the
offending key and says what is valid.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import types
import typing
from typing import Any

import yaml

from rwkv_jax.config import ConfigError, RWKVConfig


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where tokens come from.

    path: a text/jsonl file, prepared token file (``.bin`` + ``.json``) or binidx prefix;
      ``None`` trains on the default corpus (the Python standard library's own sources).
    tokenizer: "bytes", "char" (vocabulary built from the text), "world", or a
      ``tokenizer.json`` path. Prepared files carry their own. A fine-tune
      (``finetune.init_from``) follows its checkpoint unless this is set explicitly.
    loss_on: which targets the loss counts: ``None`` keeps what the data says (a prepared
      file's mask), "all" every token, "response" only assistant replies of chat records
      (``{"messages": [...]}`` or ``{"prompt", "response"}`` jsonl; supervised fine-tuning).
    pack: training rows are whole documents packed side by side, each starting from the
      empty state (:func:`rwkv_jax.data.pack.sample_packed_batch`; no loss across a
      document boundary or on the padding); False: windows of ``ctx_len + 1`` tokens that
      run across documents, as RWKV-LM's. Evaluation is the same either way.
    """

    path: str | None = None
    tokenizer: str = "bytes"
    val_fraction: float = 0.1
    ctx_len: int = 128
    sampler: str = "random"
    cache_dir: str | None = None
    max_bytes: int | None = 8_000_000
    allow_changed: bool = False  # resume even though the data differs from data.json
    loss_on: str | None = None
    pack: bool = False


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with the official RWKV parameter groups (reference §2.5, §4.4, §5.5)."""

    lr: float = 3e-3
    lr_final: float = 3e-4
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    layerwise_lr: bool = True


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate schedule as RWKV-LM: warmup factor ``start + (1-start)·step/warmup``,
    then "cosine" or "exponential" decay from ``lr`` to ``lr_final``, or "constant"."""

    kind: str = "cosine"
    warmup_steps: int = 30
    warmup_start: float = 0.2


CHUNK_GRADS = ("full", "truncated")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The training loop. Validation every ``eval_every`` steps scores the first
    ``eval_batches`` x ``batch_size`` windows of the validation split; the final step's
    evaluation scores ``final_eval_batches`` x ``batch_size`` of them (None: as many as
    ``eval_batches``), so the progress evaluations can be a cheap fixed subset while the
    reported result covers the whole split.

    ``chunk_len`` > 0 trains each row of ``data.ctx_len`` tokens in chunks of that many
    tokens, the recurrent state carried from chunk to chunk, so activation memory follows
    ``chunk_len``, not ``ctx_len`` (RWKV's "infctx"; 0 = whole rows). ``chunk_grad``:
    "full" backpropagates through the carried state (the gradient of whole rows, exactly);
    "truncated" stops it between chunks (RWKV-PEFT-style truncated backpropagation, an
    approximation: a chunk's loss does not train what earlier chunks wrote into the state;
    here it saves no memory, only the state's backward pass).
    See :func:`rwkv_jax.train.step.loss_fn`."""

    max_steps: int = 500
    batch_size: int = 16
    grad_accum: int = 1
    seed: int = 0
    l2wrap: bool = True
    eval_every: int = 100
    eval_batches: int = 16
    final_eval_batches: int | None = None
    log_every: int = 10
    sample_tokens: int = 200
    sample_prompt: str | None = None  # None: the start of the first validation window
    # resume from this kept checkpoint (0: start over; later checkpoints are moved to
    # checkpoints/rejected/); None: the latest healthy one that verifies
    resume_from: int | None = None
    # a checkpoint saved with a training loss above this is "diverged" (kept, not resumed
    # from by default); None: max(10 x the best smoothed loss, ln(vocab) + 3)
    divergence_threshold: float | None = None
    chunk_len: int = 0
    chunk_grad: str = "full"
    # steps per dispatch: up to this many steps run in one compiled call (fewer where a log,
    # evaluation or checkpoint falls, and at most ~4M tokens and ~1e12 FLOPs per call, so a
    # large model runs one step per call); 1 = one dispatch per step. The losses are the same
    # either way.
    steps_per_call: int = 64


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 100
    keep: int = 2


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    progress: bool = True
    tensorboard: bool = False


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The device mesh: ``data`` x ``fsdp`` x ``tensor`` devices (-1 in one of them: the
    remaining devices). The batch is split over ``data`` and ``fsdp``; parameters and
    optimizer state are replicated over ``data``, split over ``fsdp`` (their ``embed``
    dimension) and, with ``tensor`` > 1, over ``tensor`` (their ``vocab``/``ffn``/``heads``
    dimensions): the rules of :mod:`rwkv_jax.train.mesh`."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1


FINETUNE_METHODS = ("full", "lora", "state")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Start from a checkpoint and choose what trains (:mod:`rwkv_jax.train.finetune`).

    init_from: an official ``.pth``, a ``.safetensors`` (official, Hugging Face or FLA names)
      or a run directory; ``None`` trains from scratch (everything below is then unused).
      The model section is inferred from it; only the fields its shapes cannot tell
      (``ln_eps``, ``ln_x_eps``, dtypes, ``wkv_impl``, ``chunk_size``) may be set.
    method: "full" (every parameter), "lora" (low-rank adapters on the projection
      matrices) or "state" (only each layer's initial recurrent state).
    lora_rank, lora_alpha, lora_dropout: the adapters' rank r, scale alpha/r, and the
      dropout on their input (training only).
    lora_targets: regexes (full match) over official weight names of the Linear weights
      that get adapters; ``None`` = the version's ``SPEC.lora_targets`` (time-mix and
      channel-mix projections).
    train_also: regexes over official parameter names trained in full alongside the
      adapters (RWKV-PEFT's ``train_parts``), e.g. ``'.*ln.*'``, ``'.*time_decay'``.
    state_shift: state tuning also trains the token-shift vectors (else only the WKV state).
    """

    init_from: str | None = None
    method: str = "full"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] | None = None
    train_also: tuple[str, ...] = ()
    state_shift: bool = False

    def __post_init__(self):
        import re
        for name in ("lora_targets", "train_also"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, str) or not isinstance(value, (list, tuple)):
                raise ConfigError(f"{name}: expected a list of regexes, got {value!r}")
            for p in value:
                if not isinstance(p, str):
                    raise ConfigError(f"{name}: expected a list of regexes, got item {p!r}")
                try:
                    re.compile(p)
                except re.error as e:
                    raise ConfigError(f"{name}: {p!r} is not a valid regex ({e})") from None
            object.__setattr__(self, name, tuple(value))
        if self.method not in FINETUNE_METHODS:
            raise ConfigError(f"method: {self.method!r} is not one of "
                              f"{', '.join(FINETUNE_METHODS)}")
        if self.method != "full" and self.init_from is None:
            raise ConfigError(f"method: {self.method!r} fine-tunes a trained model; set "
                              "finetune.init_from to its checkpoint")
        if self.lora_rank < 1:
            raise ConfigError(f"lora_rank: must be a positive integer, got {self.lora_rank}")
        if not self.lora_alpha > 0:
            raise ConfigError(f"lora_alpha: must be > 0, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout: must be in [0, 1), got {self.lora_dropout}")


_MODEL_DEFAULTS = dict(version="4", n_layer=4, n_embd=256)


def _model_default() -> RWKVConfig:
    return RWKVConfig(**_MODEL_DEFAULTS)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a training run needs. ``model.vocab_size`` follows the tokenizer unless set."""

    out_dir: str = "runs/default"
    model: RWKVConfig = dataclasses.field(default_factory=_model_default)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
    # set when the YAML or an override gives model.vocab_size explicitly
    vocab_size_explicit: bool = False
    # every dotted key the YAML or an override set (a preset sets all of model.*): a
    # fine-tune follows its checkpoint's tokenizer unless data.tokenizer is here
    explicit: frozenset[str] = dataclasses.field(default=frozenset(), compare=False)
    # a fine-tune (finetune.init_from set): the model section as given, ((key, value), ...)
    # type-checked but not built (its version is the checkpoint's); ``model`` is then the
    # default until the trainer replaces it with the checkpoint's config
    model_explicit: tuple[tuple[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for name in _INTERNAL:
            d.pop(name)
        if d["finetune"] == dataclasses.asdict(FinetuneConfig()):
            d.pop("finetune")  # a run without one dumps the config it always did
        else:
            d["finetune"] = {k: list(v) if isinstance(v, tuple) else v
                             for k, v in d["finetune"].items()}
        return d


_INTERNAL = ("vocab_size_explicit", "explicit", "model_explicit")


_CHOICES = {
    "data.sampler": ("random", "magic_prime"),
    "schedule.kind": ("cosine", "exponential", "constant"),
    "data.loss_on": ("all", "response"),  # or null
    "finetune.method": FINETUNE_METHODS,
    "train.chunk_grad": CHUNK_GRADS,
}


def _at_least(lo: int):
    return (lambda v: v >= lo), f"must be >= {lo}"


def _finite(test, what: str):
    return (lambda v: math.isfinite(v) and test(v)), what


# key -> (test of the value, what a valid value is); None values skip the test
_RANGES = {
    "data.ctx_len": _at_least(1),
    "data.val_fraction": _finite(lambda v: 0 < v < 1, "must be in (0, 1)"),
    "data.max_bytes": _at_least(1),
    "optimizer.lr": _finite(lambda v: v > 0, "must be a finite number > 0"),
    "optimizer.lr_final": _finite(lambda v: v >= 0, "must be a finite number >= 0"),
    "optimizer.beta1": _finite(lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "optimizer.beta2": _finite(lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "optimizer.eps": _finite(lambda v: v > 0, "must be a finite number > 0"),
    "optimizer.weight_decay": _finite(lambda v: v >= 0, "must be a finite number >= 0"),
    "optimizer.grad_clip": _finite(lambda v: v >= 0, "must be a finite number >= 0 (0 = off)"),
    "schedule.warmup_steps": _at_least(0),
    "schedule.warmup_start": _finite(lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "train.max_steps": _at_least(0),
    "train.batch_size": _at_least(1),
    "train.grad_accum": _at_least(1),
    "train.eval_every": (lambda v: v >= 0, "must be >= 0 (0 = no evaluation)"),
    "train.log_every": _at_least(1),
    "train.steps_per_call": _at_least(1),
    "train.sample_tokens": _at_least(0),
    "train.chunk_len": (lambda v: v >= 0, "must be >= 0 (0 = whole rows)"),
    "checkpoint.every": _at_least(1),
    "checkpoint.keep": _at_least(1),
    "mesh.data": (lambda v: v == -1 or v >= 1, "must be -1 (the remaining devices) or >= 1"),
    "mesh.fsdp": (lambda v: v == -1 or v >= 1, "must be -1 (the remaining devices) or >= 1"),
}

def _check_type(key: str, value: Any, tp: Any) -> Any:
    """Coerce/validate ``value`` against the annotation ``tp``; raise ConfigError naming key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(key, value, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        return value
    name = getattr(tp, "__name__", str(tp))
    raise ConfigError(f"{key}: expected {name}, got {value!r} ({type(value).__name__})")


def _build(cls, values: dict[str, Any], prefix: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in _INTERNAL}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]}; valid keys in "
                          f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in values.items():
        key = prefix + name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            default = fields[name].default_factory()
            merged = {**dataclasses.asdict(default), **(value or {})} if isinstance(value, dict) \
                else value
            kwargs[name] = _build(tp, merged, key + ".")
            continue
        value = _check_type(key, value, tp)
        if key in _CHOICES and value is not None and value not in _CHOICES[key]:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(_CHOICES[key])}")
        if key in _RANGES and value is not None:
            test, what = _RANGES[key]
            if not test(value):
                raise ConfigError(f"{key}: {what}, got {value!r}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{prefix}{e}") from None
    except TypeError as e:
        raise ConfigError(f"{prefix.rstrip('.')}: {e}") from None


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {p} is not a section")
    node[parts[-1]] = value


def _check_duplicate_keys(node: yaml.Node, where: str, prefix: str = "") -> None:
    """Reject a mapping that repeats a key (PyYAML silently keeps the last one)."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *base" may repeat keys
                continue
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else id(key_node)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"{where}: duplicate key {prefix}{key} (lines {seen[key]} "
                                  f"and {line})")
            seen[key] = line
            _check_duplicate_keys(value_node, where, f"{prefix}{key}.")
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_duplicate_keys(item, where, prefix)


def _load_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` that also rejects duplicate keys; errors name ``where``."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if root is not None:
            _check_duplicate_keys(root, where)
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({e})") from None


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.max_steps=10", "out_dir=runs/x"]`` -> nested dict (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        value = _load_yaml(raw, f"override {key.strip()}") if raw != "" else None
        _set_path(tree, key.strip(), value)
    return tree


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) \
            else v
    return out


def load_config(path: str | pathlib.Path | None = None,
                overrides: list[str] | None = None) -> RunConfig:
    """Defaults <- YAML file <- overrides, validated. Raises ConfigError naming the key."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = pathlib.Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        if path.is_dir():
            raise ConfigError(f"config file {path} is a directory")
        if not path.is_file():  # a FIFO or device: reading could block forever
            raise ConfigError(f"config file {path} is not a regular file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not UTF-8 text (a YAML file?)") from None
        if "\x00" in text:
            raise ConfigError(f"config file {path} is not text (a YAML file?)")
        loaded = _load_yaml(text, str(path)) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        tree = loaded
    tree = _deep_merge(tree, parse_overrides(overrides or []))
    explicit_vocab = isinstance(tree.get("model"), dict) and "vocab_size" in tree["model"]
    model = tree.get("model")
    if isinstance(model, dict) and "preset" in model:
        model = dict(model)
        preset = model.pop("preset")
        try:
            base = RWKVConfig.preset(preset)
        except ConfigError as e:
            raise ConfigError(f"model.preset: {e}") from None
        tree["model"] = {**dataclasses.asdict(base), **model}
        explicit_vocab = True
    explicit = frozenset(_leaf_keys(tree))
    model_explicit: tuple = ()
    ft = tree.get("finetune")
    if isinstance(ft, dict) and ft.get("init_from") is not None and "model" in tree:
        model_explicit = _model_keys(tree.pop("model"))
    cfg = _build(RunConfig, tree, "")
    _validate(cfg)
    return dataclasses.replace(cfg, vocab_size_explicit=explicit_vocab, explicit=explicit,
                               model_explicit=model_explicit)


def _model_keys(model: Any) -> tuple[tuple[str, Any], ...]:
    """A fine-tune's model section: each key a field of RWKVConfig, each value of its type
    (checked against the checkpoint's config later, in :mod:`rwkv_jax.train.finetune`)."""
    if not isinstance(model, dict):
        raise ConfigError(f"model: expected a mapping, got {model!r}")
    hints = typing.get_type_hints(RWKVConfig)
    unknown = sorted(set(model) - set(hints))
    if unknown:
        raise ConfigError(f"unknown key model.{unknown[0]}; valid keys in model: "
                          f"{', '.join(sorted(hints))}")
    return tuple(sorted((k, _check_type(f"model.{k}", v, hints[k])) for k, v in model.items()))


def _leaf_keys(tree: dict, prefix: str = "") -> list[str]:
    """The dotted keys of a nested mapping's leaves (``{"a": {"b": 1}}`` -> ``["a.b"]``)."""
    keys = []
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            keys += _leaf_keys(v, f"{prefix}{k}.")
        else:
            keys.append(f"{prefix}{k}")
    return keys


def _validate(cfg: RunConfig) -> None:
    """The checks that span keys or look at the filesystem (after every key is typed)."""
    _check_data_path(cfg.data.path)
    _check_out_dir(cfg.out_dir)
    t = cfg.train
    if t.eval_every > 0 and t.eval_batches < 1:
        raise ConfigError(f"train.eval_batches: must be >= 1 when train.eval_every > 0, got "
                          f"{t.eval_batches}")
    if t.final_eval_batches is not None and t.final_eval_batches < 1:
        raise ConfigError(f"train.final_eval_batches: must be >= 1 (or null: as many as "
                          f"train.eval_batches), got {t.final_eval_batches}")
    if t.chunk_len > 0 and cfg.data.ctx_len % t.chunk_len:
        raise ConfigError(f"train.chunk_len: data.ctx_len ({cfg.data.ctx_len}) must be a "
                          f"multiple of train.chunk_len ({t.chunk_len})")
    if cfg.finetune.init_from is None:  # a fine-tune's model is the checkpoint's, already real
        _check_model_fits(cfg.model)
    _check_tokenizer(cfg.data.tokenizer)


TRAIN_BYTES_PER_PARAM = 16  # fp32 weights, gradients and AdamW's two moments


def estimated_params(m: RWKVConfig) -> int:
    """The parameter count estimated from the shapes alone (no build; within 2x for every
    version): per layer 6·C² for the time-mix (receptance, key, value, output, gate, and
    room for v6/v7's low-rank mixers) and 2·C·F + C² for the channel mix, plus the
    embedding and head (2·V·C)."""
    C, F = m.n_embd, m.ffn_size
    return m.n_layer * (6 * C * C + 2 * C * F + C * C) + 2 * m.vocab_size * C


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not every platform reports it
        return None


def _check_model_fits(m: RWKVConfig) -> None:
    """Refuse, before anything is built, a model whose weights, gradients and optimizer state
    alone exceed this machine's memory (``model.n_layer=100000`` would otherwise hang in
    the build or die out of memory)."""
    need = estimated_params(m) * TRAIN_BYTES_PER_PARAM
    have = _physical_memory()
    if have is not None and need > have:
        raise ConfigError(
            f"model.n_layer={m.n_layer}, model.n_embd={m.n_embd}, model.vocab_size="
            f"{m.vocab_size}: about {estimated_params(m) / 1e9:.2f}B parameters, {need / 2**30:.1f} GiB with "
            f"gradients and optimizer state ({TRAIN_BYTES_PER_PARAM} bytes each), more than "
            f"this machine's {have / 2**30:.1f} GiB of memory")


def _check_data_path(path: str | None) -> None:
    """``data.path`` names a file, or a prefix of ``.bin`` + ``.idx``/``.json`` files."""
    if path is None:
        return
    p = pathlib.Path(path).expanduser()
    if p.is_dir():
        raise ConfigError(f"data.path: {path} is a directory; name a text, .jsonl, prepared "
                          "(.bin + .json) or binidx (.bin + .idx) file")
    if p.is_file():
        return
    if p.exists():  # a FIFO or device: reading could block forever
        raise ConfigError(f"data.path: {path} is not a regular file")
    prefix = p.with_suffix("") if p.suffix in (".bin", ".idx", ".json") else p
    if not any(prefix.with_name(prefix.name + s).is_file() for s in (".bin", ".json", ".idx")):
        raise ConfigError(f"data.path: {path} does not exist")


def _check_out_dir(out_dir: str) -> None:
    p = pathlib.Path(out_dir).expanduser()
    if p.exists() and not p.is_dir():
        raise ConfigError(f"out_dir: {out_dir} exists and is not a directory")
    base = p
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise ConfigError(f"out_dir: cannot create {out_dir}: {base} is not a directory")


def _check_tokenizer(spec: str) -> None:
    """``data.tokenizer``: bytes, char, world or a tokenizer.json that loads."""
    if spec in ("char", "world"):  # char is built from the data; world is packaged (slow)
        return
    from rwkv_jax.tokenizers import get_tokenizer
    try:
        get_tokenizer(spec)
    except (ValueError, OSError, ImportError) as e:
        raise ConfigError(f"data.tokenizer: {e}") from None


def dump_config(cfg: RunConfig, path: str | pathlib.Path) -> None:
    """Write the resolved config as YAML (loadable again with :func:`load_config`)."""
    pathlib.Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
