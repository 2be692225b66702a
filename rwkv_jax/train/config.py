"""Run configuration: YAML files and ``key.sub=value`` overrides -> typed frozen dataclasses.

Every section is a frozen dataclass; :func:`load_config` merges, in order, the defaults,
a YAML file and command-line overrides, and checks every key and type before any work
starts. An error names the offending key and lists the valid ones.
"""

from __future__ import annotations

import dataclasses
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
      ``tokenizer.json`` path. Prepared files carry their own.
    """

    path: str | None = None
    tokenizer: str = "bytes"
    val_fraction: float = 0.1
    ctx_len: int = 128
    sampler: str = "random"
    cache_dir: str | None = None
    max_bytes: int | None = 8_000_000


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


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 500
    batch_size: int = 16
    grad_accum: int = 1
    seed: int = 0
    l2wrap: bool = True
    eval_every: int = 100
    eval_batches: int = 16
    log_every: int = 10
    sample_tokens: int = 200
    sample_prompt: str | None = None  # None: the start of the first validation window


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
    # set when the YAML or an override gives model.vocab_size explicitly
    vocab_size_explicit: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("vocab_size_explicit")
        return d


_CHOICES = {
    "data.sampler": ("random", "magic_prime"),
    "schedule.kind": ("cosine", "exponential", "constant"),
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
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "vocab_size_explicit"}
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
        if key in _CHOICES and value not in _CHOICES[key]:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(_CHOICES[key])}")
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


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.max_steps=10", "out_dir=runs/x"]`` -> nested dict (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else None
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
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
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
    cfg = _build(RunConfig, tree, "")
    return dataclasses.replace(cfg, vocab_size_explicit=explicit_vocab)


def dump_config(cfg: RunConfig, path: str | pathlib.Path) -> None:
    """Write the resolved config as YAML (loadable again with :func:`load_config`)."""
    pathlib.Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
