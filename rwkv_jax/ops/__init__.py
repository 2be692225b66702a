"""WKV recurrences: one module per version, every form behind one signature."""

from rwkv_jax.ops.impl import WkvImpl, resolve_impl
from rwkv_jax.ops.wkv4 import Wkv4State, wkv4, wkv4_associative, wkv4_scan, wkv4_step
from rwkv_jax.ops.wkv6 import wkv6, wkv6_associative, wkv6_chunked, wkv6_scan, wkv6_step
from rwkv_jax.ops.wkv7 import wkv7, wkv7_chunked, wkv7_scan, wkv7_step

__all__ = ["WkvImpl", "resolve_impl", "Wkv4State", "wkv4", "wkv4_associative", "wkv4_scan",
           "wkv4_step", "wkv6", "wkv6_associative", "wkv6_chunked", "wkv6_scan", "wkv6_step",
           "wkv7", "wkv7_chunked", "wkv7_scan", "wkv7_step"]
