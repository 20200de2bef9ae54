"""The collectives of :mod:`lightning_introspect.core.dist` on 2 gloo processes: a flush's round reads nothing
on the host (no sync per flush under NCCL) and still pairs with a rank at its epoch end; DTensor shards are
counted once over ranks; layers that return DTensors (tensor parallelism) are watched through their local part."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from helpers.dist_rounds_worker import rounds_worker

from lightning_introspect.core import IntrospectConfig, Introspector


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    root = tmp_path_factory.mktemp("rounds")
    mp.start_processes(rounds_worker, args=(2, str(root / "init"), str(root)), nprocs=2, start_method="spawn")
    return [json.loads((root / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_flush_round_reads_nothing_on_the_host(ranks: list[dict[str, Any]]) -> None:
    """Test that flush_reduce calls no host-reading tensor method (item, tolist, cpu, bool, ...)."""
    assert ranks[0]["flush_host_reads"] == [] and ranks[1]["flush_host_reads"] == []


def test_flush_reduces_over_the_ranks_that_flush(ranks: list[dict[str, Any]]) -> None:
    """Test that a flush of both ranks sums and takes minima over both, a flush of rank 0 alone (rank 1 at its
    epoch end, joining with neutral values) gives rank 0's own values, and the rounds stay paired after."""
    for r in ranks:
        assert r["both"] == [[3.0, 6.0], [5.0]]
        assert r["after"] == [3.0]
    assert ranks[0]["alone"] == [[10.0], [2.0, 3.0], [3.0]]


def test_dtensor_shards_are_counted_once(ranks: list[dict[str, Any]]) -> None:
    """Test that shards count on every rank, replicas and plain tensors on rank 0 only, a mesh smaller than the
    world only where it holds rank 0, and that Partial placements are refused."""
    assert [r["counted"]["shard"] for r in ranks] == [True, True]
    assert [r["counted"]["replicate"] for r in ranks] == [True, False]
    assert [r["counted"]["plain"] for r in ranks] == [True, False]
    assert [r["counted"]["submesh"] for r in ranks] == [True, False]
    assert ranks[0]["counted"]["local_shape"] == [2, 3]
    assert "partial sums" in ranks[1]["counted"]["partial"]


class _DTensorOut(torch.nn.Module):
    """A Linear whose output is wrapped as a DTensor with the given placement (as tensor parallelism returns)."""

    def __init__(self, placement: Any) -> None:
        super().__init__()
        self.linear, self.placement = torch.nn.Linear(3, 4), placement

    def forward(self, x: torch.Tensor) -> Any:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(self.linear(x), init_device_mesh("cpu", (1,)), [self.placement])


@pytest.fixture
def one_rank_group(tmp_path: Path) -> Iterator[None]:
    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        yield
    finally:
        tdist.destroy_process_group()


@pytest.mark.parametrize("kind", ["replicate", "rows", "units"])
def test_dtensor_layer_outputs(one_rank_group: None, kind: str) -> None:
    """Test that a layer returning a replicated or row-split DTensor gets the statistics of its local tensor,
    and one split along its units is skipped with a warning that says why."""
    from torch.distributed.tensor import Replicate, Shard

    placement = {"replicate": Replicate(), "rows": Shard(0), "units": Shard(1)}[kind]
    torch.manual_seed(0)
    model = torch.nn.Sequential(_DTensorOut(placement))
    x = torch.randn(8, 3)
    intro = Introspector(model, IntrospectConfig(every_n_steps=1, warmup_steps=0, layer_types=(_DTensorOut,), grad_norms=False,
                                                 histograms=False))
    got: dict[str, float] = {}
    intro.on_scalars = lambda scalars, step: got.update(scalars)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with intro.step(0):
            model(x)
        intro.close()
    if kind == "units":
        assert "activation_mean/0" not in got
        assert any("split across ranks along a dimension other than the rows" in str(w.message) for w in caught)
    else:
        expected = model[0].linear(x).detach()
        assert got["activation_mean/0"] == pytest.approx(expected.mean().item(), rel=1e-6)
        assert got["activation_max/0"] == pytest.approx(expected.max().item(), rel=1e-6)
