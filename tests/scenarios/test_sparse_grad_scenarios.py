"""Scenario: a recommender-style model whose ``nn.Embedding(sparse=True)`` makes sparse COO gradients.

A second callback records, at every optimizer step, the embedding's gradient in dense form (the coalesced
gradient: duplicate lookups summed) and its weights before and after the step: the oracle for every gradient
figure written to TensorBoard.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers.models import lightning, trainer
from helpers.tb import read_events
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_introspect import Introspect

pl = lightning("lightning.pytorch")
VOCAB, TOKENS, CLASSES = 20, 3, 4


class BagOfEmbeddings(pl.LightningModule):
    """Mean of ``TOKENS`` sparse-gradient embeddings per example, then (optionally) a dense linear head."""

    def __init__(self, optimizer: str, head: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8 if head else CLASSES, sparse=True)
        self.head = nn.Linear(8, CLASSES) if head else None
        self.optimizer = optimizer

    def forward(self, x: Tensor) -> Tensor:
        h = self.emb(x).mean(1)
        return self.head(h) if self.head is not None else h

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "sparse_adam":
            return torch.optim.SparseAdam(self.parameters(), lr=0.05)
        return torch.optim.SGD(self.parameters(), lr=0.5)


class Recorder(pl.Callback):
    """Keeps, per optimizer step, every parameter's gradient in dense form and its weights before and after."""

    def __init__(self) -> None:
        self.grads: dict[int, dict[str, Tensor]] = {}
        self.before: dict[int, dict[str, Tensor]] = {}
        self.after: dict[int, dict[str, Tensor]] = {}
        self.sparse_steps: list[int] = []

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        step = trainer.global_step
        params = dict(pl_module.named_parameters())
        if params["emb.weight"].grad.is_sparse and not params["emb.weight"].grad.is_coalesced():
            self.sparse_steps.append(step)
        self.grads[step] = {n: p.grad.to_dense().double().clone() for n, p in params.items()}
        self.before[step] = {n: p.detach().double().clone() for n, p in params.items()}

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        self.after[trainer.global_step - 1] = {n: p.detach().double().clone() for n, p in pl_module.named_parameters()}


def _norm(tensors: list[Tensor]) -> float:
    return torch.linalg.vector_norm(torch.cat([t.reshape(-1) for t in tensors])).item()


@pytest.mark.parametrize(("optimizer", "head", "accumulate"), [("sgd", True, 1), ("sgd", True, 2), ("sparse_adam", False, 1)])
def test_sparse_embedding_gradient_figures_equal_the_coalesced_oracle(
    tmp_path: Path, optimizer: str, head: bool, accumulate: int
) -> None:
    """Test that a sparse-gradient embedding trains, and its gradient, ratio and update tags equal the oracle."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, VOCAB, (96, TOKENS), generator=g)  # 16 x 3 lookups of 20 rows: duplicates in every batch
    y = torch.randint(0, CLASSES, (96,), generator=g)
    recorder = Recorder()
    intro = Introspect(every_n_steps=2, warmup_steps=0, param_grad_norms=True, activations=False, histograms=False,
                       dead_units=False)
    tr = trainer("lightning.pytorch", tmp_path, max_steps=5, accumulate_grad_batches=accumulate,
                 callbacks=[intro, recorder])
    tr.fit(BagOfEmbeddings(optimizer, head), DataLoader(TensorDataset(x, y), batch_size=16))
    assert tr.global_step == 5
    assert recorder.sparse_steps == [0, 1, 2, 3, 4]  # the gradients really were uncoalesced sparse tensors
    scalars = read_events(tmp_path / "version_0").scalars
    layers = {"emb": ["emb.weight"], **({"head": ["head.weight", "head.bias"]} if head else {})}
    sampled = [0, 2, 4]
    for layer, names in layers.items():
        for kind in ("grad_norm", "grad_to_weight", "update_to_weight"):
            assert [s for s, _ in scalars[f"{kind}/{layer}"]] == sampled, kind
    for step in sampled:
        grads, before, after = recorder.grads[step], recorder.before[step], recorder.after[step]
        at = {tag: dict(points)[step] for tag, points in scalars.items() if step in dict(points)}
        assert at["grad_norm/global"] == pytest.approx(_norm(list(grads.values())), rel=1e-5)
        assert at["param_grad_norm/emb.weight"] == pytest.approx(grads["emb.weight"].norm().item(), rel=1e-5)
        for layer, names in layers.items():
            g_norm, w_norm = _norm([grads[n] for n in names]), _norm([before[n] for n in names])
            u_norm = _norm([after[n] - before[n] for n in names])
            assert at[f"grad_norm/{layer}"] == pytest.approx(g_norm, rel=1e-5)
            assert at[f"grad_to_weight/{layer}"] == pytest.approx(g_norm / w_norm, rel=1e-5)
            assert at[f"update_to_weight/{layer}"] == pytest.approx(u_norm / w_norm, rel=1e-4)
        assert at["update_to_weight/global"] == pytest.approx(
            _norm([after[n] - before[n] for n in grads]) / _norm(list(before.values())), rel=1e-4)
