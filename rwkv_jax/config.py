"""Model configuration: one frozen dataclass for every RWKV version, with presets.

Sizes that a checkpoint's tensor shapes determine (vocab, layers, width, FFN width, heads,
LoRA ranks) are inferred by :func:`rwkv_jax.checkpoint.infer_config`; the rest (epsilons,
dtypes, WKV implementation) are fields with the official defaults and can be overridden.
Which fields a version has, and their defaults, each version module declares
(:mod:`rwkv_jax.versions`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from rwkv_jax.ops.impl import WkvImpl, resolve_impl

_DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A config value is invalid; the message names the field and the valid values."""


@dataclasses.dataclass(frozen=True)
class RWKVConfig:
    """Architecture and numerics of one RWKV language model.

    Common fields:
      version: "4", "5.1", "5.2", "6" or "7" (:data:`rwkv_jax.versions.REGISTRY`).
      vocab_size, n_layer, n_embd: V, L, C.
      ffn_dim: channel-mix width F; ``None`` = the version's default (4C for v4/v7,
        int(3.5C)//32*32 for v5/v6).
      ln_eps: LayerNorm eps (1e-5 in every official model).
      param_dtype: dtype the parameters are stored in.
      compute_dtype: dtype of the matmuls; LayerNorms, WKV recurrences and the state
        always run in float32, logits are float32.
      wkv_impl: a :class:`WkvImpl` value the version's recurrence has; "auto" picks by
        platform.
      chunk_size: chunk length of the chunked WKV forms; ``None`` = the op's default.

    Version fields (declared, with their defaults and meaning, by each version module's
    ``SPEC.extras``; ``None`` = that default; setting one the version does not have is an
    error): ``head_size`` and ``ln_x_eps`` (v5+), ``d_mix`` and ``d_decay`` (v6 LoRA ranks),
    ``d_decay``, ``d_aaa``, ``d_mv``, ``d_gate`` (v7 LoRA ranks).
    """

    version: str = "4"
    vocab_size: int = 256
    n_layer: int = 4
    n_embd: int = 128
    ffn_dim: int | None = None
    head_size: int | None = None
    ln_eps: float = 1e-5
    ln_x_eps: float | None = None
    d_mix: int | None = None
    d_decay: int | None = None
    d_aaa: int | None = None
    d_mv: int | None = None
    d_gate: int | None = None
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    wkv_impl: str = "auto"
    chunk_size: int | None = None

    def __post_init__(self):
        from rwkv_jax import versions  # the registry imports model code, which imports this
        if self.version not in versions.REGISTRY:
            raise ConfigError(f"version: {self.version!r} is not one of "
                              f"{', '.join(versions.VERSIONS)}")
        spec = self.spec
        for name in ("vocab_size", "n_layer", "n_embd"):
            _positive_int(name, getattr(self, name))
        for name, have in versions.all_extras().items():
            value = getattr(self, name)
            if name not in spec.extras:
                if value is not None:
                    raise ConfigError(
                        f"{name}: {spec.title} has no such field (it is a field of RWKV-"
                        f"{', '.join(have)}); {spec.title}'s own fields: "
                        f"{', '.join(spec.extras) or 'none beyond the common ones'}")
                continue
            if value is None:  # frozen: fill the version's default once
                object.__setattr__(self, name, spec.extras[name].default(self.n_embd))
            if name == "ln_x_eps":
                if not getattr(self, name) > 0:
                    raise ConfigError(f"{name}: must be > 0, got {getattr(self, name)!r}")
            else:
                _positive_int(name, getattr(self, name))
        if self.ffn_dim is not None:
            _positive_int("ffn_dim", self.ffn_dim)
        if self.chunk_size is not None:
            _positive_int("chunk_size", self.chunk_size)
        if self.head_size is not None and self.n_embd % self.head_size:
            raise ConfigError(f"head_size: {self.head_size} does not divide n_embd={self.n_embd}")
        for name in ("param_dtype", "compute_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ConfigError(f"{name}: {getattr(self, name)!r} is not one of {', '.join(_DTYPES)}")
        try:
            impl = WkvImpl.parse(self.wkv_impl)
        except ValueError as e:
            raise ConfigError(f"wkv_impl: {e}") from None
        if impl is not WkvImpl.AUTO and impl not in spec.wkv_forms:
            raise ConfigError(f"wkv_impl: {spec.title} has no {impl.value!r} form; valid: auto, "
                              f"{', '.join(f.value for f in spec.wkv_forms)}")
        if not (isinstance(self.ln_eps, (int, float)) and self.ln_eps > 0):
            raise ConfigError(f"ln_eps: must be > 0, got {self.ln_eps!r}")

    # ---- derived ---------------------------------------------------------------------------
    @property
    def spec(self):
        """This version's :class:`~rwkv_jax.versions.base.VersionSpec`."""
        from rwkv_jax import versions
        return versions.REGISTRY[self.version]

    @property
    def resolved_impl(self) -> WkvImpl:
        """The concrete WKV form ``wkv_impl`` means on JAX's default platform."""
        return resolve_impl(self.wkv_impl, self.spec.wkv_op, self.spec.wkv_forms)

    @property
    def ffn_size(self) -> int:
        """Channel-mix width F."""
        return self.ffn_dim if self.ffn_dim is not None else self.spec.ffn_size(self.n_embd)

    @property
    def n_head(self) -> int | None:
        """H = C / head_size for the matrix-state versions; None for RWKV-4."""
        return None if self.head_size is None else self.n_embd // self.head_size

    @property
    def param_jnp_dtype(self):
        return jnp.dtype(self.param_dtype)

    @property
    def compute_jnp_dtype(self):
        return jnp.dtype(self.compute_dtype)

    # ---- construction --------------------------------------------------------------------
    def replace(self, **changes: Any) -> "RWKVConfig":
        """A copy with ``changes``; unknown field names raise ConfigError listing valid ones."""
        valid = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - valid)
        if unknown:
            raise ConfigError(f"unknown config field(s) {', '.join(unknown)}; "
                              f"valid: {', '.join(sorted(valid))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The fields this version has (version fields it lacks are left out)."""
        d = dataclasses.asdict(self)
        from rwkv_jax import versions
        for name in versions.all_extras():
            if name not in self.spec.extras:
                d.pop(name)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RWKVConfig":
        """Inverse of :meth:`to_dict`. Also reads dicts written before version fields were
        checked: a version field the version does not have is dropped."""
        from rwkv_jax import versions
        d = dict(d)
        version = d.get("version", "4")
        if version in versions.REGISTRY:
            for name in versions.all_extras():
                if name not in versions.REGISTRY[version].extras:
                    d.pop(name, None)
        return cls().replace(**d)

    @classmethod
    def tiny(cls, version: str = "4", **changes: Any) -> "RWKVConfig":
        """A byte-level model small enough for unit tests (L2, C64, V256; heads of 16 and
        LoRA ranks 16 where the version has them)."""
        from rwkv_jax import versions
        small = dict(head_size=16, d_mix=16, d_decay=16, d_aaa=16, d_mv=16, d_gate=16)
        extras = versions.spec(version).extras
        base = dict(version=version, vocab_size=256, n_layer=2, n_embd=64,
                    **{k: v for k, v in small.items() if k in extras})
        return cls(**{**base, **changes})

    @classmethod
    def preset(cls, name: str, **changes: Any) -> "RWKVConfig":
        """An official size by name, e.g. "rwkv4-169m", "rwkv7-0.1b"; see :data:`PRESETS`."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **changes})


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name}: must be a positive integer, got {value!r}")


# Official sizes. RWKV-4 Pile: 20B tokenizer, V=50277 (reference §2.3). v5/v6/v7 World
# models: V=65536, head size 64; v7 Pile models: V=50304.
PRESETS: dict[str, dict[str, Any]] = {
    "rwkv4-169m": dict(version="4", vocab_size=50277, n_layer=12, n_embd=768),
    "rwkv4-430m": dict(version="4", vocab_size=50277, n_layer=24, n_embd=1024),
    "rwkv4-1b5": dict(version="4", vocab_size=50277, n_layer=24, n_embd=2048),
    "rwkv4-3b": dict(version="4", vocab_size=50277, n_layer=32, n_embd=2560),
    "rwkv4-7b": dict(version="4", vocab_size=50277, n_layer=32, n_embd=4096),
    "rwkv4-14b": dict(version="4", vocab_size=50277, n_layer=40, n_embd=5120),
    "rwkv5-0.4b": dict(version="5.2", vocab_size=65536, n_layer=24, n_embd=1024),
    "rwkv5-1b5": dict(version="5.2", vocab_size=65536, n_layer=24, n_embd=2048),
    "rwkv5-3b": dict(version="5.2", vocab_size=65536, n_layer=32, n_embd=2560),
    "rwkv5-7b": dict(version="5.2", vocab_size=65536, n_layer=32, n_embd=4096),
    "rwkv6-1b6": dict(version="6", vocab_size=65536, n_layer=24, n_embd=2048),
    "rwkv6-3b": dict(version="6", vocab_size=65536, n_layer=32, n_embd=2560),
    "rwkv6-7b": dict(version="6", vocab_size=65536, n_layer=32, n_embd=4096),
    "rwkv7-0.1b": dict(version="7", vocab_size=65536, n_layer=12, n_embd=768),
    "rwkv7-0.4b": dict(version="7", vocab_size=65536, n_layer=24, n_embd=1024, d_gate=128),
    "rwkv7-1b5": dict(version="7", vocab_size=65536, n_layer=24, n_embd=2048),
    "rwkv7-2b9": dict(version="7", vocab_size=65536, n_layer=32, n_embd=2560),
    "rwkv7-7b": dict(version="7", vocab_size=65536, n_layer=32, n_embd=4096),
    "rwkv7-pile-0.1b": dict(version="7", vocab_size=50304, n_layer=12, n_embd=768),
}
