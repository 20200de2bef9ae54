"""Sampled steps under ``torch.compile``: the ``force_eager`` stance, shared by every Introspector in the
process, and the warning of a torch without ``torch.compiler.set_stance`` (before 2.6)."""
from __future__ import annotations

import sys
from typing import Any, Callable

import torch

from .writer import AsyncWriter

#: [instances holding the `force_eager` stance, the stance's context object]: shared by every Introspector in
#: the process, so that two callbacks on one Trainer, whose step ends come in the order their step starts did
#: (not nested), leave the stance the first one found, not `force_eager` for good.
_EAGER: list[Any] = [0, None]


def _hold_eager(set_stance: Callable[..., Any]) -> None:
    if _EAGER[0] == 0:
        _EAGER[1] = set_stance("force_eager")
    _EAGER[0] += 1


def _release_eager() -> None:
    _EAGER[0] -= 1
    if _EAGER[0] == 0 and _EAGER[1] is not None:
        stance, _EAGER[1] = _EAGER[1], None
        stance.__exit__(None, None, None)


def _compiled_frames() -> int:
    """How many frames Dynamo has compiled in this process (a host counter; 0 when Dynamo is not loaded)."""
    counters = getattr(sys.modules.get("torch._dynamo.utils"), "counters", None)
    return int(counters.get("frames", {}).get("ok", 0)) if counters else 0


class EagerStance:
    """One Introspector's hold on the ``force_eager`` stance during its sampled steps.

    :meth:`hold` runs the sampled step's ``torch.compile`` code eagerly (``torch.compiler.set_stance(
    "force_eager")``, until :meth:`release` restores the stance the step began with, once no instance holds
    it), so that every hooked layer runs its hook. A compiled graph never holds the hooks: Dynamo does not guard
    on an empty hook dict, so a graph traced on an unsampled step (a new batch size or sequence length) would run
    hook-less on every later sampled step; and one traced with the hooks would break at each of them. Compiled
    code then recompiles for nothing Introspect does, and unsampled steps keep the user's graphs."""

    def __init__(self, writer: AsyncWriter) -> None:
        self.writer = writer
        self.held = False  # True while this sampled step holds the `force_eager` stance
        self._warned = False  # the warning of a torch without set_stance was given
        self._frames_before = _compiled_frames()  # Dynamo's count of frames compiled before this run

    def hold(self) -> None:
        set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
        if set_stance is None:
            self._no_stance_warning()
            return
        if torch.compiler.is_compiling():  # the step itself is being traced: a stance cannot be set there
            return
        _hold_eager(set_stance)
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            _release_eager()  # back to the stance the step began with, once no instance holds it

    def _no_stance_warning(self) -> None:
        """Once, on a torch without ``set_stance``, after Dynamo has compiled a frame: the statistics that may
        be missing under ``torch.compile``. Host-side counters only."""
        if self._warned:
            return
        if _compiled_frames() <= self._frames_before:  # nothing compiled since this run began
            return
        self._warned = True
        self.writer.alert(
            f"lightning_introspect: torch {torch.__version__} has no `torch.compiler.set_stance`, so sampled steps "
            "cannot run `torch.compile`d code eagerly: a graph compiled on an unsampled step (a new batch size or "
            "sequence length) may run later sampled steps without the hooks, and its layers then get no activation or "
            "dead-unit statistics on them (gradient norms are unaffected). Use torch>=2.6 with torch.compile.",
            RuntimeWarning, key="no set_stance",
        )
