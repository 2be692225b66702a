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
