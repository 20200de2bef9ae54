"""Collectives for flushes and epoch ends; no-ops without an initialised process group.

Every synchronisation round starts with a small header all-reduce saying what each rank is doing: its kind of
round and, for a flush, the sizes of the flush's two payloads. A flushing rank never reads the header (that
would be a device-to-host sync per flush under NCCL): it always goes on to reduce its payloads. A rank at an
epoch end reads it (an epoch end may sync): while other ranks are still flushing (they ran more batches), it
joins their two payload reductions with neutral values (zeros for sums, +inf for minima) and repeats the
header, until every rank is at the epoch end. Ranks that see different numbers of batches therefore never
pair mismatched collectives, and a flush's figures are those of the ranks that flushed.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

FLUSH = 0
EPOCH_END = 1
_KINDS = 2
_HEADER = _KINDS + 2  # the kinds' counts, then the flush's sum and min payload sizes


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def comm_device(fallback: torch.device) -> torch.device:
    """Device whose tensors the process group's backend accepts."""
    if is_distributed() and dist.get_backend() == "nccl":
        return fallback if fallback.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _header(kind: int, sizes: tuple[int, int], device: torch.device) -> Tensor:
    """This rank's header, filled by kernels (no host-to-device copy, which waits on CUDA)."""
    header = torch.zeros(_HEADER, dtype=torch.int64, device=device)
    header[kind] = 1
    header[_KINDS] = sizes[0]
    header[_KINDS + 1] = sizes[1]
    return header


def flush_reduce(sums: Sequence[Tensor], mins: Sequence[Tensor], device: torch.device) -> None:
    """A flush's round: the header, then ``sums`` and ``mins`` all-reduced in place, one collective each.

    Nothing is read on the host: the header only tells ranks at an epoch end what to join (see
    :func:`agree_epoch_end`), so under NCCL the round is three collectives queued on the stream and no sync.
    When some ranks are at their epoch end instead, the result is the reduction over the ranks that flushed.
    """
    if not is_distributed():
        return
    sizes = (sum(t.numel() for t in sums), sum(t.numel() for t in mins))
    dist.all_reduce(_header(FLUSH, sizes, comm_device(device)))
    reduce_(sums, "sum")
    reduce_(mins, "min")


def agree_epoch_end(device: torch.device) -> None:
    """An epoch end's header round, repeated until every rank is at its epoch end; meanwhile joins the payload
    reductions of the ranks still flushing with neutral values. Reads the header on the host (an epoch end
    may sync)."""
    if not is_distributed():
        return
    n = dist.get_world_size()
    dev = comm_device(device)
    while True:
        header = _header(EPOCH_END, (0, 0), dev)
        dist.all_reduce(header)
        counts = header.tolist()  # epoch-end round: host read allowed here
        if counts[EPOCH_END] == n:
            return
        flushing = counts[FLUSH]
        if flushing == 0 or counts[_KINDS] % flushing or counts[_KINDS + 1] % flushing:
            raise RuntimeError(
                f"lightning_introspect: ranks disagree in a synchronisation round (header {counts} over {n} ranks); "
                "every rank must drive the Introspector through the same flushes and epoch ends."
            )
        for size, fill, op in ((counts[_KINDS] // flushing, 0.0, dist.ReduceOp.SUM),
                               (counts[_KINDS + 1] // flushing, float("inf"), dist.ReduceOp.MIN)):
            if size:
                dist.all_reduce(torch.full((size,), fill, dtype=torch.float64, device=dev), op=op)


def reduce_(tensors: Sequence[Tensor], op: str) -> None:
    """All-reduce tensors in place with one collective: packs them flat, reduces, unpacks.

    ``op`` is "sum", "min" or "max". Dtypes are kept per tensor (packed as float64, exact for counts up to 2**53).
    """
    if not is_distributed() or not tensors:
        return
    red = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op]
    dev = comm_device(tensors[0].device)
    flat = torch.cat([t.detach().reshape(-1).to(dev, torch.float64) for t in tensors])
    dist.all_reduce(flat, op=red)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


# ----------------------------------------------------------------------------------------- sharded tensors
def _dtensor_type() -> Optional[type]:
    if not dist.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.4
        try:
            from torch.distributed._tensor import DTensor  # type: ignore[no-redef]
        except ImportError:
            return None
    return DTensor


_DTENSOR = _dtensor_type()


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a DTensor (a parameter or gradient of FSDP2's ``fully_shard`` or of tensor parallelism)."""
    return _DTENSOR is not None and isinstance(t, _DTENSOR)


def local_part(t: Tensor) -> Tensor:
    """The part of ``t`` this rank holds: a DTensor's local shard (no communication), else ``t`` itself."""
    return t._local_tensor if is_dtensor(t) else t  # type: ignore[attr-defined]  # to_local(), without autograd


def counted_here(t: Tensor) -> bool:
    """Whether this rank's part of ``t`` counts in a sum over all ranks, so that each distinct element is
    counted exactly once: for a DTensor, the rank is in the same mesh as rank 0 (a mesh smaller than the world,
    such as the data-parallel part of a 2-D mesh, is repeated on the other ranks) and its coordinate is 0 along
    every mesh dimension ``t`` is replicated over (each shard counts once); for a plain tensor, rank 0 holds it.

    Raises:
        ValueError: a DTensor with a ``Partial`` placement (pending sums: its norm cannot be taken per shard).
    """
    if not is_dtensor(t):
        return rank() == 0
    placements = t.placements  # type: ignore[attr-defined]
    if any(p.is_partial() for p in placements):
        raise ValueError(f"a DTensor with placements {tuple(placements)} holds partial sums")
    mesh = t.device_mesh  # type: ignore[attr-defined]
    coord = mesh.get_coordinate()
    if coord is None or 0 not in mesh.mesh.flatten().tolist():  # the mesh's ranks: a host tensor
        return False
    return all(c == 0 for c, p in zip(coord, placements) if p.is_replicate())
