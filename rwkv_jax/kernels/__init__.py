"""Fused Pallas kernels for the WKV recurrences, behind the ops' signatures.

Optional: :mod:`rwkv_jax.ops` imports these lazily for ``WkvImpl.PALLAS`` only, so a jax
without Pallas (or without a backend's Pallas module) leaves every other form working.
"""
