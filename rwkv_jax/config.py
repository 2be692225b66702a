"""Model configuration: one frozen dataclass for every RWKV version, with presets.

Sizes that a checkpoint's tensor shapes determine (vocab, layers, width, FFN width, heads,
LoRA ranks) are inferred by :func:`rwkv_jax.checkpoint.infer_config`; the rest (epsilons,
dtypes, WKV implementation) are fields with the official defaults and can be overridden.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from rwkv_jax.ops.impl import WkvImpl

VERSIONS = ("4", "5.1", "5.2", "6", "7")
_DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A config value is invalid; the message names the field and the valid values."""


@dataclasses.dataclass(frozen=True)
class RWKVConfig:
    """Architecture and numerics of one RWKV language model.

    Attributes:
      version: "4", "5.1", "5.2", "6" or "7".
      vocab_size, n_layer, n_embd: V, L, C.
      ffn_dim: channel-mix width F; ``None`` = the version's default (4C for v4/v7,
        int(3.5C)//32*32 for v5/v6).
      head_size: N for v5+ (H = C/N heads); ignored by v4.
      ln_eps: LayerNorm eps (1e-5 in every official model).
      ln_x_eps: GroupNorm eps of v5+ ``ln_x`` (official 64e-5; the tiny v5 fixtures use 1e-5).
      d_mix, d_decay: RWKV-6 LoRA ranks (time_maa_w1/w2 and time_decay_w1/w2);
        ``None`` = official x060 values 32 and 64.
      d_decay, d_aaa, d_mv, d_gate: RWKV-7 LoRA ranks (w, a, v, g); ``None`` = the x070
        formulas of :func:`rwkv7_lora_ranks` (64, 64, 32, 128 at C=768).
      param_dtype: dtype the parameters are stored in.
      compute_dtype: dtype of the matmuls; LayerNorms, WKV recurrences and the state
        always run in float32, logits are float32.
      wkv_impl: a :class:`WkvImpl` value; "auto" picks by platform.
      chunk_size: chunk length of the chunked WKV forms (v5+); ``None`` = the op's default.
    """

    version: str = "4"
    vocab_size: int = 256
    n_layer: int = 4
    n_embd: int = 128
    ffn_dim: int | None = None
    head_size: int = 64
    ln_eps: float = 1e-5
    ln_x_eps: float = 64e-5
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
        if self.version not in VERSIONS:
            raise ConfigError(f"version: {self.version!r} is not one of {', '.join(VERSIONS)}")
        if isinstance(self.n_embd, int) and self.n_embd > 0:
            defaults = dict(zip(("d_decay", "d_aaa", "d_mv", "d_gate"),
                                rwkv7_lora_ranks(self.n_embd))) if self.version == "7" \
                else {"d_mix": 32, "d_decay": 64}
            for name in ("d_mix", "d_decay", "d_aaa", "d_mv", "d_gate"):
                if getattr(self, name) is None:  # frozen: fill derived defaults once
                    object.__setattr__(self, name, defaults.get(name, 32))
        for name in ("vocab_size", "n_layer", "n_embd", "head_size", "d_mix", "d_decay",
                     "d_aaa", "d_mv", "d_gate"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name}: must be a positive integer, got {value!r}")
        if self.ffn_dim is not None and (not isinstance(self.ffn_dim, int) or self.ffn_dim <= 0):
            raise ConfigError(f"ffn_dim: must be a positive integer or None, got {self.ffn_dim!r}")
        if self.version != "4" and self.n_embd % self.head_size:
            raise ConfigError(f"head_size: {self.head_size} does not divide n_embd={self.n_embd}")
        for name in ("param_dtype", "compute_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ConfigError(f"{name}: {getattr(self, name)!r} is not one of {', '.join(_DTYPES)}")
        try:
            WkvImpl.parse(self.wkv_impl)
        except ValueError as e:
            raise ConfigError(f"wkv_impl: {e}") from None
        for name in ("ln_eps", "ln_x_eps"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}: must be > 0, got {getattr(self, name)!r}")

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def ffn_size(self) -> int:
        """Channel-mix width F."""
        if self.ffn_dim is not None:
            return self.ffn_dim
        if self.version in ("4", "7"):
            return 4 * self.n_embd
        return int(3.5 * self.n_embd) // 32 * 32

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

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
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RWKVConfig":
        return cls().replace(**d)

    @classmethod
    def tiny(cls, version: str = "4", **changes: Any) -> "RWKVConfig":
        """A byte-level model small enough for unit tests (L2, C64, V256)."""
        base = dict(version=version, vocab_size=256, n_layer=2, n_embd=64, head_size=16,
                    d_mix=16, d_decay=16, d_aaa=16, d_mv=16, d_gate=16)
        return cls(**{**base, **changes})

    @classmethod
    def preset(cls, name: str, **changes: Any) -> "RWKVConfig":
        """An official size by name, e.g. "rwkv4-169m", "rwkv7-0.1b"; see :data:`PRESETS`."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **changes})


def rwkv7_lora_ranks(n_embd: int) -> tuple[int, int, int, int]:
    """RWKV-7 (w, a, v, g) LoRA ranks of the x070 code: ``max(32, round(k·√C/32)·32)`` with
    k = 1.8, 1.8, 1.3 and ``0.6·C^0.8`` for g (Python's round). C=768 -> (64, 64, 32, 128),
    C=2048 -> (96, 96, 64, 256) as the released 0.1B and 1.5B models."""
    def r(x):
        return max(32, round(x / 32) * 32)
    s = n_embd ** 0.5
    return r(1.8 * s), r(1.8 * s), r(1.3 * s), r(0.6 * n_embd ** 0.8)


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
