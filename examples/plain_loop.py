"""The framework-agnostic core in a plain PyTorch loop: no Lightning, a few calls per step.

An MLP on scikit-learn's handwritten digits with 10 % of the training labels flipped (seeded). The
`Introspector` records layer statistics on sampled steps and per-example dynamics on every step; the
`TensorBoardSink` writes them; the ids come from `WithIndex`. Ends with the top mislabel suspects.

    python examples/plain_loop.py [--out runs/plain] [--epochs 25]
    tensorboard --logdir runs/plain
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_introspect import IntrospectConfig, Introspector, WithIndex
from lightning_introspect.sinks import TensorBoardSink


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/plain")
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--noise", type=float, default=0.1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    flipped = rng.choice(len(y), size=int(args.noise * len(y)), replace=False)
    y[flipped] = (y[flipped] + rng.integers(1, 10, size=len(flipped))) % 10  # another class, uniformly
    data = WithIndex(TensorDataset(torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)))
    loader = DataLoader(data, batch_size=64, shuffle=True)

    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    out = Path(args.out) / "mlp"  # one run folder: TensorBoard names the run after it
    intro = Introspector(  # every 10th step (after 5 warm-up steps): activations, dead units, gradient norms
        model, IntrospectConfig(every_n_steps=10), sinks=[TensorBoardSink(out)], records_dir=out / "introspect",
        num_examples=len(data), class_names=[str(d) for d in range(10)],
    )
    step = 0
    for epoch in range(args.epochs):
        for xb, yb, ids in loader:
            with intro.step(step):  # hooks are attached only if this step is sampled
                logits = model(xb)
                loss = F.cross_entropy(logits, yb)
                opt.zero_grad()
                intro.before_backward()  # optional: the writer thread works while backward runs (no GIL)
                loss.backward()
                intro.after_backward()
                intro.observe_gradients(opt)  # gradient norms (sampled steps) and the real update size
                opt.step()
                intro.observe_batch(ids, targets=yb, logits=logits.detach(), loss=loss)  # every step
            step += 1
        intro.end_epoch(epoch, step)  # folds the epoch's per-example figures, writes samples.npz
    intro.close()  # flushes and waits for the background writer

    suspects = intro.mislabeled()
    print(f"{step} steps; TensorBoard logs and records in {out} (tensorboard --logdir {args.out})")
    print(f"{len(flipped)} labels flipped; the automatic cut flags {int(suspects.flagged.sum())}, "
          f"{np.isin(suspects.flagged_ids, flipped).mean():.0%} of them flipped ones. Top 10 suspects:")
    print("  rank     id  given  score  AUM    flipped?")
    for r, (i, s) in enumerate(zip(suspects.ids[:10], suspects.scores[:10])):
        print(f"  {r + 1:>4d} {i:>6d} {suspects.labels[r]:>6d}  {s:.3f} {suspects.columns['aum'][r]:+6.2f}  "
              f"{'yes' if i in flipped else 'no'}")


if __name__ == "__main__":
    main()
