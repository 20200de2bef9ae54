"""Which steps are sampled: every N steps, a dense warm-up, and an overhead budget held by measurement."""
from __future__ import annotations

import math
import time
from collections import deque
from functools import wraps
from statistics import median
from typing import Any, Callable, Deque, Optional, TypeVar

# kinds of step, see SamplingSchedule
PLAIN, SAMPLED, AFTER, BOTH, TAIL = "plain", "sampled", "after", "both", "tail"
TICK, END, PAUSE = 0, 1, 2  # logged timing events
F = TypeVar("F", bound=Callable[..., Any])


def _central_mean(xs: Deque[float]) -> float:
    """Mean of the middle half (the interquartile mean): as robust to bursts of load as the median, and
    less noisy on the well-behaved rest."""
    v = sorted(xs)
    q = len(v) // 4
    mid = v[q : len(v) - q] or v
    return sum(mid) / len(mid)


def _replayed(fn: F) -> F:
    """An estimate: the timing events logged since the last one are replayed before it is computed."""

    @wraps(fn)
    def wrapper(self: "SamplingSchedule", *args: Any) -> Any:
        if self._log:
            self._replay()
        return fn(self, *args)

    return wrapper  # type: ignore[return-value]


def quantize_interval(x: float) -> float:
    """A budget's interval: a multiple of 1/8 below 64 steps (exact in float32, so ranks that reduce it agree;
    fine enough that the sampled share is within 2 % of its target even at 3 steps), whole steps above; an
    ``int`` when whole, so that :meth:`SamplingSchedule.should_sample` takes its modulo path."""
    q = round(x * 8) / 8 if x < 64 else float(round(x))
    return int(q) if q == int(q) else q


class SamplingSchedule:
    """Decides which optimizer steps are sampled (hooks attached, statistics computed and flushed).

    Steps ``0 .. warmup_steps - 1`` are all sampled; after that, one step per interval. With an
    ``overhead_budget`` the interval adapts so that the slowdown over the same steps without the tool stays
    at the budget.

    How the cost is measured: from step times alone, on the training thread, which is where a slowdown is
    felt. The tool calls :meth:`tick` when a step starts and :meth:`end` when it ends, each time with its own
    time in the step (``own_seconds``). A sampled step opens a *cycle* of steps that pay for it: the *sampled*
    step, the *after* step (the next one, which flushes it), and *tail* steps (further steps that start while
    the writer thread still works on that flush, ``tick(writer_busy=True)``: its fold and writing compete for
    the GIL and the cores). A step that is sampled and flushes the one before (interval 1) is *both*. The
    other steps are *plain*:

    * ``base`` = median of (step time - own time) over the last 16 plain steps: the step without the tool
      (recent steps only: the machine's speed drifts when other jobs come and go);
    * ``always_on`` = mean own time / ``base`` over plain steps: the tool's every-step work (per-example
      dynamics, including the steps that run their batched pass, and the framework adapter's hook bodies),
      which no interval can avoid; plus the work the writer thread does outside sample cycles (the batched
      per-example passes handed to it): a plain step that starts while it works (``tick(writer_busy=True)``)
      is slowed by it, as the writer's Python holds the GIL, which the training thread needs even in its
      backward pass. That share is the interquartile mean of those steps' time (own time taken off) over
      ``base``, less one, times their share of the last 256 plain steps: a cost that the median ``base``
      ignores when it falls on one step in sixteen. And the own time is counted twice over
      (``UNTIMED_PER_OWN``): the tool's timers miss part of what its every-step work costs. Its Python runs
      between the step's kernels and evicts the caches they then refill; Lightning's dispatch of its hooks and
      the forward hook's dispatch run outside its timers. Measured on the three benchmark workloads
      (``benchmarks/overhead.py``, budget runs), plain steps with the tool were slower than bare steps by about
      twice its own time: own time 0.9 / 0.5 / 0.2 % of a step (MLP / CNN / Transformer), plain steps
      1.4-1.8 / 1.0-1.3 / 0.5 % slower than bare. A ``base`` measured on the tool's plain steps holds that
      untimed cost, so nothing the schedule measures shows it: it is the one figure taken from calibration.
      With it, two full benchmark runs held every budget within a point (MLP 5 %: 5.5 and 5.1 %; it was
      5.6-6.3 % in the four runs before).

    Each step of a cycle gives its extra cost ``time / base - 1 - always_on`` against the base of its time
    (``always_on`` as measured: its untimed part, above, is in ``base`` already).
    The cost of one sampled step, all included, is ``excess = m(sampled) + m(after)`` (or ``m(both)``)
    ``+ m(tail) x`` the mean number of tail steps per cycle, where ``m`` is the interquartile mean over the
    last 64 steps of that kind: what a sample costs the training thread whatever the machine does with the
    writer thread (a free core makes it cheap, a busy one does not). The slowdown at interval ``N`` is then
    ``excess / N + always_on``, and the proposed interval is the ``N`` that makes it the budget, but at
    least 2.5: cycles of two and three steps alternate, so every other cycle keeps a plain step and the base
    stays measured (when tail steps leave none for two intervals, the interval doubles until they do). ``N``
    may be fractional (a multiple of 1/8 below 64): between 3 and 4 steps, whole intervals alone would miss a
    5 % budget by up to 0.7 points, and a sample that costs 0.13 of a plain step needs 2.6 to spend 5 %.
    Interquartile means make the estimate robust to other jobs on the machine; pauses (a step more than ten
    times the median of its kind: validation, checkpoints, a debugger) are left out. The interval moves only
    when the target differs by more than 5 % (or is the bound, 2.5 or ``max_interval``), and by at most a
    factor of 4 per update, so it settles instead of oscillating. Step time is in-step time (from
    :meth:`tick` to :meth:`end`: forward, backward, optimizer), so time spent loading data only makes the
    real slowdown smaller. Without :meth:`end` calls, start-to-start times are used.

    The sampled steps get what ``always_on`` leaves of the budget, but at least a tenth of it
    (``MIN_ROOM``): when ``always_on`` alone takes more than nine tenths, the budget cannot be held
    (:attr:`budget_unreachable` is then True), sampling goes on as sparsely as that tenth allows, and the
    slowdown is about ``always_on + budget / 10``: as near the budget as a tool that still samples can be.

    Example:
        >>> s = SamplingSchedule(every_n_steps=4, warmup_steps=2)
        >>> [step for step in range(10) if s.should_sample(step)]
        [0, 1, 4, 8]
    """

    GAP_FACTOR = 10.0  # a step this many times longer than the median of its kind is a pause
    DEADBAND = 0.05  # the interval moves when the target differs by more than this fraction
    MAX_FACTOR = 4.0  # and by at most this factor per update
    WINDOW = 64  # cycle steps of each kind (and cycles) the excess is measured over
    MIN_ROOM = 0.1  # share of the budget the sampled steps keep when the every-step work takes the rest
    BASE_WINDOW = 16  # recent plain steps the bare step is measured over: the machine's speed drifts
    # under a budget: a cycle is the sampled step and the flushing one, and at least every other cycle has a
    # plain step (2.5 samples steps 0, 3, 5, 8, 10, ...: gaps of 3 and 2 alternate)
    MIN_BUDGET_INTERVAL = 2.5
    UNTIMED_PER_OWN = 1.0  # the every-step work's untimed cost per second of its own time (see always_on)
    VERDICT_PLAIN = 128  # plain steps timed before the budget is judged out of reach (a few batched passes)
    LOG_LIMIT = 256  # timing events logged before they are replayed without an estimate being read

    def __init__(
        self,
        every_n_steps: int,
        warmup_steps: int = 0,
        overhead_budget: Optional[float] = None,
        max_interval: int = 10_000,
        min_samples: int = 3,
    ) -> None:
        self.interval: float = every_n_steps  # an int unless a budget made it fractional
        self.warmup_steps = warmup_steps
        self.overhead_budget = overhead_budget
        self.max_interval = max_interval
        self.min_samples = min_samples
        self._plain: Deque[float] = deque(maxlen=self.BASE_WINDOW)  # plain steps: time - own time
        self._plain_time: Deque[float] = deque(maxlen=64)  # plain steps: time (for the pause test)
        self._pause_above: Optional[float] = None  # a plain step longer than this is a pause
        self._plain_seen = 0
        self._own: Deque[float] = deque(maxlen=256)  # plain steps: own time (a window over many batched passes)
        self._plain_busy: Deque[bool] = deque(maxlen=256)  # plain steps: whether the writer thread worked
        self._busy_time: Deque[float] = deque(maxlen=self.WINDOW)  # those that started while it did: time - own
        self._writer_busy = False  # the running plain step started while the writer thread worked
        kinds = (SAMPLED, AFTER, BOTH, TAIL)
        self._extra: dict[str, Deque[float]] = {k: deque(maxlen=self.WINDOW) for k in kinds}
        self._time: dict[str, Deque[float]] = {k: deque(maxlen=self.WINDOW) for k in kinds}  # for the pause test
        self._raw: dict[str, list[float]] = {k: [] for k in kinds}  # measured before the base was known
        self._tails: Deque[int] = deque(maxlen=self.WINDOW)  # tail steps of each recent cycle
        self._tail_count: Optional[int] = None  # tail steps of the running cycle (None: no cycle running)
        self._start: Optional[float] = None
        self._kind = PLAIN
        self._steps = 0
        self._since_plain = 0
        self._log: list[tuple[int, float, Optional[float], bool, bool]] = []  # timing events not yet replayed

    def should_sample(self, step: int) -> bool:
        """Steps before ``warmup_steps``, then the first step of each period of ``interval`` steps (a budget's
        interval can be fractional: 3.5 samples steps 0, 4, 7, 11, 14, ..., i.e. every 3 or 4 steps)."""
        if step < self.warmup_steps:
            return True
        r = self.interval
        if type(r) is int:
            return step % r == 0
        return math.floor(step / r) != math.floor((step - 1) / r)

    # ------------------------------------------------------------------------------------------------ timing
    # tick, end and pause are called on every training step: they only log the event (a tuple appended), and
    # the log is replayed in one loop when an estimate is read (at a flush) or when it reaches LOG_LIMIT.
    # Replayed in a loop, the bookkeeping costs a fraction of what it costs spread over the steps, where each
    # call meets caches the forward and backward passes have just emptied.
    def tick(
        self, sampled: bool, now: Optional[float] = None, own_seconds: Optional[float] = None,
        writer_busy: bool = False,
    ) -> None:
        """Called when a step starts. Without an :meth:`end` call for the previous step, its duration is the
        time since the previous :meth:`tick` and ``own_seconds`` is the tool's own time in it.
        ``writer_busy``: whether the writer thread still has work queued or running (read before this step
        submits any)."""
        log = self._log
        log.append((TICK, time.perf_counter() if now is None else now, own_seconds, sampled, writer_busy))
        if len(log) >= self.LOG_LIMIT:
            self._replay()

    def end(self, now: Optional[float] = None, own_seconds: Optional[float] = None) -> None:
        """Called when a step ends (after the optimizer step); ``own_seconds``: the tool's own time in it."""
        self._log.append((END, time.perf_counter() if now is None else now, own_seconds, False, False))

    def pause(self) -> None:
        """Forget the running step (epoch end, validation): its duration is not a training step's."""
        self._log.append((PAUSE, 0.0, None, False, False))

    def _replay(self) -> None:
        """Applies the logged events in order."""
        log, self._log = self._log, []
        for event, now, own, sampled, writer_busy in log:
            if event == TICK:
                self._tick(sampled, now, own, writer_busy)
            elif event == END:
                if self._start is not None:
                    self._record(now - self._start, own or 0.0)
                self._start = None
            else:
                self._start = None

    def _tick(self, sampled: bool, now: float, own_seconds: Optional[float], writer_busy: bool) -> None:
        if self._start is not None:
            self._record(now - self._start, own_seconds or 0.0)
        prev = self._kind
        flushes = prev in (SAMPLED, BOTH) and self._steps > 0
        if sampled:
            self._close_cycle()
            self._tail_count = 0
            self._kind = BOTH if flushes else SAMPLED
        elif flushes:
            self._kind = AFTER
        elif self._tail_count is not None and writer_busy:
            self._kind = TAIL
            self._tail_count += 1
        else:
            self._close_cycle()
            self._kind = PLAIN
        self._writer_busy = writer_busy
        self._since_plain = 0 if self._kind == PLAIN else self._since_plain + 1
        self._steps += 1
        self._start = now

    def _close_cycle(self) -> None:
        if self._tail_count is not None:
            self._tails.append(self._tail_count)
        self._tail_count = None

    def _record(self, seconds: float, own: float) -> None:
        if self._steps == 1:  # the very first step allocates and compiles: not representative
            return
        kind = self._kind
        if kind == PLAIN:
            if self._pause_above is not None and seconds > self._pause_above:
                return
            self._plain_time.append(seconds)
            self._plain_seen += 1
            if len(self._plain_time) >= self.min_samples and (len(self._plain_time) < 16 or self._plain_seen % 16 == 0):
                self._pause_above = self.GAP_FACTOR * median(self._plain_time)  # not every step: it sorts
            self._plain.append(seconds - own)
            self._own.append(own)
            self._plain_busy.append(self._writer_busy)
            if self._writer_busy:
                self._busy_time.append(seconds - own)
            if len(self._plain) == self._min_plain():
                for k, raw in self._raw.items():  # the steps measured before the base was known
                    self._extra[k].extend(self._relative(t) for t in raw)
                    raw.clear()
            return
        seen = self._time[kind]
        if len(seen) >= self.min_samples and seconds > self.GAP_FACTOR * median(seen):
            return
        seen.append(seconds)
        if self.base() is None:
            self._raw[kind].append(seconds)
            del self._raw[kind][: -self.WINDOW]
        else:
            self._extra[kind].append(self._relative(seconds))

    def _relative(self, seconds: float) -> float:
        base = self.base()
        assert base is not None
        # a cycle step pays the every-step work too; its untimed part is in ``base`` already, so only the
        # measured part is taken off
        return seconds / base - 1.0 - self._floor(untimed=False)

    def _min_plain(self) -> int:
        return 2 * self.min_samples

    # ------------------------------------------------------------------------------------------------ estimates
    @_replayed
    def base(self) -> Optional[float]:
        """Median seconds of a plain step without the tool's own work (None until measured)."""
        if len(self._plain) < self._min_plain():
            return None
        return max(median(self._plain), 1e-9)

    @_replayed
    def always_on(self) -> float:
        """Slowdown of every step from the tool's every-step work, as a fraction (0 until measured): own time
        and the writer's share as measured, the own time's untimed cost (``UNTIMED_PER_OWN``) added."""
        return self._floor(untimed=True)

    def _floor(self, untimed: bool) -> float:
        base = self.base()
        if base is None or not self._own:
            return 0.0
        writer = 0.0
        if self._busy_time:
            share = sum(self._plain_busy) / len(self._plain_busy)
            writer = share * max(_central_mean(self._busy_time) / base - 1.0, 0.0)
        own = sum(self._own) / len(self._own) / base
        if untimed:
            own *= 1.0 + self.UNTIMED_PER_OWN
        return own + writer

    @_replayed
    def excess(self) -> Optional[float]:
        """Measured extra cost of one sampled step (hooks, its flush and the writer's work, as far as they slow
        the training thread), as a fraction of a plain step (None until measured)."""
        s, a, b, t = (self._extra[k] for k in (SAMPLED, AFTER, BOTH, TAIL))
        n = self.min_samples
        tail = _central_mean(t) * sum(self._tails) / len(self._tails) if t and self._tails else 0.0
        if len(s) >= n and len(a) >= n and not (self.interval == 1 and len(b) >= n):
            return max(_central_mean(s) + _central_mean(a) + tail, 0.0)
        if len(b) >= n:
            return max(_central_mean(b) + tail, 0.0)
        return None

    @property
    @_replayed
    def budget_unreachable(self) -> bool:
        """True when the every-step work alone takes more than nine tenths of the budget (``1 - MIN_ROOM``),
        judged once ``VERDICT_PLAIN`` plain steps are timed: over fewer, the first per-example batched passes
        (kernels run for the first time) can make a 1 % every-step cost look like 5 %."""
        return (self.overhead_budget is not None and len(self._own) >= self.VERDICT_PLAIN
                and self.base() is not None
                and self.always_on() > (1.0 - self.MIN_ROOM) * self.overhead_budget)

    @_replayed
    def target_interval(self) -> Optional[float]:
        """The interval whose expected slowdown is the budget (None without a budget or measurements):
        ``excess / (budget - always_on)``, fractional (see :func:`quantize_interval`)."""
        excess = self.excess()
        if self.overhead_budget is None or excess is None:
            return None
        budget, c = self.overhead_budget, self.always_on()
        room = max(budget - c, budget * self.MIN_ROOM)
        return self._clamp(excess / room)

    def _clamp(self, x: float) -> float:
        return quantize_interval(min(max(x, self.MIN_BUDGET_INTERVAL), self.max_interval))

    @_replayed
    def proposed_interval(self) -> float:
        """The interval this process proposes now: the current one without a budget or measurements; else
        toward :meth:`target_interval`, moving only by more than ``DEADBAND`` and at most 4x per update."""
        cur = self.interval
        if self.overhead_budget is None:
            return cur
        if self._since_plain > 2 * cur + self.warmup_steps:
            # Every step is in a cycle: no plain step keeps the bare cost measured, and the machine's speed
            # drifts. Make room first.
            return self._clamp(2 * cur)
        target = self.target_interval()
        at_bound = target in (self.MIN_BUDGET_INTERVAL, self.max_interval)  # exactly there: nothing to oscillate
        if target is None or (abs(target - cur) <= self.DEADBAND * cur and not at_bound):
            return cur
        return self._clamp(min(max(target, cur / self.MAX_FACTOR), cur * self.MAX_FACTOR))

    @_replayed
    def expected_overhead(self) -> Optional[float]:
        """Expected slowdown at the current interval, as a fraction (None until measured)."""
        excess = self.excess()
        return None if excess is None else excess / self.interval + self.always_on()

    def state_dict(self) -> dict[str, Any]:
        return {"interval": self.interval}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.interval = quantize_interval(float(state["interval"]))
