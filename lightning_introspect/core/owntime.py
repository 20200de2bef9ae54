"""Own-time accounting: the time the tool spends in its own calls, counted once however they nest, for the
``introspect/overhead`` figure and the overhead budget."""
from __future__ import annotations

import time
from functools import wraps
from typing import Any, Callable, Optional, Protocol, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class _Timed(Protocol):
    """What is timed: an object with the two clocks below (the Introspector)."""

    overhead_seconds: float
    _own_since: Optional[float]


def timed(fn: F) -> F:
    """Adds the time spent in ``fn`` to ``self.overhead_seconds`` (the tool's own cost, reported), unless an
    enclosing :meth:`Introspector.own_time` already counts it."""

    @wraps(fn)
    def wrapper(self: "_Timed", *args: Any, **kwargs: Any) -> Any:
        if self._own_since is not None:  # inside a timed call already (a callback's hook body): counted there
            return fn(self, *args, **kwargs)
        with OwnTime(self):
            return fn(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


class OwnTime:
    """Counts the time inside as the tool's own, once when nested: the context of :meth:`Introspector.own_time`
    and of every timed core call (a class: cheaper than a generator on every hook)."""

    __slots__ = ("core", "t0")

    def __init__(self, core: "_Timed") -> None:
        self.core = core
        self.t0: Optional[float] = None

    def __enter__(self) -> None:
        if self.core._own_since is None:  # outermost: this one counts
            self.t0 = self.core._own_since = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        if self.t0 is not None:
            self.core._own_since = None
            self.core.overhead_seconds += time.perf_counter() - self.t0
