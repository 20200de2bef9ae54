"""Unit tests of the per-example figure kernels' row status and the store's bad-input counters."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_introspect.core.samples import BAD_INPUT_NAMES, PerSampleStore, classification_figures, sequence_figures


def test_sequence_figures_status_per_example() -> None:
    """Test that a sequence example is used (1) with its mean over kept tokens, left out and counted (0) for a
    kept token with a target out of range, left out silently (-1) when every token is ignored, and gets a NaN
    loss for a non-finite logit in a kept token."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 5, generator=g)
    targets = torch.randint(0, 5, (4, 3), generator=g)
    targets[0, 2] = -100
    targets[1, 1] = 7
    targets[2] = -100
    logits[3, 0, 1] = float("nan")
    loss, _, _, _, status = sequence_figures(logits, targets, -100)
    assert status.tolist() == [1, 0, -1, 1]
    assert loss[0].item() == pytest.approx(F.cross_entropy(logits[0, :2], targets[0, :2]).item(), rel=1e-6)
    assert math.isnan(loss[3].item())


def test_store_counts_bad_targets_but_not_ignored_rows() -> None:
    """Test that the store leaves out rows with status 0 and -1, counting only the former, and averages the
    rows of an id repeated in a batch."""
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0]])
    targets = torch.tensor([0, -100, 5, 1])
    loss, margin, conf, correct, status = classification_figures(logits, targets, -100)
    assert status.tolist() == [1, -1, 0, 1]
    store = PerSampleStore(4)
    store.observe(torch.tensor([0, 1, 2, 0]), loss, margin, conf, correct, labels=targets, valid=status)
    counts = dict(zip(BAD_INPUT_NAMES, store.take_bad_counts().tolist()))
    assert counts == {"ids_out_of_range": 0, "ids_repeated_in_batch": 1, "targets_out_of_range": 1, "nonfinite_outputs": 0}
    means = store.epoch_means()
    assert means["seen"].tolist() == [True, False, False, False]
    assert means["loss"][0].item() == pytest.approx((loss[0].item() + loss[3].item()) / 2, rel=1e-6)
