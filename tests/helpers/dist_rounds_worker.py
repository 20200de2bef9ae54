"""A 2-rank gloo worker for tests/core/test_dist.py: the flush and epoch-end rounds of
:mod:`lightning_introspect.core.dist` and its rule for counting DTensor shards. Torch and the core only."""
from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as tdist
from torch.overrides import TorchFunctionMode

from lightning_introspect.core import dist

#: Tensor methods that read a value on the host (a device-to-host sync under NCCL).
HOST_READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"}


class _HostReads(TorchFunctionMode):
    """Records the names of host-reading Tensor methods called inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func: Callable, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def rounds_worker(rank: int, world: int, init_file: str, out: str) -> None:
    """Rank 0 flushes twice (the second time alone), rank 1 goes to its epoch end after the first; both then
    meet at the epoch end and reduce once more. Writes what each rank got to ``out/rank{r}.json``."""
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                             timeout=timedelta(seconds=30))
    try:
        result: dict[str, Any] = {}
        cpu = torch.device("cpu")
        reads = _HostReads()
        sums, mins = torch.tensor([1.0, 2.0]) * (rank + 1), torch.tensor([5.0 + rank])
        with reads:
            dist.flush_reduce([sums], [mins], cpu)
        result["both"] = [sums.tolist(), mins.tolist()]
        if rank == 0:
            sums, counts, mins = torch.tensor([10.0]), torch.tensor([2.0, 3.0]), torch.tensor([3.0])
            with reads:
                dist.flush_reduce([sums, counts], [mins], cpu)
            result["alone"] = [sums.tolist(), counts.tolist(), mins.tolist()]
        result["flush_host_reads"] = reads.seen
        dist.agree_epoch_end(cpu)
        after = torch.tensor([float(rank + 1)])
        dist.reduce_([after], "sum")
        result["after"] = after.tolist()
        result["counted"] = _counted(rank)
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        tdist.destroy_process_group()


def _counted(rank: int) -> dict[str, Any]:
    """``dist.counted_here`` for DTensors placed every way FSDP2 and tensor parallelism place them."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    mesh = init_device_mesh("cpu", (2,))
    grid = init_device_mesh("cpu", (2, 1), mesh_dim_names=("dp", "tp"))
    local = torch.ones(2, 3)
    out: dict[str, Any] = {
        "plain": dist.counted_here(local),
        "shard": dist.counted_here(DTensor.from_local(local, mesh, [Shard(0)])),
        "replicate": dist.counted_here(DTensor.from_local(local, mesh, [Replicate()])),
        "submesh": dist.counted_here(DTensor.from_local(local, grid["tp"], [Shard(0)])),
        "local_shape": list(dist.local_part(DTensor.from_local(local, mesh, [Shard(0)])).shape),
    }
    try:
        dist.counted_here(DTensor.from_local(local, mesh, [Partial()]))
        out["partial"] = "no error"
    except ValueError as err:
        out["partial"] = str(err)
    return out
