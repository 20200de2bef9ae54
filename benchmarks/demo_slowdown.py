"""Slowdown of the README demo (examples/digits.py) with `Introspect` against the same run without it.

    python benchmarks/demo_slowdown.py [--epochs 30] [--repeats 3]

The same training (the demo's CNN, data, seed and recipe) runs bare and with the demo's callback
(`Introspect(every_n_steps=10)`, per-example dynamics on), alternating bare / with, `--repeats` times, in one
process. Printed: each fit's wall time (epoch ends, records, TensorBoard writing and the data map
included, as a user sees it), the median ratio and its min-max. 1 torch thread, as the demo.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402

from digits import DigitsCNN, digits  # noqa: E402
from lightning_introspect import Introspect, WithIndex  # noqa: E402


def fit(with_callback: bool, epochs: int, root: str) -> float:
    pl.seed_everything(0, verbose=False)
    data, _ = digits(0.1)
    loader = DataLoader(WithIndex(data), batch_size=64, shuffle=True)
    callbacks = [Introspect(every_n_steps=10)] if with_callback else []
    trainer = pl.Trainer(
        max_epochs=epochs, callbacks=callbacks, logger=TensorBoardLogger(root, name="demo"),
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False, accelerator="cpu",
        log_every_n_steps=10,
    )
    t0 = time.perf_counter()
    trainer.fit(DigitsCNN(), loader)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    root = tempfile.mkdtemp(prefix="demo-slowdown-")
    fit(False, 1, root)  # warm-up: imports, first allocations
    bare, withcb = [], []
    for _ in range(args.repeats):
        bare.append(fit(False, args.epochs, root))
        withcb.append(fit(True, args.epochs, root))
    ratios = [w / b for w, b in zip(withcb, bare)]
    print(f"demo ({args.epochs} epochs, 1 thread): bare {', '.join(f'{t:.1f}' for t in bare)} s; "
          f"with Introspect {', '.join(f'{t:.1f}' for t in withcb)} s")
    print(f"slowdown: median {statistics.median(ratios):.3f}x (min {min(ratios):.3f}, max {max(ratios):.3f}) "
          f"over {args.repeats} alternating pairs")


if __name__ == "__main__":
    main()
