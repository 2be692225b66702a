"""The shared Linear's dtype paths agree with a float32 reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rwkv_jax.model.layers import Linear


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 15, 16, 40])
@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_linear_small_and_large_rows_match_fp32(rows, param_dtype):
    """Every path of Linear (one-row/few-row decoding paths, the matmul path) computes
    ``x @ W.T`` with float32 accumulation: bf16 operands give exact products in float32, so
    the result matches float64 of the bf16-rounded operands to float32 accumulation error."""
    rng = np.random.default_rng(rows)
    d_in, d_out = 48, 40
    w = jnp.asarray(rng.standard_normal((d_out, d_in)).astype(np.float32), param_dtype)
    x = jnp.asarray(rng.standard_normal((rows, d_in)).astype(np.float32))
    cd = jnp.bfloat16 if param_dtype == jnp.bfloat16 else jnp.float32
    lin = Linear(d_in, d_out, init=w, compute_dtype=cd)
    got = np.asarray(jax.jit(lambda x: lin(x).astype(jnp.float32))(x[None]))[0]
    xr = np.asarray(x.astype(cd).astype(jnp.float32), np.float64)
    want = xr @ np.asarray(w.astype(jnp.float32), np.float64).T
    # bf16 output rounding (compute dtype) is the only coarse step
    tol = 1e-5 if cd == jnp.float32 else 2 ** -8
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())
