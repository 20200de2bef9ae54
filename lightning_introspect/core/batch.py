"""Where a training batch keeps what per-example dynamics need: the sample ids, the targets and the logits.
Used by the Lightning callback and usable from a plain loop."""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence, Union

from torch import Tensor

from .hooks import first_tensor

#: Where to find ids or targets: "auto", a dict key, a tuple position, a function of the batch, or None.
BatchKey = Union[str, int, Callable[[Any], Tensor], None]
_TARGET_KEYS = ("label", "labels", "target", "targets", "y")
_EMPTY: Mapping[str, Any] = {}




def logits_of(output: Any) -> Any:
    """The logits in a forward output that is not a tensor: its 'logits' entry, else its first tensor."""
    if isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
        return output["logits"].detach()
    t = first_tensor(output)
    return t.detach() if t is not None else output


def as_mapping(x: Any) -> Mapping[str, Any]:
    """``x`` when it is a mapping, else an empty one (a tensor is checked first: an ABC check is slower)."""
    return x if type(x) is dict or (not isinstance(x, Tensor) and isinstance(x, Mapping)) else _EMPTY


def extract(batch: Any, key: BatchKey, what: str, index_key: Optional[str] = None) -> Any:
    """``what`` ("ids" or "targets") from the batch; ``index_key``: the WithIndex's key when the training set
    is wrapped in one (None when not), so that the errors say what is true of this run."""
    if callable(key):
        return key(batch)
    if isinstance(batch, (tuple, list)):  # the usual collated batch: before the slower Mapping (ABC) check
        return from_sequence(batch, key, what)
    if isinstance(batch, Mapping):
        if key == "auto":
            candidates = (index_key or "index",) if what == "ids" else _TARGET_KEYS
            for k in candidates:
                if k in batch:
                    return batch[k]
            if what == "targets":
                fix = "pass `targets=<key>`."
            elif index_key is not None:
                fix = (f"the training set is wrapped in `WithIndex`, whose {index_key!r} entry was dropped on the way "
                       "(a collate_fn?): keep it, or pass `ids=<key>`.")
            else:
                fix = "wrap the dataset in `WithIndex` or pass `ids=<key>`."
            raise ValueError(f"the batch (a dict with keys {sorted(batch)[:8]}) has no {what}: {fix}")
        if key not in batch:
            raise ValueError(f"the batch has no key {key!r} for {what}; its keys are {sorted(batch)[:8]}.")
        return batch[key]
    fix = (
        "the training set is wrapped in `WithIndex`, which makes tuples and dicts, so a collate_fn changed the batch: "
        if index_key is not None else "wrap the dataset in `WithIndex` or "
    )
    raise ValueError(
        f"cannot find {what} in a batch of type {type(batch).__name__}: {fix}pass `{what}=` as a function of the batch."
    )


def from_sequence(batch: Sequence[Any], key: BatchKey, what: str) -> Any:
    """``what`` from a tuple or list batch: at position ``key``; "auto": the ids last, the targets second."""
    if key == "auto":
        key = -1 if what == "ids" else 1
        if what == "targets" and len(batch) < 3:
            raise ValueError(
                f"cannot tell the targets in a batch of {len(batch)} elements (an `(x, y, index)` batch has 3, the "
                "sample ids last); pass `targets=<position>` of the labels (not the ids' position) or return "
                "'targets' from training_step."
            )
    if not isinstance(key, int) or not -len(batch) <= key < len(batch):
        raise ValueError(f"the batch has {len(batch)} elements; {what} position {key!r} is not among them.")
    return batch[key]


def read_ids_and_targets(
    batch: Any, out: Mapping[str, Any], logits: Any, *, captured: bool, forward_output: Any, ids_key: BatchKey,
    targets_key: BatchKey, index_key: Optional[str], user_ids_key: BatchKey, first_batch: bool,
) -> tuple[Any, Any]:
    """The sample ids and targets of a Lightning training batch, with ``out`` the step's output mapping and
    ``logits`` the logits found (``captured``: taken from the module's forward output ``forward_output``).
    Raises ValueError for what makes the batch unusable: forward output that is not logits, ids that are the
    targets, and (on the ``first_batch``) neither logits nor a per-example loss."""
    if captured and logits.ndim < 2:
        raise ValueError(
            f"the LightningModule's forward returned a tensor of shape {tuple(logits.shape)}, not logits "
            "(N, C) or (N, T, C), and training_step returned no 'logits'. Return "
            "{'loss': loss, 'logits': logits} from training_step, or pass `sample_dynamics=False`."
        )
    ids = extract(batch, ids_key, "ids", index_key)
    targets = out.get("targets")
    if targets is None and logits is not None:
        targets = extract(batch, targets_key, "targets", index_key)
        if targets is ids and ids is not None:
            raise ValueError(
                f"the sample ids and the targets are the same element of the batch (ids={user_ids_key!r}, "
                f"targets={targets_key!r}): the labels would be taken for sample ids. Wrap the training "
                "set in `WithIndex` (it adds the index as the last element, or an 'index' key), or point "
                "`ids=` and `targets=` at different elements."
            )
    if logits is None and out.get("sample_loss") is None and first_batch:
        what = type(forward_output).__name__ if forward_output is not None else "nothing (forward was not called)"
        raise ValueError(
            "Introspect found no logits: training_step returned no 'logits' and the LightningModule's "
            f"forward returned {what}. Return {{'loss': loss, 'logits': logits}} from training_step (or a "
            "(N,) 'sample_loss' without logits), or pass `sample_dynamics=False`."
        )
    return ids, targets
