"""Trains TinyNet with Introspect on 2 CPU processes (gloo) and writes what each rank saw.

Run by tests/test_distributed.py as ``python robust_ddp_script.py OUT STRATEGY N BATCH EPOCHS``: Lightning's
``ddp`` strategy re-launches this file for rank 1, ``ddp_spawn`` forks it through torch.multiprocessing.
Each rank writes ``OUT/rank{r}.json``; rank 0's logger and Introspect write under ``OUT/run``.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from robust_common import fit_ddp  # the script's folder is first on sys.path


def main() -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    out, strategy, n, batch, epochs = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    fit_ddp(out, strategy, n=n, batch=batch, epochs=epochs)


if __name__ == "__main__":
    main()
