"""Scenario: epochs whose length is equal to, below and above each buffer of per-step work (the per-example
buffer SAMPLE_BUFFER_STEPS, the held windows FOLD_BATCH), with the writer thread running freely or held until
the training thread has passed each epoch's end. Every example must be counted once per epoch, in the records
after fit, on disk and in each epoch-end checkpoint.

The model's logits are a fixed table indexed by sample id (plus a zero term that keeps a watched layer and a
gradient in the step), so the per-example figures are known in closed form."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.models import lightning, trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_introspect import Introspect, WithIndex
from lightning_introspect.core.dynamics import SAMPLE_BUFFER_STEPS
from lightning_introspect.core.introspector import FOLD_BATCH
from lightning_introspect.records import read_records

PACKAGE = "lightning.pytorch"
BATCH, C, EPOCHS = 4, 3, 3
pl = lightning(PACKAGE)


class TableModel(pl.LightningModule):  # type: ignore[name-defined,misc]
    """Logits ``table[id]`` whatever the weights: ``0 * layer(x)`` keeps a hooked layer and a gradient."""

    def __init__(self, table: Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table)
        self.layer = nn.Linear(2, C)

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        x, y, ids = batch
        logits = self.table[ids] + 0.0 * self.layer(x)
        return {"loss": F.cross_entropy(logits, y), "logits": logits.detach()}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class HoldWriter(pl.Callback):  # type: ignore[name-defined,misc]
    """Holds the writer thread through each epoch; released after Introspect's epoch end (it comes later in
    the callback list), so that every job of the epoch is still queued when the epoch is folded."""

    def __init__(self, introspect: Introspect) -> None:
        self.introspect = introspect
        self.gate = threading.Event()

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.gate = gate = threading.Event()
        self.introspect.core.writer.submit(lambda: gate.wait(120))

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.gate.set()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.gate.set()


# Epoch lengths in steps around every buffer of per-step work.
STEPS = sorted({SAMPLE_BUFFER_STEPS - 1, SAMPLE_BUFFER_STEPS, SAMPLE_BUFFER_STEPS + 1, 2 * SAMPLE_BUFFER_STEPS,
                FOLD_BATCH - 1, FOLD_BATCH, FOLD_BATCH + 1})


@pytest.mark.parametrize("held", [False, True], ids=["free", "held"])
@pytest.mark.parametrize("steps", STEPS)
def test_every_epoch_counts_every_example(tmp_path: Path, steps: int, held: bool) -> None:
    """Test that each example is counted once per epoch for epoch lengths around every buffer size."""
    n = steps * BATCH
    g = torch.Generator().manual_seed(steps)
    table, y = torch.randn(n, C, generator=g), torch.randint(0, C, (n,), generator=g)
    data = WithIndex(TensorDataset(torch.rand(n, 2, generator=g), y))
    cb = Introspect(every_n_steps=1, warmup_steps=0)
    callbacks: list[Any] = [cb]
    if held:
        callbacks.append(HoldWriter(cb))
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1,
                                        save_on_train_epoch_end=True, filename="{epoch}")
    t = trainer(PACKAGE, tmp_path, max_epochs=EPOCHS, enable_checkpointing=True, callbacks=[*callbacks, ckpt])
    t.fit(TableModel(table), DataLoader(data, batch_size=BATCH, shuffle=False))

    loss = F.cross_entropy(table, y, reduction="none").numpy()
    records = cb.core.records()
    assert records["seen_epochs"].tolist() == [EPOCHS] * n
    np.testing.assert_allclose(records["loss_sum"], EPOCHS * loss, rtol=1e-5)
    on_disk, meta = read_records(tmp_path)
    assert meta["epoch"] == EPOCHS - 1
    assert on_disk["seen_epochs"].tolist() == [EPOCHS] * n
    np.testing.assert_allclose(on_disk["loss_sum"], EPOCHS * loss, rtol=1e-5)
    for epoch in range(EPOCHS):  # each epoch-end checkpoint holds that epoch, folded, and nothing of the next
        state = torch.load(tmp_path / "ckpt" / f"epoch={epoch}.ckpt", weights_only=False)["callbacks"]["Introspect"]
        store = state["store"]
        assert store["seen_epochs"].tolist() == [epoch + 1] * n, epoch
        np.testing.assert_allclose(store["loss_sum"].numpy(), (epoch + 1) * loss, rtol=1e-5)
        assert not store["epoch"].any(), epoch
