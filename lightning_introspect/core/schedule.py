"""Which steps are sampled: every N steps, a dense warm-up, and an overhead budget held by measurement."""
from __future__ import annotations

import math
import time
from collections import deque
from typing import Any, Deque, Optional


class SamplingSchedule:
    """Decides which optimizer steps are sampled (hooks attached, statistics computed and flushed).

    Steps ``0 .. warmup_steps - 1`` are all sampled; after that, multiples of the interval. With an
    ``overhead_budget`` the interval adapts: the schedule times each step on the host (start to start) and
    sets ``interval = ceil(excess / budget)``, where ``excess = (median sampled - median unsampled) /
    median unsampled`` is the extra cost of one sampled step, so that the slowdown ``excess / interval``
    stays just under the budget. The tool's own work on every step (per-example dynamics), reported to
    :meth:`tick` as ``own_seconds``, is part of the slowdown too: it is taken off the budget first (the
    sampled steps keep at least a quarter of it).

    Example:
        >>> s = SamplingSchedule(every_n_steps=4, warmup_steps=2)
        >>> [step for step in range(10) if s.should_sample(step)]
        [0, 1, 4, 8]
    """

    def __init__(
        self,
        every_n_steps: int,
        warmup_steps: int = 0,
        overhead_budget: Optional[float] = None,
        max_interval: int = 10_000,
        min_samples: int = 3,
    ) -> None:
        self.interval = every_n_steps
        self.warmup_steps = warmup_steps
        self.overhead_budget = overhead_budget
        self.max_interval = max_interval
        self.min_samples = min_samples
        self._sampled_times: Deque[float] = deque(maxlen=16)
        self._unsampled_times: Deque[float] = deque(maxlen=64)
        self._own_times: Deque[float] = deque(maxlen=64)
        self._last_start: Optional[float] = None
        self._last_sampled = False

    def should_sample(self, step: int) -> bool:
        return step < self.warmup_steps or step % self.interval == 0

    def tick(self, sampled: bool, now: Optional[float] = None, own_seconds: Optional[float] = None) -> None:
        """Called at each step start: attributes the previous step's duration to its kind. ``own_seconds``:
        time the tool itself spent in the previous step (kept for unsampled steps)."""
        now = time.perf_counter() if now is None else now
        if self._last_start is not None:
            (self._sampled_times if self._last_sampled else self._unsampled_times).append(now - self._last_start)
            if own_seconds is not None and not self._last_sampled:
                self._own_times.append(own_seconds)
        self._last_start = now
        self._last_sampled = sampled

    def pause(self) -> None:
        """Forget the running step (epoch end, validation): its duration is not a training step's."""
        self._last_start = None

    def excess(self) -> Optional[float]:
        """Measured extra cost of a sampled step, as a fraction of an unsampled one (None until measured)."""
        if len(self._sampled_times) < self.min_samples or len(self._unsampled_times) < 4 * self.min_samples:
            return None
        s = sorted(self._sampled_times)[len(self._sampled_times) // 2]
        u = sorted(self._unsampled_times)[len(self._unsampled_times) // 2]
        return max(s - u, 0.0) / max(u, 1e-9)

    def always_on(self) -> float:
        """Measured share of an unsampled step spent in the tool's every-step work (0 until measured)."""
        if len(self._own_times) < 4 * self.min_samples or len(self._unsampled_times) < 4 * self.min_samples:
            return 0.0
        own = sorted(self._own_times)[len(self._own_times) // 2]
        u = sorted(self._unsampled_times)[len(self._unsampled_times) // 2]
        return min(own / max(u - own, 1e-9), 1.0)

    def proposed_interval(self) -> int:
        """The interval the budget asks for now (the current one without a budget or measurements)."""
        if self.overhead_budget is None:
            return self.interval
        excess = self.excess()
        if excess is None:
            return self.interval
        room = max(self.overhead_budget - self.always_on(), self.overhead_budget / 4)
        return int(min(max(math.ceil(excess / room), 1), self.max_interval))

    def expected_overhead(self) -> Optional[float]:
        excess = self.excess()
        return None if excess is None else excess / self.interval + self.always_on()

    def state_dict(self) -> dict[str, Any]:
        return {"interval": self.interval}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.interval = int(state["interval"])
