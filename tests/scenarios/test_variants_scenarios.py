"""Variants of the issue-23 scenarios, built the other ways a user builds them: nested splits, dict
datasets with a collate_fn, a compiled submodule, accumulation, ``ddp_spawn``, notebook-style reuse, sparse
``EmbeddingBag`` gradients, a skipped last batch, clipping with accumulation, GELU and CNN dead units, an
unused head. Each asserts the numbers against an oracle built from the data or the model."""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset, random_split

from helpers.models import classification_data, classifier, lightning, loader, mlp, trainer
from helpers.tb import read_events
from lightning_introspect import Introspect, WithIndex
from lightning_introspect.records import read_records

pl = lightning("lightning.pytorch")


def _fit(tmp_path: Path, model: Any, data: Any, cb: Introspect, **kwargs: Any) -> list[str]:
    """Fits with a TensorBoardLogger in ``tmp_path/version_0``; returns the tool's warnings."""
    tr = trainer("lightning.pytorch", tmp_path, callbacks=[cb], **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.fit(model, data)
    return [str(w.message) for w in caught if "introspect" in str(w.message).lower()]


# ---------------------------------------------------------------------------------------------- items 1, 2
def test_subset_of_with_index_of_subset_records_the_inner_subset_positions(tmp_path: Path) -> None:
    """Test that Subset(WithIndex(Subset(ds))) sizes the store by the inner subset and records the outer
    picks under their positions in it, with that example's label."""
    ds = classification_data(40)
    inner = list(range(1, 40, 2))  # 20 examples
    outer = [3, 17, 0, 9, 12, 5]
    cb = Introspect(every_n_steps=10**6, warmup_steps=0, histograms=False, sample_dynamics=True)
    ours = _fit(tmp_path, classifier(), DataLoader(Subset(WithIndex(Subset(ds, inner)), outer), batch_size=4),
                cb, max_epochs=2)
    assert ours == []
    records, _ = read_records(tmp_path / "version_0")
    expected = np.zeros(len(inner), dtype=np.int64)
    expected[outer] = 2
    np.testing.assert_array_equal(records["seen_epochs"], expected)
    labels = ds.tensors[1][inner].numpy()
    np.testing.assert_array_equal(records["label"][outer], labels[outer])


def test_subset_of_a_random_split_of_with_index_keeps_the_full_set_ids(tmp_path: Path) -> None:
    """Test that Subset(random_split(WithIndex(ds))[0]) sizes the store by ds and records the picks under
    their ids in ds."""
    ds = classification_data(40)
    train, _ = random_split(WithIndex(ds), [30, 10], generator=torch.Generator().manual_seed(1))
    picks = [0, 4, 8, 29, 13, 21, 2, 7]
    ids = [train.indices[p] for p in picks]
    cb = Introspect(every_n_steps=10**6, warmup_steps=0, histograms=False, sample_dynamics=True)
    ours = _fit(tmp_path, classifier(), DataLoader(Subset(train, picks), batch_size=4), cb, max_epochs=2)
    assert ours == []
    records, _ = read_records(tmp_path / "version_0")
    expected = np.zeros(40, dtype=np.int64)
    expected[ids] = 2
    np.testing.assert_array_equal(records["seen_epochs"], expected)
    np.testing.assert_array_equal(records["label"][ids], ds.tensors[1][ids].numpy())


class _Columns(Dataset):
    """HF-style: ``__getitems__`` returns a dict of per-key lists; no tuple items."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"pixel": self.x[i], "label": int(self.y[i])}

    def __getitems__(self, idx: list[int]) -> dict[str, Any]:
        return {"pixel": [self.x[i] for i in idx], "label": [int(self.y[i]) for i in idx]}


class _DictModel(pl.LightningModule):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch["pixel"]), batch["labels"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_hf_style_columns_with_a_collate_fn_that_renames_keys(tmp_path: Path) -> None:
    """Test that a column dataset in WithIndex, batched by a collate_fn that builds its own dict (renaming
    'label' to 'labels', keeping 'index'), gives every id both epochs with its label (logits from forward)."""
    ds = classification_data(24)
    cols = WithIndex(_Columns(*ds.tensors))

    def collate(b: dict[str, Any]) -> dict[str, Tensor]:
        return {"pixel": torch.stack(b["pixel"]), "labels": torch.tensor(b["label"]), "index": torch.tensor(b["index"])}

    cb = Introspect(every_n_steps=10**6, warmup_steps=0, histograms=False, sample_dynamics=True)
    ours = _fit(tmp_path, _DictModel(), DataLoader(cols, batch_size=5, collate_fn=collate), cb, max_epochs=2)
    assert ours == []
    records, _ = read_records(tmp_path / "version_0")
    assert records["seen_epochs"].tolist() == [2] * 24
    np.testing.assert_array_equal(records["label"], ds.tensors[1].numpy())


# ---------------------------------------------------------------------------------------------- item 3
class _CompiledInside(pl.LightningModule):  # type: ignore[misc]
    """A LightningModule whose body is a ``torch.compile``-d submodule (the module itself is not compiled)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()
        self.body = torch.compile(self.net, backend="aot_eager")

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_compiled_submodule_with_partial_batches_keeps_stats_on_every_sampled_step(tmp_path: Path) -> None:
    """Test that a compiled submodule, fed 3 full batches and a partial one per epoch, gets activation stats
    on every sampled step (every 2nd after 1 warm-up step), as grad_norm does."""
    torch._dynamo.reset()
    try:
        cb = Introspect(every_n_steps=2, warmup_steps=1, histograms=False)
        ours = _fit(tmp_path, _CompiledInside(), loader(WithIndex(classification_data(27)), batch_size=8), cb,
                    max_epochs=3)
    finally:
        torch._dynamo.reset()
    assert ours == []
    events = read_events(tmp_path / "version_0")
    grad_steps = events.steps("grad_norm/global")
    for layer in ("net.0", "net.1", "net.3", "net.4", "net.5"):
        assert events.steps(f"activation_mean/{layer}") == grad_steps, layer
    assert len(grad_steps) >= 6
    records, _ = read_records(tmp_path / "version_0")
    assert records["seen_epochs"].tolist() == [3] * 27


# ---------------------------------------------------------------------------------------------- item 4
@pytest.mark.parametrize("batches", [15, 16, 17, 33])
def test_accumulated_epochs_count_every_example(tmp_path: Path, batches: int) -> None:
    """Test that with accumulate_grad_batches=3 and epochs of 15, 16, 17 or 33 batches (a partial last
    one), every example is counted in each of 3 epochs."""
    n = batches * 4 - 1
    cb = Introspect(every_n_steps=3, warmup_steps=1, histograms=False)
    ours = _fit(tmp_path, classifier(return_logits=False), loader(WithIndex(classification_data(n)), batch_size=4),
                cb, max_epochs=3, accumulate_grad_batches=3)
    assert ours == []
    records, _ = read_records(tmp_path / "version_0")
    assert records["seen_epochs"].tolist() == [3] * n
    steps_per_epoch = math.ceil(batches / 3)
    assert read_events(tmp_path / "version_0").steps("samples/learned_fraction") == [
        steps_per_epoch * e for e in (1, 2, 3)]


# ---------------------------------------------------------------------------------------------- item 6
def test_notebook_loop_of_three_trainers_with_auto_versions(tmp_path: Path) -> None:
    """Test that one callback reused by three Trainers whose TensorBoardLogger picks version_0, 1, 2 in one
    folder writes each run's points and fresh records to its own version, with each run's epoch count."""
    cb = Introspect(every_n_steps=2, warmup_steps=0, histograms=False)
    data = loader(WithIndex(classification_data(32)))
    for epochs in (1, 2, 3):
        logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="hp", default_hp_metric=False)
        model = classifier()
        trainer("lightning.pytorch", tmp_path, logger=logger, callbacks=[cb], max_epochs=epochs).fit(model, data)
        assert cb.core is not None and cb.core.model is model
    for version, epochs in enumerate((1, 2, 3)):
        run = tmp_path / "hp" / f"version_{version}"
        records, _ = read_records(run)
        assert records["seen_epochs"].tolist() == [epochs] * 32, version
        events = read_events(run)
        assert events.steps("grad_norm/global") == list(range(0, 4 * epochs, 2)), version
        assert events.steps("samples/learned_fraction") == [4 * e for e in range(1, epochs + 1)], version


def test_reused_callback_without_a_logger_in_the_same_root_is_refused(tmp_path: Path) -> None:
    """Test that a second Trainer with logger=False in the first one's root dir is refused before training
    (it would resolve to the first run's records dir), and the first run's records stay intact."""
    cb = Introspect(every_n_steps=2, warmup_steps=0, histograms=False)
    data = loader(WithIndex(classification_data(32)))
    trainer("lightning.pytorch", tmp_path, logger=False, callbacks=[cb], max_epochs=1).fit(classifier(), data)
    model = classifier()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="already wrote a run"):
        trainer("lightning.pytorch", tmp_path, logger=False, callbacks=[cb], max_epochs=1).fit(model, data)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    records, _ = read_records(tmp_path)
    assert records["seen_epochs"].tolist() == [1] * 32


# ---------------------------------------------------------------------------------------------- item 8
class _SkipLast(pl.LightningModule):  # type: ignore[misc]
    """Returns None on the last batch of every epoch (and on every batch of epoch 1), logits from forward."""

    def __init__(self, last: int) -> None:
        super().__init__()
        self.net = mlp()
        self.last = last

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        logits = self(batch[0])
        if batch_idx == self.last or self.current_epoch == 1:
            return None
        return F.cross_entropy(logits, batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_none_on_the_last_batch_and_on_a_whole_epoch(tmp_path: Path) -> None:
    """Test that skipping each epoch's last batch, and all of epoch 1, leaves exactly those examples out:
    the last batch's ids are never seen, the others in epochs 0 and 2 only; no warning."""
    cb = Introspect(every_n_steps=1, warmup_steps=0, histograms=False)
    ours = _fit(tmp_path, _SkipLast(last=4), loader(WithIndex(classification_data(36)), batch_size=8), cb,
                max_epochs=3)
    assert ours == []
    records, _ = read_records(tmp_path / "version_0")
    assert records["seen_epochs"].tolist() == [2] * 32 + [0] * 4
    events = read_events(tmp_path / "version_0")
    # Lightning counts a skipped batch's step (5 an epoch); only the 8 that ran a backward have gradients,
    # and every step ran the forward, so every one has activation statistics.
    assert events.steps("grad_norm/global") == [0, 1, 2, 3, 10, 11, 12, 13]
    assert events.steps("activation_mean/net.0") == list(range(15))


# ---------------------------------------------------------------------------------------------- item 5
class _TupleForward(pl.LightningModule):  # type: ignore[misc]
    """``forward`` returns ``(logits, features)``; ``training_step`` returns a dict without logits. lr 0:
    the model never changes, so each example's loss is known in closed form."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.head = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.body(x)
        return self.head(h), h

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        logits, _ = self(batch[0])
        loss = F.cross_entropy(logits, batch[1])
        return {"loss": loss, "acc": (logits.argmax(1) == batch[1]).float().mean().detach()}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_ddp_spawn_takes_logits_from_a_tuple_forward_when_the_step_returns_a_dict(tmp_path: Path) -> None:
    """Test that under ddp_spawn on 2 processes, a forward returning (logits, features) and a step returning
    {'loss', 'acc'} give every example its closed-form loss in each epoch (the 21st example padded twice)."""
    ds = classification_data(21)
    model = _TupleForward()
    with torch.no_grad():
        expected = F.cross_entropy(model(ds.tensors[0])[0], ds.tensors[1], reduction="none").numpy()
    cb = Introspect(every_n_steps=2, warmup_steps=0, histograms=False, sample_dynamics=True)
    tr = trainer("lightning.pytorch", tmp_path, callbacks=[cb], max_epochs=2, strategy="ddp_spawn", devices=2,
                 use_distributed_sampler=True)
    tr.fit(model, DataLoader(WithIndex(ds), batch_size=3))
    records, _ = read_records(tmp_path / "version_0")
    assert records["seen_epochs"].tolist() == [2] * 21
    np.testing.assert_array_equal(records["label"], ds.tensors[1].numpy())
    np.testing.assert_allclose(records["loss_sum"], 2 * expected, rtol=1e-5)
