"""Scenarios: what the tool says about the per-example input is what happened to it.

Targets equal to ``ignore_index`` are left out without a word; ids repeated by a sampler that draws with
replacement are kept and averaged, and the warning says so (the figures are checked against the step's own
logits); NaN logits are reported as the model's doing; ids that are the labels are refused.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler

from helpers.models import classification_data, trainer
from helpers.tb import read_events
from lightning_introspect import Introspect, WithIndex
from lightning_introspect.records import read_records

IGNORE = -100


class Recorder(pl.LightningModule):
    """A linear classifier over the last axis of ``x`` ((N, F) or (N, T, F)) that keeps, per step, the ids
    and the logits it returned (the oracle's input); ``nan_at`` makes the returned logits NaN at that step."""

    def __init__(self, in_features: int, num_classes: int, *, nan_at: Optional[int] = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(in_features, num_classes)
        self.nan_at = nan_at
        self.seen: list[tuple[Tensor, Tensor, Tensor]] = []

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y, ids = (batch["x"], batch["label"], None) if isinstance(batch, dict) else (batch[0], batch[1], batch[-1])
        logits = self(x)
        loss = F.cross_entropy(logits.flatten(0, -2), y.flatten(), ignore_index=IGNORE)
        out = logits.detach().clone()
        if self.global_step == self.nan_at:
            out[:2] = float("nan")
        self.seen.append((ids, y, out))
        return {"loss": loss, "logits": out}

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _fit(tmp_path: Path, model: pl.LightningModule, loader: DataLoader, epochs: int = 2,
         **kwargs: Any) -> tuple[Introspect, dict[str, np.ndarray], list[str]]:
    intro = Introspect(every_n_steps=10**6, warmup_steps=0, histograms=False, **kwargs)
    tr = trainer("lightning.pytorch", tmp_path, max_epochs=epochs, callbacks=[intro])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.fit(model, loader)
    records, _ = read_records(tmp_path / "version_0")
    return intro, records, [str(w.message) for w in caught if "lightning_introspect" in str(w.message)]


def _bad_input_texts(tmp_path: Path) -> list[str]:
    return [text for _, text in read_events(tmp_path / "version_0").texts.get("alerts/bad_input", [])]


def test_ignore_index_class_targets_are_left_out_without_a_warning(tmp_path: Path) -> None:
    """Test that (N, C) rows whose target is ignore_index give no warning and are never recorded, while
    every other example is seen in both epochs."""
    ds = classification_data(32)
    y = ds.tensors[1].clone()
    ignored = [1, 6, 7, 20, 31]
    y[ignored] = IGNORE
    _, records, ours = _fit(tmp_path, Recorder(8, 4), DataLoader(WithIndex(TensorDataset(ds.tensors[0], y)), batch_size=8))
    assert ours == [] and _bad_input_texts(tmp_path) == []
    expected = np.full(32, 2)
    expected[ignored] = 0
    np.testing.assert_array_equal(records["seen_epochs"], expected)


def test_ignore_index_tokens_are_left_out_of_sequence_figures(tmp_path: Path) -> None:
    """Test that (N, T, C) tokens equal to ignore_index give no warning and are left out of each example's
    mean loss (checked against the returned logits), and that an example with every token ignored is not
    recorded."""
    g = torch.Generator().manual_seed(2)
    n, t, f, c = 12, 5, 3, 4
    x = torch.randn(n, t, f, generator=g)
    y = torch.randint(0, c, (n, t), generator=g)
    y[0, 3:] = IGNORE
    y[4, ::2] = IGNORE
    y[9] = IGNORE  # nothing to measure
    model = Recorder(f, c)
    _, records, ours = _fit(tmp_path, model, DataLoader(WithIndex(TensorDataset(x, y)), batch_size=4), epochs=1)
    assert ours == [] and _bad_input_texts(tmp_path) == []
    expected_seen = np.ones(n, dtype=np.int16)
    expected_seen[9] = 0
    np.testing.assert_array_equal(records["seen_epochs"], expected_seen)
    for ids, yy, logits in model.seen:
        for row, i in enumerate(ids.tolist()):
            keep = yy[row] != IGNORE
            if keep.any():
                want = F.cross_entropy(logits[row][keep], yy[row][keep]).item()
                assert records["loss_sum"][i] == pytest.approx(want, rel=1e-5)


def test_weighted_sampler_repeats_are_averaged_and_the_warning_says_so(tmp_path: Path) -> None:
    """Test that ids repeated by WeightedRandomSampler(replacement=True) give a warning saying the rows were
    kept and averaged, and that each id's recorded loss, confidence and margin are the means over all its
    rows in the epoch (the oracle: the step's own logits)."""
    ds = classification_data(24)
    weights = torch.ones(24)
    weights[:4] = 20.0  # ids 0-3 come many times, in the same batch and in several
    sampler = WeightedRandomSampler(weights, num_samples=48, replacement=True, generator=torch.Generator().manual_seed(0))
    model = Recorder(8, 4)
    _, records, ours = _fit(tmp_path, model, DataLoader(WithIndex(ds), batch_size=12, sampler=sampler), epochs=1)
    repeats = [m for m in ours if "ids_repeated_in_batch" in m]
    assert len(repeats) >= 1
    assert "they were kept" in repeats[0] and "mean over all its rows" in repeats[0]
    assert "left out" not in repeats[0].split("ids_repeated_in_batch", 1)[1].split(";")[0]
    assert _bad_input_texts(tmp_path)
    rows: dict[int, list[tuple[float, float, float]]] = {}
    for ids, y, logits in model.seen:
        logp = logits.log_softmax(1)
        for row, i in enumerate(ids.tolist()):
            given = logits[row, y[row]]
            others = torch.cat([logits[row, : y[row]], logits[row, y[row] + 1 :]])
            rows.setdefault(i, []).append((-logp[row, y[row]].item(), logp[row, y[row]].exp().item(),
                                           (given - others.max()).item()))
    assert max(len(v) for v in rows.values()) > 2  # the scenario repeats ids
    seen = np.flatnonzero(records["seen_epochs"] > 0)
    assert sorted(seen.tolist()) == sorted(rows)
    assert (records["seen_epochs"][seen] == 1).all()  # an epoch counts once however often the id came
    for i, figures in rows.items():
        loss, conf, margin = np.mean(figures, axis=0)
        assert records["loss_sum"][i] == pytest.approx(loss, rel=1e-5)
        assert records["confidence_sum"][i] == pytest.approx(conf, rel=1e-5)
        assert records["margin_sum"][i] == pytest.approx(margin, rel=1e-5, abs=1e-6)


def test_nan_logits_are_blamed_on_the_model_not_the_sampler(tmp_path: Path) -> None:
    """Test that NaN logits warn that the model produced non-finite logits (no word about the sampler or
    WithIndex), and that exactly those rows are left out."""
    model = Recorder(8, 4, nan_at=5)
    _, records, ours = _fit(tmp_path, model, DataLoader(WithIndex(classification_data(32)), batch_size=8))
    texts = [m for m in ours if "nonfinite_outputs" in m]
    assert len(texts) == 1
    assert "the model produced NaN/Inf" in texts[0] and "2 rows" in texts[0]
    assert "sampler" not in texts[0] and "WithIndex" not in texts[0]
    expected = np.full(32, 2)
    expected[[8, 9]] = 1  # step 5 = epoch 1, batch 1: its first two rows
    np.testing.assert_array_equal(records["seen_epochs"], expected)


def test_labels_taken_for_ids_are_refused(tmp_path: Path) -> None:
    """Test that ids and targets pointing at the same batch element (an unwrapped (x, y) set with
    targets=1) fail on the first batch with a message naming the mix-up, instead of recording labels as
    ids."""
    with pytest.raises(ValueError, match="the sample ids and the targets are the same element"):
        _fit(tmp_path, Recorder(8, 4), DataLoader(classification_data(16), batch_size=8),
             sample_dynamics=True, ids=-1, targets=1)


def test_missing_index_in_a_wrapped_set_does_not_say_wrap_it(tmp_path: Path) -> None:
    """Test that a dict batch that lost the WithIndex key (a collate_fn dropping it) fails with a message
    saying the set is wrapped and the entry was dropped, not telling the user to wrap it."""

    class Dicts(TensorDataset):
        def __getitem__(self, i: int) -> dict[str, Tensor]:
            x, y = super().__getitem__(i)
            return {"x": x, "label": y}

    def drop_index(items: list[dict[str, Any]]) -> dict[str, Tensor]:
        return {k: torch.stack([it[k] for it in items]) for k in ("x", "label")}

    ds = classification_data(16)
    loader = DataLoader(WithIndex(Dicts(*ds.tensors), key="idx"), batch_size=8, collate_fn=drop_index)
    with pytest.raises(ValueError, match="wrapped in `WithIndex`, whose 'idx' entry was dropped") as err:
        _fit(tmp_path, Recorder(8, 4), loader, sample_dynamics=True)
    assert "wrap the dataset" not in str(err.value)
