"""Per-example loss dynamics: the ``WithIndex`` wrapper, figure kernels and the on-device store.

No hooks are needed: a few vectorised ops on the logits the training step already computed give each
example's loss, margin, given-label probability and correctness; one ``index_add_`` scatters them into
dense per-id buffers on the device. Rows with ids out of range, targets out of range or non-finite figures
are *counted* on the device and left out (masked into a trash row, never used as an index); ids repeated
within a batch are counted and kept. The counts are reported at the next flush.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .stats import to_device

#: Epoch-buffer columns (float32 each): how often the example was seen this epoch, then sums of its figures.
_EP_COUNT, _EP_LOSS, _EP_MARGIN, _EP_CONF, _EP_CORRECT = range(5)
#: Device counters reported at flushes.
BAD_INPUT_NAMES = ("ids_out_of_range", "ids_repeated_in_batch", "targets_out_of_range", "nonfinite_outputs")


def bad_input_message(counts: dict[str, int], num_examples: Optional[int], ignore_index: int) -> str:
    """The warning for the bad-input counters that are non-zero: for each, what was wrong and what was done
    with the rows, in that order of :data:`BAD_INPUT_NAMES`.

    Example:
        >>> bad_input_message({"nonfinite_outputs": 3}, 10, -100)  # doctest: +ELLIPSIS
        'nonfinite_outputs: 3 rows had non-finite logits (or per-example losses): the model produced NaN/Inf...'
    """
    texts = {
        "ids_out_of_range": (
            f"{{}} rows had sample ids outside [0, {num_examples}); they were left out. The ids are not positions "
            f"in a set of {num_examples} examples: wrap the whole training set in `WithIndex` (and split that), "
            "or, with `ids=` of your own, pass `num_examples=` above the largest id"
        ),
        "ids_repeated_in_batch": (
            "{} rows repeated an id already in their batch; they were kept, and an example's figures for the "
            "epoch are the mean over all its rows. That is expected with a sampler that draws with replacement "
            "(WeightedRandomSampler); otherwise the ids are not sample ids (labels taken for ids?): check `ids=`"
        ),
        "targets_out_of_range": (
            f"{{}} rows had a target outside [0, num_classes) (targets equal to ignore_index={ignore_index} are "
            "left out silently); they were left out. Check `targets=` and the number of classes in the logits"
        ),
        "nonfinite_outputs": (
            "{} rows had non-finite logits (or per-example losses): the model produced NaN/Inf, a training "
            "problem (see the `alerts/nonfinite` tag), not bad input; those rows were left out"
        ),
    }
    parts = [f"{name}: " + texts[name].format(counts[name]) for name in BAD_INPUT_NAMES if counts.get(name, 0) > 0]
    return "; ".join(parts) + "."


class WithIndex(Dataset):
    """Wraps a map-style dataset so that each item carries its index (the sample id).

    A tuple/list item ``(x, y)`` becomes ``(x, y, index)``; a dict item gets ``{key: index}`` added; any other
    item ``x`` becomes ``(x, index)``. Attributes of the wrapped dataset (``classes``, ...) stay reachable.

    Example:
        >>> ds = WithIndex([(0.5, 1), (0.7, 0)])
        >>> ds[1]
        (0.7, 0, 1)
        >>> WithIndex([{"x": 3}])[0]
        {'x': 3, 'index': 0}
    """

    def __init__(self, dataset: Any, *, key: str = "index") -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(
                f"`WithIndex` needs a map-style dataset with __getitem__ and __len__, got {type(dataset).__name__}. "
                "For an IterableDataset, yield the sample id yourself and pass `ids=` to `Introspect`."
            )
        self.dataset = dataset
        self.key = key

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self._with_index(self.dataset[index], index)

    def __getitems__(self, indices: Sequence[int]) -> Any:
        """A whole batch of items, each with its index.

        The DataLoader fetches a batch with ``__getitems__`` when the dataset has one, instead of calling
        ``__getitem__`` per index; this override keeps the index on that path. A wrapped dataset's own
        ``__getitems__`` (``Subset``, HuggingFace ``datasets.Dataset``) is still used for the fetch: it may
        return a list of items or a dict of per-key lists, and the indices are added to either.
        """
        fetch = getattr(self.dataset, "__getitems__", None)
        if not fetch:
            return [self._with_index(self.dataset[i], i) for i in indices]
        items = fetch(indices)
        if isinstance(items, dict):
            return {**items, self.key: list(indices)}
        if isinstance(items, (list, tuple)) and len(items) == len(indices):
            return [self._with_index(item, i) for item, i in zip(items, indices)]
        raise TypeError(
            f"`{type(self.dataset).__name__}.__getitems__` returned {type(items).__name__}"
            + (f" of {len(items)} items for {len(indices)} indices" if isinstance(items, (list, tuple)) else "")
            + ": `WithIndex` can add the indices to a list of items (one per index) or a dict of lists only."
        )

    def _with_index(self, item: Any, index: int) -> Any:
        if isinstance(item, dict):
            return {**item, self.key: index}
        if isinstance(item, (tuple, list)):
            return (*item, index)
        return (item, index)

    def __getattr__(self, name: str) -> Any:
        # Dunders are not forwarded: the DataLoader, pickle and copy look them up by name, and a forwarded one
        # would act on the wrapped dataset and bypass the index (``__getitems__`` did exactly that).
        if name in ("dataset", "key") or (name.startswith("__") and name.endswith("__")):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(self.dataset, name)


def classification_figures_with_other(
    logits: Tensor, targets: Tensor, ignore_index: Optional[int] = None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-example (loss, margin, confidence, correct, status, other) from (N, C) logits and (N,) integer targets.

    margin = given-label logit minus the largest other logit; confidence = softmax probability of the given
    label; loss = cross-entropy; correct = the given label's logit is strictly the largest (margin > 0).
    status (int8) says what the store does with the row: 1 = use it; 0 = left out and counted, as the target
    is outside [0, C) or a logit is not finite; -1 = left out silently, as the target is ``ignore_index`` (a
    row the loss ignores too). Rows other than 1 hold junk. other (long) = the best class other than the given
    label (the runner-up that the margin is taken against): the store's vote for a suggested label.

    The logits are transposed to (C, N) first, so that every reduction over the classes runs along the long
    axis: on a CPU this is 4x faster than ``log_softmax`` and ``topk`` over a short last axis (0.13 ms instead
    of 0.53 ms for 2,048 x 10), and it is the same dozen kernels on a GPU. A row is finite when the sum of its
    logits is (a sum overflows only past 3e38).

    Example:
        >>> loss, margin, conf, correct, status, other = classification_figures_with_other(
        ...     torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 3.0], [0.0, 1.0, 0.0]]), torch.tensor([0, 2, -100]),
        ...     ignore_index=-100)
        >>> margin[:2].tolist(), correct[:2].tolist(), status.tolist(), other[:2].tolist()
        ([1.0, 2.0], [1.0, 1.0], [1, 1, -1], [2, 1])
    """
    x = logits.detach() if logits.requires_grad else logits
    x = (x if x.dtype == torch.float32 else x.float()).t().contiguous()  # (C, N)
    C = x.shape[0]
    t = targets if targets.dtype == torch.long and not targets.requires_grad else targets.detach().long()
    status = ((t >= 0) & (t < C) & torch.isfinite(x.sum(0))).to(torch.int8)
    if ignore_index is not None:
        status = status.masked_fill_(t == ignore_index, -1)
    tc = t.clamp(0, C - 1).unsqueeze(0)
    given = x.gather(0, tc).squeeze(0)
    top = x.amax(0)
    log_z = (x - top).exp_().sum(0).log_().add_(top)  # log-sum-exp, shifted by the row maximum
    lp_given = given - log_z
    best_other, other = x.scatter(0, tc, float("-inf")).max(0)  # not in place: x may be the caller's own storage
    margin = given - best_other
    return -lp_given, margin, lp_given.exp(), (margin > 0).float(), status, other


def classification_figures(
    logits: Tensor, targets: Tensor, ignore_index: Optional[int] = None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-example (loss, margin, confidence, correct, status) from (N, C) logits and (N,) integer targets;
    see :func:`classification_figures_with_other`, which also gives the best other class.

    Example:
        >>> loss, margin, conf, correct, status = classification_figures(
        ...     torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 1.0]]), torch.tensor([0, 0, -100]), ignore_index=-100)
        >>> margin[:2].tolist(), correct[:2].tolist(), status.tolist()
        ([2.0, -1.0], [1.0, 0.0], [1, 1, -1])
    """
    return classification_figures_with_other(logits, targets, ignore_index)[:5]


def sequence_figures(
    logits: Tensor, targets: Tensor, ignore_index: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-example figures from (N, T, C) logits and (N, T) targets: means over the tokens not ignored.

    correct is the example's token accuracy. status as in :func:`classification_figures`, per example: 0 when
    a token not ignored has a target outside [0, C); -1 when every token is ``ignore_index`` (nothing to
    measure); else 1. An example with a non-finite logit in a token not ignored gets a NaN loss, which the
    store counts as a non-finite output.
    """
    N, T, C = logits.shape
    flat_t = targets.reshape(N * T)
    loss, margin, conf, correct, tok = classification_figures(logits.reshape(N * T, C), flat_t)
    kept = flat_t != ignore_index
    in_range = (flat_t >= 0) & (flat_t < C)
    w = (kept & (tok > 0)).float().view(N, T)
    denom = w.sum(1).clamp_min(1.0)
    bad_target = (kept & ~in_range).view(N, T).any(1)
    nonfinite = (kept & in_range & (tok == 0)).view(N, T).any(1)  # in range, so not usable: a non-finite logit

    def mean(v: Tensor) -> Tensor:
        return (torch.nan_to_num(v.view(N, T)) * w).sum(1) / denom

    status = torch.where(kept.view(N, T).any(1), (~bad_target).to(torch.int8), -1).to(torch.int8)
    return mean(loss).masked_fill(nonfinite, float("nan")), mean(margin), mean(conf), mean(correct), status


def _flat(t: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``t`` as a 1-d tensor of ``dtype`` on ``device``, detached; no call for what already is (each is a
    dispatch, and the batched pass runs dozens)."""
    if t.requires_grad:
        t = t.detach()
    if t.ndim != 1:
        t = t.reshape(-1)
    if t.dtype != dtype or t.device != device:
        t = t.to(device, dtype, non_blocking=True)
    return t


class PerSampleStore:
    """Dense per-example buffers on one device: this epoch's sums and the aggregates across epochs.

    Memory: 24 bytes of epoch buffers + 35 bytes of aggregates = 59 bytes per example, whatever the number of
    classes (see :mod:`lightning_introspect.core.scoring` for the record fields). Row ``num_examples`` is a
    trash row that absorbs writes from bad ids, so that a bad id is counted, never used as an index.

    The suggested label is a running majority vote (Boyer-Moore) over the epochs, one vote per epoch for the
    best class other than the given label (``epoch_other``; an id with several rows in an epoch keeps one
    of them, from the latest pass that saw it).
    It needs a candidate and a counter per example, not a count per class: O(1) memory per example.
    """

    def __init__(self, num_examples: int, device: torch.device | str = "cpu") -> None:
        if not isinstance(num_examples, int) or num_examples <= 0:
            raise ValueError(f"`num_examples` must be a positive int, got {num_examples!r}.")
        self.num_examples = num_examples
        self.device = torch.device(device)
        self.epochs_folded = 0
        self._offsets: dict[tuple[int, ...], Tensor] = {}
        self._const: Optional[Tensor] = None  # rows of ones and zeros (read only), grown as needed
        self._zero = torch.zeros((), dtype=torch.long, device=self.device)
        self._allocate(num_examples)

    def _allocate(self, n: int) -> None:
        d = self.device
        self.epoch = torch.zeros(n + 1, 5, dtype=torch.float32, device=d)
        self.label = torch.full((n + 1,), -1, dtype=torch.int32, device=d)
        self.epoch_other = torch.full((n + 1,), -1, dtype=torch.int32, device=d)
        self.seen_epochs = torch.zeros(n, dtype=torch.int16, device=d)
        self.loss_sum = torch.zeros(n, dtype=torch.float32, device=d)
        self.margin_sum = torch.zeros(n, dtype=torch.float32, device=d)
        self.confidence_sum = torch.zeros(n, dtype=torch.float32, device=d)
        self.confidence_sq_sum = torch.zeros(n, dtype=torch.float32, device=d)
        self.correct_epochs = torch.zeros(n, dtype=torch.int16, device=d)
        self.forgetting_events = torch.zeros(n, dtype=torch.int16, device=d)
        self.first_learned = torch.full((n,), -1, dtype=torch.int16, device=d)
        self.last_correct = torch.full((n,), -1, dtype=torch.int8, device=d)
        self.suggested_label = torch.full((n,), -1, dtype=torch.int32, device=d)
        self.suggested_votes = torch.zeros(n, dtype=torch.int16, device=d)
        self.bad = torch.zeros(len(BAD_INPUT_NAMES), dtype=torch.float64, device=d)

    _AGGREGATES = (
        "seen_epochs", "label", "loss_sum", "margin_sum", "confidence_sum", "confidence_sq_sum",
        "correct_epochs", "forgetting_events", "first_learned", "last_correct", "suggested_label", "suggested_votes",
    )
    #: Per-epoch buffers with a trash row, cleared at each fold (``label`` keeps its last value instead).
    _EPOCH_BUFFERS = ("epoch", "epoch_other")

    def bytes_per_example(self) -> float:
        """Bytes of device memory per example, all buffers and aggregates together (the trash row included)."""
        tensors = [self.epoch, self.epoch_other, *(getattr(self, k) for k in self._AGGREGATES)]
        return sum(t.numel() * t.element_size() for t in tensors) / self.num_examples

    @torch.no_grad()
    def observe(
        self,
        ids: Tensor,
        loss: Tensor,
        margin: Optional[Tensor] = None,
        confidence: Optional[Tensor] = None,
        correct: Optional[Tensor] = None,
        *,
        labels: Optional[Tensor] = None,
        valid: Optional[Tensor] = None,
        batch_sizes: Optional[Sequence[int]] = None,
        other: Optional[Tensor] = None,
    ) -> None:
        """Scatters per-example figures (each (B,)) into this epoch's buffers. No host sync.

        Every row of an id adds to the same sums, so an id that comes several times in an epoch (a sampler
        drawing with replacement, in one batch or in several) gets the mean of its figures over those rows,
        and counts as seen in the epoch once. Repeats within one batch are also counted, as
        ``ids_repeated_in_batch``: without such a sampler they mean the ids are wrong.

        ``valid``: (B,) bool, True = use the row, or the int8 status of :func:`classification_figures` (-1 =
        leave the row out without counting it). ``batch_sizes``: when the rows are several training batches
        concatenated, their sizes in order, so that an id counts as repeated only within its own batch.
        ``other``: (B,) the best class other than the given label (see :func:`classification_figures_with_other`),
        this epoch's vote for the example's suggested label; an id with several rows keeps one of them.
        """
        n, dev = self.num_examples, self.device
        ids = _flat(ids, torch.long, dev)
        loss = _flat(loss, torch.float32, dev)
        in_range = (ids >= 0) & (ids < n)
        finite = torch.isfinite(loss)
        ok = in_range & finite
        key = ids
        if batch_sizes is not None and len(batch_sizes) > 1:
            key = ids + self._batch_offsets(tuple(batch_sizes))  # ids of different batches never compare equal
        srt = key.sort().values
        bad = [(~in_range).sum(), (srt[1:] == srt[:-1]).sum()]
        if valid is not None:  # a bool mask, or the int8 status of the figure functions (-1: ignored)
            valid = valid.to(dev)
            bad.append((ok & (valid == 0)).sum())  # a NaN row is a non-finite output, not a bad target
            ok = ok & (valid > 0)
        else:
            bad.append(self._zero)
        bad.append((in_range & ~finite).sum())
        self.bad.add_(torch.stack(bad))
        ones, zeros = self._constants(loss.shape[0])
        cols = [ones, loss]
        for v in (margin, confidence, correct):
            cols.append(zeros if v is None else _flat(v, torch.float32, dev))
        rows = torch.nan_to_num(torch.stack(cols, 1), nan=0.0, posinf=0.0, neginf=0.0)
        idx = torch.where(ok, ids, n)
        self.epoch.index_add_(0, idx, rows)
        if labels is not None:
            self.label.index_copy_(0, idx, _flat(labels, torch.int32, dev))
        if other is not None:
            self.epoch_other.index_copy_(0, idx, _flat(other, torch.int32, dev))

    def _batch_offsets(self, sizes: tuple[int, ...]) -> Tensor:
        """(sum(sizes),) offsets that keep the ids of concatenated batches apart: batch k adds k * 2**40.
        Cached per tuple of sizes (a training run has one or two)."""
        t = self._offsets.get(sizes)
        if t is None:
            if len(self._offsets) >= 8:
                self._offsets.clear()
            offsets = [k << 40 for k, size in enumerate(sizes) for _ in range(size)]  # host ints, once
            t = self._offsets[sizes] = to_device(offsets, torch.long, self.device)
        return t

    def _constants(self, n: int) -> tuple[Tensor, Tensor]:
        """(n,) ones and (n,) zeros, views of one kept (2, n) tensor (read only), grown as needed."""
        if self._const is None or self._const.shape[1] < n:
            self._const = torch.stack([torch.ones(n, device=self.device), torch.zeros(n, device=self.device)])
        return self._const[0, :n], self._const[1, :n]

    def take_bad_counts(self) -> Tensor:
        """The bad-input counters since the last call (a device tensor), then zeroes them."""
        out = self.bad.clone()
        self.bad.zero_()
        return out

    @torch.no_grad()
    def epoch_means(self) -> dict[str, Tensor]:
        """This epoch's per-example means (NaN where not seen), as device tensors."""
        ep = self.epoch[: self.num_examples]
        cnt = ep[:, _EP_COUNT]
        seen = cnt > 0
        means = ep[:, 1:] / cnt.clamp_min(1.0).unsqueeze(1)
        nan = torch.full_like(cnt, float("nan"))
        return {
            "seen": seen,
            "loss": torch.where(seen, means[:, 0], nan),
            "margin": torch.where(seen, means[:, 1], nan),
            "confidence": torch.where(seen, means[:, 2], nan),
            "correct": torch.where(seen, means[:, 3], nan),
        }

    @torch.no_grad()
    def fold_epoch(self, epoch: int) -> None:
        """Folds this epoch's means into the aggregates and clears the epoch buffers.

        Under DDP call it after summing ``epoch`` across ranks (and max-reducing ``label`` and
        ``epoch_other``): duplicates that a distributed sampler pads in are averaged, not double-weighted, and
        every rank casts the same vote, so the votes stay equal on all ranks.
        """
        m = self.epoch_means()
        seen = m["seen"]
        correct_now = seen & (m["correct"] >= 0.5)
        zero = torch.zeros((), device=self.device)
        self.seen_epochs += seen.to(torch.int16)
        self.loss_sum += torch.where(seen, m["loss"], zero)
        self.margin_sum += torch.where(seen, m["margin"], zero)
        conf = torch.where(seen, m["confidence"], zero)
        self.confidence_sum += conf
        self.confidence_sq_sum += conf * conf
        self.correct_epochs += correct_now.to(torch.int16)
        self.forgetting_events += (seen & (self.last_correct == 1) & ~correct_now).to(torch.int16)
        learned_now = correct_now & (self.first_learned < 0)
        self.first_learned = torch.where(learned_now, torch.full_like(self.first_learned, epoch), self.first_learned)
        self.last_correct = torch.where(seen, correct_now.to(torch.int8), self.last_correct)
        self._vote(seen & (self.epoch_other[: self.num_examples] >= 0), self.epoch_other[: self.num_examples])
        self.epoch.zero_()
        self.epoch_other.fill_(-1)
        self.epochs_folded += 1

    def _vote(self, has: Tensor, other: Tensor) -> None:
        """One Boyer-Moore step per example that has a vote: an empty counter takes the vote as its candidate,
        an equal vote adds one, another one takes one off. The candidate ends as the class that won more than
        half of the votes whenever one did, and otherwise leans to the latest votes."""
        take = has & (self.suggested_votes == 0)
        same = has & ~take & (self.suggested_label == other)
        differ = has & ~take & ~same
        self.suggested_label = torch.where(take, other, self.suggested_label)
        self.suggested_votes += take.to(torch.int16) + same.to(torch.int16) - differ.to(torch.int16)

    def records(self) -> dict[str, np.ndarray]:
        """Host copy of the aggregates, keyed as the record fields (a device-to-host copy: epoch ends only)."""
        out = {}
        for k in self._AGGREGATES:
            t = getattr(self, k)
            # A copy even on CPU (where .cpu() is a no-op): the writer thread reads these arrays while the
            # next epoch updates the store in place.
            out[k] = (t[: self.num_examples] if k == "label" else t).to("cpu", copy=True).numpy()
        return out

    def grow(self, num_examples: int) -> None:
        """Enlarges the store (the dataset grew), keeping every record."""
        if num_examples <= self.num_examples:
            return
        old = {k: getattr(self, k) for k in (*self._AGGREGATES, *self._EPOCH_BUFFERS, "bad")}
        old_n = self.num_examples
        self.num_examples = num_examples
        self._allocate(num_examples)
        for k, t in old.items():
            if k == "bad":
                self.bad.copy_(t)
            elif k in ("epoch", "epoch_other", "label"):
                getattr(self, k)[:old_n] = t[:old_n]
            else:
                getattr(self, k)[:old_n] = t

    def state_dict(self) -> dict[str, Any]:
        # Copies even on CPU (where .cpu() is a no-op): training goes on updating the store in place.
        state: dict[str, Any] = {
            k: getattr(self, k).detach().to("cpu", copy=True) for k in (*self._AGGREGATES, *self._EPOCH_BUFFERS, "bad")
        }
        state["num_examples"] = self.num_examples
        state["epochs_folded"] = self.epochs_folded
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        n = int(state["num_examples"])
        self.num_examples = n
        self._allocate(n)
        for k in (*self._AGGREGATES, *self._EPOCH_BUFFERS, "bad"):
            if k in state:  # checkpoints from before the suggested label lack its tensors: they start empty
                getattr(self, k).copy_(state[k])
        self.epochs_folded = int(state.get("epochs_folded", 0))
