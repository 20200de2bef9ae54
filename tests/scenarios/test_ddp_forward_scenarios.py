"""DDP with a ``training_step`` that calls ``self(x)`` and returns only the loss: the logits come from the
LightningModule's own forward, not from the call through which the strategy runs ``training_step``.

Lightning's DDP strategy runs ``training_step`` inside ``DistributedDataParallel.forward``, which calls the
LightningModule with its ``forward`` swapped for ``training_step``: a forward hook on the module fires twice a
step, the second time with the step's scalar loss. The oracle is one process over the same global batches
(as in tests/test_distributed.py), also taking its logits from the forward.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from helpers.robust_common import (
    DDP_INTROSPECT,
    DDPOrderBatchSampler,
    TinyNet,
    ddp_global_batches,
    make_data,
    tiny_model,
    trainer_kwargs,
)
from lightning_introspect import Introspect, WithIndex
from lightning_introspect.records import read_records

N, PER_RANK_BATCH, EPOCHS = 21, 3, 2  # 21 is odd: the sampler pads one duplicate
HELPERS = Path(__file__).parents[1] / "helpers"


def _env() -> dict[str, str]:
    root = str(Path(__file__).parents[2])  # children import this checkout's package
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo",
            "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One process over the global batches of the 2-rank run, logits from the forward."""
    root = tmp_path_factory.mktemp("single_forward")
    loader = torch.utils.data.DataLoader(WithIndex(make_data(N)), batch_sampler=DDPOrderBatchSampler(N, 2, PER_RANK_BATCH))
    trainer = pl.Trainer(**trainer_kwargs(root, max_epochs=EPOCHS, callbacks=[Introspect(**DDP_INTROSPECT)]))
    trainer.fit(tiny_model(0, return_logits=False), loader)
    return read_records(root / "run")[0]


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_ddp_takes_logits_from_the_forward_when_the_step_returns_only_the_loss(
    tmp_path: Path, reference: dict[str, Any], strategy: str
) -> None:
    """Test that under DDP a training_step returning only the loss gets per-example records for every id from
    both ranks, equal to one process over the same global batches."""
    cmd = [sys.executable, str(HELPERS / "ddp_forward_script.py"), str(tmp_path), strategy, str(N),
           str(PER_RANK_BATCH), str(EPOCHS)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=150, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records, meta = read_records(tmp_path / "run")
    assert meta["num_classes"] == 3 and meta["task"] == "classification"
    assert records["seen_epochs"].tolist() == [EPOCHS] * N  # every id, from both ranks, in each epoch
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    covered = {i for r in ranks for batch in r["batches"] for i in batch}
    assert covered == set(range(N))
    assert all(r["batches"] for r in ranks)  # both ranks trained
    batches = sum((ddp_global_batches(N, 2, PER_RANK_BATCH, e) for e in range(EPOCHS)), [])
    assert [a + b for a, b in zip(ranks[0]["batches"], ranks[1]["batches"])] == batches
    for key, ref in reference.items():
        np.testing.assert_allclose(records[key], ref, rtol=1e-4, atol=1e-5, err_msg=key)


class _LossForward(TinyNet):
    """TinyNet whose ``forward`` returns the mean of the logits (a scalar), never the logits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).mean()

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        return self(batch[0])


def test_a_forward_that_returns_no_logits_is_a_clear_error(tmp_path: Path) -> None:
    """Test that a forward output that is not (N, C) logits, with none in the step output, stops the first batch
    with an error naming the shape and what to return."""
    loader = torch.utils.data.DataLoader(WithIndex(make_data(N)), batch_size=PER_RANK_BATCH)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[Introspect(**DDP_INTROSPECT)]))
    with pytest.raises(ValueError, match=r"forward returned a tensor of shape \(\), not logits"):
        trainer.fit(_LossForward(), loader)
