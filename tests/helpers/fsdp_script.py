"""Trains :class:`ShardedNet` with Introspect under Lightning's ``ModelParallelStrategy`` (FSDP2's
``fully_shard``) on 2 CPU processes (gloo), or in one process with ``single``.

Run by tests/scenarios/test_fsdp_scenarios.py as ``python fsdp_script.py OUT fsdp`` (Lightning re-launches this
file for rank 1) and imported by it for the one-process reference. Both ranks get the same batches (no
distributed sampler): FSDP2 averages their equal gradients, so every figure must equal one process's.
Rank 0's logger and Introspect write under ``OUT/run``.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_introspect import Introspect, WithIndex

N, BATCH, EPOCHS, CLIP = 12, 4, 2, 0.5
INTROSPECT = dict(every_n_steps=1, warmup_steps=0, dead_window=2, histograms=False, param_grad_norms=True)


class ShardedNet(pl.LightningModule):
    """Linear(6, 10) -> ReLU -> Linear(10, 3), SGD with momentum; under a device mesh each Linear and the whole
    net are ``fully_shard``-ed (10 rows: rank 0 and 1 hold 5 each; 3 rows: 2 and 1)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))

    def configure_model(self) -> None:
        if self.device_mesh is None:  # one process: nothing to shard
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in (self.net[0], self.net[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y, _ = batch
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, y), "logits": logits.detach()}

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(N, 6, generator=g), torch.randint(0, 3, (N,), generator=g))


def fit(out: Path, mode: str) -> None:
    """One fit: ``mode`` "fsdp" (2 processes, ModelParallelStrategy) or "single"; logs under ``out/run``."""
    kwargs: dict[str, Any] = dict(accelerator="cpu", devices=1)
    if mode == "fsdp":
        from lightning.pytorch.strategies import ModelParallelStrategy

        kwargs = dict(accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), use_distributed_sampler=False)
    trainer = pl.Trainer(
        **kwargs, default_root_dir=str(out), max_epochs=EPOCHS, gradient_clip_val=CLIP, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
        logger=TensorBoardLogger(str(out), name="", version="run"), callbacks=[Introspect(**INTROSPECT)],
    )
    loader = DataLoader(WithIndex(data()), batch_size=BATCH, shuffle=False)
    try:
        trainer.fit(ShardedNet(), loader)
    finally:
        if mode == "fsdp" and torch.distributed.is_initialized():  # gloo's group is not destroyed by Lightning
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    fit(Path(sys.argv[1]), sys.argv[2])
