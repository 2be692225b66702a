"""The persistent XLA compilation cache that the ``rwkv-jax`` command turns on.

A second ``rwkv-jax generate`` / ``eval`` / ``train`` with the same model shapes loads its
compiled programs from disk instead of compiling them again. Only the CLI does this; the
library (``import rwkv_jax``) never changes JAX's global configuration.

Where: ``$RWKV_JAX_CACHE_DIR``, else ``$RWKV_JAX_CACHE/xla`` (beside the token cache of
:func:`rwkv_jax.data.default_cache_dir`), else ``$XDG_CACHE_HOME/rwkv-jax/xla``, else
``~/.cache/rwkv-jax/xla``. A cache directory already configured for JAX
(``JAX_COMPILATION_CACHE_DIR``, or a program that set ``jax_compilation_cache_dir`` before
calling :func:`rwkv_jax.cli.main`) is left as it is, and so is
``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS``. Off: ``RWKV_JAX_COMPILATION_CACHE=0`` or
``rwkv-jax --no-compile-cache``.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping

ENV_DIR = "RWKV_JAX_CACHE_DIR"
ENV_SWITCH = "RWKV_JAX_COMPILATION_CACHE"
# every program is cached: the CLI's programs are few, and even the small ones take a
# noticeable share of a short run's start-up (JAX's default of 1 s would skip most of them)
MIN_COMPILE_TIME_SECS = 0.0

HELP = (f"compiled XLA programs are cached in ${ENV_DIR} (default "
        "$XDG_CACHE_HOME/rwkv-jax/xla or ~/.cache/rwkv-jax/xla), so a second run with the same "
        f"shapes starts faster; turn it off with --no-compile-cache or {ENV_SWITCH}=0")


def cache_dir(environ: Mapping[str, str] | None = None) -> pathlib.Path:
    """The directory the CLI caches compiled programs in (module docstring)."""
    env = os.environ if environ is None else environ
    if env.get(ENV_DIR):
        return pathlib.Path(env[ENV_DIR]).expanduser()
    if env.get("RWKV_JAX_CACHE"):
        return pathlib.Path(env["RWKV_JAX_CACHE"]).expanduser() / "xla"
    base = env.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base).expanduser() / "rwkv-jax" / "xla"


def switched_off(environ: Mapping[str, str], name: str) -> bool:
    """Whether the environment variable ``name`` is 0/false/no/off (any case, spaces
    ignored): how the CLI's on-by-default switches are turned off."""
    return environ.get(name, "").strip().lower() in ("0", "false", "no", "off")


def wanted(disabled_by_flag: bool, environ: Mapping[str, str] | None = None) -> bool:
    """False when ``--no-compile-cache`` or ``RWKV_JAX_COMPILATION_CACHE=0/false/no/off``."""
    env = os.environ if environ is None else environ
    return not disabled_by_flag and not switched_off(env, ENV_SWITCH)


def configure(disabled_by_flag: bool = False) -> pathlib.Path | None:
    """Point JAX's persistent compilation cache at :func:`cache_dir` (or turn it off); call
    before anything is compiled. Returns the directory in use, or None when off."""
    import jax
    if not wanted(disabled_by_flag):
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    current = jax.config.jax_compilation_cache_dir
    if current:  # configured by the user or the program embedding the CLI: theirs wins
        return pathlib.Path(current)
    path = cache_dir()
    jax.config.update("jax_compilation_cache_dir", str(path))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_SECS)
    return path
