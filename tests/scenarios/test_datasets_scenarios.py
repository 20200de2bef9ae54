"""Scenarios: training sets built the way users build them, with ``WithIndex`` inside or around a split.

Each run trains a tiny classifier for two epochs and checks, against an oracle built from the dataset: the
size of the per-example store, which ids were seen and in how many epochs, that each seen id's recorded
label is that example's label (so the ids are the examples' own, not their labels), that the suspects are
exactly the seen examples, and that the epoch shares count seen examples only.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset, random_split

from helpers.models import classification_data, classifier, trainer
from helpers.tb import read_events
from lightning_introspect import Introspect, WithIndex
from lightning_introspect.records import read_records

N, EPOCHS, BATCH = 40, 2, 8


def _run(tmp_path: Path, dataset: Any, model: Any = None) -> tuple[Introspect, dict[str, np.ndarray], list[str]]:
    """Fits ``EPOCHS`` epochs on ``dataset`` (unshuffled); returns the callback, the records on disk and the
    warnings of the tool."""
    intro = Introspect(every_n_steps=10**6, warmup_steps=0, histograms=False, sample_dynamics=True)
    tr = trainer("lightning.pytorch", tmp_path, max_epochs=EPOCHS, callbacks=[intro])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.fit(model or classifier(), DataLoader(dataset, batch_size=BATCH, shuffle=False))
    records, _ = read_records(tmp_path / "version_0")
    return intro, records, [str(w.message) for w in caught if "lightning_introspect" in str(w.message)]


def _check(intro: Introspect, records: dict[str, np.ndarray], ours: list[str], tmp_path: Path, *,
           size: int, seen_ids: Sequence[int], labels: torch.Tensor) -> None:
    """The store has ``size`` rows; exactly ``seen_ids`` were seen, each in every epoch, with its label
    ``labels[id]``; the suspects are the seen ids; the learned share counts seen examples only."""
    assert ours == []
    assert records["seen_epochs"].shape == (size,)
    seen = np.zeros(size, dtype=bool)
    seen[list(seen_ids)] = True
    np.testing.assert_array_equal(records["seen_epochs"], np.where(seen, EPOCHS, 0))
    np.testing.assert_array_equal(records["label"][seen], labels.numpy()[seen])
    assert (records["label"][~seen] == -1).all()
    suspects = intro.mislabeled()
    assert sorted(suspects.ids.tolist()) == sorted(seen_ids)
    learned = read_events(tmp_path / "version_0").scalars["samples/learned_fraction"]
    assert len(learned) == EPOCHS
    assert learned[-1][1] == pytest.approx((records["last_correct"][seen] == 1).mean())


def test_with_index_around_a_subset_keeps_the_index_and_ids_are_subset_positions(tmp_path: Path) -> None:
    """Test that WithIndex(Subset(ds)) yields (x, y, index) batches (Subset has __getitems__) and that the
    ids are positions in the subset: a store of len(subset), every position seen in both epochs."""
    ds = classification_data(N)
    picks = list(range(3, N, 2))  # 19 examples
    intro, records, ours = _run(tmp_path, WithIndex(Subset(ds, picks)))
    _check(intro, records, ours, tmp_path, size=len(picks), seen_ids=range(len(picks)), labels=ds.tensors[1][picks])


def test_subset_of_with_index_records_the_full_set_ids(tmp_path: Path) -> None:
    """Test that Subset(WithIndex(ds)) sizes the store by ds and records the picked examples under their
    ids in ds; the others are never seen and never suspects."""
    ds = classification_data(N)
    picks = [37, 2, 11, 30, 5, 19, 23, 8, 39, 14]
    intro, records, ours = _run(tmp_path, Subset(WithIndex(ds), picks))
    _check(intro, records, ours, tmp_path, size=N, seen_ids=picks, labels=ds.tensors[1])


def test_random_split_of_with_index_sizes_the_store_by_the_whole_set(tmp_path: Path) -> None:
    """Test that training on random_split(WithIndex(ds))[0] sizes the store by ds (ids reach past the split's
    length), records every example of the split under its id, and leaves the rest out of the suspects and
    shares."""
    ds = classification_data(N)
    train, _ = random_split(WithIndex(ds), [30, 10], generator=torch.Generator().manual_seed(1))
    assert max(train.indices) >= len(train)  # the scenario needs ids past the split's length
    intro, records, ours = _run(tmp_path, train)
    _check(intro, records, ours, tmp_path, size=N, seen_ids=train.indices, labels=ds.tensors[1])


class HFStyleDataset(Dataset):
    """A look-alike of HuggingFace ``datasets.Dataset``: dict items, and a batched ``__getitems__`` that returns
    a dict of per-column lists (``columns=True``) or a list of dicts; it counts its batched fetches."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, *, columns: bool) -> None:
        self.x, self.y, self.columns, self.batched_fetches = x, y, columns, 0

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"features": self.x[i], "label": int(self.y[i])}

    def __getitems__(self, indices: list[int]) -> Any:
        self.batched_fetches += 1
        if self.columns:
            return {"features": [self.x[i] for i in indices], "label": [int(self.y[i]) for i in indices]}
        return [self[i] for i in indices]


def _dict_classifier() -> Any:
    base = type(classifier())

    class DictClassifier(base):  # type: ignore[valid-type,misc]
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x = batch["features"]
            x = torch.stack(x) if isinstance(x, list) else x
            logits = self(x)
            return {"loss": F.cross_entropy(logits, batch["label"]), "logits": logits.detach()}

    return DictClassifier()


def _stack_features(items: Any) -> Any:
    """A collate_fn for a dict of lists: tensors stacked, numbers as a tensor (what a datasets user writes)."""
    return {k: torch.stack(v) if isinstance(v[0], torch.Tensor) else torch.tensor(v) for k, v in items.items()}


@pytest.mark.parametrize("columns", [False, True], ids=["list-of-dicts", "dict-of-lists"])
def test_hf_style_dataset_with_getitems_gives_dict_batches_with_ids(tmp_path: Path, columns: bool) -> None:
    """Test that WithIndex around a dict dataset with a batched __getitems__ keeps that fast path and adds the
    'index' entry, so that every example is recorded under its own id."""
    ds = classification_data(N)
    hf = HFStyleDataset(*ds.tensors, columns=columns)
    intro = Introspect(every_n_steps=10**6, warmup_steps=0, histograms=False, sample_dynamics=True)
    tr = trainer("lightning.pytorch", tmp_path, max_epochs=EPOCHS, callbacks=[intro])
    loader_kwargs = {"collate_fn": _stack_features} if columns else {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.fit(_dict_classifier(), DataLoader(WithIndex(hf), batch_size=BATCH, **loader_kwargs))
    ours = [str(w.message) for w in caught if "lightning_introspect" in str(w.message)]
    assert hf.batched_fetches == EPOCHS * N // BATCH
    records, _ = read_records(tmp_path / "version_0")
    _check(intro, records, ours, tmp_path, size=N, seen_ids=range(N), labels=ds.tensors[1])


def test_plain_tensor_dataset_in_with_index_records_every_example(tmp_path: Path) -> None:
    """Test that WithIndex(TensorDataset) records every example in both epochs, with its label."""
    ds = classification_data(N)
    intro, records, ours = _run(tmp_path, WithIndex(ds))
    _check(intro, records, ours, tmp_path, size=N, seen_ids=range(N), labels=ds.tensors[1])


def test_with_index_forwards_attributes_but_no_dunder() -> None:
    """Test that WithIndex forwards the wrapped dataset's attributes but none of its special methods."""

    class Tagged(TensorDataset):
        classes = ("a", "b")

        def __deepcopy__(self, memo: dict) -> Any:
            return self

    wrapped = WithIndex(Tagged(torch.zeros(3, 1)))
    assert wrapped.classes == ("a", "b")
    assert not hasattr(wrapped, "__deepcopy__")
    assert hasattr(WithIndex(Subset(TensorDataset(torch.zeros(3, 1)), [0, 1])), "__getitems__")
    assert WithIndex(Subset(TensorDataset(torch.zeros(3, 1)), [2, 0])).__getitems__([1, 0])[0][-1] == 1
