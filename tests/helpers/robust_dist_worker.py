"""A plain-loop worker for the uneven-batches DDP test: torch + the core only (no Lightning import).

Each of the gloo processes runs its own number of steps per epoch, flushing every step and ending every
epoch, so that the header-round protocol of :mod:`lightning_introspect.core.dist` must pair a rank that is
flushing with a rank already at its epoch end.
"""
from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lightning_introspect.core import IntrospectConfig, Introspector

BATCH = 2


def ids_of(rank: int, k: int) -> list[int]:
    """Ids of rank ``rank``'s ``k``-th batch: rank 0 uses ids 0.., rank 1 ids 100.. (disjoint)."""
    return [100 * rank + BATCH * k + j for j in range(BATCH)]


def uneven_worker(rank: int, world: int, init_file: str, scenarios: Sequence[tuple[str, Sequence[Sequence[int]]]],
                  budget_out: Optional[str] = None) -> None:
    """For each ``(out, steps)`` scenario, in turn: runs ``steps[rank][epoch]`` steps in each epoch, with a fresh
    model and Introspector; rank 0 writes records and events under ``out``, every rank ``out/rank{r}.json``.
    Then, with ``budget_out``, the overhead-budget scenario (:func:`_budget_scenario`)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=40))
    try:
        for out, steps in scenarios:
            _scenario(rank, out, steps)
            dist.barrier()
        if budget_out is not None:
            _budget_scenario(rank, budget_out)
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _budget_scenario(rank: int, out: str, steps: int = 160) -> None:
    """Overhead budget under DDP with ranks that measure different costs: rank 1's sampled steps are made 4 ms
    slower than rank 0's, so the ranks propose different intervals. Writes the sampled steps and the final
    interval of this rank to ``out/budget_rank{r}.json``."""
    Path(out).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = IntrospectConfig(every_n_steps=2, warmup_steps=0, overhead_budget=0.05, histograms=False)
    intro = Introspector(model, cfg, num_examples=200)
    gen = torch.Generator().manual_seed(rank)
    sampled_steps = []
    for step in range(steps):
        x, y = torch.randn(BATCH, 4, generator=gen), torch.randint(0, 3, (BATCH,), generator=gen)
        with intro.step(step) as sampled:
            _train_step(model, opt, intro, x, y)
            time.sleep(0.001 + (0.001 + 0.004 * rank if sampled else 0.0))
        if sampled:
            sampled_steps.append(step)
    intro.end_epoch(0, steps)
    intro.close()
    Path(out, f"budget_rank{rank}.json").write_text(
        json.dumps({"sampled": sampled_steps, "interval": intro.schedule.interval})
    )


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, intro: Introspector, x: torch.Tensor,
                y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One plain-loop step with gradient figures read between backward and the optimizer step."""
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    opt.zero_grad()
    loss.backward()
    intro.observe_gradients(opt)
    opt.step()
    return logits, loss


def _scenario(rank: int, out: str, steps: Sequence[Sequence[int]]) -> None:
    Path(out).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sinks = []
    if rank == 0:
        from lightning_introspect.sinks.tensorboard import TensorBoardSink

        sinks.append(TensorBoardSink(str(Path(out) / "tb")))
    cfg = IntrospectConfig(every_n_steps=1, warmup_steps=0, dead_window=1, histograms=False)
    intro = Introspector(model, cfg, sinks=sinks, records_dir=Path(out) / "introspect", num_examples=200)
    gen = torch.Generator().manual_seed(rank)
    step = 0
    for epoch, n_steps in enumerate(steps[rank]):
        for k in range(n_steps):
            x, y = torch.randn(BATCH, 4, generator=gen), torch.randint(0, 3, (BATCH,), generator=gen)
            ids = torch.tensor(ids_of(rank, k))
            with intro.step(step):
                logits, loss = _train_step(model, opt, intro, x, y)
                intro.observe_batch(ids, targets=y, logits=logits, loss=loss)
            step += 1
        intro.end_epoch(epoch, step)
    intro.close()
    records = {k: v.tolist() for k, v in intro.records().items()}
    Path(out, f"rank{rank}.json").write_text(json.dumps({"steps": step, "records": records}))
