"""DDP on 2 CPU processes (gloo): figures describe the global batch, per-example dynamics merge by id,
sampler padding does not distort them, only rank 0 writes, and uneven batch counts never hang.

Reference design: Lightning gives the training loader a ``DistributedSampler(shuffle=True, seed=0)``, which
shuffles 21 indices per epoch, pads them to 22 (one index twice) and gives rank r the indices ``r::2``; each
rank cuts its 11 into batches of 3 (3, 3, 3, 2). One process whose batch k is the union of both ranks'
batch k (:func:`ddp_global_batches`, built with the same sampler class) sees the same examples at the same steps, and, because both ranks' batches have equal sizes, DDP's averaged gradient
equals that process's mean-loss gradient. So its activation statistics, gradient norms and per-example
records must match the DDP run within float tolerance.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import lightning.pytorch as pl
from helpers.robust_common import (
    DDP_INTROSPECT,
    DDPOrderBatchSampler,
    ddp_global_batches,
    fit_ddp,
    layer_tags,
    make_data,
    read_scalars,
    tiny_model,
    trainer_kwargs,
)
from helpers.robust_dist_worker import BATCH, ids_of, uneven_worker
from lightning_introspect import Introspect, WithIndex
from lightning_introspect.records import read_records

N, PER_RANK_BATCH, EPOCHS = 21, 3, 2  # 21 is odd: the sampler pads one duplicate (id 0)
HELPERS = Path(__file__).parent / "helpers"
_ENV = {**os.environ, "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One process, batch 2b over the interleaved order the DistributedSampler produces."""
    root = tmp_path_factory.mktemp("single")
    sampler = DDPOrderBatchSampler(N, 2, PER_RANK_BATCH)
    loader = torch.utils.data.DataLoader(WithIndex(make_data(N)), batch_sampler=sampler)
    intro = Introspect(**DDP_INTROSPECT)
    trainer = pl.Trainer(**trainer_kwargs(root, max_epochs=EPOCHS, callbacks=[intro]))
    trainer.fit(tiny_model(0), loader)
    return {"scalars": read_scalars(root / "run"), "records": read_records(root / "run")[0]}


def _check_against_reference(out: Path, reference: dict[str, Any]) -> None:
    scalars = read_scalars(out / "run")
    ref = reference["scalars"]
    tags = layer_tags(ref)
    assert {"activation_mean/net.0", "activation_max/net.1", "dead_fraction/net.1", "grad_norm/global"} <= set(tags)
    assert layer_tags(scalars) == tags
    for tag in tags:
        steps, values = zip(*scalars[tag])
        ref_steps, ref_values = zip(*ref[tag])
        assert steps == ref_steps, tag
        np.testing.assert_allclose(values, ref_values, rtol=1e-4, atol=1e-5, err_msg=tag)
    records, _ = read_records(out / "run")
    for key, ref_values in reference["records"].items():
        np.testing.assert_allclose(records[key], ref_values, rtol=1e-4, atol=1e-5, err_msg=key)
    # Padding duplicate: id 0 was seen twice per epoch (once per rank) but counts as one epoch, averaged.
    assert records["seen_epochs"].tolist() == [EPOCHS] * N
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    batches = [ddp_global_batches(N, 2, PER_RANK_BATCH, epoch) for epoch in range(EPOCHS)]
    assert [a + b for a, b in zip(ranks[0]["batches"], ranks[1]["batches"])] == sum(batches, [])  # same order
    assert all(sorted(sum(b, [])) != list(range(N)) for b in batches)  # each epoch holds a padding duplicate
    assert [(r["is_writer"], r["world"]) for r in ranks] == [(True, 2), (False, 2)]
    # Every rank holds the same reduced records; only rank 0 wrote: one event file, one records folder.
    for r in ranks:
        np.testing.assert_allclose(r["records_in_memory"]["loss_sum"], records["loss_sum"], rtol=1e-6)
    assert len(list(out.rglob("events.out.tfevents.*"))) == 1
    assert [p.relative_to(out).as_posix() for p in out.rglob("samples.npz")] == ["run/introspect/samples.npz"]


def test_ddp_matches_one_process_over_the_global_batches(tmp_path: Path, reference: dict[str, Any]) -> None:
    """Test that Lightning `ddp` on 2 gloo processes logs the statistics and records of one process seeing the
    same global batches."""
    cmd = [sys.executable, str(HELPERS / "robust_ddp_script.py"), str(tmp_path), "ddp", str(N), str(PER_RANK_BATCH),
           str(EPOCHS)]
    proc = subprocess.run(cmd, env=_ENV, capture_output=True, text=True, timeout=110, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_against_reference(tmp_path, reference)


def test_ddp_spawn_matches_one_process_over_the_global_batches(
    tmp_path: Path, reference: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Test that Lightning `ddp_spawn` on 2 gloo processes logs the statistics and records of one process."""
    for key in ("MASTER_ADDR", "GLOO_SOCKET_IFNAME", "OMP_NUM_THREADS"):
        monkeypatch.setenv(key, _ENV[key])
    fit_ddp(tmp_path, "ddp_spawn", n=N, batch=PER_RANK_BATCH, epochs=EPOCHS)
    _check_against_reference(tmp_path, reference)


UNEVEN = {"rank1-fewer": [[5, 4], [3, 3]], "rank1-empty-epoch": [[2, 2], [0, 5]]}


@pytest.fixture(scope="module")
def uneven_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Runs every :data:`UNEVEN` scenario on the same 2 gloo processes; fails (never hangs) after 90 s."""
    root = tmp_path_factory.mktemp("uneven")
    scenarios = [(str(root / name), steps) for name, steps in UNEVEN.items()]
    ctx = mp.start_processes(uneven_worker, args=(2, str(root / "init"), scenarios, str(root / "budget")), nprocs=2,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + 90.0
    try:
        while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                pytest.fail(f"ranks with uneven steps per epoch {UNEVEN} did not finish within 90 s (a hang)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return root


@pytest.mark.parametrize("name", list(UNEVEN))
def test_uneven_batches_across_ranks_do_not_hang(uneven_runs: Path, name: str) -> None:
    """Test that ranks running different numbers of steps (flushing every step, ending every epoch, one rank
    with an empty epoch) finish, and rank 0's records merge both ranks' examples by id."""
    steps, out = UNEVEN[name], uneven_runs / name
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["steps"] for r in ranks] == [sum(s) for s in steps]
    records, meta = read_records(out / "introspect")
    seen = np.asarray(records["seen_epochs"])
    for rank, per_epoch in enumerate(steps):
        for k in range(max(per_epoch)):
            expected = sum(1 for n in per_epoch if n > k)
            assert seen[ids_of(rank, k)].tolist() == [expected] * BATCH, (rank, k)
    assert int(seen.sum()) == BATCH * sum(sum(s) for s in steps)
    assert ranks[0]["records"] == ranks[1]["records"]  # reduced: both ranks hold the same aggregates
    scalars = read_scalars(out / "tb")
    assert "activation_mean/0" in scalars and "grad_norm/global" in scalars


def test_budget_interval_is_agreed_by_all_ranks(uneven_runs: Path) -> None:
    """Test that under an overhead budget ranks that measure different costs still sample the very same steps
    (the interval is agreed at each flush on every rank), and that the budget did move the interval."""
    ranks = [json.loads((uneven_runs / "budget" / f"budget_rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["sampled"] == ranks[1]["sampled"]
    assert ranks[0]["interval"] == ranks[1]["interval"]
    assert ranks[0]["interval"] > 2, "the budget should have widened the interval from every_n_steps=2"
