"""Shared pieces of the robustness tests (DDP, precision, compile, loops, resume, bad input, crashes).

Imported by the tests as ``helpers.robust_common`` and by the subprocess scripts next to it as
``robust_common`` (a script's own folder is first on ``sys.path``). Torch, Lightning and tensorboard only.
"""
from __future__ import annotations

import atexit
import json
from pathlib import Path
from typing import Any, Iterator, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from lightning_introspect import Introspect, WithIndex

IN_FEATURES, HIDDEN, CLASSES = 6, 8, 3


def make_data(n: int = 21, seed: int = 0) -> TensorDataset:
    """``n`` examples of 6 features and a class in [0, 3), from an explicit generator."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN_FEATURES, generator=g)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return TensorDataset(x, y)


class TinyNet(pl.LightningModule):
    """Linear -> ReLU -> Linear, SGD; returns its logits from ``training_step``.

    Args:
        lr: SGD learning rate.
        compile_net: wrap the inner ``nn.Sequential`` in ``torch.compile`` (the LightningModule stays eager).
        return_logits: put the logits into the step output (else Introspect takes the forward output).
    """

    def __init__(self, lr: float = 0.1, *, compile_net: bool = False, return_logits: bool = True) -> None:
        super().__init__()
        self.lr = lr
        self.return_logits = return_logits
        net = nn.Sequential(nn.Linear(IN_FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))
        self.net = torch.compile(net) if compile_net else net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y, _ = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        return {"loss": loss, "logits": logits.detach()} if self.return_logits else loss

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y, _ = batch
        return F.cross_entropy(self(x), y)

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.validation_step(batch, batch_idx)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def tiny_model(seed: int = 0, **kwargs: Any) -> TinyNet:
    """A :class:`TinyNet` with weights from ``seed``."""
    torch.manual_seed(seed)
    return TinyNet(**kwargs)


def ddp_global_batches(n: int, world: int, per_rank_batch: int, epoch: int, *, seed: int = 0) -> list[list[int]]:
    """The global batches of a Lightning DDP run: step k holds batch k of every rank, rank 0 first.

    Lightning gives a training loader a ``DistributedSampler(shuffle=True, seed=0)`` and calls its
    ``set_epoch``; the sampler pads the shuffled index list with its first indices up to a multiple of
    ``world`` (duplicates) and gives rank r the indices ``r::world``; each rank cuts its share into batches.
    """
    from torch.utils.data import DistributedSampler

    shares = []
    for r in range(world):
        sampler = DistributedSampler(range(n), num_replicas=world, rank=r, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        shares.append(list(sampler))
    steps = -(-len(shares[0]) // per_rank_batch)
    return [
        [i for share in shares for i in share[k * per_rank_batch : (k + 1) * per_rank_batch]] for k in range(steps)
    ]


class DDPOrderBatchSampler(Sampler[list[int]]):
    """Yields, in one process, the global batches of a 2-rank DDP run (:func:`ddp_global_batches`), epoch by
    epoch (Lightning calls ``set_epoch`` on ``loader.batch_sampler.sampler``: here the batch sampler itself)."""

    def __init__(self, n: int, world: int, per_rank_batch: int) -> None:
        self.n, self.world, self.per_rank_batch, self.epoch = n, world, per_rank_batch, 0
        self.sampler = self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        return iter(ddp_global_batches(self.n, self.world, self.per_rank_batch, self.epoch))

    def __len__(self) -> int:
        return len(ddp_global_batches(self.n, self.world, self.per_rank_batch, 0))


def trainer_kwargs(root: Path, **overrides: Any) -> dict[str, Any]:
    """Fast CPU Trainer settings with a real TensorBoardLogger under ``root``."""
    from lightning.pytorch.loggers import TensorBoardLogger

    kwargs: dict[str, Any] = dict(
        default_root_dir=str(root), accelerator="cpu", devices=1, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
        logger=TensorBoardLogger(str(root), name="", version="run"),
    )
    kwargs.update(overrides)
    return kwargs


def loader(data: Any, *, batch_size: int = 4, shuffle: bool = False, seed: Optional[int] = None,
           **kwargs: Any) -> DataLoader:
    """A DataLoader over ``WithIndex(data)``; a seeded generator when shuffling."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(WithIndex(data), batch_size=batch_size, shuffle=shuffle, generator=gen, **kwargs)


def read_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """All scalar points under ``logdir`` (every event file, recursively), sorted by step per tag."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(Path(logdir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return {tag: sorted(points) for tag, points in out.items()}


def layer_tags(scalars: dict[str, list[tuple[int, float]]]) -> list[str]:
    """The layer-statistic tags (activations, dead units, gradient norms), without bookkeeping tags."""
    prefixes = ("activation_", "dead_", "grad_norm/", "grad_to_weight/", "update_to_weight/")
    return sorted(t for t in scalars if t.startswith(prefixes))


DDP_INTROSPECT = dict(every_n_steps=1, warmup_steps=0, dead_window=2, histograms=False)
"""Introspect settings of the DDP comparison: every step sampled, short dead-unit windows."""


class RankReport(pl.Callback):
    """Writes, per rank, the sample ids of its batches, whether its Introspector writes, and its records."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.batches: list[list[int]] = []

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        # In each worker: Lightning destroys only an NCCL process group at exit. A gloo group left alive until
        # the interpreter's teardown occasionally aborted a ddp_spawn worker after `fit` had finished
        # ("terminate called without an active exception", SIGABRT): destroy it first, as Lightning does NCCL's.
        atexit.register(_destroy_process_group)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.batches.append(batch[-1].tolist())

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        core = next(c for c in trainer.callbacks if isinstance(c, Introspect)).core
        info = {"rank": trainer.global_rank, "world": trainer.world_size, "is_writer": core.is_writer,
                "sinks": len(core.sinks), "batches": self.batches, "records_in_memory": {k: v.tolist() for k, v in core.records().items()}}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(info))


def _destroy_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def fit_ddp(out: Path, strategy: str, *, n: int, batch: int, epochs: int) -> None:
    """Trains TinyNet on 2 CPU processes with ``strategy``; rank 0 logs under ``out/run``."""
    model = tiny_model(0)
    intro = Introspect(**DDP_INTROSPECT)
    trainer = pl.Trainer(**trainer_kwargs(out, strategy=strategy, devices=2, max_epochs=epochs,
                                          callbacks=[intro, RankReport(out)]))
    trainer.fit(model, loader(make_data(n), batch_size=batch))
