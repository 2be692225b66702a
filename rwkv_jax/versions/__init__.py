"""The version registry: one module per RWKV version, each declaring a
:class:`~rwkv_jax.versions.base.VersionSpec`; this file registers them once.

Everything else (model assembly, config validation, checkpoint detection, shape inference
and names, state files, optimizer groups, the WKV-form check) calls :func:`spec` or
:func:`detect` instead of testing version strings.

Adding a version: write ``rwkv_jax/versions/rwkvN.py`` with its mixers and a ``SPEC``
(copy the nearest existing version), add one line to :data:`REGISTRY` below, in detection
order (most specific first), and add its fixture to the parity tests.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rwkv_jax.versions import rwkv4, rwkv5, rwkv6, rwkv7
from rwkv_jax.versions.base import Extra, NameMap, VersionSpec

# detection order: a checkpoint is the first version whose ``detect`` accepts its keys
REGISTRY: dict[str, VersionSpec] = {s.version: s for s in (
    rwkv7.SPEC,
    rwkv6.SPEC,
    rwkv5.SPEC_52,
    rwkv5.SPEC_51,
    rwkv4.SPEC,
)}
VERSIONS = tuple(sorted(REGISTRY))  # "4", "5.1", "5.2", "6", "7"


def spec(version: str) -> VersionSpec:
    """The :class:`VersionSpec` of ``version``; KeyError-free: unknown raises ValueError."""
    try:
        return REGISTRY[version]
    except KeyError:
        raise ValueError(f"unknown RWKV version {version!r}; known: {', '.join(VERSIONS)}") \
            from None


def detect(shapes: Mapping[str, tuple[int, ...]]) -> VersionSpec:
    """The version of an official-named checkpoint (the official ``rwkv`` package's rules)."""
    return next(s for s in REGISTRY.values() if s.detect(shapes))


def name_maps() -> list[NameMap]:
    """Every registered non-official name map, each once (each recognises its own keys)."""
    out: list[NameMap] = []
    for s in REGISTRY.values():
        for m in s.names.values():
            if m not in out:
                out.append(m)
    return out


def all_extras() -> dict[str, Any]:
    """Every extra config field of any version -> the versions that have it."""
    out: dict[str, list[str]] = {}
    for s in REGISTRY.values():
        for name in s.extras:
            out.setdefault(name, []).append(s.version)
    return out


__all__ = ["REGISTRY", "VERSIONS", "Extra", "NameMap", "VersionSpec", "all_extras", "detect",
           "name_maps", "spec"]
