"""The main demo: a small CNN on the real handwritten digits of scikit-learn, with `Introspect`.

10 % of the training labels are flipped (seeded) so that there is something to find. Runs in about a
minute on 2 CPU cores, writes TensorBoard logs and ends with the mislabeled-examples report.

    python examples/digits.py [--out runs/digits] [--epochs 30] [--noise 0.1]
    tensorboard --logdir runs/digits
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from lightning_introspect import Introspect, WithIndex
from lightning_introspect.report import main as report


def digits(noise: float, seed: int = 0) -> tuple[TensorDataset, np.ndarray, np.ndarray]:
    """The 1797 digits as (1, 8, 8) standardized images, a seeded share of labels flipped to another class;
    also the flipped ids and the true labels."""
    x, y = load_digits(return_X_y=True)
    x = (x - x.mean()) / x.std()
    rng = np.random.default_rng(seed)
    flipped = rng.choice(len(y), size=int(round(noise * len(y))), replace=False)
    noisy = y.copy()
    noisy[flipped] = (y[flipped] + rng.integers(1, 10, size=len(flipped))) % 10  # uniform over the others
    data = TensorDataset(torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8), torch.tensor(noisy))
    return data, np.sort(flipped), y


class DigitsCNN(pl.LightningModule):
    """The network and recipe of benchmarks/mislabeled.py (AdamW, lr 1e-3, weight decay 1e-4, batch 64)."""

    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.lr = lr
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def training_step(self, batch, batch_idx):
        x, y, _ = batch  # WithIndex appends the sample id
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log("train_loss", loss, prog_bar=True)
        return {"loss": loss, "logits": logits.detach()}

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=1e-4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/digits")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for this tiny CNN)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pl.seed_everything(0, verbose=False)
    data, flipped, truth = digits(args.noise)
    loader = DataLoader(WithIndex(data), batch_size=64, shuffle=True)
    introspect = Introspect(every_n_steps=10, class_names=[str(d) for d in range(10)])
    logger = TensorBoardLogger(args.out, name="", version=time.strftime("run-%Y%m%d-%H%M%S"))
    trainer = pl.Trainer(
        max_epochs=args.epochs, callbacks=[introspect], logger=logger, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False, log_every_n_steps=10, accelerator="cpu",
    )
    t0 = time.perf_counter()
    trainer.fit(DigitsCNN(), loader)
    print(f"\nTrained {args.epochs} epochs in {time.perf_counter() - t0:.0f} s. TensorBoard logs: {logger.log_dir}")
    print(f"  open them with:  tensorboard --logdir {args.out}   (then http://localhost:6006)\n")

    suspects = introspect.mislabeled()
    top = suspects.ids[: len(flipped)]
    hit = np.isin(top, flipped).mean()
    flagged = suspects.ids[suspects.flagged]
    print(f"{len(flipped)} labels were flipped; {hit:.0%} of the top {len(flipped)} suspects are flipped ones; the "
          f"automatic cut flags {len(flagged)}, of which {np.isin(flagged, flipped).mean():.0%} are flipped.")
    caught = np.isin(flagged, flipped)
    right = suspects.suggested_labels[suspects.flagged][caught] == truth[flagged[caught]]
    if caught.any():
        print(f"The suggested label is the true one for {right.sum()} of the {caught.sum()} flagged flips "
              f"({right.mean():.1%}).")
    print()
    report(["report", str(Path(logger.log_dir)), "--top", "15"])


if __name__ == "__main__":
    main()
