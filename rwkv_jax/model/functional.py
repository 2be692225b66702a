"""A module as a pure function: a hashable static definition plus its current arrays.

Every jitted entry point (the model's own ``__call__``, generation, evaluation, training)
runs ``f(static, values, ...)`` with ``static`` a :class:`ModuleDef` (hashable: the jit cache
key) and ``values`` the flat list of the module's arrays. Walking an NNX module graph
(``nnx.split``) costs milliseconds for a 12-layer model, more than a decode step, so the walk
is done once per module and cached (:func:`split`); a later call only reads each cached
``Variable``'s current value, which sees every in-place update (``model.x.weight[...] = ...``,
``nnx.update``, an optimizer writing back).

What invalidates the cache: assigning an attribute on any :class:`Module` (e.g. replacing a
submodule or a ``Variable``) bumps a global structure generation, and a cached split made
before it is rebuilt on next use. All of the package's modules derive from :class:`Module`.
"""

from __future__ import annotations

import weakref
from typing import Any, NamedTuple

import jax
from flax import nnx

_generation = 0  # bumped by every attribute assignment on a Module (structure may change)


class Module(nnx.Module):
    """``nnx.Module`` whose attribute assignments invalidate cached splits (:func:`split`)."""

    def __setattr__(self, name: str, value: Any) -> None:
        global _generation
        super().__setattr__(name, value)
        _generation += 1


class ModuleDef:
    """The static part of a module: its NNX graph definition and the pytree structure of its
    state. Hashable, so it can be a static argument of ``jax.jit``; the hash is computed once
    (an NNX graphdef hashes its whole graph, ~1 ms for a 12-layer model, on every lookup)."""

    __slots__ = ("graphdef", "treedef", "_hash")

    def __init__(self, graphdef: Any, treedef: Any):
        self.graphdef, self.treedef = graphdef, treedef
        self._hash = hash((graphdef, treedef))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return self is other or (isinstance(other, ModuleDef) and self._hash == other._hash
                                 and self.graphdef == other.graphdef
                                 and self.treedef == other.treedef)

    def merge(self, values) -> Any:
        """The module rebuilt from ``values`` (the list :func:`split` returns; traced or not)."""
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, list(values)))


class _Split(NamedTuple):
    generation: int
    moduledef: ModuleDef
    variables: tuple  # the module's live Variable objects, in ``treedef`` leaf order


_cache: "weakref.WeakKeyDictionary[Any, _Split]" = weakref.WeakKeyDictionary()


def _build(module) -> _Split:
    graphdef, state = nnx.split(module)
    leaves, treedef = jax.tree.flatten(state)
    variables = tuple(v for _, v in nnx.to_flat_state(state))
    # the state holds the module's own Variables; their values must be the flat leaves in
    # the same order, or reading them back would scramble the parameters
    if len(variables) != len(leaves) or any(v.get_value() is not x
                                            for v, x in zip(variables, leaves)):
        raise RuntimeError("nnx state leaves do not line up with its Variables")
    return _Split(_generation, ModuleDef(graphdef, treedef), variables)


def split(module) -> tuple[ModuleDef, list]:
    """``(moduledef, values)`` for ``module``: the graph walk is cached per module (see the
    module docstring); ``values`` are read afresh on every call. ``moduledef.merge(values)``
    inverts it, also inside a traced function."""
    entry = _cache.get(module)
    if entry is None or entry.generation != _generation:
        entry = _build(module)
        _cache[module] = entry
    # the raw values: get_value() copies through jax.tree.map (~13 µs per Variable)
    return entry.moduledef, [_read(v) for v in entry.variables]


def _read(v: nnx.Variable):
    x = v.get_raw_value()
    return x if isinstance(x, jax.Array) else v.get_value()  # e.g. an array ref


def is_traced(x) -> bool:
    """True when ``x`` is a JAX tracer (we are inside jit/grad/vmap tracing)."""
    return isinstance(x, jax.core.Tracer)


try:  # jax's own record of whether a trace is active (no public spelling in jax 0.10/0.11)
    from jax._src.core import trace_state_clean as _trace_state_clean
except ImportError:  # pragma: no cover - a jax without it: the leaf check alone
    _trace_state_clean = None


def under_trace(*leaves) -> bool:
    """True inside jit/grad/vmap tracing: some of ``leaves`` is a tracer, or a trace is
    active although every argument is concrete (a traced value can reach the computation
    another way, e.g. a LoRA dropout key set by :func:`~rwkv_jax.model.layers.dropout_key`
    inside a jitted function)."""
    if any(is_traced(x) for x in leaves):
        return True
    return _trace_state_clean is not None and not _trace_state_clean()


def dotted_name(path) -> str:
    """``"blocks.3.att.key.weight"`` from a path: an NNX state path (str / int parts) or a JAX
    key path (``DictKey``, ``GetAttrKey``, ``SequenceKey`` entries). The ``.value`` entry a
    JAX path takes into an ``nnx.Variable`` is not part of the name."""
    path = list(path)
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    parts = []
    for p in path:
        for attr in ("key", "name", "idx"):
            if hasattr(p, attr) and not isinstance(p, (str, int)):
                p = getattr(p, attr)
                break
        parts.append(str(p))
    return ".".join(parts)


def tree_names(tree) -> Any:
    """A pytree like ``tree`` holding each leaf's :func:`dotted_name`."""
    return jax.tree_util.tree_map_with_path(lambda path, _: dotted_name(path), tree)
