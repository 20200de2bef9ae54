"""Per-example dynamics: the buffer of each step's inputs, the reduce that turns them into per-example figures
(offloaded to the writer thread), the per-example store, and the non-finite-loss counter."""
from __future__ import annotations

import threading
from collections import deque
from contextlib import nullcontext
from typing import Any, Callable, NamedTuple, Optional, Union

import numpy as np
import torch
from torch import Tensor

from . import dist
from ._sync import allow_sync
from .config import IntrospectConfig
from .samples import BAD_INPUT_NAMES, PerSampleStore, classification_figures_with_other, sequence_figures
from .writer import AsyncWriter

# Per-example inputs are kept for this many steps, then reduced in one batched pass, whose cost hardly depends
# on how many steps it covers; more steps would pin more of the host heap (see docs/decisions.md).
SAMPLE_BUFFER_STEPS = 16
MAX_BUFFERED_LOGITS = 1 << 18  # larger (N, C) logits are reduced to per-example figures at once


class RawBatch(NamedTuple):
    """A buffered batch with (N, C) logits, reduced later."""

    ids: Tensor
    targets: Tensor
    logits: Tensor


class FigureBatch(NamedTuple):
    """A buffered batch whose per-example figures were computed when it came (sequence logits, large logits,
    a per-example loss)."""

    ids: Tensor
    fields: tuple[Tensor, ...]  # (loss, margin, confidence, correct) or (loss,)
    labels: Optional[Tensor]
    valid: Optional[Tensor]
    other: Optional[Tensor]


BufferEntry = Union[RawBatch, FigureBatch]


class JoinedRaws(NamedTuple):
    """The buffered :class:`RawBatch` es of one drain, concatenated, with each batch's size."""

    ids: Tensor
    targets: Tensor
    logits: Tensor
    sizes: list[int]


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


class Dynamics:
    """Per-example figures of every step, kept on the device without a host sync.

    Inputs are checked when they come (shapes: free) and buffered for up to ``SAMPLE_BUFFER_STEPS`` steps;
    their figures are then computed and scattered into the :class:`PerSampleStore` in one pass, on the writer
    thread where possible. Every reader of the store calls :meth:`drain` first.
    """

    def __init__(self, config: IntrospectConfig, writer: AsyncWriter, num_examples: Optional[int]) -> None:
        self.config = config
        self.writer = writer
        self.store: Optional[PerSampleStore] = None
        self.num_examples = num_examples
        self.num_classes: Optional[int] = None
        self.task: Optional[str] = None
        self.batches_ok = 0  # batches accepted so far: the first bad one raises, later ones warn
        self.loss_check = config.detect_nonfinite
        self.loss_buf: list[Tensor] = []  # scalar step losses, checked in one op at the next drain
        self.loss_bad: Optional[Tensor] = None
        #: Forgetting counts at the last epoch end or resume: the next epoch's forgotten fraction compares
        #: against them (read and updated by the epoch's writer job).
        self.forgets_before: Optional[np.ndarray] = None
        self._buf: list[BufferEntry] = []
        self._raw_sig: Optional[tuple[Any, ...]] = None  # shapes, dtypes and device of the last batch kept raw
        self._pending_state: Optional[dict[str, Any]] = None
        # Buffered batches are reduced on the writer thread (see drain); the lock keeps the training thread's
        # own reads and writes of the store (bad-input counters, explicit drains) apart from them.
        self.lock = threading.Lock()
        self._reduces: deque[_Reduce] = deque()  # handed to the writer, in order; possibly not run yet

    # ------------------------------------------------------------------------------------------- every step
    def observe_loss(self, loss: Any) -> None:
        """Counts a non-finite loss on the device (read at the next flush)."""
        if not self.loss_check or not isinstance(loss, Tensor):
            return
        if loss.ndim == 0:
            # checked in one op at the next drain (Lightning hands over a detached loss: no op on the step then)
            self.loss_buf.append(loss.detach() if loss.requires_grad else loss)
            if len(self.loss_buf) >= SAMPLE_BUFFER_STEPS:
                self.drain(offload=True)
            return
        bad = (~torch.isfinite(loss.detach())).any()
        if self.loss_bad is None:
            self.loss_bad = torch.zeros((), dtype=torch.float64, device=loss.device)
        self.loss_bad.add_(bad)

    def observe_batch(
        self, ids: Any, targets: Any, logits: Any, sample_loss: Any, step: int
    ) -> None:
        """Buffers one batch (see :meth:`Introspector.observe_batch`); a bad batch raises while none was
        accepted yet, and is skipped with a warning afterwards."""
        sig = None
        if logits is not None and type(ids) is Tensor and type(targets) is Tensor and type(logits) is Tensor:
            sig = (ids.shape, targets.shape, logits.shape, ids.dtype, targets.dtype, logits.dtype, logits.device)
        entry: Optional[BufferEntry]
        if sig is not None and sig == self._raw_sig:  # as the last batch checked: its checks hold
            entry = RawBatch(ids, targets, logits.detach() if logits.requires_grad else logits)
        else:
            try:
                entry = self._buffer_entry(ids, targets, logits, sample_loss)
                if entry is None:
                    return
                self.ensure_store(entry.ids.device if self.store is None else self.store.device)
            except ValueError as err:
                self.skip_batch(err, step)
                return
            if type(entry) is RawBatch:
                self._raw_sig = sig
        self._buf.append(entry)
        self.batches_ok += 1
        if len(self._buf) >= SAMPLE_BUFFER_STEPS:
            self.drain(offload=True)

    def skip_batch(self, err: ValueError, step: int) -> None:
        """The policy for a batch whose per-example inputs are unusable: before any batch was accepted the
        error is raised (the setup is wrong, and every batch would be); afterwards the batch is skipped with a
        warning, once per kind of problem, and training goes on."""
        if self.batches_ok == 0:
            raise err
        self.writer.alert(
            f"lightning_introspect skipped a batch at step {step}: {err}", RuntimeWarning, key=f"skipped:{str(err)[:60]}",
        )

    def _buffer_entry(self, ids: Any, targets: Any, logits: Any, sample_loss: Any) -> Optional[BufferEntry]:
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
                    return RawBatch(ids, targets.detach(), logits.detach())
                loss, margin, conf, correct, valid, other = classification_figures_with_other(
                    logits, targets, self.config.ignore_index
                )
                return FigureBatch(ids, (loss, margin, conf, correct), targets.detach(), valid, other)
            if logits.ndim == 3 and logits.shape[:2] == targets.shape and logits.shape[0] == n and C >= 2:
                self.task = self.task or "sequence"
                self.num_classes = C
                loss, margin, conf, correct, valid = sequence_figures(logits, targets, self.config.ignore_index)
                return FigureBatch(ids, (loss, margin, conf, correct), None, valid, None)
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
            return FigureBatch(ids, (sample_loss.detach(),), None, None, None)
        raise ValueError(
            "no logits and no per-example loss for per-example dynamics: return {'loss': loss, 'logits': logits} "
            "(or 'sample_loss': a (N,) tensor) from training_step, or turn them off with `sample_dynamics=False`."
        )

    # ------------------------------------------------------------------------------------------------ drains
    def drain(self, offload: bool = False) -> None:
        """Counts the buffered non-finite losses, and computes and scatters the buffered batches' figures in
        one pass. With ``offload`` (a full buffer, mid-epoch) that pass runs on the writer thread, in order
        with the flushes, during a backward window, off the training thread; under DDP it stays here, as
        every collective does. Without ``offload`` (explicit flushes, epoch ends, checkpoints: the readers of
        the store) it runs here once every reduce handed off before it is done."""
        self.drain_losses()
        if not offload:  # every reader of the store comes here first, even with nothing buffered since
            self.wait_for_reduces()
        buf, self._buf = self._buf, []
        if not buf or self.store is None:
            return
        raw = self._join_raws(buf)
        figs = [e for e in buf if type(e) is FigureBatch]
        del buf
        if offload and not dist.is_distributed():
            device = self.store.device
            stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
            reduces = self._reduces
            while reduces and reduces[0].done:  # read without the lock: a stale False keeps one a while longer
                reduces.popleft()
            job = _Reduce(lambda: self._reduce_on_writer(raw, figs, stream), self.lock)
            reduces.append(job)
            if not self.writer.offer(job):  # a full queue or a closed writer: here, after those before it
                self.wait_for_reduces()
            return
        with self.lock:
            self._reduce(raw, figs)

    @staticmethod
    def _join_raws(buf: list[BufferEntry]) -> Optional[JoinedRaws]:
        """The buffered batches with logits as one batch, joined here, on the training thread (three copies),
        so that the dozens of small tensors are freed now, in the order they came: kept until the writer runs,
        they would sit between the next step's activations and hold the heap apart."""
        raws = [e for e in buf if type(e) is RawBatch]
        if not raws:
            return None
        # cat promotes mixed target dtypes: one conversion in the reduce, not one per step
        return JoinedRaws(torch.cat([e.ids for e in raws]), torch.cat([e.targets for e in raws]),
                          torch.cat([e.logits for e in raws]), [e.ids.shape[0] for e in raws])

    def wait_for_reduces(self) -> None:
        """Runs here, in order, every reduce handed to the writer thread that it has not started, and waits for
        the one it runs: the store is then complete. No wait for the writer's other jobs (figures, pictures),
        and none that can time out: a slow or stuck writer cannot make an epoch end fold a partial epoch."""
        reduces = self._reduces
        while reduces:
            reduces.popleft()()

    def _reduce_on_writer(self, raw: Optional[JoinedRaws], figs: list[FigureBatch], stream: Any) -> None:
        """A reduce on the writer thread, or on the training thread when it waits for the store (see
        :class:`_Reduce`, which holds the lock); on CUDA on the training thread's stream, which produced the
        buffered tensors."""
        try:
            with torch.no_grad(), (torch.cuda.stream(stream) if stream is not None else nullcontext()):
                self._reduce(raw, figs)
        except Exception as err:  # inputs were checked when buffered: this is a bug or the device failing
            batches = len(figs) + (len(raw.sizes) if raw is not None else 0)
            self.writer.alert(
                f"lightning_introspect lost the per-example figures of {batches} batches "
                f"({type(err).__name__}: {err}); training goes on.", RuntimeWarning, key="lost per-example",
            )

    def _reduce(self, raw: Optional[JoinedRaws], figs: list[FigureBatch]) -> None:
        """The buffered batches' figures, computed in one pass over their concatenation and scattered:
        ``raw`` as :meth:`_join_raws` returns it, ``figs`` the batches that came with per-example figures."""
        store = self.store
        assert store is not None
        if raw is not None:
            targets = raw.targets if raw.targets.dtype == torch.long else raw.targets.long()
            loss, margin, conf, correct, valid, other = classification_figures_with_other(
                raw.logits, targets, self.config.ignore_index
            )
            store.observe(
                raw.ids, loss, margin, conf, correct, labels=targets, valid=valid, batch_sizes=raw.sizes, other=other
            )
        groups: dict[tuple[int, bool, bool, bool], list[FigureBatch]] = {}
        for e in figs:
            groups.setdefault((len(e.fields), e.labels is None, e.valid is None, e.other is None), []).append(e)
        for (n_fields, no_labels, no_valid, no_other), entries in groups.items():
            fields = [torch.cat([e.fields[i].reshape(-1) for e in entries]) for i in range(n_fields)]
            store.observe(
                torch.cat([e.ids for e in entries]), *fields,
                labels=None if no_labels else torch.cat([e.labels for e in entries]),  # type: ignore[misc]
                valid=None if no_valid else torch.cat([e.valid for e in entries]),  # type: ignore[misc]
                batch_sizes=[e.ids.shape[0] for e in entries],
                other=None if no_other else torch.cat([e.other for e in entries]),  # type: ignore[misc]
            )

    def drain_losses(self) -> None:
        """Counts the non-finite ones among the buffered step losses, in one op."""
        if self.loss_buf:
            losses, self.loss_buf = self.loss_buf, []
            stacked = torch.stack(losses)  # promotes mixed dtypes
            if self.loss_bad is None:
                self.loss_bad = torch.zeros((), dtype=torch.float64, device=stacked.device)
            self.loss_bad.add_((~torch.isfinite(stacked)).sum())

    def take_counters(self, device: torch.device) -> Tensor:
        """The non-finite-loss count and the bad-input counts since the last call, as one float64 tensor on
        ``device`` (no host sync); a reduce running on the writer thread keeps its counts for a later call."""
        loss_bad = self.loss_bad if self.loss_bad is not None else torch.zeros((), dtype=torch.float64, device=device)
        store_bad = torch.zeros(len(BAD_INPUT_NAMES), dtype=torch.float64, device=device)
        if self.store is not None and self.lock.acquire(blocking=False):
            try:
                store_bad = self.store.take_bad_counts()
            finally:
                self.lock.release()
        extra = torch.cat([loss_bad.reshape(1).to(device, torch.float64), store_bad.to(device)])
        if self.loss_bad is not None:
            self.loss_bad.zero_()  # after the copy into `extra` (stream order on CUDA)
        return extra

    # ------------------------------------------------------------------------------------------------ epochs
    def fold_epoch(
        self, epoch: int, *, with_means: bool
    ) -> tuple[dict[str, np.ndarray], Optional[dict[str, np.ndarray]]]:
        """Reduces the epoch's per-example figures across ranks (a collective: every rank calls it), folds them
        into the aggregates and returns the records and, ``with_means``, the epoch's per-example means, as host
        arrays. Call :meth:`drain` first."""
        store = self.store
        assert store is not None
        with allow_sync():
            if dist.is_distributed():
                dist.agree_epoch_end(store.device)
                dist.reduce_([store.epoch], "sum")
                dist.reduce_([store.label, store.epoch_other], "max")
            means = {k: v.cpu().numpy() for k, v in store.epoch_means().items()} if with_means else None
            store.fold_epoch(epoch)
            return store.records(), means

    def epoch_scalars(self, records: dict[str, np.ndarray]) -> dict[str, float]:
        """The learned and forgotten fractions of the examples seen so far; forgotten since the last call (or
        resume). Called once per epoch, in epoch order (on the writer thread)."""
        n_seen = max(int((records["seen_epochs"] > 0).sum()), 1)
        scalars = {"samples/learned_fraction": float((records["last_correct"] == 1).sum() / n_seen)}
        forgets = records["forgetting_events"].astype(np.int64)
        prev = self.forgets_before
        if prev is not None and prev.shape == forgets.shape:
            scalars["samples/forgotten_fraction"] = float((forgets > prev).sum() / n_seen)
        else:
            scalars["samples/forgotten_fraction"] = float((forgets > 0).sum() / n_seen)
        self.forgets_before = forgets
        return scalars

    # ------------------------------------------------------------------------------------------------ store
    def ensure_store(self, device: torch.device) -> PerSampleStore:
        """The store, made on ``device`` at the first batch (with a checkpoint's state, when resuming)."""
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

    def resize(self, num_examples: int) -> None:
        """Sets the training set's size; a store made for fewer examples grows (their records are kept)."""
        if self.store is not None and num_examples > self.store.num_examples:
            self.num_examples = num_examples
            with allow_sync():
                self._load_store(self.store.state_dict())
        self.num_examples = num_examples

    def load_state(self, state: dict[str, Any]) -> None:
        """Takes a checkpoint's store, now or when the store is made."""
        self._pending_state = dict(state)
        if self.store is not None:
            self._load_store(self._pending_state)
        elif self.num_examples is None:
            self.num_examples = int(state["num_examples"])

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
            self.forgets_before = self.store.forgetting_events.cpu().numpy().astype(np.int64)
