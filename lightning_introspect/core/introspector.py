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

import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from . import dist
from ._sync import allow_sync
from .alerts import Alerts
from .compile import EagerStance
from .config import IntrospectConfig
from .contracts import EXTRAS_DUTY, EpochOutput, Publisher, Sink, default_publisher
from .dynamics import SAMPLE_BUFFER_STEPS, Dynamics
from .flush import FOLD_BATCH, FlushPipeline
from .gradients import GradientObserver
from .hooks import HookSet, select_layers
from .owntime import OwnTime as _OwnTime, timed as _timed
from .samples import PerSampleStore
from .schedule import SamplingSchedule
from .stats import LayerStats
from .units import unit_rule
from .writer import AsyncWriter

__all__ = ["EXTRAS_DUTY", "FOLD_BATCH", "SAMPLE_BUFFER_STEPS", "Introspector"]  # the constants: re-exported

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
        is_writer: whether this process writes (default: rank 0).
        publisher: writes each epoch's outputs (records, suspects, pictures); default: the package's
            :class:`~lightning_introspect.publish.RecordsPublisher` over ``records_dir`` and ``class_names``.
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
        publisher: Optional[Publisher] = None,
    ) -> None:
        self.config = config = config or IntrospectConfig()
        self.model = model
        self.overhead_seconds = 0.0
        self._own_mark = 0.0
        self._own_since: Optional[float] = None  # start of the timed call in progress (see own_time)
        watch_layers = config.activations or config.dead_units or config.histograms
        self.layers = select_layers(model, config) if watch_layers else []
        self.layer_stats: dict[str, LayerStats] = {}
        self.is_writer = dist.rank() == 0 if is_writer is None else is_writer
        self.writer = AsyncWriter()
        self.schedule = SamplingSchedule(
            config.every_n_steps, config.warmup_steps, config.overhead_budget, config.max_interval
        )
        self.alerts = Alerts(config, self.writer, self.layers, self.schedule, self.is_writer)
        self.hooks = self.alerts.hooks = HookSet(self.layers, self.layer_stats, config, self.alerts.on_skip)
        self.gradients = GradientObserver(model, config, self.writer)
        self.grad = self.gradients.grad
        self.sinks: list[Sink] = list(sinks)
        self.records_dir = Path(records_dir) if records_dir is not None else None
        self.publisher = publisher if publisher is not None else default_publisher(config, self.records_dir, class_names)
        self.class_names = list(class_names) if class_names is not None else None
        self._describe: Optional[Callable[[int], str]] = None
        self.dynamics = Dynamics(config, self.writer, num_examples or config.num_examples)
        self.flusher = FlushPipeline(
            config, writer=self.writer, hooks=self.hooks, grad=self.grad, schedule=self.schedule, alerts=self.alerts,
            dynamics=self.dynamics, layer_stats=self.layer_stats, sinks=self.sinks, on_scalars=on_scalars,
            is_writer=self.is_writer)
        self.sampled, self.step_index = False, 0  # whether the step in progress is sampled; its index
        self.samples_flushed = 0
        self._flushed_before = 0  # sampled steps of a run this one resumes: their calls are not in hooks.called
        self.epochs_done = 0
        self._pending: Optional[int] = None
        self._step_handles: list[Any] = []
        self.stance = EagerStance(self.writer)  # runs sampled steps' compiled code eagerly (see core/compile.py)
        self._records: Optional[dict[str, np.ndarray]] = None
        self._steps_since_flush = 0
        self.threshold_ids: Optional[np.ndarray] = None  # AUM threshold samples (ThresholdSamples), if any

    @property
    def on_scalars(self) -> Optional[Callable[[dict[str, float], int], None]]:
        """Called on the training thread with ``(scalars, step)`` after they were written."""
        return self.flusher.on_scalars

    @on_scalars.setter
    def on_scalars(self, fn: Optional[Callable[[dict[str, float], int], None]]) -> None:
        self.flusher.on_scalars = fn

    @property
    def describe(self) -> Optional[Callable[[int], str]]:
        """``describe(sample_id) -> str`` (e.g. an example's text): the ``text`` column of the suspects tables."""
        return self._describe

    @describe.setter
    def describe(self, fn: Optional[Callable[[int], str]]) -> None:
        self._describe = fn
        if hasattr(self.publisher, "describe"):  # the publisher's suspects table shows it too
            setattr(self.publisher, "describe", fn)

    @property
    def store(self) -> Optional[PerSampleStore]:
        """The per-example store (None until the first batch with sample ids)."""
        return self.dynamics.store

    @property
    def num_examples(self) -> Optional[int]:
        """The training set's size: sample ids lie in ``[0, num_examples)``."""
        return self.dynamics.num_examples

    @num_examples.setter
    def num_examples(self, n: int) -> None:
        self.dynamics.resize(n)

    @property
    def num_classes(self) -> Optional[int]:
        return self.dynamics.num_classes

    @property
    def task(self) -> Optional[str]:
        """"classification", "sequence" or "regression", from the first batch; None before it."""
        return self.dynamics.task

    @property
    def batches_seen(self) -> int:
        """Batches whose per-example inputs were accepted so far."""
        return self.dynamics.batches_ok

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
            alerts = self.alerts
            sampled = alerts.diagnose > 0 or self.schedule.should_sample(step)
            if self.flusher.holding and not sampled:  # no flush comes next step: the held windows go now
                self.flusher.submit_held()
            self.schedule.tick(sampled, start, writer_busy=writer_busy)
            self.sampled = sampled
            self.step_index = step
            self._steps_since_flush += 1
            if sampled:
                if self._pending != step and alerts.diagnose > 0:
                    alerts.diagnose -= 1
                self._pending = step
                cfg = self.config
                self.hooks.histogram = cfg.histograms and self.samples_flushed % cfg.histogram_every_n_samples == 0
                if self.layers:
                    self.hooks.attach()
                    if not self.stance.held and "torch._dynamo.eval_frame" in sys.modules:
                        self.stance.hold()
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
                self.stance.release()  # back to the stance the step began with, once no instance holds it
                for h in self._step_handles:
                    h.remove()
                self._step_handles = []
            dyn = self.dynamics
            if type(loss) is Tensor and loss.ndim == 0 and not loss.requires_grad and dyn.loss_check:
                dyn.loss_buf.append(loss)  # what Lightning hands over: observe_loss, without its calls
                if len(dyn.loss_buf) >= SAMPLE_BUFFER_STEPS:
                    dyn.drain(offload=True)
            elif loss is not None:
                self.observe_loss(loss)
        finally:
            now = time.perf_counter()
            if outer:
                self._own_since = None
                self.overhead_seconds += now - t0
            # the step's own time: its timed calls so far, and the one in progress
            self.schedule.end(now, own_seconds=self.overhead_seconds - self._own_mark + (0.0 if outer else now - start))  # type: ignore[operator]

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

    def add_own_time(self, seconds: float) -> None:
        """Counts ``seconds`` an adapter spent outside any timed call (e.g. in a forward hook) as the tool's own."""
        self.overhead_seconds += seconds

    def skip_batch(self, err: ValueError) -> None:
        """An adapter's batch it cannot read: raised before any batch was accepted, else warned and skipped."""
        self.dynamics.skip_batch(err, self.step_index)

    def pause(self) -> None:
        """Tells the overhead budget that training pauses (validation): the time until the next step is not
        a training step's."""
        self.schedule.pause()

    @property
    def write_failures(self) -> int:
        """Writer jobs that failed so far (each was warned about once)."""
        return self.writer.failures

    @property
    def has_epoch_records(self) -> bool:
        """Whether an epoch end has folded per-example records."""
        return self._records is not None

    @_timed
    def observe_loss(self, loss: Any) -> None:
        """Counts a non-finite loss on the device (read at the next flush)."""
        self.dynamics.observe_loss(loss)

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
        self._step_handles += self.gradients.observe(optimizer, clipping=clipping)

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
        self.dynamics.observe_batch(ids, targets, logits, sample_loss, self.step_index)

    # ------------------------------------------------------------------------------------------------ flush
    @_timed
    def flush(self) -> None:
        """Flushes the pending sampled step now (normally done when the next step begins); with none pending,
        still reads the bad-input and non-finite-loss counters of the steps since the last flush."""
        if self._pending is not None:
            self._flush(drain=True)
        elif self._steps_since_flush > 0:
            self._flush(counters_only=True, drain=True)
        self.flusher.submit_held()

    def _device(self) -> torch.device:
        for st in self.layer_stats.values():
            if st.sums is not None:
                return st.sums.device
        if self.gradients.params:
            return self.gradients.params[0].device
        return torch.device("cpu")

    def _flush(self, counters_only: bool = False, drain: bool = False) -> None:
        """Ends the pending window (see :meth:`FlushPipeline.flush_window`). Per-example inputs still buffered
        are drained only with ``drain`` (explicit flushes, epoch ends): the flush at a step's start leaves them
        batched, and the bad-input counts they carry are read at a later flush ("up to step N"). Buffered
        losses are always checked."""
        step = self.step_index if counters_only else self._pending
        assert step is not None
        if drain:
            self.dynamics.drain()
        else:
            self.dynamics.drain_losses()
        self._pending = None
        self._steps_since_flush = 0
        with allow_sync():
            device = self._device()
        self.flusher.flush_window(step, counters_only, drain, device)
        if not counters_only:
            self.samples_flushed += 1

    # ------------------------------------------------------------------------------------------------ epochs
    @_timed
    def end_epoch(self, epoch: int, step: int) -> None:
        """Folds this epoch's per-example figures into the aggregates (reduced across ranks), writes the records
        atomically and the epoch's TensorBoard entries. Every rank must call it."""
        self.writer.poll()
        self.flush()
        self.alerts.warn_uncalled_layers(self.samples_flushed - self._flushed_before)
        self.dynamics.drain()
        self.schedule.pause()
        store = self.store
        if store is None and dist.is_distributed() and self.num_examples is not None:
            store = self.dynamics.ensure_store(self._device())  # a rank that saw no batch still joins the epoch-end round
        if store is None:
            return
        records, means = self.dynamics.fold_epoch(epoch, with_means=self.is_writer)
        self._records = records
        self.epochs_done = epoch + 1
        meta = self._records_meta(epoch)
        self.flusher.submit(lambda: self._write_epoch(records, means, meta, epoch, step), required=True)

    def _records_meta(self, epoch: int) -> dict[str, Any]:
        return {"format": 1, "epoch": epoch, "num_examples": self.store.num_examples if self.store else self.num_examples,
                "num_classes": self.num_classes, "class_names": self.class_names, "task": self.task or "classification",
                "ignore_index": self.config.ignore_index,
                "threshold_ids": None if self.threshold_ids is None else [int(i) for i in self.threshold_ids]}

    def _write_epoch(
        self, records: dict[str, np.ndarray], means: Optional[dict[str, np.ndarray]], meta: dict[str, Any],
        epoch: int, step: int,
    ) -> None:
        """The epoch's scalars, then the publisher's outputs (writer thread, in order with the other epochs)."""
        scalars = self.dynamics.epoch_scalars(records)
        out = EpochOutput(records, means, meta, epoch, step, scalars, self.threshold_ids)
        scalars = self.publisher.publish_epoch(out, self.sinks)
        if self.on_scalars is not None:
            cb = self.on_scalars
            self.writer.on_main_thread(lambda: cb(scalars, step))

    # ------------------------------------------------------------------------------------------------ results
    def records(self) -> dict[str, np.ndarray]:
        """The per-example aggregates (host arrays, as of the last epoch end)."""
        if self._records is None:
            if self.store is None:
                raise RuntimeError(
                    "no per-example records yet: they exist after the first training epoch with sample ids "
                    "(wrap the training set in `WithIndex`)."
                )
            self.dynamics.wait_for_reduces()
            with allow_sync():
                self._records = self.store.records()
        return self._records

    def mislabeled(self, *, method: str = "default", cut: Any = "auto", threshold_ids: Any = None) -> Any:
        """Examples ranked most suspect first (see :func:`~lightning_introspect.core.scoring.find_label_issues`)."""
        from .scoring import find_label_issues

        threshold_ids = self.threshold_ids if threshold_ids is None else threshold_ids
        return find_label_issues(self.records(), method=method, cut=cut, threshold_ids=threshold_ids,
                                 num_classes=self.num_classes, describe=self.describe)

    @_timed
    def close(self) -> None:
        """Flushes what is pending, waits for the writer and closes the sinks (idempotent)."""
        self.end_step()
        self.flush()
        self.flusher.submit(lambda: self.publisher.finish(self.sinks), required=True)
        if self.sinks:  # on the writer thread, after every job that writes to them
            self.writer.submit(self._close_sinks, required=True)
        self.writer.close()

    def _close_sinks(self) -> None:
        """Closes the sinks; on the writer thread, whose jobs read ``self.sinks`` when they run."""
        sinks = list(self.sinks)
        self.sinks.clear()  # in place: the flush pipeline holds the same list
        for sink in sinks:
            sink.close()

    def drain(self) -> None:
        """Waits until everything submitted so far is written."""
        self.flush()
        self.writer.drain()

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: schedule, dead-unit streaks, per-example store."""
        self.dynamics.drain()  # the per-example store is complete after it, however slow the writer
        self.flusher.submit_held()
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
        self.dynamics.num_classes = state.get("num_classes")
        self.dynamics.task = state.get("task")
        if state.get("store") is not None:
            self.dynamics.load_state(state["store"])
