"""What the WKV modules share: the switch that picks a form, and the ``resets`` argument.

Every recurrence module (`wkv4`, `wkv6`, `wkv7`) exposes several forms behind one
signature; :class:`WkvImpl` names them and :func:`resolve_impl` turns ``AUTO`` into a
concrete form for the current backend. Models pass the enum through and never branch on
it themselves. :func:`check_resets` validates the optional document-start mask that every
form takes (its contract is stated in each module's docstring); :func:`jit_form` is the
``jax.jit`` every public form is wrapped in.
"""

from __future__ import annotations

import enum
import functools
import inspect

import jax
import jax.numpy as jnp


class WkvImpl(str, enum.Enum):
    """Which form of the WKV recurrence to run.

    AUTO: chosen by platform in :func:`resolve_impl`.
    SCAN: ``lax.scan`` over the per-token step (the oracle; fastest on CPU).
    ASSOCIATIVE: ``lax.associative_scan`` (parallel over time; fast on GPU/TPU for RWKV-4).
    CHUNKED: intra-chunk matmuls plus a scan over chunks (matrix-state versions).
    PALLAS: the fused Pallas kernels of :mod:`rwkv_jax.kernels` (WKV-4, WKV-5/6 and WKV-7;
      Triton on GPU, Mosaic on TPU, interpret mode on CPU); never chosen by AUTO until
      measured on a device.
    """

    AUTO = "auto"
    SCAN = "scan"
    ASSOCIATIVE = "associative"
    CHUNKED = "chunked"
    PALLAS = "pallas"

    @classmethod
    def parse(cls, value: "WkvImpl | str") -> "WkvImpl":
        """Accept an enum member or its string value; anything else raises ValueError."""
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            valid = ", ".join(m.value for m in cls)
            raise ValueError(f"unknown WKV implementation {value!r}; valid: {valid}") from None


# Per-version default for AUTO, by platform. RWKV-4 (per-channel state): lax.scan measured
# 2.5x faster than the associative form on CPU; associative 30x faster than lax.scan on an H100.
# Matrix-state versions (5/6/7): the chunked form does the work as matmuls on accelerators.
_AUTO_TABLE = {
    "wkv4": {"cpu": WkvImpl.SCAN, "gpu": WkvImpl.ASSOCIATIVE, "tpu": WkvImpl.ASSOCIATIVE},
    # RWKV-5/6 on CPU: lax.scan measured 3.7x faster fwd, equal fwd+bwd (B8 T512 H8 N64)
    "wkv6": {"cpu": WkvImpl.SCAN, "gpu": WkvImpl.CHUNKED, "tpu": WkvImpl.CHUNKED},
    # RWKV-7 on CPU: lax.scan measured 8x faster fwd, 1.1x fwd+bwd than chunked (B8 T512 H8 N64)
    "wkv7": {"cpu": WkvImpl.SCAN, "gpu": WkvImpl.CHUNKED, "tpu": WkvImpl.CHUNKED},
}


def resolve_impl(impl: "WkvImpl | str", op: str, supported: tuple[WkvImpl, ...],
                 platform: str | None = None) -> WkvImpl:
    """Resolve ``impl`` for recurrence ``op`` ("wkv4", "wkv6", "wkv7").

    AUTO maps through the platform table (``platform`` defaults to JAX's default backend);
    a concrete value must be in ``supported`` or a ValueError names the valid ones.
    """
    impl = WkvImpl.parse(impl)
    if impl is WkvImpl.AUTO:
        platform = platform or jax.default_backend()
        table = _AUTO_TABLE[op]
        impl = table.get(platform, table["cpu"])
    if impl not in supported:
        valid = ", ".join(m.value for m in supported)
        raise ValueError(f"{op} has no {impl.value!r} form; valid: auto, {valid}")
    return impl


def check_resets(resets, batch: int, time: int) -> jax.Array | None:
    """``resets`` (None, or an array of shape [B, T]) as a bool [B, T] array; None stays None.

    A wrong shape raises a ValueError naming it and the expected one.
    """
    if resets is None:
        return None
    if tuple(jnp.shape(resets)) != (batch, time):
        raise ValueError(f"resets must be [B, T] = {(batch, time)}; "
                         f"got {tuple(jnp.shape(resets))}")
    return jnp.asarray(resets).astype(jnp.bool_)


def form_kwargs(form: WkvImpl, *, resets=None, chunk_size: int | None = None) -> dict:
    """The keywords a dispatcher passes to ``form``: ``resets`` only when given (a form
    called without it traces the program without resets), ``chunk_size`` to the chunked
    form only."""
    kwargs = {} if resets is None else {"resets": resets}
    if form is WkvImpl.CHUNKED and chunk_size is not None:
        kwargs["chunk_size"] = chunk_size
    return kwargs


def jit_form(fn=None, *, static_argnames: tuple[str, ...] = ()):
    """``jax.jit`` for a WKV form, cached on the call's values whatever its spelling.

    ``jax.jit`` keys its cache on how a call is written too: ``f(x)``, ``f(x, None)`` and
    ``f(x, state=None)`` (or a static argument left at its default vs. passed) each trace
    and compile anew. Here every call is first bound to the full signature with defaults
    filled in, so one shape/dtype/static configuration compiles once, eager or inside an
    outer jit (where it is inlined). Usable as ``@jit_form`` or
    ``@jit_form(static_argnames=(...))``.
    """
    if fn is None:
        return functools.partial(jit_form, static_argnames=static_argnames)
    signature = inspect.signature(fn)
    jitted = jax.jit(fn, static_argnames=static_argnames)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return jitted(*bound.args, **bound.kwargs)

    return call
