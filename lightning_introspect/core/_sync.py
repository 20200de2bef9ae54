"""Marks the places where a device-to-host copy is allowed: flushes and epoch ends.

Everything else on the training path (hooks, per-step bookkeeping) only launches kernels. The marker costs
a thread-local flag; tests use :func:`sync_allowed` to tell a legitimate flush copy from a stray sync.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

_state = threading.local()


@contextmanager
def allow_sync() -> Iterator[None]:
    """Context in which a device-to-host copy is expected (a flush or an epoch end)."""
    depth = getattr(_state, "depth", 0)
    _state.depth = depth + 1
    try:
        yield
    finally:
        _state.depth = depth


def sync_allowed() -> bool:
    """Whether the calling thread is inside a flush or epoch end."""
    return getattr(_state, "depth", 0) > 0
