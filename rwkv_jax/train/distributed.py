"""Multi-process (multi-host) data parallelism: one ``rwkv-jax train`` process per host.

Every process runs the same command with the same config and ``out_dir`` (a filesystem all
hosts share); :func:`initialize_from_env` joins them into one JAX runtime before any JAX
backend use, after which ``jax.devices()`` lists every host's devices. The environment says
whether and how:

* ``RWKV_JAX_COORDINATOR=host:port`` (process 0's address, reachable from every host),
  ``RWKV_JAX_NUM_PROCESSES=N`` and ``RWKV_JAX_PROCESS_ID=i`` (0..N-1, different on each host):
  an explicit cluster. All three or none.
* ``RWKV_JAX_DISTRIBUTED=auto``: let ``jax.distributed.initialize()`` detect the cluster
  (SLURM, Open MPI, Cloud TPU pods, ...), as MaxText does.
* none of these: a single-process run; nothing is initialized.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from rwkv_jax.config import ConfigError

ENV_VARS = ("RWKV_JAX_COORDINATOR", "RWKV_JAX_NUM_PROCESSES", "RWKV_JAX_PROCESS_ID")
AUTO_VAR = "RWKV_JAX_DISTRIBUTED"


def _settings(environ: Mapping[str, str]) -> dict | None:
    """The ``jax.distributed.initialize`` keyword arguments the environment asks for, or None.

    Raises ConfigError naming the variable at fault."""
    given = {k: environ[k].strip() for k in ENV_VARS if environ.get(k, "").strip()}
    auto = environ.get(AUTO_VAR, "").strip().lower()
    if auto not in ("", "0", "auto", "1"):
        raise ConfigError(f"{AUTO_VAR}: {environ[AUTO_VAR]!r} is not one of auto, 1, 0")
    if not given:
        return {} if auto in ("auto", "1") else None
    missing = [k for k in ENV_VARS if k not in given]
    if missing:
        raise ConfigError(f"{missing[0]} is not set; a multi-process run needs all of "
                          f"{', '.join(ENV_VARS)} (or none of them)")
    coordinator = given["RWKV_JAX_COORDINATOR"]
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"RWKV_JAX_COORDINATOR: {coordinator!r} is not of the form host:port")
    ints = {}
    for key in ("RWKV_JAX_NUM_PROCESSES", "RWKV_JAX_PROCESS_ID"):
        try:
            ints[key] = int(given[key])
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {given[key]!r}") from None
    n, i = ints["RWKV_JAX_NUM_PROCESSES"], ints["RWKV_JAX_PROCESS_ID"]
    if n < 1:
        raise ConfigError(f"RWKV_JAX_NUM_PROCESSES: must be a positive integer, got {n}")
    if not 0 <= i < n:
        raise ConfigError(f"RWKV_JAX_PROCESS_ID: {i} is not in [0, RWKV_JAX_NUM_PROCESSES={n})")
    return {"coordinator_address": coordinator, "num_processes": n, "process_id": i}


def initialize_from_env(environ: Mapping[str, str] | None = None) -> bool:
    """Call ``jax.distributed.initialize`` when the environment asks for it (see the module
    docstring); True when it did. Must run before anything touches a JAX backend."""
    settings = _settings(os.environ if environ is None else environ)
    if settings is None:
        return False
    import jax
    if jax.distributed.is_initialized():
        return True
    try:
        # CPU processes need a cross-process collectives backend (gloo is the default from
        # jax 0.5 on; set it explicitly for older or differently configured installs)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError):  # pragma: no cover - option absent in this jax
        pass
    try:
        jax.distributed.initialize(**settings)
    except ValueError as e:
        if settings:
            raise
        # auto-detection found no cluster (no SLURM/Open MPI/TPU/... environment)
        raise ConfigError(f"{AUTO_VAR}=auto: jax.distributed.initialize() found no cluster "
                          f"({e}); set {', '.join(ENV_VARS)} instead") from None
    return True
