"""Count XLA compilations and traces, to assert that a repeated call compiles nothing.

``with CompileCounter() as c: ...`` then ``c.compiles`` (backend compilations, each one an
executable built by XLA, whether or not the persistent cache served it) and ``c.traces``
(Python traces to a jaxpr). Counts come from ``jax.monitoring`` duration events, which every
jit, eager primitive and ``lax.scan`` body compile reports.
"""

from __future__ import annotations

import threading

from jax import monitoring

_COMPILE = "/jax/core/compile/backend_compile_duration"
_TRACE = "/jax/core/compile/jaxpr_trace_duration"
_active: list["CompileCounter"] = []
_lock = threading.Lock()
_registered = False


def _listener(name: str, duration: float, **kwargs) -> None:
    del duration, kwargs
    with _lock:
        for c in _active:
            if name == _COMPILE:
                c.compiles += 1
            elif name == _TRACE:
                c.traces += 1


class CompileCounter:
    """Context manager counting compilations and traces while it is open."""

    def __init__(self):
        self.compiles = 0
        self.traces = 0

    def __enter__(self) -> "CompileCounter":
        global _registered
        with _lock:
            if not _registered:
                monitoring.register_event_duration_secs_listener(_listener)
                _registered = True
            _active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        with _lock:
            _active.remove(self)


def assert_compiled_once(calls, same_programs=()) -> None:
    """Each of ``calls`` (zero-argument callables) compiles on its first run and nothing on
    its second; then each of ``same_programs`` (the same computations called another way:
    through a dispatcher, with keywords) compiles nothing."""
    import jax
    for call in calls:
        with CompileCounter() as first:
            jax.block_until_ready(call())
        with CompileCounter() as second:
            jax.block_until_ready(call())
        assert first.compiles >= 1 and second.compiles == 0, (first.compiles, second.compiles)
    for call in same_programs:
        with CompileCounter() as c:
            jax.block_until_ready(call())
        assert c.compiles == 0, c.compiles
