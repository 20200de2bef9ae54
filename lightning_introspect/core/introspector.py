"""The framework-agnostic core: a plain PyTorch loop drives it in a few calls; the Lightning callback maps
Trainer hooks onto the same calls.

Example (a plain loop):
    >>> import torch
    >>> from torch import nn
    >>> from lightning_introspect.core import Introspector, IntrospectConfig
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> intro = Introspector(model, IntrospectConfig(every_n_steps=2, warmup_steps=0), num_examples=16)
    >>> x, y, ids = torch.randn(16, 4), torch.randint(0, 3, (16,)), torch.arange(16)
    >>> for step in range(4):
    ...     with intro.step(step):
    ...         logits = model(x)
    ...         loss = nn.functional.cross_entropy(logits, y)
    ...         opt.zero_grad(); loss.backward()
    ...         intro.observe_gradients(opt)
    ...         opt.step()
    ...         intro.observe_batch(ids, targets=y, logits=logits, loss=loss)
    >>> intro.end_epoch(epoch=0, step=4)
    >>> intro.records()["seen_epochs"].tolist()[:4]
    [1, 1, 1, 1]
    >>> intro.close()
"""
from __future__ import annotations

import gc
import math
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager, nullcontext
from functools import wraps
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Optional, Sequence, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from . import dist
from ._sync import allow_sync
from .config import ACTIVATION_TYPES, IntrospectConfig
from .hooks import HookSet, plain_name, select_layers
from .samples import (
    BAD_INPUT_NAMES, PerSampleStore, bad_input_message, classification_figures_with_other, sequence_figures,
)
from .schedule import SamplingSchedule, quantize_interval
from .stats import HIST_BINS, CaptureFolder, GradNorms, LayerStats, histogram_edges, to_device
from .units import unit_rule
from ..sinks.base import AsyncWriter

F = TypeVar("F", bound=Callable[..., Any])
_EDGES = histogram_edges()
DIAGNOSE_STEPS = 3
# Per-example inputs are kept for SAMPLE_BUFFER_STEPS steps, then reduced in one batched pass (~60 kernel
# launches, about as costly for 1 step as for 16: 1.1-1.3 ms on the benchmark's MLP on a CPU). More steps
# would cut the per-step share (20 us at 64 instead of 70), but the kept tensors, allocated between each
# step's activations, pin the host heap apart: +26 MB of peak memory on the CNN benchmark at 64. Copying them
# into buffers allocated once costs more than it saves: 40-50 us a step for three small copies, numpy or torch
# (the first call into either, after the forward and backward passes, runs with cold caches).
SAMPLE_BUFFER_STEPS = 16
MAX_BUFFERED_LOGITS = 1 << 18  # larger (N, C) logits are reduced to per-example figures at once
# The epoch-end data map and suspects table (matplotlib: about 180 ms for 12,800 examples on this CPU) are
# redrawn only while they take at most EXTRAS_DUTY of the wall time since the last redraw. They run on the
# writer thread, but that does not hide them: matplotlib is Python that holds the GIL, and a training step
# beside a redraw takes 4-5x as long (the CNN benchmark's model: 45-56 ms instead of 11), so a redraw costs
# training about its own duration. The last epoch's picture is always drawn, at close.
EXTRAS_DUTY = 0.01
# Windows of consecutive sampled steps (every step sampled: dense warm-up, every_n_steps=1) are handed to the
# writer thread this many at a time, for one fold, one pack and one host copy. The writer's Python holds the
# GIL, and the training thread waits for it even in its backward pass; a fold's Python costs about as much
# for eight windows as for one. TensorBoard sees them at most this many steps later.
FOLD_BATCH = 8
# Scalars of a layer (activation statistics, dead units), of a parameter-owning layer and of a parameter,
# in the order of their values in _write_flush.
_ACTIVATION_TAGS = ("activation_mean", "activation_std", "activation_min", "activation_max",
                    "activation_zero_fraction", "activation_nonfinite")
_DEAD_TAGS = ("dead_fraction", "dead_count", "dead_windows")
_SATURATED_TAGS = ("saturated_fraction", "saturated_count", "saturated_windows")
_UNIT_TAGS = {"dead": _DEAD_TAGS, "saturated": _SATURATED_TAGS}
_GRAD_TAGS = ("grad_norm", "grad_to_weight", "update_to_weight")
_PARAM_TAGS = ("param_grad_norm",)
_GLOBAL_GRAD_TAGS = ("grad_norm/global", "grad_norm/global_clipped")  # not layers
_HIST_TAGS = ("activation_hist",)
MAX_WRITTEN_BUCKETS = 40  # histogram buckets per event (adjacent ones merged beyond)


class _Window(NamedTuple):
    """One flushed window, as the training thread hands it over: what the fold and the pack read."""

    stats: list[LayerStats]  # the allocated layers, sorted by name
    captures: list[Any]  # their Captures, in the same order
    counts: Tensor  # (L + 1,) subsampled elements per layer (the last slot unused)
    extra: Tensor  # the non-finite-loss and bad-input counters
    interval: Tensor  # (1,) minus the proposed interval (reduced with "min" across ranks)
    grad_parts: list[Tensor]  # squared gradient, weight and update norms (see GradNorms.take)


class _Reduce:
    """A reduce of buffered per-example inputs, handed to the writer thread and run once, by whichever thread
    comes first: the writer in its queue's order, or the training thread when it needs the store (an epoch
    end, a checkpoint) and takes back, in the same order, the reduces the writer has not started. Taking the
    job and running it are one step under the store's lock, so that a thread that finds it taken knows it is
    done, and reduces are applied to the store in the order they were handed over."""

    __slots__ = ("fn", "lock", "done")

    def __init__(self, fn: Callable[[], None], lock: threading.Lock) -> None:
        self.fn: Optional[Callable[[], None]] = fn
        self.lock = lock
        self.done = False

    def __call__(self) -> None:
        with self.lock:
            fn, self.fn = self.fn, None  # dropped once run: its buffers are freed by whoever ran it
            if fn is None:
                return
            try:
                fn()
            finally:
                self.done = True


class _HeldKey(NamedTuple):
    """Windows folded together share their layers, histogram flag, gradient buffers' shapes and device."""

    layers: tuple[str, ...]
    histogram: bool
    grad_shapes: tuple[torch.Size, ...]
    device: torch.device


def _timed(fn: F) -> F:
    """Adds the time spent in ``fn`` to ``self.overhead_seconds`` (the tool's own cost, reported), unless an
    enclosing :meth:`Introspector.own_time` already counts it."""

    @wraps(fn)
    def wrapper(self: "Introspector", *args: Any, **kwargs: Any) -> Any:
        if self._own_since is not None:  # inside a timed call already (a callback's hook body): counted there
            return fn(self, *args, **kwargs)
        with _OwnTime(self):
            return fn(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


class _OwnTime:
    """Counts the time inside as the tool's own, once when nested: the context of :meth:`Introspector.own_time`
    and of every timed core call (a class: cheaper than a generator on every hook)."""

    __slots__ = ("core", "t0")

    def __init__(self, core: "Introspector") -> None:
        self.core = core
        self.t0: Optional[float] = None

    def __enter__(self) -> None:
        if self.core._own_since is None:  # outermost: this one counts
            self.t0 = self.core._own_since = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        if self.t0 is not None:
            self.core._own_since = None
            self.core.overhead_seconds += time.perf_counter() - self.t0


def tensorboard_layout(config: IntrospectConfig) -> dict[str, dict[str, list]]:
    """Custom-scalars layout: one multi-line chart per statistic, one line per layer (tags are regexes)."""
    layout: dict[str, dict[str, list]] = {}
    if config.activations:
        layout["Activations (one line per layer)"] = {
            title: ["Multiline", [rf"^activation_{key}/"]]
            for title, key in (("mean", "mean"), ("std", "std"), ("min", "min"), ("max", "max"),
                               ("fraction of zeros", "zero_fraction"), ("non-finite values", "nonfinite"))
        }
    if config.dead_units:
        layout["Dead units (one line per layer)"] = {
            "dead fraction": ["Multiline", [r"^dead_fraction/"]],
            "dead count": ["Multiline", [r"^dead_count/"]],
            "windows the longest-dead unit has stayed dead": ["Multiline", [r"^dead_windows/"]],
        }
        layout["Saturated units (one line per layer)"] = {
            "saturated fraction": ["Multiline", [r"^saturated_fraction/"]],
            "saturated count": ["Multiline", [r"^saturated_count/"]],
            "windows the longest-saturated unit has stayed saturated": ["Multiline", [r"^saturated_windows/"]],
        }
    if config.grad_norms:
        # The global norm is apart: on one axis with the layers it is the largest line and squashes them.
        charts = {"gradient L2 norm (global)": ["Multiline", [r"^grad_norm/global(_clipped)?$"]],
                  "gradient L2 norm per layer": ["Multiline", [r"^grad_norm/(?!global(_clipped)?$)"]],
                  "gradient / weight norm": ["Multiline", [r"^grad_to_weight/"]]}
        if config.update_ratios:
            charts["update / weight norm"] = ["Multiline", [r"^update_to_weight/"]]
        if config.param_grad_norms:
            charts["gradient norm per parameter"] = ["Multiline", [r"^param_grad_norm/"]]
        layout["Gradients"] = charts
    layout["Per-example dynamics"] = {
        "learned, forgotten and flagged fractions": ["Multiline", [r"^samples/.*_fraction$"]],
    }
    layout["Introspection cost"] = {
        "sampling interval (steps)": ["Multiline", [r"^introspect/interval$"]],
        "estimated slowdown": ["Multiline", [r"^introspect/overhead$"]],
    }
    return layout


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


class Introspector:
    """Records per-layer statistics on sampled steps and per-example dynamics on every step.

    Args:
        model: the module whose layers are watched (for Lightning, the LightningModule).
        config: what to record and how often (:class:`IntrospectConfig`).
        sinks: where figures go (e.g. :class:`~lightning_introspect.sinks.TensorBoardSink`); only rank 0
            should be given sinks under DDP.
        records_dir: folder for the per-example records (``samples.npz``/``.json``), the suspects CSV and the
            data map; None keeps them in memory only.
        num_examples: size of the training set (sample ids must lie in ``[0, num_examples)``).
        on_scalars: called on the training thread with ``(scalars, step)`` after they were written, e.g. to
            forward them to another logger.
        class_names: names of the classes, for reports.
    """

    def __init__(
        self,
        model: nn.Module,
        config: Optional[IntrospectConfig] = None,
        *,
        sinks: Sequence[Any] = (),
        records_dir: Optional[str | Path] = None,
        num_examples: Optional[int] = None,
        on_scalars: Optional[Callable[[dict[str, float], int], None]] = None,
        class_names: Optional[Sequence[str]] = None,
        is_writer: Optional[bool] = None,
    ) -> None:
        self.config = config = config or IntrospectConfig()
        self.model = model
        self.overhead_seconds = 0.0
        self._own_mark = 0.0
        self._own_since: Optional[float] = None  # start of the timed call in progress (see own_time)
        watch_layers = config.activations or config.dead_units or config.histograms
        self.layers = select_layers(model, config) if watch_layers else []
        self.layer_stats: dict[str, LayerStats] = {}
        self._skipped: dict[str, str] = {}
        self.hooks = HookSet(self.layers, self.layer_stats, config, self._on_skip)
        self._folder = CaptureFolder(config.zero_threshold, config.max_histogram_elements)
        named = [(plain_name(n), p) for n, p in model.named_parameters() if p.requires_grad]
        self.grad = GradNorms([n for n, _ in named])
        self._param_pos: dict[int, Optional[int]] = {id(p): i for i, (_, p) in enumerate(named)}
        self._params = [p for _, p in named]
        self.schedule = SamplingSchedule(
            config.every_n_steps, config.warmup_steps, config.overhead_budget, config.max_interval
        )
        self.sinks = list(sinks)
        self.records_dir = Path(records_dir) if records_dir is not None else None
        self.on_scalars = on_scalars
        self.class_names = list(class_names) if class_names is not None else None
        self.describe: Optional[Callable[[int], str]] = None  # sample id -> text, for the suspects tables
        self.is_writer = dist.rank() == 0 if is_writer is None else is_writer
        self.writer = AsyncWriter()
        self.store: Optional[PerSampleStore] = None
        self.num_examples = num_examples or config.num_examples
        self.num_classes: Optional[int] = None
        self.task: Optional[str] = None
        self.sampled = False
        self.step_index = 0
        self.samples_flushed = 0
        self._flushed_before = 0  # sampled steps of a run this one resumes: their calls are not in hooks.called
        self.epochs_done = 0
        self._pending: Optional[int] = None
        self._step_handles: list[Any] = []
        self._stance_warned = False  # the warning of a torch without set_stance was given (see _run_eager)
        self._frames_before = _compiled_frames()  # Dynamo's count of frames compiled before this run
        self._eager_stance: Any = None  # True while this sampled step holds the `force_eager` stance (_run_eager)
        self._loss_bad: Optional[Tensor] = None
        self._diagnose = 0
        self._layout_written = False
        self._tag_cache: dict[tuple[str, tuple[str, ...]], tuple[str, ...]] = {}
        self._held: list[tuple[_Window, dict[str, Any]]] = []  # flushed windows not yet handed to the writer
        self._held_key: Optional[_HeldKey] = None
        self._batches_ok = 0
        self._records: Optional[dict[str, np.ndarray]] = None
        self._prev_forgets: Optional[np.ndarray] = None
        self._pending_state: Optional[dict[str, Any]] = None
        self._dead_layers: Optional[dict[str, str]] = None
        self._uncalled_checked = False
        self._sample_buf: list[tuple] = []
        self._raw_sig: Optional[tuple] = None  # shapes, dtypes and device of the last batch checked as "raw"
        self._loss_buf: list[Tensor] = []
        self._loss_check = config.detect_nonfinite
        # Buffered batches are reduced on the writer thread (see _drain_samples); the lock keeps the training
        # thread's own reads and writes of the store (bad-input counters, explicit drains) apart from them.
        self._reduce_lock = threading.Lock()
        self._reduces: deque[_Reduce] = deque()  # handed to the writer, in order; possibly not run yet
        self._steps_since_flush = 0
        self._extras_cost = 0.0  # seconds the last epoch-end picture + suspects table took (writer thread)
        self._extras_done = -math.inf
        self._skipped_extras: Optional[tuple] = None
        self.threshold_ids: Optional[np.ndarray] = None  # AUM threshold samples (ThresholdSamples), if any

    # ------------------------------------------------------------------------------------------------ steps
    @contextmanager
    def step(self, step: int) -> Iterator[bool]:
        """Context for one training step: hooks are attached inside it when the step is sampled."""
        sampled = self.begin_step(step)
        try:
            yield sampled
        finally:
            self.end_step()

    # begin_step and end_step run on every step, sampled or not: they time themselves inline (no wrapper, no
    # context object) and call as little as they can. A Python call costs about a microsecond here, with the
    # caches the forward and backward passes have just emptied; a training step should not notice them.
    def begin_step(self, step: int) -> bool:
        """Starts a (micro-)batch of optimizer step ``step``; returns whether it is sampled."""
        t0 = time.perf_counter()
        start = self._own_since  # inside an adapter's own_time(): the step's clock started there
        outer = start is None
        if outer:
            start = self._own_since = t0
        self._own_mark = self.overhead_seconds
        try:
            writer = self.writer
            if writer.mail:
                writer.poll()
            writer_busy = writer.busy()  # before this step's flush submits work: the last one's still runs
            if self._pending is not None and self._pending != step:
                self._flush()
            sampled = self._diagnose > 0 or self.schedule.should_sample(step)
            if self._held and not sampled:  # no flush comes next step: the held windows go now
                self._submit_held()
            self.schedule.tick(sampled, start, writer_busy=writer_busy)
            self.sampled = sampled
            self.step_index = step
            self._steps_since_flush += 1
            if sampled:
                if self._pending != step and self._diagnose > 0:
                    self._diagnose -= 1
                self._pending = step
                cfg = self.config
                self.hooks.histogram = cfg.histograms and self.samples_flushed % cfg.histogram_every_n_samples == 0
                if self.layers:
                    self.hooks.attach()
                    if self._eager_stance is None and "torch._dynamo.eval_frame" in sys.modules:
                        self._run_eager()
            return sampled
        finally:
            if outer:
                self._own_since = None
                self.overhead_seconds += time.perf_counter() - t0

    def end_step(self, loss: Any = None) -> None:
        """Ends the (micro-)batch: hooks come off; the sampled step is flushed when the next step begins.
        ``loss``: the step's loss, counted when not finite (as :meth:`observe_loss`)."""
        t0 = time.perf_counter()
        start = self._own_since
        outer = start is None
        if outer:
            start = self._own_since = t0
        try:
            if self.sampled:  # only a sampled step attaches hooks (observe_gradients returns at once otherwise)
                self.hooks.detach()
                if self._eager_stance is not None:
                    self._eager_stance = None
                    _release_eager()  # back to the stance the step began with, once no instance holds it
                for h in self._step_handles:
                    h.remove()
                self._step_handles = []
            if type(loss) is Tensor and loss.ndim == 0 and not loss.requires_grad and self._loss_check:
                self._loss_buf.append(loss)  # what Lightning hands over: observe_loss, without its calls
                if len(self._loss_buf) >= SAMPLE_BUFFER_STEPS:
                    self._drain_samples(offload=True)
            elif loss is not None:
                self.observe_loss(loss)
        finally:
            now = time.perf_counter()
            if outer:
                self._own_since = None
                self.overhead_seconds += now - t0
            # the step's own time: its timed calls so far, and the one in progress
            self.schedule.end(now, own_seconds=self.overhead_seconds - self._own_mark + (0.0 if outer else now - start))

    def _run_eager(self) -> None:
        """Runs the sampled step's ``torch.compile`` code eagerly (``torch.compiler.set_stance("force_eager")``,
        until :meth:`end_step` restores the stance the step began with), so that every hooked layer runs its
        hook. A compiled graph never holds the hooks: Dynamo does not guard on an empty hook dict, so a graph
        traced on an unsampled step (a new batch size or sequence length) would run hook-less on every later
        sampled step; and one traced with the hooks would break at each of them. Compiled code then recompiles
        for nothing Introspect does, and unsampled steps keep the user's graphs."""
        set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
        if set_stance is None:
            self._no_stance_warning()
            return
        if torch.compiler.is_compiling():  # the step itself is being traced: a stance cannot be set there
            return
        _hold_eager(set_stance)
        self._eager_stance = True

    def _no_stance_warning(self) -> None:
        """Once, on a torch without ``set_stance``, after Dynamo has compiled a frame: the statistics that may
        be missing under ``torch.compile``. Host-side counters only."""
        if self._stance_warned:
            return
        if _compiled_frames() <= self._frames_before:  # nothing compiled since this run began
            return
        self._stance_warned = True
        self.writer.alert(
            f"lightning_introspect: torch {torch.__version__} has no `torch.compiler.set_stance`, so sampled steps "
            "cannot run `torch.compile`d code eagerly: a graph compiled on an unsampled step (a new batch size or "
            "sequence length) may run later sampled steps without the hooks, and its layers then get no activation or "
            "dead-unit statistics on them (gradient norms are unaffected). Use torch>=2.6 with torch.compile.",
            RuntimeWarning, key="no set_stance",
        )

    def own_time(self) -> "_OwnTime":
        """``with core.own_time(): ...`` counts the time inside as the tool's own (``overhead_seconds``, and
        the budget's every-step cost): for a framework adapter's code around the core's calls (a callback's
        hook bodies). Nested timed calls are counted once."""
        return _OwnTime(self)

    def before_backward(self) -> None:
        """Optional, right before ``loss.backward()``: lets the writer thread work while the backward pass runs
        mostly in C++ (see :meth:`AsyncWriter.window`). Call :meth:`after_backward` after it."""
        self.writer.window(True)

    def after_backward(self) -> None:
        """Optional, right after ``loss.backward()``: the writer holds further jobs until the next backward."""
        self.writer.window(False)

    @_timed
    def observe_loss(self, loss: Any) -> None:
        """Counts a non-finite loss on the device (read at the next flush)."""
        if not self._loss_check or not isinstance(loss, Tensor):
            return
        if loss.ndim == 0:
            # checked in one op at the next drain (Lightning hands over a detached loss: no op on the step then)
            self._loss_buf.append(loss.detach() if loss.requires_grad else loss)
            if len(self._loss_buf) >= SAMPLE_BUFFER_STEPS:
                self._drain_samples(offload=True)
            return
        bad = (~torch.isfinite(loss.detach())).any()
        if self._loss_bad is None:
            self._loss_bad = torch.zeros((), dtype=torch.float64, device=loss.device)
        self._loss_bad.add_(bad)

    @_timed
    def observe_gradients(self, optimizer: Optional[torch.optim.Optimizer] = None, *, clipping: bool = False) -> None:
        """On sampled steps: gradient and weight norms (call after backward and AMP unscaling, before gradient
        clipping and the optimizer step). With ``optimizer``, only its parameters are read and the real update
        it makes is measured (a one-shot step post-hook; a step skipped by a grad scaler is not counted).

        ``clipping=True`` (a loop that clips between this call and ``optimizer.step()``): the global norm of
        the gradients the step uses, after clipping, is read too (``grad_norm/global_clipped``), when the
        optimizer starts its step (a step pre-hook), or, where the step had already started when this was
        called (Lightning runs its closure inside ``optimizer.step``), when it ends, from the gradients it
        left, which torch's optimizers do not change; a step a grad scaler skips has none. ``grad_norm/global``
        stays the norm before clipping."""
        if not (self.sampled and self.config.grad_norms):
            return
        opt = getattr(optimizer, "optimizer", optimizer)  # LightningOptimizer -> torch optimizer
        if clipping and not hasattr(opt, "register_step_pre_hook"):
            raise ValueError(
                f"`observe_gradients(clipping=True)` reads the clipped gradients when the optimizer steps, and needs "
                f"it: pass `observe_gradients(optimizer, clipping=True)` (got {optimizer!r})."
            )
        plist = [p for g in opt.param_groups for p in g["params"]] if opt is not None else self._params
        if any(id(p) not in self._param_pos for p in plist):
            self._refresh_params(plist)
        pos, grads, params, owners = [], [], [], []
        for p in plist:  # Python bookkeeping only; the norms below are fused launches
            i = self._param_pos.get(id(p))
            if i is not None and p.grad is not None:
                pos.append(i)
                grads.append(p.grad.detach())
                params.append(p.detach())
                owners.append(p)
        if not pos:
            return
        grads, grad_w = self._local_parts("grad", pos, grads)
        params, param_w = self._local_parts("param", pos, params)
        self.grad.observe(pos, grads, params, self.config.param_grad_norms, grad_w, param_w)
        clipped_read = [not clipping]

        def read_clipped() -> None:  # once per step: the gradients as they are now (clipped in place or replaced)
            if not clipped_read[0]:
                clipped_read[0] = True
                kept = [(i, p.grad.detach()) for i, p in zip(pos, owners) if p.grad is not None]
                local, w = self._local_parts("grad", [i for i, _ in kept], [g for _, g in kept])
                self.grad.observe_clipped(local, w)

        if clipping:
            self._step_handles.append(opt.register_step_pre_hook(lambda _opt, _args, _kwargs: read_clipped()))
        update = self.config.update_ratios and opt is not None and hasattr(opt, "register_step_post_hook")
        if update:
            with torch.no_grad():
                before = torch._foreach_mul(params, 1.0)
        if update or clipping:
            fired = [False]

            def after_step(_opt: Any, _args: Any, _kwargs: Any) -> None:
                read_clipped()
                if update and not fired[0]:
                    fired[0] = True
                    self.grad.observe_update(pos, before, params, param_w)

            self._step_handles.append(opt.register_step_post_hook(after_step))

    def _refresh_params(self, plist: Sequence[Tensor]) -> None:
        """Maps the model's parameters anew when the optimizer holds ones unknown so far: FSDP2's ``fully_shard``
        and Lightning's ``configure_model`` replace them after the Introspector was made. Names (and so tags)
        stay; parameters the model does not own are remembered, so that they cost one check."""
        named = [(plain_name(n), p) for n, p in self.model.named_parameters() if p.requires_grad]
        if [n for n, _ in named] == self.grad.param_names:
            self._param_pos = {id(p): i for i, (_, p) in enumerate(named)}
            self._params = [p for _, p in named]
        for p in plist:
            self._param_pos.setdefault(id(p), None)  # not the model's: skipped

    def _local_parts(self, kind: str, pos: list[int], tensors: list[Tensor]) -> tuple[list[Tensor], Optional[Tensor]]:
        """The local shards of DTensors (FSDP2, tensor parallelism) and each one's weight in the flush's sum over
        ranks (1 where this rank counts the shard, 0 where another rank holds the same elements); ``tensors``
        and None when none is a DTensor."""
        if not any(dist.is_dtensor(t) for t in tensors):
            return tensors, None
        self.grad.sharded = True

        def weights() -> list[float]:
            out = []
            for i, t in zip(pos, tensors):
                try:
                    out.append(float(dist.counted_here(t)))
                except ValueError as err:
                    out.append(0.0)
                    self.writer.alert(
                        f"lightning_introspect: the {kind} of parameter {self.grad.param_names[i]!r} is left out of "
                        f"the gradient norms: {err}, whose norm cannot be taken shard by shard.", RuntimeWarning,
                        key=f"partial:{self.grad.param_names[i]}",
                    )
            return out

        return [dist.local_part(t) for t in tensors], self.grad.weights(kind, pos, weights, tensors[0].device)

    @_timed
    def observe_batch(
        self,
        ids: Tensor,
        *,
        targets: Optional[Tensor] = None,
        logits: Optional[Tensor] = None,
        sample_loss: Optional[Tensor] = None,
        loss: Any = None,
    ) -> None:
        """Per-example dynamics of one batch, every step: ``logits`` (N, C) or (N, T, C) with integer
        ``targets`` (N,) or (N, T) (``ignore_index`` targets left out), or a per-example ``sample_loss`` (N,)
        when there are no logits. Also counts a non-finite ``loss``. No host sync.

        Inputs are checked at once (shapes: free) and kept, detached, for up to ``SAMPLE_BUFFER_STEPS``
        steps; their figures are then computed and scattered in one pass over the concatenated batches, so
        that the every-step cost is a few Python appends instead of some forty small kernel launches.
        Sequence logits are reduced to per-example figures at once (they can be large).
        """
        if loss is not None:
            self.observe_loss(loss)
        sig = None
        if logits is not None and type(ids) is Tensor and type(targets) is Tensor and type(logits) is Tensor:
            sig = (ids.shape, targets.shape, logits.shape, ids.dtype, targets.dtype, logits.dtype, logits.device)
        if sig is not None and sig == self._raw_sig:  # as the last batch checked: its checks (20 us) hold
            entry: Optional[tuple] = ("raw", ids, targets, logits.detach() if logits.requires_grad else logits)
        else:
            try:
                entry = self._buffer_entry(ids, targets, logits, sample_loss)
                if entry is None:
                    return
                self._ensure_store(entry[1].device if self.store is None else self.store.device)
            except ValueError as err:
                if self._batches_ok == 0:
                    raise
                self.writer.alert(
                    f"lightning_introspect skipped a batch at step {self.step_index}: {err}", RuntimeWarning,
                    key=f"skipped:{str(err)[:60]}",
                )
                return
            if entry[0] == "raw":
                self._raw_sig = sig
        self._sample_buf.append(entry)
        self._batches_ok += 1
        if len(self._sample_buf) >= SAMPLE_BUFFER_STEPS:
            self._drain_samples(offload=True)

    def _buffer_entry(self, ids: Any, targets: Any, logits: Any, sample_loss: Any) -> Optional[tuple]:
        """Checks one batch's inputs (Python only) and returns what to keep until the next drain."""
        if not isinstance(ids, Tensor) or ids.is_floating_point() or ids.ndim != 1:
            raise ValueError(
                f"sample ids must be a 1-d integer tensor (one id per example), got "
                f"{type(ids).__name__}{tuple(ids.shape) if isinstance(ids, Tensor) else ''}. Wrap the dataset in "
                "`WithIndex` or pass `ids=` to say where the ids are in the batch."
            )
        n = ids.shape[0]
        if n == 0:
            return None
        ids = ids.detach()
        if logits is not None:
            if not isinstance(logits, Tensor) or not logits.is_floating_point():
                raise ValueError(f"logits must be a floating-point tensor, got {type(logits).__name__}.")
            if not isinstance(targets, Tensor) or targets.is_floating_point():
                raise ValueError(
                    "integer class targets are needed with logits, got "
                    f"{type(targets).__name__ if not isinstance(targets, Tensor) else targets.dtype}; "
                    "return them as `targets` from training_step or set `targets=` to their place in the batch."
                )
            C = logits.shape[-1] if logits.ndim else 0  # a 0-d tensor (a loss) fits nothing below
            fits = (logits.ndim == 2 and targets.shape == (n,) or logits.ndim == 3 and logits.shape[:2] == targets.shape)
            if fits and logits.shape[0] == n and C >= 2 and self.num_classes not in (None, C):
                raise ValueError(f"logits have {C} classes where earlier batches had {self.num_classes}.")
            if logits.ndim == 2 and targets.shape == (n,) and logits.shape[0] == n and C >= 2:
                self.task = self.task or "classification"
                self.num_classes = C
                if logits.numel() <= MAX_BUFFERED_LOGITS:
                    return ("raw", ids, targets.detach(), logits.detach())
                loss, margin, conf, correct, valid, other = classification_figures_with_other(
                    logits, targets, self.config.ignore_index
                )
                return ("fig", ids, (loss, margin, conf, correct), targets.detach(), valid, other)
            if logits.ndim == 3 and logits.shape[:2] == targets.shape and logits.shape[0] == n and C >= 2:
                self.task = self.task or "sequence"
                self.num_classes = C
                loss, margin, conf, correct, valid = sequence_figures(logits, targets, self.config.ignore_index)
                return ("fig", ids, (loss, margin, conf, correct), None, valid, None)
            raise ValueError(
                f"logits of shape {tuple(logits.shape)} do not fit targets of shape {tuple(targets.shape)} and "
                f"{n} sample ids: expected logits (N, C) with C >= 2 and targets (N,), or logits (N, T, C) and "
                "targets (N, T). Return per-example logits from training_step as {'loss': ..., 'logits': ...}."
            )
        if sample_loss is not None:
            if not isinstance(sample_loss, Tensor) or sample_loss.shape != (n,):
                raise ValueError(
                    f"`sample_loss` must be a (N,) tensor with one loss per example (N = {n} ids), got "
                    f"{tuple(sample_loss.shape) if isinstance(sample_loss, Tensor) else type(sample_loss).__name__}."
                )
            self.task = self.task or "regression"
            return ("fig", ids, (sample_loss.detach(),), None, None, None)
        raise ValueError(
            "no logits and no per-example loss for per-example dynamics: return {'loss': loss, 'logits': logits} "
            "(or 'sample_loss': a (N,) tensor) from training_step, or turn them off with `sample_dynamics=False`."
        )

    def _drain_samples(self, offload: bool = False) -> None:
        """Counts the buffered non-finite losses, and computes and scatters the buffered batches' figures in
        one pass. With ``offload`` (a full buffer, mid-epoch) that pass runs on the writer thread, in order
        with the flushes, during a backward window (about 1 ms of kernel launches every SAMPLE_BUFFER_STEPS
        steps on a CPU: 70 us a step off the training thread); under DDP it stays here, as every collective
        does. Without ``offload`` (explicit flushes, epoch ends, checkpoints: the readers of the store) it runs
        here once every reduce handed off before it is done."""
        self._drain_losses()
        if not offload:  # every reader of the store comes here first, even with nothing buffered since
            self._wait_for_reduces()
        buf, self._sample_buf = self._sample_buf, []
        if not buf or self.store is None:
            return
        raw = self._join_raws(buf)
        figs = [e for e in buf if e[0] == "fig"]
        del buf
        if offload and not dist.is_distributed():
            device = self.store.device
            stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
            reduces = self._reduces
            while reduces and reduces[0].done:  # read without the lock: a stale False keeps one a while longer
                reduces.popleft()
            job = _Reduce(lambda: self._reduce_on_writer(raw, figs, stream), self._reduce_lock)
            reduces.append(job)
            if not self.writer.offer(job):  # a full queue or a closed writer: here, after those before it
                self._wait_for_reduces()
            return
        with self._reduce_lock:
            self._reduce(raw, figs)

    @staticmethod
    def _join_raws(buf: list[tuple]) -> Optional[tuple]:
        """The buffered batches with logits as one ``(ids, targets, logits, batch sizes)``, joined here, on the
        training thread (three copies, a few microseconds), so that the dozens of small tensors are freed now,
        in the order they came: kept until the writer runs, they would sit between the next step's activations
        and hold the heap apart (measured: about 12 MB more peak memory on the MLP benchmark)."""
        raws = [e for e in buf if e[0] == "raw"]
        if not raws:
            return None
        # cat promotes mixed target dtypes: one conversion in the reduce, not one per step
        return (torch.cat([e[1] for e in raws]), torch.cat([e[2] for e in raws]), torch.cat([e[3] for e in raws]),
                [e[1].shape[0] for e in raws])

    def _wait_for_reduces(self) -> None:
        """Runs here, in order, every reduce handed to the writer thread that it has not started, and waits for
        the one it runs: the store is then complete. No wait for the writer's other jobs (figures, pictures),
        and none that can time out: a slow or stuck writer cannot make an epoch end fold a partial epoch."""
        reduces = self._reduces
        while reduces:
            reduces.popleft()()

    def _reduce_on_writer(self, raw: Optional[tuple], figs: list[tuple], stream: Any) -> None:
        """A reduce on the writer thread, or on the training thread when it waits for the store (see
        :class:`_Reduce`, which holds the lock); on CUDA on the training thread's stream, which produced the
        buffered tensors."""
        try:
            with torch.no_grad(), (torch.cuda.stream(stream) if stream is not None else nullcontext()):
                self._reduce(raw, figs)
        except Exception as err:  # inputs were checked when buffered: this is a bug or the device failing
            batches = len(figs) + (len(raw[3]) if raw is not None else 0)
            self.writer.alert(
                f"lightning_introspect lost the per-example figures of {batches} batches "
                f"({type(err).__name__}: {err}); training goes on.", RuntimeWarning, key="lost per-example",
            )

    def _reduce(self, raw: Optional[tuple], figs: list[tuple]) -> None:
        """The buffered batches' figures, computed in one pass over their concatenation and scattered:
        ``raw`` as :meth:`_join_raws` returns it, ``figs`` the batches that came with per-example figures."""
        store = self.store
        assert store is not None
        if raw is not None:
            ids, targets, logits, sizes = raw
            if targets.dtype != torch.long:
                targets = targets.long()
            loss, margin, conf, correct, valid, other = classification_figures_with_other(
                logits, targets, self.config.ignore_index
            )
            store.observe(
                ids, loss, margin, conf, correct, labels=targets, valid=valid, batch_sizes=sizes, other=other
            )
        groups: dict[tuple, list[tuple]] = {}
        for e in figs:
            groups.setdefault((len(e[2]), e[3] is None, e[4] is None, e[5] is None), []).append(e)
        for (n_fields, no_labels, no_valid, no_other), entries in groups.items():
            fields = [torch.cat([e[2][i].reshape(-1) for e in entries]) for i in range(n_fields)]
            store.observe(
                torch.cat([e[1] for e in entries]), *fields,
                labels=None if no_labels else torch.cat([e[3] for e in entries]),
                valid=None if no_valid else torch.cat([e[4] for e in entries]),
                batch_sizes=[e[1].shape[0] for e in entries],
                other=None if no_other else torch.cat([e[5] for e in entries]),
            )

    def _drain_losses(self) -> None:
        """Counts the non-finite ones among the buffered step losses, in one op."""
        if self._loss_buf:
            losses, self._loss_buf = self._loss_buf, []
            stacked = torch.stack(losses)  # promotes mixed dtypes
            if self._loss_bad is None:
                self._loss_bad = torch.zeros((), dtype=torch.float64, device=stacked.device)
            self._loss_bad.add_((~torch.isfinite(stacked)).sum())

    def _ensure_store(self, device: torch.device) -> PerSampleStore:
        if self.store is None:
            if self.num_examples is None:
                raise ValueError(
                    "the number of training examples is unknown: pass `num_examples=` (sample ids must lie in "
                    "[0, num_examples))."
                )
            self.store = PerSampleStore(self.num_examples, device)
            if self._pending_state is not None:
                self._load_store(self._pending_state)
        return self.store

    def _load_store(self, state: dict[str, Any]) -> None:
        assert self.store is not None
        self.store.load_state_dict(state)
        for k in PerSampleStore._AGGREGATES + PerSampleStore._EPOCH_BUFFERS + ("bad",):
            setattr(self.store, k, getattr(self.store, k).to(self.store.device))
        if self.num_examples is not None and self.num_examples > self.store.num_examples:
            self.writer.alert(
                f"lightning_introspect: the training set grew from {self.store.num_examples} to {self.num_examples} "
                "examples since the checkpoint; records of the old examples are kept, new ones start empty.",
                RuntimeWarning,
            )
            self.store.grow(self.num_examples)
        self._pending_state = None
        with allow_sync():  # resume: the forgotten fraction of the next epoch compares against these
            self._prev_forgets = self.store.forgetting_events.cpu().numpy().astype(np.int64)

    def _on_skip(self, name: str, reason: str) -> None:
        if name not in self._skipped:
            self._skipped[name] = reason
            self.writer.alert(
                f"lightning_introspect: layer {name!r} {reason}; it is not monitored. Leave it out with `layers=`.",
                UserWarning,
            )

    # ------------------------------------------------------------------------------------------------ flush
    @_timed
    def flush(self) -> None:
        """Flushes the pending sampled step now (normally done when the next step begins); with none pending,
        still reads the bad-input and non-finite-loss counters of the steps since the last flush."""
        if self._pending is not None:
            self._flush(drain=True)
        elif self._steps_since_flush > 0:
            self._flush(counters_only=True, drain=True)
        self._submit_held()

    def _device(self) -> torch.device:
        for st in self.layer_stats.values():
            if st.sums is not None:
                return st.sums.device
        if self._params:
            return self._params[0].device
        return torch.device("cpu")

    def _flush(self, counters_only: bool = False, drain: bool = False) -> None:
        """Ends the pending window: takes its captures and gradient buffers and hands them to the writer
        thread, which folds, packs and copies them to the host (during the next backward pass); while the
        next step is sampled too, the window is held, up to ``FOLD_BATCH`` of them (see :meth:`_submit_held`).
        Under DDP the fold and its all-reduce run here, on the training thread, so that every rank issues its
        collectives in the same order. Per-example inputs still buffered (< ``SAMPLE_BUFFER_STEPS`` steps) are
        drained only with ``drain`` (explicit flushes, epoch ends): the flush at a step's start leaves them
        batched, and the bad-input counts they carry are read at a later flush ("up to step N"). Buffered
        losses are always checked."""
        step = self.step_index if counters_only else self._pending
        assert step is not None
        if drain:
            self._drain_samples()
        else:
            self._drain_losses()
        self._pending = None
        self._steps_since_flush = 0
        cfg = self.config
        layers = [] if counters_only else [(n, st) for n, st in sorted(self.layer_stats.items()) if st.allocated]
        grad = self.grad
        distributed = dist.is_distributed()
        with allow_sync():
            device = self._device()
            sts = [st for _, st in layers]
            captures = [st.take_captures() for st in sts]
            counts = to_device([float(c.count) for c in captures] + [0.0], torch.float64, device)
            loss_bad = self._loss_bad if self._loss_bad is not None else torch.zeros((), dtype=torch.float64, device=device)
            store_bad = torch.zeros(len(BAD_INPUT_NAMES), dtype=torch.float64, device=device)
            # A reduce running on the writer thread holds the lock: its counts are read at a later flush.
            if self.store is not None and self._reduce_lock.acquire(blocking=False):
                try:
                    store_bad = self.store.take_bad_counts()
                finally:
                    self._reduce_lock.release()
            extra = torch.cat([loss_bad.reshape(1).to(device, torch.float64), store_bad.to(device)])
            if self._loss_bad is not None:
                self._loss_bad.zero_()  # after the copy into `extra` (stream order on CUDA)
            proposed = self.schedule.proposed_interval()
            interval = to_device([-float(proposed)], torch.float32, device)
            grad_observed = grad.observed and not counters_only
            grad_layers = sorted(grad.observed_layers()) if grad_observed else []
            grad_updated = grad.updated and not counters_only
            grad_clipped = grad.clipped and not counters_only
            param_positions = sorted(grad.observed_params) if grad_observed and cfg.param_grad_norms else []
            if grad_observed:
                grad_parts = grad.take(cfg.param_grad_norms)
            else:
                grad_parts = []
                if not counters_only:
                    grad.reset()
                    if grad.sharded and distributed:  # the same payload as the ranks that have gradients
                        grad_parts = grad.zero_parts(cfg.param_grad_norms, device)
            histogram = self.hooks.histogram and not counters_only
            window = _Window(sts, captures, counts, extra, interval, grad_parts)
            if distributed:  # collectives stay on the training thread, in the same order on every rank
                packed = self._fold_and_pack([window], histogram, device, distributed=True)
                host = self._to_host(packed.reshape(-1))
            if not counters_only:  # under DDP, the interval all ranks agreed on in the reduce
                self._apply_interval(proposed, interval if distributed else None)
        meta = {
            "step": step,
            "layers": [(n, c.units, c.count > 0, st.judged_windows + bool(c.unit_max))
                       for (n, st), c in zip(layers, captures)],
            "grad_layers": grad_layers,
            "grad_observed": grad_observed,
            "grad_updated": grad_updated,
            "grad_clipped": grad_clipped,
            "param_positions": param_positions,
            "order": list(self.hooks.order),
            "histogram": histogram,
            "counters_only": counters_only,
            "dead_layers": self._judged_dead_layers(),
            "interval": self.schedule.interval,
            "overhead": self.schedule.expected_overhead(),
        }
        for (_, st), c in zip(layers, captures):
            st.reset()
            st.windows_seen += 1
            st.judged_windows += bool(c.unit_max)
        if not counters_only:
            self.samples_flushed += 1
        if distributed:
            self._submit(lambda: self._write_flush(host, meta))
            return
        key = _HeldKey(tuple(n for n, _ in layers), histogram, tuple(t.shape for t in grad_parts), device)
        if self._held and key != self._held_key:
            self._submit_held()
        self._held.append((window, meta))
        self._held_key = key
        if counters_only or drain or len(self._held) >= FOLD_BATCH:
            self._submit_held()

    def _submit_held(self) -> None:
        """Hands the held windows (see ``FOLD_BATCH``) to the writer thread, which folds, packs and copies them
        to the host together (on CUDA on the training thread's stream), during the next backward pass (see
        :meth:`AsyncWriter.window`), then writes each window's figures in order."""
        held, self._held = self._held, []
        if not held:
            return
        windows = [w for w, _ in held]
        metas = [m for _, m in held]
        assert self._held_key is not None
        histogram, device = self._held_key.histogram, self._held_key.device
        stream = torch.cuda.current_stream(device) if device.type == "cuda" else None

        def fold_and_write() -> None:
            with allow_sync(), torch.no_grad(), (torch.cuda.stream(stream) if stream is not None else nullcontext()):
                packed = self._fold_and_pack(windows, histogram, device, distributed=False)
                rows = self._to_host(packed)()
            for row, meta in zip(rows, metas):
                self._write_flush(lambda row=row: row, meta)

        self._submit(fold_and_write)

    def _fold_and_pack(
        self, windows: list[_Window], histogram: bool, device: torch.device, *, distributed: bool
    ) -> Tensor:
        """Folds the captures of ``windows`` (consecutive windows of the same layers), reduces them across
        ranks (``distributed``, one window), moves the dead-unit streaks on window after window and packs
        everything the writer reads into one float64 tensor, a row per window (the block layout of
        :meth:`_write_flush`). The fold's kernels and
        their Python are paid once for all windows. Streaks are only touched here, one window after another."""
        cfg = self.config
        K = len(windows)
        sts = windows[0].stats
        L = len(sts)
        units = [c.units or 0 for c in windows[0].captures]
        U = sum(units)
        sum_parts: list[Tensor] = []
        min_parts: list[Tensor] = []
        folded: dict[str, Tensor] = {}
        if L:
            folded = self._folder.fold([c for w in windows for c in w.captures], histogram)  # window-major rows
            sum_parts = [folded["sums"], folded["fired"], folded["hist"], folded["judged"]]
            min_parts = [folded["mins"]]
        if distributed:
            assert K == 1
            (window,) = windows
            # Sharded parameters' squared norms are sums over ranks' shards: they ride in the same collective.
            grad_sums = window.grad_parts if self.grad.sharded else []
            dist.flush_reduce([*sum_parts, window.counts, window.extra, *grad_sums], [*min_parts, window.interval], device)
        out: list[Tensor] = []
        if L:
            # Dead-unit windows, all layers at once: a unit that fired resets its streak, the others extend it,
            # in the windows where their layer was judged (had unit scores on some rank); elsewhere it stays.
            fired = folded["fired"].view(K, U)
            unit_layer = self._folder._index(
                ("unit_layer", tuple(units)), lambda: [li for li, u in enumerate(units) for _ in range(u)], device
            )
            judged = folded["judged"].view(K, L).index_select(1, unit_layer) > 0
            streak = torch.cat([st.streak.to(device) for st in sts])  # type: ignore[union-attr]
            zero = streak.new_zeros(())
            streaks = []
            for k in range(K):
                streak = torch.where(fired[k] > 0, zero, streak + judged[k])
                streaks.append(streak)
            for st, piece in zip(sts, streak.split(units)):
                st.streak = piece
            S = torch.stack(streaks)
            w = cfg.dead_window
            zeros = torch.zeros(K, L, dtype=torch.float64, device=device)
            dead_count = zeros.index_add(1, unit_layer, (S >= w).double())
            dead_windows = zeros.scatter_reduce(
                1, unit_layer.expand(K, U), torch.div(S, w, rounding_mode="floor").double(), "amax", include_self=True
            )
            out += [folded["sums"], folded["mins"], fired, folded["hist"], torch.stack([dead_count, dead_windows], 2)]
        out += [torch.stack([w.counts for w in windows]), torch.stack([w.extra for w in windows]),
                torch.stack([w.interval for w in windows])]
        out += [torch.stack(parts) for parts in zip(*(w.grad_parts for w in windows))]
        return torch.cat([t.reshape(K, -1).to(device, torch.float64) for t in out], 1)

    def _to_host(self, packed: Optional[Tensor]) -> Callable[[], Optional[np.ndarray]]:
        """One batched device-to-host copy. On CUDA it is asynchronous (pinned buffer + event): the writer
        thread waits for it, the training thread never does."""
        if packed is None:
            return lambda: None
        if packed.device.type == "cuda":
            buf = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            buf.copy_(packed, non_blocking=True)
            event = torch.cuda.Event()
            event.record()

            def wait() -> np.ndarray:
                event.synchronize()
                return buf.numpy()

            return wait
        arr = packed.cpu().numpy()
        return lambda: arr

    def _submit(self, job: Callable[[], None], *, required: bool = False) -> None:
        """Hands ``job`` to the writer thread (rank 0 only); a ``required`` one is never dropped (see
        :meth:`AsyncWriter.submit`): the records on disk and the forgotten fraction need every epoch's."""
        if self.is_writer:
            self.writer.submit(job, required=required)

    # ------------------------------------------------------------------------------- writer thread (host)
    def _write_flush(self, host: Callable[[], Optional[np.ndarray]], meta: dict[str, Any]) -> None:
        data = host()
        if data is None:
            return
        cfg = self.config
        step = meta["step"]
        scalars: dict[str, float] = {}
        nonfinite_layers: list[str] = []
        off = 0
        L = len(meta["layers"])
        # blocks: sums (L, 4), mins (L, 2), fired (all units), hist (L, BINS), dead (L, 2), counts (L + 1)
        sums = data[off : off + 4 * L].reshape(L, 4); off += 4 * L
        mins = data[off : off + 2 * L].reshape(L, 2); off += 2 * L
        off += sum(u for _, u, _, _ in meta["layers"])  # firing counts: already folded into the streaks
        hist = data[off : off + HIST_BINS * L].reshape(L, HIST_BINS); off += HIST_BINS * L
        dead = data[off : off + 2 * L].reshape(L, 2); off += 2 * L
        counts = data[off : off + L]; off += L + 1
        extra = data[off : off + 1 + len(BAD_INPUT_NAMES)]; off += 1 + len(BAD_INPUT_NAMES)
        off += 1  # the reduced interval: applied on the training thread at the flush
        if L:  # one numpy pass over all layers, tags made once per layer (the writer's Python holds the GIL)
            live = np.flatnonzero(counts > 0)
            names = [meta["layers"][i][0] for i in live]
            if cfg.activations and live.size:
                c = counts[live]
                s1, s2, zeros, nonfinite = sums[live].T
                with np.errstate(all="ignore"):
                    mean = s1 / c
                    std = np.where(np.isfinite(mean), np.sqrt(np.maximum(s2 / c - mean * mean, 0.0)), np.nan)
                    values = np.stack([mean, std, mins[live, 0], -mins[live, 1], zeros / c, nonfinite], 1)
                tags = [t for n in names for t in self._tags(n, _ACTIVATION_TAGS)]
                scalars.update(zip(tags, values.ravel().tolist()))
                bad = (nonfinite > 0) | ~np.isfinite(values[:, [0, 2, 3]]).all(1)
                nonfinite_layers = [n for n, b in zip(names, bad.tolist()) if b]
            if cfg.dead_units:
                for i, name in zip(live.tolist(), names):
                    _, units, _, windows = meta["layers"][i]
                    group = meta["dead_layers"].get(name)
                    if windows >= cfg.dead_window and units and group is not None:
                        dead_count, dead_windows = dead[i].tolist()
                        t_frac, t_count, t_windows = self._tags(name, _UNIT_TAGS[group])
                        scalars[t_frac] = dead_count / units
                        scalars[t_count] = dead_count
                        scalars[t_windows] = dead_windows
        if meta["grad_observed"]:
            L = len(self.grad.layer_names)
            g2, w2, u2 = data[off : off + L], data[off + L : off + 2 * L], data[off + 2 * L : off + 3 * L]
            clipped_sq = data[off + 3 * L]
            off += 3 * L + 1
            sel = np.asarray(meta["grad_layers"], dtype=np.int64)
            names = [self.grad.layer_names[i] for i in sel.tolist()]
            tags = [self._tags(n, _GRAD_TAGS) for n in names]
            g2s, w2s, u2s = g2[sel], w2[sel], u2[sel]
            scalars["grad_norm/global"] = math.sqrt(float(g2s.sum()))
            if meta["grad_clipped"]:
                scalars["grad_norm/global_clipped"] = math.sqrt(float(clipped_sq))
            scalars.update(zip([t[0] for t in tags], np.sqrt(g2s).tolist()))
            has_w = np.flatnonzero(w2s > 0)
            w = w2s[has_w]
            scalars.update(zip([tags[j][1] for j in has_w.tolist()], np.sqrt(g2s[has_w] / w).tolist()))
            if meta["grad_updated"] and cfg.update_ratios:
                scalars.update(zip([tags[j][2] for j in has_w.tolist()], np.sqrt(u2s[has_w] / w).tolist()))
                if w2s.sum() > 0:
                    scalars["update_to_weight/global"] = math.sqrt(float(u2s.sum() / w2s.sum()))
            if cfg.param_grad_norms:
                P = len(self.grad.param_names)
                pg = data[off : off + P]; off += P
                positions = meta["param_positions"]
                names = [self.grad.param_names[i] for i in positions]
                scalars.update(zip([self._tags(n, _PARAM_TAGS)[0] for n in names], np.sqrt(pg[positions]).tolist()))
        self._main(self._warn_if_budget_unreachable)
        if meta["counters_only"]:  # an epoch end or close with no sampled step pending: alerts only
            self._alerts_for_flush(step, meta, extra, nonfinite_layers, scalars)
            return
        scalars["introspect/interval"] = float(meta["interval"])
        if meta["overhead"] is not None:
            scalars["introspect/overhead"] = meta["overhead"]
        self._alerts_for_flush(step, meta, extra, nonfinite_layers, scalars)
        raw: Optional[list[tuple[str, dict[str, Any]]]] = None
        for sink in self.sinks:
            if not self._layout_written and hasattr(sink, "add_layout"):
                sink.add_layout(tensorboard_layout(cfg))
            sink.add_scalars(scalars, step)
            if meta["histogram"] and cfg.histograms:
                if raw is None:
                    args = _hist_proto_args(hist, mins, sums, counts)
                    raw = [(self._tags(layer[0], _HIST_TAGS)[0], h) for layer, h in zip(meta["layers"], args)
                           if h is not None]
                if hasattr(sink, "add_histograms_raw"):
                    sink.add_histograms_raw(raw, step)
                else:
                    for tag, h in raw:
                        sink.add_histogram_raw(tag, step, **h)
            sink.flush()
        self._layout_written = True
        if self.on_scalars is not None:
            cb = self.on_scalars
            self._main(lambda: cb(scalars, step))

    def _tags(self, name: str, kinds: tuple[str, ...]) -> tuple[str, ...]:
        """The tags ``kind/name`` of one layer or parameter, made once (a step writes hundreds)."""
        key = (name, kinds)
        tags = self._tag_cache.get(key)
        if tags is None:
            if len(self._tag_cache) > 100_000:  # names are a bounded set; a pathological model gets no leak
                self._tag_cache.clear()
            tags = self._tag_cache[key] = tuple(f"{kind}/{name}" for kind in kinds)
        return tags

    def _alerts_for_flush(
        self, step: int, meta: dict[str, Any], extra: np.ndarray, nonfinite_layers: list[str], scalars: dict[str, float]
    ) -> None:
        loss_bad = extra[0]
        bad = dict(zip(BAD_INPUT_NAMES, extra[1:]))
        grad_bad = "grad_norm/global" in scalars and not math.isfinite(scalars["grad_norm/global"])
        if loss_bad > 0 or nonfinite_layers or grad_bad:
            order = meta["order"]
            first = min(nonfinite_layers, key=lambda n: order.index(n) if n in order else len(order)) if nonfinite_layers else None
            parts = []
            if loss_bad > 0:
                parts.append(f"the loss was NaN/Inf in {int(loss_bad)} step(s) up to step {step}")
            if first is not None:
                parts.append(f"the first layer in forward order with a non-finite output is {first!r}")
            elif loss_bad > 0:
                parts.append("no monitored layer produced a non-finite value on the sampled step; the next steps are sampled to find it")
            if grad_bad:
                bad_layers = [k.split("/", 1)[1] for k, v in scalars.items() if k.startswith("grad_norm/") and not math.isfinite(v) and k not in _GLOBAL_GRAD_TAGS]
                parts.append(f"non-finite gradients in {bad_layers[:5]}")
            message = f"lightning_introspect: non-finite values at step {step}: " + "; ".join(parts) + ". Training goes on."
            self.writer.alert(message, RuntimeWarning, key="nonfinite")
            for sink in self.sinks:
                sink.add_text("alerts/nonfinite", message, step)
            if first is None:
                self._main(self._start_diagnosis)
        problems = {k: int(v) for k, v in bad.items() if v > 0}
        if problems:
            n = self.store.num_examples if self.store is not None else self.num_examples
            message = f"lightning_introspect: per-example figures up to step {step}: " + bad_input_message(
                problems, n, self.config.ignore_index
            )
            self.writer.alert(message, RuntimeWarning, key="bad_input:" + ",".join(sorted(problems)))
            for sink in self.sinks:
                sink.add_text("alerts/bad_input", message, step)

    def _judged_dead_layers(self) -> dict[str, str]:
        """Layers whose units are judged, each with its tag group, "dead" or "saturated" (decided at the first
        flush, from the forward order; the rules: :mod:`~lightning_introspect.core.units`).

        An activation module is judged by its type's rule (none for activations that pass gradient
        everywhere). Any other layer is judged by the gradient reaching its output, unless a watched activation
        module comes right after it in forward order: that module judges the same units.
        """
        if self._dead_layers is None and self.hooks.order:
            order = self.hooks.order
            acts = {n for n, m in self.layers if isinstance(m, ACTIVATION_TYPES)}
            judged: dict[str, str] = {}
            for name, module in self.layers:
                rule = unit_rule(module, self.config.dead_threshold)
                if rule is None:
                    continue
                if rule.source == "gradient" and name in order:
                    i = order.index(name)
                    if i + 1 < len(order) and order[i + 1] in acts:
                        continue
                judged[name] = rule.tag
            self._dead_layers = judged
            self.hooks.dead_layers = set(judged)
        return self._dead_layers or {}

    def _start_diagnosis(self) -> None:
        self._diagnose = DIAGNOSE_STEPS

    def _main(self, job: Callable[[], None]) -> None:
        self.writer.on_main_thread(job)

    def _apply_interval(self, proposed: float, reduced_interval: Optional[Tensor]) -> None:
        """On the training thread, at the flush, on every rank: the budget's new interval. Under DDP all
        ranks take the largest proposal (reduced with the flush), so they keep sampling the same steps."""
        if self.config.overhead_budget is None:
            return
        interval = proposed
        if reduced_interval is not None:  # flush: DDP already synchronised here
            interval = quantize_interval(-float(reduced_interval.item()))
        if interval >= 1:
            self.schedule.interval = interval

    def _warn_if_budget_unreachable(self) -> None:
        if self.config.overhead_budget is not None:
            if self.schedule.budget_unreachable and self.is_writer:
                budget, floor = self.config.overhead_budget, self.schedule.always_on()
                room = self.schedule.MIN_ROOM
                self.writer.alert(
                    f"lightning_introspect: `overhead_budget={budget:g}` cannot be held: the work done on every step "
                    f"(per-example dynamics) alone slows training by {100 * floor:.1f} %; sampled steps keep a tenth "
                    f"of the budget, so expect about {100 * (floor + budget * room):.1f} % (the `introspect/overhead` "
                    "tag). Raise the budget, or pass `sample_dynamics=False` to drop per-example dynamics.",
                    RuntimeWarning, key="overhead_budget",
                )

    # ------------------------------------------------------------------------------------------------ epochs
    @_timed
    def end_epoch(self, epoch: int, step: int) -> None:
        """Folds this epoch's per-example figures into the aggregates (reduced across ranks), writes the records
        atomically and the epoch's TensorBoard entries. Every rank must call it."""
        self.writer.poll()
        self.flush()
        self._warn_uncalled_layers()
        self._drain_samples()
        self.schedule.pause()
        store = self.store
        if store is None and dist.is_distributed() and self.num_examples is not None:
            store = self._ensure_store(self._device())  # a rank that saw no batch still joins the epoch-end round
        if store is None:
            return
        with allow_sync():
            if dist.is_distributed():
                dist.agree_epoch_end(store.device)
                dist.reduce_([store.epoch], "sum")
                dist.reduce_([store.label, store.epoch_other], "max")
            means = {k: v.cpu().numpy() for k, v in store.epoch_means().items()} if self.is_writer else None
            store.fold_epoch(epoch)
            records = store.records()
        self._records = records
        self.epochs_done = epoch + 1
        meta = self._records_meta(epoch)
        self._submit(lambda: self._write_epoch(records, means, meta, epoch, step), required=True)

    def _warn_uncalled_layers(self) -> None:
        """Once, at the first epoch end after a sampled step: names the selected layers that no sampled step
        called (they have no statistics at all)."""
        sampled = self.samples_flushed - self._flushed_before
        if self._uncalled_checked or not self.layers or sampled <= 0:
            return
        self._uncalled_checked = True
        missing = [n for n, _ in self.layers if n not in self.hooks.called and n not in self._skipped]
        if missing and self.is_writer:
            self.writer.alert(
                f"lightning_introspect: {len(missing)} selected layer(s) were not called on any of the "
                f"{sampled} sampled step(s) so far and have no statistics: {missing[:8]}"
                f"{' ...' if len(missing) > 8 else ''}. A parent module may use their weights directly, or they sit "
                "on a branch training does not take. Select modules that are called with `layers=` (name "
                "patterns) or `layer_types=`.",
                UserWarning, key="uncalled layers",
            )
            self.writer.poll()

    def _records_meta(self, epoch: int) -> dict[str, Any]:
        return {
            "format": 1, "epoch": epoch, "num_examples": self.store.num_examples if self.store else self.num_examples,
            "num_classes": self.num_classes, "class_names": self.class_names, "task": self.task or "classification",
            "ignore_index": self.config.ignore_index,
            "threshold_ids": None if self.threshold_ids is None else [int(i) for i in self.threshold_ids],
        }

    def _write_epoch(
        self, records: dict[str, np.ndarray], means: Optional[dict[str, np.ndarray]], meta: dict[str, Any],
        epoch: int, step: int,
    ) -> None:
        from .. import records as rec_io

        if self.records_dir is not None:
            rec_io.write_records(self.records_dir, records, meta)
            if self.config.history and means is not None:
                rec_io.write_epoch_history(self.records_dir, epoch, means)
        seen = records["seen_epochs"] > 0
        n_seen = max(int(seen.sum()), 1)
        scalars = {"samples/learned_fraction": float((records["last_correct"] == 1).sum() / n_seen)}
        forgets = records["forgetting_events"].astype(np.int64)
        if self._prev_forgets is not None and self._prev_forgets.shape == forgets.shape:
            scalars["samples/forgotten_fraction"] = float((forgets > self._prev_forgets).sum() / n_seen)
        else:
            scalars["samples/forgotten_fraction"] = float((forgets > 0).sum() / n_seen)
        self._prev_forgets = forgets
        suspects = None
        # The data map and the suspects table stall training while they are drawn (see EXTRAS_DUTY): they are
        # refreshed only while they take at most EXTRAS_DUTY of the wall time since the previous refresh.
        t0 = time.monotonic()
        extras = t0 - self._extras_done >= self._extras_cost / EXTRAS_DUTY
        suspects = self._suspects_for(records, meta) if extras else None
        if suspects is not None:
            scalars["samples/flagged_fraction"] = float(suspects.flagged.sum() / n_seen)
        for sink in self.sinks:
            sink.add_scalars(scalars, step)
            if means is not None:
                for key in ("loss", "margin", "confidence"):
                    sink.add_histogram(f"samples/{key}", means[key][means["seen"]], step)
        self._write_pictures(records, suspects, epoch, step)
        for sink in self.sinks:
            sink.flush()
        # A skipped refresh is done at close, so that the last picture always shows the end of training.
        self._skipped_extras = None if extras else (records, meta, epoch, step)
        if extras:
            self._extras_done = time.monotonic()
            self._extras_cost = self._extras_done - t0
        if self.on_scalars is not None:
            cb = self.on_scalars
            self._main(lambda: cb(scalars, step))

    def _suspects_for(self, records: dict[str, np.ndarray], meta: dict[str, Any]) -> Any:
        if meta["task"] == "regression":
            return None
        from .scoring import find_label_issues

        return find_label_issues(records, threshold_ids=self.threshold_ids, num_classes=meta["num_classes"])

    def _write_pictures(self, records: dict[str, np.ndarray], suspects: Any, epoch: int, step: int) -> None:
        """The suspects table and the data-map image (writer thread)."""
        if suspects is None or not self.sinks:
            return
        from ..datamap import render_data_map

        image = render_data_map(records, suspects=suspects, class_names=self.class_names)
        # A matplotlib figure is a web of reference cycles: only the cyclic collector frees it, and a full
        # collection is rare in a training process, so each epoch's figure (MBs) would pile up until then.
        # The young generations hold most of it; collecting them costs a few ms on this thread.
        gc.collect(1)
        confusion = _confusion_markdown(suspects, self.class_names, epoch)
        for sink in self.sinks:
            sink.add_text("samples/suspects", _suspects_markdown(suspects, self.class_names, epoch,
                                                                 describe=self.describe), step)
            if confusion is not None:
                sink.add_text("samples/confusion", confusion, step)
            sink.add_image("samples/data_map", image, step)

    def _write_skipped_extras(self) -> None:
        if self._skipped_extras is not None:
            records, meta, epoch, step = self._skipped_extras
            self._skipped_extras = None
            suspects = self._suspects_for(records, meta)
            if suspects is not None:
                n_seen = max(int((records["seen_epochs"] > 0).sum()), 1)
                for sink in self.sinks:
                    sink.add_scalars({"samples/flagged_fraction": float(suspects.flagged.sum() / n_seen)}, step)
            self._write_pictures(records, suspects, epoch, step)

    # ------------------------------------------------------------------------------------------------ results
    def records(self) -> dict[str, np.ndarray]:
        """The per-example aggregates (host arrays, as of the last epoch end)."""
        if self._records is None:
            if self.store is None:
                raise RuntimeError(
                    "no per-example records yet: they exist after the first training epoch with sample ids "
                    "(wrap the training set in `WithIndex`)."
                )
            self._wait_for_reduces()
            with allow_sync():
                self._records = self.store.records()
        return self._records

    def mislabeled(self, *, method: str = "default", cut: Any = "auto", threshold_ids: Any = None) -> Any:
        """Examples ranked most suspect first (see :func:`~lightning_introspect.core.scoring.find_label_issues`)."""
        from .scoring import find_label_issues

        if threshold_ids is None:
            threshold_ids = self.threshold_ids
        return find_label_issues(
            self.records(), method=method, cut=cut, threshold_ids=threshold_ids, num_classes=self.num_classes,
            describe=self.describe,
        )

    @_timed
    def close(self) -> None:
        """Flushes what is pending, waits for the writer and closes the sinks (idempotent)."""
        self.end_step()
        self.flush()
        self._submit(self._write_skipped_extras, required=True)
        if self.sinks:  # on the writer thread, after every job that writes to them
            self.writer.submit(self._close_sinks, required=True)
        self.writer.close()

    def _close_sinks(self) -> None:
        """Closes the sinks; on the writer thread, whose jobs read ``self.sinks`` when they run."""
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close()

    def drain(self) -> None:
        """Waits until everything submitted so far is written."""
        self.flush()
        self.writer.drain()

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: schedule, dead-unit streaks, per-example store."""
        self._drain_samples()  # the per-example store is complete after it, however slow the writer
        self._submit_held()
        if not self.writer.drain():  # a flush folded on the writer thread moves the streaks on: let it finish
            self.writer.alert(
                "lightning_introspect: the writer thread did not finish its jobs in time for a checkpoint (a slow or "
                "hung log directory); the checkpoint's dead-unit streaks may miss the last flushes.", RuntimeWarning,
            )
        return {
            "format": 1,
            "schedule": self.schedule.state_dict(),
            "layers": {n: st.state_dict() for n, st in self.layer_stats.items()},
            "store": self.store.state_dict() if self.store is not None else None,
            "samples_flushed": self.samples_flushed,
            "epochs_done": self.epochs_done,
            "num_classes": self.num_classes,
            "task": self.task,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("format") != 1:
            raise ValueError(f"unknown lightning_introspect state format {state.get('format')!r}.")
        self.schedule.load_state_dict(state["schedule"])
        for name, st_state in state["layers"].items():
            module = dict(self.layers).get(name)
            st = LayerStats(
                name, unit_dim=st_state["unit_dim"], dead_threshold=self.config.dead_threshold,
                zero_threshold=self.config.zero_threshold,
                rule=None if module is None else unit_rule(module, self.config.dead_threshold),
            )
            st.load_state_dict(st_state)
            self.layer_stats[name] = st
        self.samples_flushed = self._flushed_before = int(state["samples_flushed"])
        self.epochs_done = int(state["epochs_done"])
        self.num_classes = state.get("num_classes")
        self.task = state.get("task")
        if state.get("store") is not None:
            self._pending_state = dict(state["store"])
            if self.store is not None:
                self._load_store(self._pending_state)
            elif self.num_examples is None:
                self.num_examples = int(state["store"]["num_examples"])


def _hist_proto_args(
    hist: np.ndarray, mins: np.ndarray, sums: np.ndarray, counts: np.ndarray
) -> list[Optional[dict[str, Any]]]:
    """Keyword arguments of ``add_histogram_raw`` for each layer's bucket counts (rows of ``hist`` (L, BINS),
    with the layers' ``mins`` [min, -max], ``sums`` [sum, sum of squares, ...] and subsampled ``counts``):
    only the span of non-empty buckets, the outer edges clipped to the exact min and max; more than
    ``MAX_WRITTEN_BUCKETS`` adjacent buckets merged (TensorBoard shows ~30 bins anyway, and smaller events cost
    the writer less). None for a layer with nothing to show. The span search and the totals are one numpy pass
    over all layers."""
    nonzero = hist != 0
    shown = nonzero.any(1)
    first = nonzero.argmax(1)
    last = hist.shape[1] - 1 - nonzero[:, ::-1].argmax(1)
    num = hist.sum(1)
    with np.errstate(all="ignore"):
        scale = np.where(counts > 0, num / counts, 0.0)  # the histogram sees a strided subsample
    out: list[Optional[dict[str, Any]]] = []
    for i, (ok, i0, i1, lo, neg_hi, n, sc) in enumerate(
        zip(shown.tolist(), first.tolist(), last.tolist(), mins[:, 0].tolist(), mins[:, 1].tolist(), num.tolist(),
            scale.tolist())
    ):
        if not ok:
            out.append(None)
            continue
        hi = -neg_hi
        limits = _EDGES[i0 + 1 : i1 + 2].copy()
        limits[-1] = min(limits[-1], hi) if math.isfinite(limits[-1]) else hi
        span = hist[i, i0 : i1 + 1]
        if span.size > MAX_WRITTEN_BUCKETS:  # groups of g adjacent buckets, the last one possibly shorter
            g = -(-span.size // MAX_WRITTEN_BUCKETS)
            starts = np.arange(0, span.size, g)
            span = np.add.reduceat(span, starts)
            limits = limits[np.minimum(starts + g - 1, limits.size - 1)]
        out.append({
            "min": lo, "max": hi, "num": n, "sum": float(sums[i, 0]) * sc, "sum_squares": float(sums[i, 1]) * sc,
            "bucket_limits": limits, "bucket_counts": span,
        })
    return out


def _suspects_markdown(suspects: Any, class_names: Optional[Sequence[str]], epoch: int, top: int = 10,
                       describe: Optional[Callable[[int], str]] = None) -> str:
    def name(label: int) -> str:
        if class_names is not None and 0 <= label < len(class_names):
            return str(class_names[label])
        return str(label)

    def text(rank: int) -> str:  # the shown rows only: describe may be slow, and the table has `top` rows
        if describe is None:
            return ""
        words = " ".join(str(describe(int(suspects.ids[rank]))).split()).replace("|", "\\|")
        return " " + (words if len(words) <= 80 else words[:79] + "…") + " |"

    text_head, text_rule = (" text |", ":---|") if describe is not None else ("", "")
    n_flag = int(np.sum(suspects.flagged))
    share = f"{n_flag / len(suspects.ids):.1%}" if len(suspects.ids) else "-"
    rate = f"{suspects.noise_rate:.1%}" if np.isfinite(suspects.noise_rate) else "- (too little evidence)"
    summary = f" Flagged share {share}; estimated noise rate {rate}." if len(suspects.ids) else ""
    if suspects.abstained is not None:
        summary += f" The automatic cut flags nothing: {suspects.abstained}"
    if len(suspects.ids) and (np.asarray(suspects.labels) < 0).all():  # no class labels: sequence (N, T, C) data
        lines = [
            f"**Epoch {epoch}: the {min(top, len(suspects.ids))} hardest of {len(suspects.ids)} examples** (scorer "
            f"`{suspects.method}` over their tokens, lower = harder; "
            + (f"{n_flag} score below {suspects.threshold:.3f}). " if suspects.abstained is None else "no cut). ")
            + "For sequences these are hard, atypical or noisy examples, not wrong labels." + summary,
            "",
            "| rank | id | score | region |" + text_head,
            "|---:|---:|---:|:---|" + text_rule,
        ]
        lines += [f"| {r + 1} | {int(suspects.ids[r])} | {float(suspects.scores[r]):.3f} | "
                  f"{'-' if suspects.regions is None else suspects.regions[r]} |{text(r)}"
                  for r in range(min(top, len(suspects.ids)))]
        return "\n".join(lines)
    lines = [
        f"**Epoch {epoch}: {n_flag} of {len(suspects.ids)} examples flagged as likely mislabeled** "
        f"(scorer `{suspects.method}`, "
        + (f"cut at score {suspects.threshold:.3f}; " if suspects.abstained is None else "")
        + "lower score = more suspect)." + summary,
        "",
        "| rank | id | given label | suggested label | score | flagged | region |" + text_head,
        "|---:|---:|:---|:---|---:|:---:|:---|" + text_rule,
    ]
    suggested = suspects.suggested_labels
    for r in range(min(top, len(suspects.ids))):
        sug = "-" if suggested is None or suggested[r] < 0 else name(int(suggested[r]))
        lines.append(
            f"| {r + 1} | {int(suspects.ids[r])} | {name(int(suspects.labels[r]))} | {sug} | "
            f"{float(suspects.scores[r]):.3f} | {'yes' if suspects.flagged[r] else 'no'} | "
            f"{'-' if suspects.regions is None else suspects.regions[r]} |{text(r)}"
        )
    return "\n".join(lines)


def _confusion_markdown(suspects: Any, class_names: Optional[Sequence[str]], epoch: int) -> Optional[str]:
    """The per-class view of the flagged examples (top pairs, flagged share per class), or None without
    class labels (sequence data)."""
    if len(suspects.ids) == 0 or (np.asarray(suspects.labels) < 0).all():
        return None
    view = suspects.class_view()
    return f"**Epoch {epoch}: flagged examples by class**\n\n" + view.to_markdown(class_names, top=5, max_classes=10)
