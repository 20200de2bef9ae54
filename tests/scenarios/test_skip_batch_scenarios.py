"""A ``training_step`` that returns ``None``: Lightning's documented way to skip a batch (no backward, no
update). Introspect skips it as well, on the first step or any later one, with no warning: the skipped
batch's examples get no per-example figures for that epoch, every other batch counts as usual."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers.models import classification_data, lightning, loader, mlp, trainer
from helpers.tb import read_events
from lightning_introspect import Introspect, WithIndex
from lightning_introspect.records import read_records

N, BATCH, EPOCHS = 32, 8, 2  # 4 batches an epoch, unshuffled: batch b holds ids 8b .. 8b+7
SKIPPED = {(0, 0), (1, 2)}  # (epoch, batch): the very first step, and a later one


class Skipper(lightning("lightning.pytorch").LightningModule):  # type: ignore[misc]
    """:func:`mlp` whose ``training_step`` runs the forward, then returns None on the batches in ``skip``."""

    def __init__(self, skip: set[tuple[int, int]], return_logits: bool) -> None:
        super().__init__()
        self.net = mlp()
        self.skip = skip
        self.return_logits = return_logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y, _ = batch
        logits = self(x)
        if (self.current_epoch, batch_idx) in self.skip:
            return None
        loss = F.cross_entropy(logits, y)
        return {"loss": loss, "logits": logits.detach()} if self.return_logits else loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("return_logits", [True, False], ids=["logits-in-output", "logits-from-forward"])
def test_batches_returning_none_are_skipped_without_warning(tmp_path: Path, return_logits: bool) -> None:
    """Test that batches whose training_step returns None, the first one included, are left out of the
    per-example records (each skipped example counts one epoch less), with no warning from Introspect."""
    torch.manual_seed(0)
    cb = Introspect(every_n_steps=1, warmup_steps=0, histograms=False)
    tr = trainer("lightning.pytorch", tmp_path, callbacks=[cb], max_epochs=EPOCHS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.fit(Skipper(SKIPPED, return_logits), loader(WithIndex(classification_data(N)), batch_size=BATCH))
    ours = [str(w.message) for w in caught if "introspect" in str(w.message).lower()]
    assert ours == []
    records, meta = read_records(tmp_path / "version_0")
    expected = np.full(N, EPOCHS)
    for _, b in SKIPPED:
        expected[b * BATCH : (b + 1) * BATCH] -= 1
    assert records["seen_epochs"].tolist() == expected.tolist()
    assert meta["num_classes"] == 4 and meta["epoch"] == EPOCHS - 1
    seen = records["seen_epochs"] > 0
    assert np.isfinite(records["loss_sum"][seen]).all()
    # Steps move on over a skipped batch (Lightning counts its optimizer call): one point per step.
    events = read_events(tmp_path / "version_0")
    assert events.steps("activation_mean/net.0") == list(range(EPOCHS * N // BATCH))
