"""Tests that per-example work handed to the writer thread is complete where the training thread reads it:
epoch ends, checkpoints, ``records()``, the records on disk. The writer is held on an Event (or slowed inside a
reduce) so that each ordering is the one that used to lose data. Plain loops, no Trainer."""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_introspect.core import IntrospectConfig, Introspector
from lightning_introspect.core.dynamics import SAMPLE_BUFFER_STEPS, Dynamics
from lightning_introspect.records import read_records

N, C, BATCH = 64, 3, 4
STEPS_PER_EPOCH = N // BATCH
assert STEPS_PER_EPOCH == SAMPLE_BUFFER_STEPS  # the epoch's last step fills the buffer: the racy hand-off


def quiet_config() -> IntrospectConfig:
    """Per-example dynamics only: no layer statistics, so that the writer's queue holds reduces and epochs."""
    return IntrospectConfig(every_n_steps=10_000, warmup_steps=0, activations=False, dead_units=False,
                            histograms=False, grad_norms=False)


def data(epochs: int) -> tuple[Tensor, Tensor]:
    """Logits ``(epochs, N, C)`` that do not depend on training (so the oracle can recompute them), targets."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(epochs, N, C, generator=g), torch.randint(0, C, (N,), generator=g)


def oracle(logits: Tensor, targets: Tensor) -> dict[str, np.ndarray]:
    """The records after every example was seen once per epoch: sums over epochs of its figures."""
    loss = torch.stack([F.cross_entropy(lg, targets, reduction="none") for lg in logits])
    given = logits.gather(2, targets.view(1, N, 1).expand(len(logits), N, 1)).squeeze(2)
    other = logits.scatter(2, targets.view(1, N, 1).expand(len(logits), N, 1), float("-inf")).amax(2)
    return {
        "seen_epochs": np.full(N, len(logits)),
        "loss_sum": loss.sum(0).numpy(),
        "margin_sum": (given - other).sum(0).numpy(),
        "confidence_sum": (-loss).exp().sum(0).numpy(),
        "correct_epochs": (given > other).sum(0).numpy(),
    }


def assert_records(records: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    for key, want in expected.items():
        np.testing.assert_allclose(records[key], want, rtol=1e-5, atol=1e-5, err_msg=key)


def run_epoch(intro: Introspector, logits: Tensor, targets: Tensor, first_step: int) -> int:
    """One epoch of a plain loop (every id once, in order); returns the next step."""
    step = first_step
    for s in range(STEPS_PER_EPOCH):
        ids = torch.arange(s * BATCH, (s + 1) * BATCH)
        with intro.step(step):
            intro.observe_batch(ids, targets=targets[ids], logits=logits[ids])
        step += 1
    return step


@pytest.fixture
def intro() -> Iterator[Introspector]:
    core = Introspector(nn.Linear(2, 2), quiet_config(), num_examples=N)
    yield core
    core.close()


def hold_writer(intro: Introspector) -> threading.Event:
    """Blocks the writer thread on an Event (queued first, so every later job waits behind it)."""
    gate = threading.Event()
    intro.writer.submit(lambda: gate.wait(120))  # longer than any wait of the training thread for the writer
    return gate


def test_epoch_end_takes_back_the_reduce_the_writer_has_not_started(intro: Introspector) -> None:
    """Test that an epoch end folds the reduce handed off at its last step, while the writer is held."""
    epochs = 3
    logits, targets = data(epochs)
    step = 0
    for e in range(epochs):
        gate = hold_writer(intro)
        step = run_epoch(intro, logits[e], targets, step)
        intro.end_epoch(e, step)
        assert intro.records()["seen_epochs"].tolist() == [e + 1] * N
        gate.set()
    assert_records(intro.records(), oracle(logits, targets))


def test_epoch_end_waits_for_the_reduce_the_writer_is_running(
    intro: Introspector, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Test that an epoch end waits for a reduce the writer thread is in the middle of."""
    epochs = 2
    logits, targets = data(epochs)
    entered = threading.Event()
    reduce = Dynamics._reduce

    def slow_reduce(self: Dynamics, raw: Any, figs: list) -> None:
        if threading.current_thread() is self.writer._thread:
            entered.set()
            time.sleep(0.1)  # fault injection: the writer is slow; the test's order comes from `entered`
        reduce(self, raw, figs)

    monkeypatch.setattr(Dynamics, "_reduce", slow_reduce)
    step = 0
    for e in range(epochs):
        entered.clear()
        step = run_epoch(intro, logits[e], targets, step)
        assert entered.wait(10)  # the writer has started the epoch's last reduce
        intro.end_epoch(e, step)
    assert_records(intro.records(), oracle(logits, targets))


def test_state_dict_is_complete_with_a_stuck_writer(intro: Introspector) -> None:
    """Test that a checkpoint holds every example handed off before it, though the writer never runs them."""
    logits, targets = data(1)
    gate = hold_writer(intro)
    intro.writer.REQUIRED_WAIT_S = 0.05  # the checkpoint's wait for the (held) figures gives up at once
    try:
        run_epoch(intro, logits[0], targets, 0)
        state = intro.state_dict()
    finally:
        gate.set()
    epoch = state["store"]["epoch"]
    assert epoch[:N, 0].tolist() == [1.0] * N  # each example counted once this epoch
    np.testing.assert_allclose(epoch[:N, 1].numpy(), F.cross_entropy(logits[0], targets, reduction="none").numpy(),
                               rtol=1e-6)
    with pytest.warns(RuntimeWarning, match="did not finish its jobs in time for a checkpoint"):
        intro.writer.poll()


def test_state_dict_is_a_copy(intro: Introspector) -> None:
    """Test that a checkpoint's per-example state does not change as training goes on."""
    logits, targets = data(2)
    step = run_epoch(intro, logits[0], targets, 0)
    state = intro.state_dict()
    before = {k: v.clone() for k, v in state["store"].items() if isinstance(v, Tensor)}
    step = run_epoch(intro, logits[1], targets, step)
    intro.end_epoch(1, step)
    for key, value in before.items():
        assert torch.equal(state["store"][key], value), key


@pytest.mark.filterwarnings("ignore:.*dropped a batch of figures")  # the epoch end's figures: they may go
def test_epoch_records_are_written_when_the_writer_queue_is_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Test that an epoch's records reach disk when the writer's queue is full at the epoch end."""
    from lightning_introspect.sinks import AsyncWriter

    intro = Introspector(nn.Linear(2, 2), quiet_config(), num_examples=N, records_dir=tmp_path)
    intro.writer.close()
    intro.writer = writer = AsyncWriter(max_pending=2)
    logits, targets = data(1)
    step = run_epoch(intro, logits[0], targets, 0)
    intro.drain()
    gate = hold_writer(intro)
    writer.submit(lambda: None)
    writer.submit(lambda: None)  # the queue is full
    offered = threading.Event()

    def signalling(put: Callable[..., None], before: bool) -> Callable[..., None]:
        def wrapper(item: Any, *args: Any, **kwargs: Any) -> None:
            mine = "end_epoch" in getattr(item, "__qualname__", "")  # the job that writes the epoch's records
            if mine and before:
                offered.set()  # a blocking put: the writer may go on once it waits
            try:
                put(item, *args, **kwargs)
            finally:
                if mine:
                    offered.set()  # a put that cannot wait has returned or raised: the writer may go on

        return wrapper

    monkeypatch.setattr(writer._queue, "put", signalling(writer._queue.put, before=True))
    monkeypatch.setattr(writer._queue, "put_nowait", signalling(writer._queue.put_nowait, before=False))
    release = threading.Thread(target=lambda: offered.wait(30) and gate.set())
    release.start()
    try:
        intro.end_epoch(0, step)
    finally:
        gate.set()
        release.join()
    intro.close()
    records, _ = read_records(tmp_path / "samples.npz")
    assert records["seen_epochs"].tolist() == [1] * N
