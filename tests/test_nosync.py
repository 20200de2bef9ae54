"""The no-sync proof: no host synchronisation from ``lightning_introspect`` outside its flushes.

Real training steps (a Trainer with every statistic on and every step sampled, and the plain-loop
``Introspector``) run under two recording modes:

- a ``TorchDispatchMode`` that sees the aten ops that would block on a GPU: reading a value
  (``_local_scalar_dense``, ``is_nonzero``, ``equal``) or producing a data-dependent shape (``nonzero``,
  ``masked_select``, boolean-mask ``index``/``index_put_``, ``unique*``, ``bincount``, ``repeat_interleave``
  without ``output_size``). A device-to-host ``_to_copy``/``copy_`` is not observable on a CPU-only run;
- a ``TorchFunctionMode`` for the host-copy calls that aten does not show on CPU: ``Tensor.cpu``, ``.numpy``,
  ``.tolist``, ``.item``, ``bool()``/``float()``/``int()``, ``np.asarray(t)``, ``print(t)`` and
  ``torch.tensor([tensors])``.

A sync is a *violation* when a frame of the ``lightning_introspect`` package is on the stack and
``sync_allowed()`` is False (not inside a flush or an epoch end). The tests also show that the recorder
sees the flush's legitimate copies and catches deliberately bad statistics, so they can fail.
"""
from __future__ import annotations

import os
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import pytest
import torch
from helpers.models import classification_data, classifier, loader, mlp, trainer
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import lightning_introspect
from lightning_introspect import Introspect, WithIndex
from lightning_introspect.core import IntrospectConfig, Introspector
from lightning_introspect.core import stats as stats_module
from lightning_introspect.core._sync import sync_allowed
from lightning_introspect.sinks import AsyncWriter, TensorBoardSink

PACKAGE_DIR = os.path.dirname(os.path.abspath(lightning_introspect.__file__)) + os.sep

#: aten ops that read a device value on the host or need one to size their output.
_ALWAYS_SYNC = {
    "_local_scalar_dense", "item", "is_nonzero", "nonzero", "argwhere", "masked_select", "equal", "bincount",
    "_unique", "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive",
    "_coalesce",  # sizes its output by the number of distinct indices: a read on CUDA
}
#: Tensor methods / functions that copy to the host (invisible to aten on a CPU-only run).
_HOST_COPIES = {"cpu", "numpy", "tolist", "item", "__bool__", "__float__", "__int__", "__index__", "__complex__",
                "__array__", "__repr__", "__format__"}


@dataclass
class Sync:
    op: str
    frame: Optional[str]  # innermost lightning_introspect frame, "file:line in function"


@dataclass
class SyncLog:
    violations: list[Sync] = field(default_factory=list)
    allowed: list[Sync] = field(default_factory=list)
    outside: int = 0  # syncs with no lightning_introspect frame (Lightning's own, the test's)

    def record(self, op: str) -> None:
        frames = [f for f in traceback.extract_stack() if f.filename.startswith(PACKAGE_DIR)]
        if not frames:
            self.outside += 1
            return
        f = frames[-1]
        where = f"{os.path.relpath(f.filename, PACKAGE_DIR)}:{f.lineno} in {f.name}"
        (self.allowed if sync_allowed() else self.violations).append(Sync(op, where))


def _has_bool_index(indices: Any) -> bool:
    return any(isinstance(i, Tensor) and i.dtype in (torch.bool, torch.uint8) for i in (indices or ()))


class _DispatchRecorder(TorchDispatchMode):
    def __init__(self, log: SyncLog) -> None:
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        sync = name in _ALWAYS_SYNC
        if name in ("index", "index_put", "index_put_", "_index_put_impl_") and len(args) > 1:
            sync = _has_bool_index(args[1])
        if name == "repeat_interleave":
            sync = kwargs.get("output_size") is None and (len(args) < 4 or args[3] is None)
        if sync:
            self.log.record(f"aten.{name}")
        return func(*args, **kwargs)


class _FunctionRecorder(TorchFunctionMode):
    def __init__(self, log: SyncLog) -> None:
        super().__init__()
        self.log = log

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _HOST_COPIES and args and isinstance(args[0], Tensor):
            self.log.record(f"Tensor.{name}")
        elif func is torch.tensor and args and _holds_tensor(args[0]):
            self.log.record("torch.tensor([tensors])")
        return func(*args, **kwargs)


def _holds_tensor(data: Any) -> bool:
    if isinstance(data, Tensor):
        return True
    return isinstance(data, (list, tuple)) and any(_holds_tensor(d) for d in data)


class record_syncs:
    """Context manager: both recorders active on this thread; ``.log`` holds what they saw."""

    def __init__(self, log: Optional[SyncLog] = None) -> None:
        self.log = log if log is not None else SyncLog()
        self._modes = (_DispatchRecorder(self.log), _FunctionRecorder(self.log))

    def __enter__(self) -> SyncLog:
        for m in self._modes:
            m.__enter__()
        return self.log

    def __exit__(self, *exc: Any) -> None:
        for m in reversed(self._modes):
            m.__exit__(*exc)


@contextmanager
def record_syncs_everywhere(monkeypatch: pytest.MonkeyPatch) -> Iterator[SyncLog]:
    """``record_syncs`` on the training thread and around every job of the background writer (the modes are
    thread-local), into one log: a flush folds and copies to the host on the writer thread."""
    with record_syncs() as log:
        submit, offer = AsyncWriter.submit, AsyncWriter.offer

        def recorded(job: Callable[[], None]) -> Callable[[], None]:
            def run() -> None:
                with record_syncs(log):
                    job()

            return run

        def recorded_submit(self: AsyncWriter, job: Callable[[], None], **kwargs: Any) -> None:
            submit(self, recorded(job), **kwargs)

        def recorded_offer(self: AsyncWriter, job: Callable[[], None]) -> bool:
            return offer(self, recorded(job))

        monkeypatch.setattr(AsyncWriter, "submit", recorded_submit)
        monkeypatch.setattr(AsyncWriter, "offer", recorded_offer)
        yield log


def _report(syncs: list[Sync]) -> str:
    return "\n".join(sorted({f"{s.op} at {s.frame}" for s in syncs}))


# ------------------------------------------------------------------------------------------------ the recorder
def test_recorder_sees_each_kind_of_sync() -> None:
    """Test that the recorder notices every sync trap of STYLE.md when run from package code."""
    t = torch.randn(6)
    traps: dict[str, Callable[[], Any]] = {
        "item": lambda: t.sum().item(), "float": lambda: float(t[0]), "if": lambda: 1 if (t > 0).any() else 0,
        "mask": lambda: t[t > 0], "nonzero": lambda: t.nonzero(), "cpu": lambda: t.cpu(), "tolist": lambda: t.tolist(),
        "tensor of scalars": lambda: torch.tensor([t[0], t[1]]), "unique": lambda: t.unique(), "print": lambda: repr(t),
    }
    for name, trap in traps.items():
        with record_syncs() as log:
            _call_from_package(trap)
        assert log.violations, f"the recorder missed a sync: {name}"
    with record_syncs() as log:
        _call_from_package(lambda: (t * 2).add_(1).topk(2).values.sort())
    assert not log.violations, _report(log.violations)


def _call_from_package(fn: Callable[[], Any]) -> Any:
    """Runs ``fn`` with a lightning_introspect frame on the stack (the Introspector's timing wrapper)."""
    from lightning_introspect.core.introspector import _timed

    class Holder:
        overhead_seconds = 0.0
        _own_since = None

        @_timed
        def run(self) -> Any:
            return fn()

    return Holder().run()


# ------------------------------------------------------------------------------------------------ the proof
def _fit_every_step_sampled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, steps: int = 12) -> tuple[Introspect, SyncLog]:
    cb = Introspect(every_n_steps=1, warmup_steps=0, histograms=True, dead_units=True, dead_window=2,
                    grad_norms=True, param_grad_norms=True, update_ratios=True, sample_dynamics=True)
    # clipping on (at a norm never reached): the clipped global norm is read in an optimizer step hook
    tr = trainer("lightning.pytorch", tmp_path, max_steps=steps, callbacks=[cb], gradient_clip_val=1e3)
    train = loader(WithIndex(classification_data(n=48)))  # 6 steps per epoch: two epoch ends
    with record_syncs_everywhere(monkeypatch) as log:
        tr.fit(classifier(), train)
    return cb, log


def test_trainer_steps_do_not_sync_outside_flushes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Test that a Trainer run with every statistic on every step syncs only inside flushes and epoch ends."""
    cb, log = _fit_every_step_sampled(tmp_path, monkeypatch)
    assert not log.violations, "host syncs outside flushes:\n" + _report(log.violations)
    # The recorder did see the flush's single batched copy, and the epoch-end copies of the records.
    where = _report(log.allowed)
    assert "core/flush.py" in where and "in to_host" in where, where
    assert "records" in where or "end_epoch" in where, where
    assert cb.core is not None and cb.core.samples_flushed == 12
    copies = [s for s in log.allowed if s.op == "Tensor.cpu" and s.frame and s.frame.endswith("in to_host")]
    # One batched copy per batch of held windows, not one per scalar: every step is sampled, so the windows of
    # each six-step epoch are folded and copied together (at most FOLD_BATCH = 8) at the epoch end's flush.
    assert len(copies) == 2


def test_plain_loop_introspector_does_not_sync_outside_flushes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Test the same for the torch-only Introspector driven by a plain loop."""
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    cfg = IntrospectConfig(every_n_steps=1, warmup_steps=0, dead_window=2, param_grad_norms=True)
    intro = Introspector(model, cfg, num_examples=32, sinks=[TensorBoardSink(tmp_path)], records_dir=tmp_path / "rec")
    g = torch.Generator().manual_seed(0)
    x, y, ids = torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g), torch.arange(32)
    with record_syncs_everywhere(monkeypatch) as log:
        for epoch in range(2):
            for step in range(epoch * 4, epoch * 4 + 4):
                rows = slice((step % 4) * 8, (step % 4) * 8 + 8)
                with intro.step(step):
                    logits = model(x[rows])
                    loss = nn.functional.cross_entropy(logits, y[rows])
                    opt.zero_grad()
                    loss.backward()
                    intro.observe_gradients(opt)
                    opt.step()
                    intro.observe_batch(ids[rows], targets=y[rows], logits=logits, loss=loss)
            intro.end_epoch(epoch=epoch, step=step + 1)
        intro.close()
    assert not log.violations, "host syncs outside flushes:\n" + _report(log.violations)
    assert any("in to_host" in (s.frame or "") for s in log.allowed)
    assert intro.records()["seen_epochs"].tolist() == [2] * 32


def test_sparse_gradients_do_not_sync_outside_flushes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Test that the norms of uncoalesced sparse gradients (``nn.Embedding(sparse=True)``) take no sync."""
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Flatten(), nn.Linear(12, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = IntrospectConfig(every_n_steps=1, warmup_steps=0, param_grad_norms=True)
    intro = Introspector(model, cfg, sinks=[TensorBoardSink(tmp_path)])
    x = torch.randint(0, 10, (8, 3), generator=torch.Generator().manual_seed(0))  # 24 lookups of 10 rows
    with record_syncs_everywhere(monkeypatch) as log:
        for step in range(3):
            with intro.step(step):
                opt.zero_grad()
                model(x).sum().backward()
                intro.observe_gradients(opt)
                opt.step()
        intro.close()
    assert not log.violations, "host syncs outside flushes:\n" + _report(log.violations)
    assert intro.samples_flushed == 3


# ------------------------------------------------------------------------------------------------ it can fail
def _bad_amax_item(x: Tensor, unit_dim: int) -> Tensor:
    """A statistic that reads a value on the host on every call (what fastai's ActivationStats does)."""
    if x.max().item() > 1e9:
        raise AssertionError("unreachable")
    return _GOOD_UNIT_AMAX(x, unit_dim)


def _bad_amax_mask(x: Tensor, unit_dim: int) -> Tensor:
    """A statistic with a data-dependent shape (boolean mask)."""
    x[x > 0].sum()
    return _GOOD_UNIT_AMAX(x, unit_dim)


_GOOD_UNIT_AMAX = stats_module.unit_amax


@pytest.mark.parametrize(("bad", "op"), [(_bad_amax_item, "aten._local_scalar_dense"), (_bad_amax_mask, "aten.index")])
def test_a_syncing_statistic_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad: Any, op: str) -> None:
    """Test that a statistic that syncs inside a forward hook is reported as a violation at the hook."""
    monkeypatch.setattr(stats_module, "unit_amax", bad)
    _, log = _fit_every_step_sampled(tmp_path, monkeypatch, steps=2)
    caught = [s for s in log.violations if s.op == op]
    assert caught, "the deliberately bad statistic was not caught"
    assert all(s.frame and s.frame.startswith("core/stats.py") for s in caught), _report(caught)


def test_a_sync_inside_allow_sync_is_not_a_violation() -> None:
    """Test that the same read inside ``allow_sync()`` counts as an allowed (flush) sync."""
    from lightning_introspect.core._sync import allow_sync

    t = torch.randn(3)

    def flush_like() -> float:
        with allow_sync():
            return t.sum().item()

    with record_syncs() as log:
        _call_from_package(flush_like)
    assert not log.violations
    assert sorted(s.op for s in log.allowed) == ["Tensor.item", "aten._local_scalar_dense"]
