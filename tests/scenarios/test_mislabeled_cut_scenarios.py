"""Scenarios: the calibrated cut, its abstention, the regions and the ``describe`` text on real runs.

Four well-separated Gaussian blobs in 8-d (a model fits them within a few epochs). Clean labels must flag at
most 1 % once the model fits; a seeded 20 % of symmetric flips must be flagged with a flagged share and an
estimated noise rate near 20 %; a 2-epoch run must abstain with a warning that says why; the noise rate, the
flagged share, the regions and the text of each suspect must reach suspects.csv, the report and TensorBoard.
"""
from __future__ import annotations

import csv
import io
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from helpers.models import trainer
from helpers.tb import read_events
from lightning_introspect import Introspect, WithIndex
from lightning_introspect.report import main as report_main

C, N = 4, 240


def _blobs(noise: float, seed: int = 0) -> tuple[TensorDataset, np.ndarray]:
    """(x, labels) of 4 blobs, with a seeded ``noise`` share moved to another class; and the flipped ids."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(C, 8, generator=g) * 4.0
    y = torch.arange(N) % C
    x = centers[y] + torch.randn(N, 8, generator=g)
    flipped = torch.randperm(N, generator=g)[: int(noise * N)]
    noisy = y.clone()
    noisy[flipped] = (y[flipped] + 1 + torch.randint(0, C - 1, (len(flipped),), generator=g)) % C
    return TensorDataset(x, noisy), np.sort(flipped.numpy())


class BlobNet(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, C))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y, _ = batch
        logits = self(x)
        return {"loss": F.cross_entropy(logits, y), "logits": logits.detach()}

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _fit(tmp_path: Path, data: TensorDataset, epochs: int, **kwargs: Any) -> Introspect:
    intro = Introspect(every_n_steps=10**6, warmup_steps=0, histograms=False, **kwargs)
    loader = DataLoader(WithIndex(data), batch_size=32, shuffle=False)
    trainer("lightning.pytorch", tmp_path, max_epochs=epochs, callbacks=[intro]).fit(BlobNet(), loader)
    return intro


def _csv(intro: Introspect) -> list[dict[str, str]]:
    assert intro.records_dir is not None
    with open(intro.records_dir / "suspects.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _last_suspects_text(tmp_path: Path) -> str:
    texts = read_events(tmp_path / "version_0").texts["samples/suspects"]
    return texts[-1][1]


def test_clean_labels_flag_at_most_one_percent_once_the_model_fits(tmp_path: Path) -> None:
    """Test that 12 epochs on clean labels flag <= 1 % without abstaining, with an estimated noise rate
    <= 1 %, and that the CSV and TensorBoard text carry the share, the rate and a region per example."""
    data, _ = _blobs(0.0)
    intro = _fit(tmp_path, data, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no abstention warning
        suspects = intro.mislabeled()
    assert suspects.abstained is None
    assert suspects.flagged.sum() <= 0.01 * N and suspects.noise_rate <= 0.01
    rows = _csv(intro)
    assert len(rows) == N and {r["region"] for r in rows} <= {"easy", "ambiguous", "hard", "mislabeled"}
    assert sum(r["region"] == "easy" for r in rows) >= 0.9 * N
    text = _last_suspects_text(tmp_path)
    assert f"Flagged share {suspects.flagged_share:.1%}; estimated noise rate {suspects.noise_rate:.1%}." in text
    assert "| region |" in text


def test_symmetric_noise_is_flagged_at_its_rate_and_kept_apart_as_mislabeled(tmp_path: Path) -> None:
    """Test that 20 % symmetric flips are flagged (F1 >= 0.9), the flagged share and the estimated noise rate
    are within 5 points of 20 %, and the flagged examples, only they, have the region ``mislabeled``."""
    data, flipped = _blobs(0.2)
    intro = _fit(tmp_path, data, 12)
    suspects = intro.mislabeled()
    assert suspects.abstained is None
    flagged = set(suspects.flagged_ids.tolist())
    tp = len(flagged & set(flipped.tolist()))
    f1 = 2 * tp / (len(flagged) + len(flipped))
    assert f1 >= 0.9, (f1, len(flagged), len(flipped))
    assert abs(suspects.flagged_share - 0.2) <= 0.05 and abs(suspects.noise_rate - 0.2) <= 0.05
    rows = _csv(intro)
    assert {int(r["index"]) for r in rows if r["region"] == "mislabeled"} == flagged
    assert all((r["flagged"] == "true") == (r["region"] == "mislabeled") for r in rows)


def test_a_short_run_abstains_with_a_warning_that_says_why(tmp_path: Path) -> None:
    """Test that after 2 epochs ``mislabeled()`` flags nothing and warns with the epoch count and what to do,
    and the report CLI prints the same reason instead of a list."""
    data, _ = _blobs(0.2)
    intro = _fit(tmp_path, data, 2)
    with pytest.warns(UserWarning, match=r"the run has 2 epochs; the automatic cut needs at least 5 .*Train longer"):
        suspects = intro.mislabeled()
    assert not suspects.flagged.any() and suspects.abstained is not None
    assert np.isnan(suspects.noise_rate)  # no estimate either
    text = _last_suspects_text(tmp_path)
    assert "estimated noise rate - (too little evidence). The automatic cut flags nothing: the run has 2 epochs" in text
    assert "cut at score" not in text  # no cut was applied
    out = io.StringIO()
    from contextlib import redirect_stdout

    with redirect_stdout(out):
        assert report_main(["report", str(tmp_path / "version_0"), "--out", str(tmp_path / "report")]) == 0
    text = out.getvalue()
    assert "flagged:" in text and "0 of 240 seen (0.0%) (the cut abstained" in text
    assert "auto -> abstains, flags none" in text and "- (too little evidence)" in text
    assert "warning: the automatic cut flags nothing: the run has 2 epochs" in text


def test_describe_puts_each_suspects_text_in_the_csv_and_tensorboard(tmp_path: Path) -> None:
    """Test that ``Introspect(describe=...)`` fills the ``text`` column of suspects.csv for every row and the
    text cell of the TensorBoard suspects table for the shown rows (the top suspect's text included)."""
    data, _ = _blobs(0.2)
    intro = _fit(tmp_path, data, 6, describe=lambda i: f"sample | number {i}")
    suspects = intro.mislabeled()
    rows = _csv(intro)
    assert [r["text"] for r in rows] == [f"sample | number {i}" for i in suspects.ids.tolist()]
    text = _last_suspects_text(tmp_path)
    assert "| text |" in text
    top = [line for line in text.splitlines() if line.startswith("| 1 |")][0]
    assert top.endswith(" sample \\| number " + top.split(" | ")[1] + " |"), top
