"""Collectives for flushes and epoch ends; no-ops without an initialised process group.

Every synchronisation round starts with a small header all-reduce saying what each rank is doing. When
ranks disagree (one is flushing a step that another never reached because it ran out of batches), the
flushing ranks skip the reduction and the ranks at an epoch end wait for the others by repeating the
header. Ranks that see different numbers of batches therefore never pair mismatched collectives.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

FLUSH = 0
EPOCH_END = 1
_KINDS = 2


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


def agree(kind: int, device: torch.device) -> bool:
    """Header round: True when every rank is at the same kind of round.

    A rank at an epoch end repeats the header until all ranks are there; a rank at a flush returns False at
    once when the others are elsewhere (it then skips that flush's reduction).
    """
    if not is_distributed():
        return True
    n = dist.get_world_size()
    dev = comm_device(device)
    while True:
        header = torch.zeros(_KINDS, dtype=torch.int64, device=dev)
        header[kind] = 1
        dist.all_reduce(header)
        count = int(header[kind].item())  # flush/epoch-end round: host read allowed here
        if count == n:
            return True
        if kind != EPOCH_END:
            return False


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
