"""WKV recurrences: one module per version, every form behind one signature."""

from rwkv_jax.ops.impl import WkvImpl, resolve_impl
from rwkv_jax.ops.wkv4 import Wkv4State, wkv4, wkv4_associative, wkv4_scan, wkv4_step

__all__ = ["WkvImpl", "resolve_impl", "Wkv4State", "wkv4", "wkv4_associative", "wkv4_scan",
           "wkv4_step"]
