"""XLA:CPU options the ``rwkv-jax`` command sets for a command before JAX starts.

Only the CLI does this, and only through ``XLA_FLAGS`` before the first JAX backend exists;
the library (``import rwkv_jax``) never changes JAX's configuration. A flag the user already
has in ``XLA_FLAGS`` wins (it is never added a second time or overridden), and
``RWKV_JAX_XLA_DEFAULTS=0`` turns the whole thing off.

What is set, and why (measured on a 2-core AVX2 CPU, jaxlib 0.10.2; BENCHMARKS.md):

* ``train`` on CPU: ``--xla_cpu_experimental_ynn_fusion_type=reduce``. XLA:CPU hands dots to
  YNNPACK by default; at training shapes (a [768, 128] x [128, 384] forward, the transposed
  products of the backward) YNNPACK's dots ran at about a quarter of the rate of XLA's own
  multi-threaded Eigen dots, while its reductions (the gradients of the per-channel vectors)
  are faster than XLA's. ``reduce`` keeps YNNPACK for reductions only.
  Not for ``generate``: YNNPACK's dots win there (batched decoding at B=16 ran 4x slower
  without them).

The flag exists in the jaxlib versions the project supports (0.10, 0.11); another jaxlib
gets nothing added (XLA rejects an unknown flag at start-up).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

from rwkv_jax.cli.compile_cache import switched_off

ENV_SWITCH = "RWKV_JAX_XLA_DEFAULTS"
# command -> flags (name, value) it gets on CPU
COMMAND_FLAGS: dict[str, tuple[tuple[str, str], ...]] = {
    "train": (("xla_cpu_experimental_ynn_fusion_type", "reduce"),),
}
KNOWN_JAXLIB = ("0.10.", "0.11.")


def _jaxlib_version() -> str | None:
    from importlib import metadata
    try:
        return metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        return None


def _backend_started() -> bool:
    """Whether a JAX backend exists already (then XLA_FLAGS is read and changing it is
    pointless)."""
    import sys
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
        return bool(xla_bridge.backends_are_initialized())
    except Exception:  # noqa: BLE001  (a private API: when unsure, assume started)
        return True


def apply(command: str, environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Add ``command``'s flags (:data:`COMMAND_FLAGS`) to ``XLA_FLAGS`` in ``environ``
    (default ``os.environ``), except flags already named there; returns the flags added.

    Nothing is added when ``RWKV_JAX_XLA_DEFAULTS`` is 0/false/no/off, when JAX is not set
    to run on CPU (``JAX_PLATFORMS`` names no ``cpu``), for a jaxlib outside
    :data:`KNOWN_JAXLIB`, or once a JAX backend has started in this process."""
    env = os.environ if environ is None else environ
    wanted = COMMAND_FLAGS.get(command, ())
    if not wanted or switched_off(env, ENV_SWITCH):
        return []
    platforms = env.get("JAX_PLATFORMS", "").strip().lower()
    if platforms and "cpu" not in platforms.split(","):
        return []
    version = _jaxlib_version()
    if version is None or not version.startswith(KNOWN_JAXLIB) or _backend_started():
        return []
    current = env.get("XLA_FLAGS", "")
    added = [f"--{name}={value}" for name, value in wanted if f"--{name}" not in current]
    if added:
        env["XLA_FLAGS"] = " ".join([current.strip(), *added]).strip()
    return added
