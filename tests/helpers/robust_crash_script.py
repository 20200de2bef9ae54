"""Trains until killed: epoch 0 is quick, epoch 1 is slow (a sleep per step), so a test can SIGKILL it
mid-epoch once epoch 0's records are on disk. ``python robust_crash_script.py OUT``; writes
``OUT/epoch1_started`` when epoch 1 begins."""
from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import lightning.pytorch as pl
from robust_common import loader, make_data, tiny_model, trainer_kwargs  # the script's folder is on sys.path

from lightning_introspect import Introspect


class SlowAfterFirstEpoch(pl.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.current_epoch == 1:
            (self.out / "epoch1_started").write_text("1")

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        if trainer.current_epoch >= 1:
            time.sleep(0.05)


def main() -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    trainer = pl.Trainer(**trainer_kwargs(out, max_epochs=50, callbacks=[
        Introspect(every_n_steps=1, warmup_steps=0), SlowAfterFirstEpoch(out)]))
    trainer.fit(tiny_model(0), loader(make_data(400), batch_size=4))


if __name__ == "__main__":
    main()
