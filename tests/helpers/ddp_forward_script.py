"""Trains TinyNet with Introspect on 2 CPU processes (gloo), ``training_step`` returning only the loss.

Run by tests/scenarios/test_ddp_forward_scenarios.py as ``python ddp_forward_script.py OUT STRATEGY N BATCH
EPOCHS``: Lightning's ``ddp`` re-launches this file for rank 1, ``ddp_spawn`` forks it. Rank 0's logger and
Introspect write under ``OUT/run``; each rank writes ``OUT/rank{r}.json`` (see ``RankReport``).
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from robust_common import DDP_INTROSPECT, RankReport, loader, make_data, tiny_model, trainer_kwargs

from lightning_introspect import Introspect


def main() -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    out, strategy, n, batch, epochs = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    model = tiny_model(0, return_logits=False)  # Introspect takes the logits from the forward
    intro = Introspect(**DDP_INTROSPECT, sample_dynamics=True)
    trainer = pl.Trainer(**trainer_kwargs(out, strategy=strategy, devices=2, max_epochs=epochs,
                                          callbacks=[intro, RankReport(out)]))
    trainer.fit(model, loader(make_data(n), batch_size=batch))


if __name__ == "__main__":
    main()
