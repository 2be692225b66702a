"""Shared test set-up: strict rank promotion, fp64 available, fixture paths."""

from __future__ import annotations

import os
import pathlib
import tempfile

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")
# fp64 references are computed with numpy or with jax under explicit float64 dtypes;
# x64 must be on for the latter. Library code always names its dtypes explicitly.
jax.config.update("jax_enable_x64", True)

# Tests build many identical programs (same shapes, new closures): the persistent cache
# turns every recompilation after the first into a load.
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="rwkv-jax-test-xla-"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("RWKV_JAX_SHARED", ROOT.parent / "shared"))
FIXTURES = pathlib.Path(os.environ.get("RWKV_JAX_FIXTURES", SHARED / "fixtures" / "tiny-rwkv"))


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    """The tiny-rwkv fixture folder; skips with the reason when it is absent."""
    if not (FIXTURES / "reference-logits.npz").exists():
        pytest.skip(f"tiny-rwkv fixtures not found at {FIXTURES} (set RWKV_JAX_FIXTURES)")
    return FIXTURES


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    if not SHARED.exists():
        pytest.skip(f"../shared not found at {SHARED} (set RWKV_JAX_SHARED)")
    return SHARED
