"""Tests of the epoch publisher injected into the core: the package's default writes records and pictures for a
plain loop, and a publisher passed in replaces it."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from helpers.tb import read_events
from torch import nn

from lightning_introspect import Introspector
from lightning_introspect.core import IntrospectConfig
from lightning_introspect.core.contracts import EpochOutput, NoPublisher, Sink
from lightning_introspect.publish import RecordsPublisher
from lightning_introspect.records import read_records
from lightning_introspect.sinks import TensorBoardSink

N, C, EPOCHS = 24, 3, 2


def _fit(intro: Introspector, model: nn.Module) -> None:
    """Two epochs of one full batch; every example seen once per epoch."""
    g = torch.Generator().manual_seed(0)
    x, y, ids = torch.randn(N, 4, generator=g), torch.randint(0, C, (N,), generator=g), torch.arange(N)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for epoch in range(EPOCHS):
        with intro.step(epoch):
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            intro.observe_batch(ids, targets=y, logits=logits)
        intro.end_epoch(epoch, epoch + 1)
    intro.close()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, C))


def test_a_plain_loop_gets_the_records_publisher_by_default(tmp_path: Path) -> None:
    """Test that an Introspector made without a publisher writes the records, suspects table and data map."""
    model = _model()
    cfg = IntrospectConfig(every_n_steps=10**6, warmup_steps=0, histograms=False)
    intro = Introspector(model, cfg, sinks=[TensorBoardSink(tmp_path / "tb")], records_dir=tmp_path / "rec",
                         num_examples=N)
    assert isinstance(intro.publisher, RecordsPublisher)
    _fit(intro, model)
    records, meta = read_records(tmp_path / "rec")
    assert records["seen_epochs"].tolist() == [EPOCHS] * N and meta["epoch"] == EPOCHS - 1
    ev = read_events(tmp_path / "tb")
    assert [s for s, _ in ev.scalars["samples/learned_fraction"]] == [1, 2]
    assert "samples/data_map" in ev.images and "samples/suspects" in ev.texts


class _Recording(NoPublisher):
    """Publishes scalars only, and remembers each epoch it was handed."""

    def __init__(self) -> None:
        self.epochs: list[tuple[int, int, int]] = []

    def publish_epoch(self, out: EpochOutput, sinks: Sequence[Sink]) -> dict[str, float]:
        self.epochs.append((out.epoch, out.step, int(out.records["seen_epochs"].sum())))
        return super().publish_epoch(out, sinks)


def test_an_injected_publisher_replaces_the_default(tmp_path: Path) -> None:
    """Test that a publisher passed in gets every epoch, in order, and that no records or pictures are written."""
    model = _model()
    cfg = IntrospectConfig(every_n_steps=10**6, warmup_steps=0, histograms=False)
    publisher = _Recording()
    intro = Introspector(model, cfg, sinks=[TensorBoardSink(tmp_path / "tb")], records_dir=tmp_path / "rec",
                         num_examples=N, publisher=publisher)
    _fit(intro, model)
    assert publisher.epochs == [(0, 1, N), (1, 2, 2 * N)]
    assert not (tmp_path / "rec").exists()
    ev = read_events(tmp_path / "tb")
    assert [s for s, _ in ev.scalars["samples/forgotten_fraction"]] == [1, 2]
    assert "samples/data_map" not in ev.images
