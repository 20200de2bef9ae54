"""AUM threshold samples (Pleiss et al. 2020, "Identifying Mislabeled Data using the Area Under the Margin").

A seeded random ``1 / (C + 1)`` share of the training examples is relabelled to a fake extra class ``C``, so
the model needs ``C + 1`` outputs. Those examples are mislabeled by construction; the 99th percentile of
their AUM is a data-driven threshold below which real examples are flagged
(:func:`~lightning_introspect.core.scoring.find_label_issues` with ``threshold_ids=``). Train on the wrapped
dataset once to pick the threshold; the threshold samples are left out of the ranking.

Torch only, no Lightning.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["ThresholdSamples"]


class ThresholdSamples(Dataset):
    """Relabels a seeded random ``1 / (C + 1)`` share of a dataset to the fake class ``C``.

    Items may be tuples/lists ``(x, y, ...)`` (the label at ``label_index``) or dicts (the label under
    ``label_key``); everything else passes through unchanged. Wrap the raw dataset, then wrap this in
    ``WithIndex`` so the ids it appends are the ids of :attr:`threshold_ids`; attributes stay reachable through
    ``WithIndex``.

    Args:
        dataset: a map-style dataset (``__getitem__`` and ``__len__``).
        num_classes: the number of real classes ``C`` (labels in ``[0, C)``).
        seed: seed of the choice of threshold samples.
        label_index: position of the label in tuple/list items.
        label_key: key of the label in dict items.

    Attributes:
        threshold_ids: (M,) sorted int64 ids of the relabelled examples, ``M = round(N / (C + 1))``.
        num_classes: ``C + 1``, the number of outputs the model needs.
        fake_class: ``C``, the label the threshold samples get.

    Raises:
        ValueError: if the dataset is not map-style, ``num_classes`` is not an int >= 2, or the dataset is too
            small to hold one threshold sample.

    Example:
        >>> data = [(float(i), i % 3) for i in range(8)]
        >>> ds = ThresholdSamples(data, num_classes=3, seed=0)
        >>> ds.num_classes, len(ds.threshold_ids)
        (4, 2)
        >>> all(ds[int(i)][1] == 3 for i in ds.threshold_ids)
        True
    """

    def __init__(
        self,
        dataset: Any,
        num_classes: int,
        *,
        seed: int = 0,
        label_index: int = 1,
        label_key: str = "label",
    ) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise ValueError(
                f"`ThresholdSamples` needs a map-style dataset with __getitem__ and __len__, "
                f"got {type(dataset).__name__}."
            )
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
            raise ValueError(f"`num_classes` must be the number of real classes, an int >= 2, got {num_classes!r}.")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"`seed` must be an int, got {seed!r}.")
        size = len(dataset)
        count = int(round(size / (num_classes + 1)))
        if count < 1:
            raise ValueError(
                f"A dataset of {size} examples is too small for threshold samples with {num_classes} classes; "
                f"it needs at least {(num_classes + 1) // 2 + 1} examples."
            )
        self.dataset = dataset
        self.fake_class = int(num_classes)
        self.num_classes = int(num_classes) + 1
        self.label_index = label_index
        self.label_key = label_key
        rng = np.random.default_rng(int(seed))
        self.threshold_ids: np.ndarray = np.sort(rng.choice(size, size=count, replace=False)).astype(np.int64)
        self._is_threshold = np.zeros(size, dtype=bool)
        self._is_threshold[self.threshold_ids] = True

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        if not self._is_threshold[index]:
            return item
        if isinstance(item, dict):
            if self.label_key not in item:
                raise KeyError(f"Dict item {index} has no label key {self.label_key!r}; pass `label_key=`.")
            return {**item, self.label_key: self._fake_like(item[self.label_key])}
        if isinstance(item, (tuple, list)):
            fields = list(item)
            fields[self.label_index] = self._fake_like(fields[self.label_index])
            return tuple(fields) if isinstance(item, tuple) else fields
        raise TypeError(
            f"Item {index} is a {type(item).__name__}; `ThresholdSamples` needs (x, y, ...) tuples or dicts."
        )

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "_is_threshold"):  # not set yet (unpickling): avoid recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def _fake_like(self, label: Any) -> Any:
        """The fake class, in the label's own type (tensor dtype, numpy scalar or int)."""
        if isinstance(label, torch.Tensor):
            return torch.full_like(label, self.fake_class)
        if isinstance(label, np.generic):
            return type(label)(self.fake_class)
        return self.fake_class
