"""The collectives of :mod:`lightning_introspect.core.dist` on 2 gloo processes: a flush's round reads nothing
on the host (no sync per flush under NCCL) and still pairs with a rank at its epoch end; DTensor shards are
counted once over ranks."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch.multiprocessing as mp
from helpers.dist_rounds_worker import rounds_worker


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
