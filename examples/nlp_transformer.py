"""A small causal Transformer language model on real text (the Python docs that ship with Python), with `Introspect`.

The text is `pydoc_data.topics` (the `help()` pages of the standard library, offline). Each training
example is one fixed window of characters; its per-token losses are folded into per-window dynamics.
For language data a "suspect" is not a wrong label: it is a window the model finds hard or keeps
forgetting (tables, grammar notation, code, rare characters, text cut at a topic end). To measure the
ranking, ``--noise`` (default 5 %) corrupts a seeded share of the windows: their next-character targets are
replaced by random characters, the sequence counterpart of a wrong label. The script prints how many of
the lowest-ranked windows are corrupted ones, the flagged share and the estimated noise rate (or why the
automatic cut abstains: a character model does not fit its windows, so it should not flag), and the text of
each suspect is in ``suspects.csv`` (column ``text``) and the TensorBoard suspects table.

    python examples/nlp_transformer.py [--out runs/nlp] [--epochs 8] [--windows 2048] [--noise 0.05]
    tensorboard --logdir runs/nlp
"""
from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from pydoc_data.topics import topics
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from lightning_introspect import Introspect, WithIndex

PAD, IGNORE = 0, -100  # input id of padding; target value the loss (and Introspect) skips


def windows(seq_len: int, max_windows: int, seed: int = 0) -> tuple[TensorDataset, list[str]]:
    """Non-overlapping windows of each topic (a seeded subset of ``max_windows`` of them, in corpus order):
    inputs (T,) char ids, targets (T,) next-char ids (IGNORE past the topic's end). The vocabulary is every
    character of the corpus; id 0 is padding."""
    vocab = ["<pad>", *sorted(set("".join(topics.values())))]
    index = {c: i for i, c in enumerate(vocab)}
    xs, ys = [], []
    for name in sorted(topics):
        ids = [index[c] for c in topics[name]]
        for s in range(0, len(ids) - 1, seq_len):
            chunk, pad = ids[s : s + seq_len + 1], seq_len + 1 - len(ids[s : s + seq_len + 1])
            xs.append(chunk[:-1] + [PAD] * pad)
            ys.append(chunk[1:] + [IGNORE] * pad)
    keep = torch.randperm(len(xs), generator=torch.Generator().manual_seed(seed))[:max_windows].sort().values
    return TensorDataset(torch.tensor(xs)[keep], torch.tensor(ys)[keep]), vocab


def corrupt(data: TensorDataset, share: float, vocab_size: int, seed: int = 0) -> np.ndarray:
    """Replace the targets of a seeded ``share`` of the windows by random characters, in place (ignored
    positions stay ignored); returns the sorted ids of the corrupted windows."""
    g = torch.Generator().manual_seed(seed)
    n = len(data)
    ids = torch.randperm(n, generator=g)[: int(round(share * n))].sort().values
    targets = data.tensors[1]
    noise = torch.randint(1, vocab_size, targets[ids].shape, generator=g)
    targets[ids] = torch.where(targets[ids] == IGNORE, targets[ids], noise)
    return ids.numpy()


class CharTransformer(pl.LightningModule):
    def __init__(self, vocab_size: int, seq_len: int, d_model: int = 64, layers: int = 2, lr: float = 3e-3) -> None:
        super().__init__()
        self.lr = lr
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Parameter(torch.randn(seq_len, d_model) * 0.02)
        block = nn.TransformerEncoderLayer(d_model, nhead=4, dim_feedforward=4 * d_model, dropout=0.0,
                                           activation=nn.ReLU(), batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(block, layers, norm=nn.LayerNorm(d_model), enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab_size)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq_len), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos[: x.shape[1]]
        return self.head(self.encoder(h, mask=self.mask[: x.shape[1], : x.shape[1]], is_causal=True))

    def training_step(self, batch, batch_idx):
        x, y, _ = batch  # WithIndex appends the window's id
        logits = self(x)  # (N, T, C)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE)
        self.log("train_loss", loss, prog_bar=True)
        return {"loss": loss, "logits": logits.detach(), "targets": y}

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=1e-2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/nlp")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (-1: no limit)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--windows", type=int, default=2048, help="train on this many windows (of ~7300)")
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--noise", type=float, default=0.05, help="share of windows with random targets")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    data, vocab = windows(args.seq_len, args.windows)
    corrupted = corrupt(data, args.noise, len(vocab))
    loader = DataLoader(WithIndex(data), batch_size=64, shuffle=True)

    def describe(i: int) -> str:  # the window's text, for the suspects tables
        x, y = data[i]
        return "".join(vocab[int(c)] for c in x[y != IGNORE])

    introspect = Introspect(every_n_steps=20, ignore_index=IGNORE, describe=describe)
    logger = TensorBoardLogger(args.out, name="", version=time.strftime("run-%Y%m%d-%H%M%S"))
    trainer = pl.Trainer(max_epochs=args.epochs, max_steps=args.max_steps, callbacks=[introspect], logger=logger,
                         enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                         log_every_n_steps=20, accelerator="cpu")
    t0 = time.perf_counter()
    trainer.fit(CharTransformer(len(vocab), args.seq_len), loader)
    print(f"\n{len(data)} windows of {args.seq_len} characters from {len(topics)} help topics, vocabulary "
          f"{len(vocab)}; trained {trainer.current_epoch} epochs in {time.perf_counter() - t0:.0f} s.")
    print(f"TensorBoard logs: {logger.log_dir}   (tensorboard --logdir {args.out})\n")

    rec = introspect.core.records()
    seen = np.maximum(rec["seen_epochs"], 1)
    loss, aum = rec["loss_sum"] / seen, rec["margin_sum"] / seen

    def table(title: str, ids: np.ndarray) -> None:
        print(title)
        for i in ids:
            x, y = data[i]
            text = "".join(vocab[int(c)] for c in x[y != IGNORE]).replace("\n", "⏎")
            print(f"  #{i:<5d} loss {loss[i]:.2f}  AUM {aum[i]:+.2f}  forgot {rec['forgetting_events'][i]}  {text!r}")

    print("What the figures mean for text (each is first averaged over a window's tokens, then over epochs):\n"
          f"  loss   = next-character cross-entropy in nats ({np.log(len(vocab)):.1f} = ln {len(vocab)}: a uniform "
          "guess);\n"
          "  AUM    = area under the margin: logit of the true next character minus the best other one (< 0: the\n"
          "           model mostly predicts another character there);\n"
          "  forgot = forgetting events: epochs in which the window's token accuracy fell from >= 50 % back below.\n"
          "A window with high loss / low AUM is hard or atypical text (grammar notation, code, tables, rare symbols,\n"
          "URLs) or noise; one that is forgotten sits at the edge of what the model has learned. Neither is a\n"
          "'wrong label': the ranking points at the text the model finds least like the rest.\n")
    with warnings.catch_warnings(record=True):  # the abstention is printed below
        warnings.simplefilter("always")
        suspects = introspect.mislabeled()
    if len(corrupted):
        k = len(corrupted)
        hits = np.isin(suspects.ids[:k], corrupted).sum()
        print(f"Injected noise: {k} of {len(data)} windows ({k / len(data):.1%}) have random targets; "
              f"{hits} of the {k} lowest-ranked windows are corrupted ones (precision@k {hits / k:.0%}).")
    rate = f"{suspects.noise_rate:.1%}" if np.isfinite(suspects.noise_rate) else "- (too little evidence)"
    print(f"Flagged: {int(suspects.flagged.sum())} windows ({suspects.flagged_share:.1%}); estimated noise "
          f"rate {rate}." + ("" if suspects.abstained is None else
                                                 f" The automatic cut abstains: {suspects.abstained}") + "\n")
    hardest = introspect.mislabeled(method="aum", cut=0).ids  # ranked by AUM, lowest first
    table(f"Hardest windows (lowest AUM; {np.mean(aum < 0):.0%} of all windows have AUM < 0 so far):",
          hardest[: args.top])
    forgotten = np.lexsort((-loss, -rec["forgetting_events"]))[: args.top]
    table("\nMost-forgotten windows (learned, then lost again; ties broken by loss):"
          + ("" if rec["forgetting_events"].any() else " none yet, train longer"),
          forgotten[rec["forgetting_events"][forgotten] > 0])
    table("\nEasiest windows, for contrast:", hardest[::-1][:3])

if __name__ == "__main__":
    main()
