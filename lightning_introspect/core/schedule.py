"""Which steps are sampled: every N steps, a dense warm-up, and an overhead budget held by measurement."""
from __future__ import annotations

import math
import time
from collections import deque
from statistics import median
from typing import Any, Deque, Optional

PLAIN, SAMPLED, AFTER, BOTH = "plain", "sampled", "after", "both"  # kinds of step, see SamplingSchedule


class SamplingSchedule:
    """Decides which optimizer steps are sampled (hooks attached, statistics computed and flushed).

    Steps ``0 .. warmup_steps - 1`` are all sampled; after that, multiples of the interval. With an
    ``overhead_budget`` the interval adapts so that the slowdown over the same steps without the tool stays
    at the budget.

    How the cost is measured. The tool calls :meth:`tick` when a step starts and :meth:`end` when it ends,
    each time with its own time in the step (``own_seconds``). A step is one of four kinds: *sampled*, *after*
    (the step after a sampled one: it flushes the sampled step's statistics at its start and shares the CPU
    with the writer thread that formats and writes them), *both* (sampled and after, e.g. at interval 1) and
    *plain* (everything else). On plain steps:

    * ``base`` = median of (step time - own time): the step without the tool;
    * ``always_on`` = mean own time / ``base``: the tool's every-step work (per-example dynamics, including
      the steps that run their batched pass), which no interval can avoid.

    Each sampled and after step gives its extra cost ``time / base - 1 - always_on``; the cost of one sampled
    step, all included, is ``excess = median(sampled) + median(after)`` (or ``median(both)``), plus the
    median time the writer thread spent on its flush (:meth:`add_background`), over ``base``. The slowdown at
    interval ``N`` is then ``excess / N + always_on``, and the proposed interval is the ``N`` that brings it
    nearest to the budget. Medians per kind make the estimate robust to other jobs on the machine; pauses
    (a step more than ten times the median of its kind: validation, checkpoints, a debugger) are left out.
    The interval moves only when the target differs by more than 10 %, and by at most a factor of 4 per
    update, so it settles instead of oscillating. Step time is in-step time (from :meth:`tick` to :meth:`end`:
    forward, backward, optimizer), so time spent loading data only makes the real slowdown smaller. Without
    :meth:`end` calls, start-to-start times are used.

    If ``always_on`` alone takes more than three quarters of the budget, the sampled steps still keep a
    quarter of it (:attr:`budget_unreachable` is then True and the slowdown is about ``always_on + budget / 4``).

    Example:
        >>> s = SamplingSchedule(every_n_steps=4, warmup_steps=2)
        >>> [step for step in range(10) if s.should_sample(step)]
        [0, 1, 4, 8]
    """

    GAP_FACTOR = 10.0  # a step this many times longer than the median of its kind is a pause
    DEADBAND = 0.1  # the interval moves when the target differs by more than this fraction
    MAX_FACTOR = 4.0  # and by at most this factor per update

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
        self._plain: Deque[float] = deque(maxlen=64)  # plain steps: time - own time
        self._plain_time: Deque[float] = deque(maxlen=64)  # plain steps: time (for the pause test)
        self._own: Deque[float] = deque(maxlen=256)  # plain steps: own time (a window over many batched passes)
        self._extra: dict[str, Deque[float]] = {k: deque(maxlen=16) for k in (SAMPLED, AFTER, BOTH)}
        self._raw: dict[str, Deque[float]] = {k: deque(maxlen=16) for k in (SAMPLED, AFTER, BOTH)}  # before base
        self._background: Deque[float] = deque(maxlen=16)  # writer-thread seconds per sampled step's flush
        self._start: Optional[float] = None
        self._kind = PLAIN
        self._prev_sampled = False
        self._steps = 0

    def should_sample(self, step: int) -> bool:
        return step < self.warmup_steps or step % self.interval == 0

    # ------------------------------------------------------------------------------------------------ timing
    def tick(self, sampled: bool, now: Optional[float] = None, own_seconds: Optional[float] = None) -> None:
        """Called when a step starts. Without an :meth:`end` call for the previous step, its duration is the
        time since the previous :meth:`tick` and ``own_seconds`` is the tool's own time in it."""
        now = time.perf_counter() if now is None else now
        if self._start is not None:
            self._record(now - self._start, own_seconds or 0.0)
        after = self._prev_sampled and self._steps > 0
        self._kind = BOTH if sampled and after else SAMPLED if sampled else AFTER if after else PLAIN
        self._prev_sampled = sampled
        self._steps += 1
        self._start = now

    def end(self, now: Optional[float] = None, own_seconds: Optional[float] = None) -> None:
        """Called when a step ends (after the optimizer step); ``own_seconds``: the tool's own time in it."""
        now = time.perf_counter() if now is None else now
        if self._start is not None:
            self._record(now - self._start, own_seconds or 0.0)
        self._start = None

    def add_background(self, seconds: float) -> None:
        """The writer thread's time for one sampled step (its fold and writing); thread-safe (a deque append).
        It counts as if spent on the training thread: on a busy machine it is (the GIL, shared cores), and
        a budget should hold whatever the core count."""
        self._background.append(seconds)

    def pause(self) -> None:
        """Forget the running step (epoch end, validation): its duration is not a training step's."""
        self._start = None

    def _record(self, seconds: float, own: float) -> None:
        if self._steps == 1:  # the very first step allocates and compiles: not representative
            return
        kind = self._kind
        if kind == PLAIN:
            if len(self._plain_time) >= self.min_samples and seconds > self.GAP_FACTOR * median(self._plain_time):
                return
            self._plain_time.append(seconds)
            self._plain.append(seconds - own)
            self._own.append(own)
            if len(self._plain) == self._min_plain():
                for k, raw in self._raw.items():  # the steps measured before the base was known
                    self._extra[k].extend(self._relative(t) for t in raw)
                    raw.clear()
            return
        base = self.base()
        if base is None:
            self._raw[kind].append(seconds)
            return
        extra = self._relative(seconds)
        seen = self._extra[kind]
        if len(seen) >= self.min_samples and extra + 1 > self.GAP_FACTOR * (median(seen) + 1):
            return
        seen.append(extra)

    def _relative(self, seconds: float) -> float:
        base = self.base()
        assert base is not None
        return seconds / base - 1.0 - self.always_on()

    def _min_plain(self) -> int:
        return 2 * self.min_samples

    # ------------------------------------------------------------------------------------------------ estimates
    def base(self) -> Optional[float]:
        """Median seconds of a plain step without the tool's own work (None until measured)."""
        if len(self._plain) < self._min_plain():
            return None
        return max(median(self._plain), 1e-9)

    def always_on(self) -> float:
        """Measured slowdown of every step from the tool's every-step work, as a fraction (0 until measured)."""
        base = self.base()
        if base is None or not self._own:
            return 0.0
        return sum(self._own) / len(self._own) / base

    def excess(self) -> Optional[float]:
        """Measured extra cost of one sampled step (hooks, its flush and the writer's work included), as a
        fraction of a plain step (None until measured)."""
        s, a, b = (self._extra[k] for k in (SAMPLED, AFTER, BOTH))
        n = self.min_samples
        base = self.base()
        background = self._background.copy()  # one C-level copy: the writer thread appends meanwhile
        bg = median(background) / base if background and base is not None else 0.0
        if len(s) >= n and len(a) >= n and not (self.interval == 1 and len(b) >= n):
            return max(median(s) + median(a), 0.0) + bg
        if len(b) >= n:
            return max(median(b), 0.0) + bg
        return None

    @property
    def budget_unreachable(self) -> bool:
        """True when the every-step work alone takes more than three quarters of the budget."""
        return self.overhead_budget is not None and self.base() is not None and self.always_on() > 0.75 * self.overhead_budget

    def target_interval(self) -> Optional[int]:
        """The interval whose expected slowdown is nearest the budget (None without a budget or measurements)."""
        excess = self.excess()
        if self.overhead_budget is None or excess is None:
            return None
        budget, c = self.overhead_budget, self.always_on()
        room = max(budget - c, budget / 4)
        x = excess / room
        lo, hi = max(math.floor(x), 1), max(math.ceil(x), 1)
        n = min((hi, lo), key=lambda k: abs(excess / k - room))  # nearest the budget; above it only when nearer
        return int(min(max(n, 1), self.max_interval))

    def proposed_interval(self) -> int:
        """The interval this process proposes now: the current one without a budget or measurements; else
        toward :meth:`target_interval`, moving only by more than 10 % and at most 4x per update."""
        target = self.target_interval()
        cur = self.interval
        if target is None and self.overhead_budget is not None and cur <= 2 and not self._plain:
            # Every step is sampled or flushes the one before: no plain step measures the bare cost. Make room.
            return 3
        if target is None or abs(target - cur) <= self.DEADBAND * cur:
            return cur
        step = min(max(target, math.floor(cur / self.MAX_FACTOR)), math.ceil(cur * self.MAX_FACTOR))
        return int(min(max(step, 1), self.max_interval))

    def expected_overhead(self) -> Optional[float]:
        """Expected slowdown at the current interval, as a fraction (None until measured)."""
        excess = self.excess()
        return None if excess is None else excess / self.interval + self.always_on()

    def state_dict(self) -> dict[str, Any]:
        return {"interval": self.interval}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.interval = int(state["interval"])
