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


# ---------------------------------------------------------------------------------------------- item 7
class _Bag(pl.LightningModule):  # type: ignore[misc]
    """``EmbeddingBag(sparse=True, mode='sum')`` over variable-length bags (offsets), then a dense head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.bag = nn.EmbeddingBag(12, 6, mode="sum", sparse=True)
        self.head = nn.Linear(6, 3)
        self.grads: dict[int, dict[str, Tensor]] = {}

    def forward(self, tokens: Tensor, offsets: Tensor) -> Tensor:
        return self.head(self.bag(tokens, offsets))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        tokens, offsets, y = batch
        return F.cross_entropy(self(tokens, offsets), y)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        self.grads[self.global_step] = {n: p.grad.to_dense().clone() for n, p in self.named_parameters()}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.3)


def _bags(n: int) -> list[tuple[Tensor, Tensor, Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        lengths = torch.randint(1, 5, (4,), generator=g)
        tokens = torch.randint(0, 4, (int(lengths.sum()),), generator=g)  # 4 of 12 rows: many repeats
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
        out.append((tokens, offsets, torch.randint(0, 3, (4,), generator=g)))
    return out


def test_embedding_bag_sparse_gradients_give_the_dense_norms(tmp_path: Path) -> None:
    """Test that a sparse EmbeddingBag (repeated rows in each bag: uncoalesced gradients) logs, at every step,
    the global and per-parameter gradient norms of the dense gradients."""
    model = _Bag()
    cb = Introspect(every_n_steps=1, warmup_steps=0, histograms=False, param_grad_norms=True)
    ours = _fit(tmp_path, model, DataLoader(_bags(6), batch_size=None), cb, max_epochs=1)
    assert ours == []
    events = read_events(tmp_path / "version_0")
    assert events.steps("grad_norm/global") == list(range(6))
    for step, value in events.scalars["grad_norm/global"]:
        grads = model.grads[step]
        want = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads.values()])).item()
        assert value == pytest.approx(want, rel=1e-5), step
    for step, value in events.scalars["param_grad_norm/bag.weight"]:
        assert value == pytest.approx(torch.linalg.vector_norm(model.grads[step]["bag.weight"]).item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------- item 9
def test_an_unnamed_and_a_named_callback_keep_their_own_runs_and_state(tmp_path: Path) -> None:
    """Test that an unnamed and a named callback with other cadences run side by side: each writes its own
    steps to its own dir, keeps its own records, and the checkpoint holds both states under distinct keys."""
    plain = Introspect(every_n_steps=2, warmup_steps=0, histograms=False)
    named = Introspect(every_n_steps=3, warmup_steps=0, histograms=False, name="every3")
    tr = trainer("lightning.pytorch", tmp_path, callbacks=[plain, named], max_epochs=2)
    tr.fit(classifier(), loader(WithIndex(classification_data(32))))
    assert plain.state_key != named.state_key
    assert read_events(tmp_path / "version_0").steps("grad_norm/global") == [0, 2, 4, 6]
    assert read_events(tmp_path / "version_0" / "every3").steps("grad_norm/global") == [0, 3, 6]
    for run in (tmp_path / "version_0", tmp_path / "version_0" / "every3"):
        assert read_records(run)[0]["seen_epochs"].tolist() == [2] * 32
    ckpt = tmp_path / "last.ckpt"
    tr.save_checkpoint(ckpt)
    states = torch.load(ckpt, weights_only=False)["callbacks"]
    assert {plain.state_key, named.state_key} <= set(states)


# ---------------------------------------------------------------------------------------------- item 10
class _Tagger(pl.LightningModule):  # type: ignore[misc]
    """A token tagger (N, T, C) with padding targets -1; lr 0, so each sequence's loss is known."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 8)
        self.out = nn.Linear(8, 5)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.out(torch.relu(self.emb(tokens)))

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        tokens, tags, _ = batch
        logits = self(tokens)
        loss = F.cross_entropy(logits.flatten(0, 1), tags.flatten(), ignore_index=-1)
        return {"loss": loss, "logits": logits.detach()}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_sequence_padding_with_a_custom_ignore_index_is_left_out_silently(tmp_path: Path) -> None:
    """Test that tag sequences padded with -1 (Introspect(ignore_index=-1)) give no warning and each
    sequence's loss is the mean over its real tokens."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 10, (12, 6), generator=g)
    tags = torch.randint(0, 5, (12, 6), generator=g)
    lengths = torch.randint(2, 7, (12,), generator=g)
    tags[torch.arange(6).expand(12, 6) >= lengths.unsqueeze(1)] = -1
    model = _Tagger()
    with torch.no_grad():
        tok = F.cross_entropy(model(tokens).flatten(0, 1), tags.flatten(), ignore_index=-1, reduction="none")
        expected = (tok.view(12, 6).sum(1) / lengths).numpy()
    cb = Introspect(every_n_steps=2, warmup_steps=0, histograms=False, ignore_index=-1)
    ours = _fit(tmp_path, model, loader(WithIndex(torch.utils.data.TensorDataset(tokens, tags)), batch_size=4), cb,
                max_epochs=2)
    assert ours == []
    records, _ = read_records(tmp_path / "version_0")
    assert records["seen_epochs"].tolist() == [2] * 12
    np.testing.assert_allclose(records["loss_sum"], 2 * expected, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- item 11
class _Recorded(pl.LightningModule):  # type: ignore[misc]
    """:func:`mlp`; keeps each optimizer step's gradients as Lightning hands them to clipping."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = mlp()
        self.grads: dict[int, list[Tensor]] = {}

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch[0]), batch[1]) * 10  # large gradients: clipping bites

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        self.grads[self.global_step] = [p.grad.detach().clone() for p in self.parameters()]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_clipping_with_accumulation_logs_both_norms(tmp_path: Path, algorithm: str) -> None:
    """Test that with accumulate_grad_batches=2 and gradient_clip_val, each sampled step logs the norm of the
    accumulated gradients before clipping and the norm of the clipped ones (by norm or by value)."""
    model = _Recorded()
    cb = Introspect(every_n_steps=1, warmup_steps=0, histograms=False)
    ours = _fit(tmp_path, model, loader(classification_data(48)), cb, max_epochs=1, accumulate_grad_batches=2,
                gradient_clip_val=0.05, gradient_clip_algorithm=algorithm)
    assert ours == []
    events = read_events(tmp_path / "version_0")
    assert events.steps("grad_norm/global") == events.steps("grad_norm/global_clipped") == list(range(3))
    pairs = zip(events.scalars["grad_norm/global"], events.scalars["grad_norm/global_clipped"])
    for (step, before), (_, after) in pairs:
        grads = model.grads[step]
        norm = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads]))
        if algorithm == "norm":
            clipped = norm * min(1.0, 0.05 / (norm.item() + 1e-6))
        else:
            clipped = torch.linalg.vector_norm(torch.cat([g.clamp(-0.05, 0.05).reshape(-1) for g in grads]))
        assert before == pytest.approx(norm.item(), rel=1e-5), step
        assert after == pytest.approx(float(clipped), rel=1e-4), step
        assert after < before


# ---------------------------------------------------------------------------------------------- item 12
class _Gelu(nn.Module):
    """``Linear(3, 4)`` whose units sit in [-1.5, -0.5) for inputs in [0, 1), then GELU (a module, or
    ``F.gelu``): healthy, no unit dead."""

    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.act = nn.Identity() if functional else nn.GELU()
        self.functional = functional
        self.out = nn.Linear(4, 2)
        with torch.no_grad():
            self.fc.weight.fill_(1.0 / 3)
            self.fc.bias.fill_(-1.5)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        return self.out(F.gelu(h) if self.functional else self.act(h))


class _Cnn(nn.Module):
    """Conv2d(1, 3) + BatchNorm2d(3) + ReLU (a module, or ``F.relu``); the BN shifts channel 0 far below 0:
    exactly one dead channel."""

    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.relu = nn.Identity() if functional else nn.ReLU()
        self.functional = functional
        self.out = nn.Linear(3, 2)
        with torch.no_grad():
            self.bn.bias.copy_(torch.tensor([-100.0, 0.0, 0.0]))

    def forward(self, x: Tensor) -> Tensor:
        h = self.bn(self.conv(x))
        return self.out((F.relu(h) if self.functional else self.relu(h)).mean((2, 3)))


class _Wrap(pl.LightningModule):  # type: ignore[misc]
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize("functional", [False, True], ids=["nn.GELU", "F.gelu"])
def test_gelu_mlp_units_below_zero_are_not_dead(tmp_path: Path, functional: bool) -> None:
    """Test that a GELU whose inputs all sit below 0 is never called dead: an nn.GELU gets no dead tag (nor
    the Linear it judges), and the Linear before an F.gelu, judged by its gradient, has no dead unit."""
    torch.manual_seed(0)
    x = torch.rand(32, 3)
    cb = Introspect(every_n_steps=1, warmup_steps=0, histograms=False, dead_window=2)
    _fit(tmp_path, _Wrap(_Gelu(functional)), loader(torch.utils.data.TensorDataset(x, torch.randint(0, 2, (32,)))),
         cb, max_epochs=1)
    scalars = read_events(tmp_path / "version_0").scalars
    assert len(scalars["activation_mean/net.fc"]) == 4
    if functional:
        dead = [v for _, v in scalars["dead_fraction/net.fc"]]
        assert len(dead) >= 3 and dead == [0.0] * len(dead)
    else:
        assert not any(t.startswith(("dead_", "saturated_")) and t.endswith(("/net.act", "/net.fc")) for t in scalars)


@pytest.mark.parametrize("functional", [False, True], ids=["nn.ReLU", "F.relu"])
def test_conv_batchnorm_relu_cnn_has_one_dead_channel(tmp_path: Path, functional: bool) -> None:
    """Test that in a Conv2d+BatchNorm+ReLU block whose BN pins channel 0 far below 0, one unit of three is
    dead: judged at the nn.ReLU, or at the conv by its gradient (none reaches channel 0) under F.relu."""
    torch.manual_seed(0)
    x = torch.randn(32, 1, 5, 5)
    cb = Introspect(every_n_steps=1, warmup_steps=0, histograms=False, dead_window=2)
    _fit(tmp_path, _Wrap(_Cnn(functional)), loader(torch.utils.data.TensorDataset(x, torch.randint(0, 2, (32,)))),
         cb, max_epochs=1)
    scalars = read_events(tmp_path / "version_0").scalars
    layer = "net.conv" if functional else "net.relu"
    assert [v for _, v in scalars[f"dead_count/{layer}"]][-1] == 1.0
    assert scalars[f"dead_fraction/{layer}"][-1][1] == pytest.approx(1 / 3)
    judged = {t.split("/", 1)[1] for t in scalars if t.startswith("dead_fraction/")}
    assert judged == {layer, "net.out"}


# ---------------------------------------------------------------------------------------------- item 13
class _TwoHeads(pl.LightningModule):  # type: ignore[misc]
    """A TransformerEncoderLayer body, a used head and an ``aux`` head that forward never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.enc = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True, dropout=0.0)
        self.head = nn.Linear(8, 3)
        self.aux = nn.Linear(8, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.enc(self.emb(tokens)).mean(1))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_transformer_layer_with_an_unused_head_names_only_that_head(tmp_path: Path) -> None:
    """Test that a TransformerEncoderLayer's attention gets statistics on every sampled step, and the one
    warning after the first epoch names the unused head only (not out_proj, not the used layers)."""
    g = torch.Generator().manual_seed(0)
    tokens, labels = torch.randint(0, 10, (24, 5), generator=g), torch.randint(0, 3, (24,), generator=g)
    data = torch.utils.data.TensorDataset(tokens, labels)
    cb = Introspect(every_n_steps=2, warmup_steps=0, histograms=False)
    ours = _fit(tmp_path, _TwoHeads(), loader(data), cb, max_epochs=3)
    uncalled = [w for w in ours if "never called" in w or "no statistics" in w]
    assert len(uncalled) == 1, ours
    assert "'aux'" in uncalled[0] and "out_proj" not in uncalled[0] and "'head'" not in uncalled[0]
    events = read_events(tmp_path / "version_0")
    sampled = events.steps("grad_norm/global")
    assert sampled == [0, 2, 4, 6, 8]
    assert events.steps("activation_mean/enc.self_attn") == sampled
    assert "activation_mean/aux" not in events.scalars


def test_concat_of_with_index_parts_is_refused_and_with_index_of_concat_works(tmp_path: Path) -> None:
    """Test that a ConcatDataset of WithIndex-wrapped parts (ids colliding across parts) is refused before
    training with the fix in the text, and that WithIndex(ConcatDataset(parts)) records every example."""
    from torch.utils.data import ConcatDataset

    a, b = classification_data(16, seed=0), classification_data(8, seed=1)
    cb = Introspect(every_n_steps=10**6, warmup_steps=0, histograms=False)
    with pytest.raises(ValueError, match=r"Wrap the concatenation instead: `WithIndex\(ConcatDataset"):
        _fit(tmp_path / "parts", classifier(), loader(Subset(ConcatDataset([WithIndex(a), WithIndex(b)]), range(20))),
             cb, max_epochs=1)
    cb = Introspect(every_n_steps=10**6, warmup_steps=0, histograms=False)
    assert _fit(tmp_path, classifier(), loader(WithIndex(ConcatDataset([a, b]))), cb, max_epochs=2) == []
    records, _ = read_records(tmp_path / "version_0")
    assert records["seen_epochs"].tolist() == [2] * 24
    np.testing.assert_array_equal(records["label"], torch.cat([a.tensors[1], b.tensors[1]]).numpy())


def test_reused_callback_resumes_from_a_checkpoint_in_the_first_runs_dir(tmp_path: Path) -> None:
    """Test that a notebook resume (the same callback, a new Trainer in the first run's log dir, fit with
    ckpt_path) continues the run: every example counted in all 3 epochs, points continue without repeats."""
    cb = Introspect(every_n_steps=2, warmup_steps=0, histograms=False)
    data = loader(WithIndex(classification_data(32)))
    tr = trainer("lightning.pytorch", tmp_path, callbacks=[cb], max_epochs=2)
    model = classifier()
    tr.fit(model, data)
    tr.save_checkpoint(tmp_path / "epoch2.ckpt")
    tr = trainer("lightning.pytorch", tmp_path, callbacks=[cb], max_epochs=3)
    tr.fit(classifier(), data, ckpt_path=str(tmp_path / "epoch2.ckpt"), weights_only=False)
    records, _ = read_records(tmp_path / "version_0")
    assert records["seen_epochs"].tolist() == [3] * 32
    events = read_events(tmp_path / "version_0")
    assert events.steps("grad_norm/global") == list(range(0, 12, 2))
    assert events.steps("samples/learned_fraction") == [4, 8, 12]


class _ManualClip(pl.LightningModule):  # type: ignore[misc]
    """Manual optimization that clips with ``self.clip_gradients`` before ``opt.step()``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = mlp()
        self.automatic_optimization = False
        self.norms: dict[int, tuple[float, float]] = {}

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(F.cross_entropy(self.net(batch[0]), batch[1]) * 10)
        before = torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in self.parameters()])).item()
        self.clip_gradients(opt, gradient_clip_val=0.05, gradient_clip_algorithm="norm")
        after = torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in self.parameters()])).item()
        self.norms[self.global_step] = (before, after)
        opt.step()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_manual_optimization_logs_the_norm_as_the_step_runs(tmp_path: Path) -> None:
    """Test the documented rule under manual optimization: grad_norm/global is read as opt.step() runs, so it
    is the norm after the step's own clip_gradients, and no grad_norm/global_clipped is written."""
    model = _ManualClip()
    cb = Introspect(every_n_steps=1, warmup_steps=0, histograms=False)
    _fit(tmp_path, model, loader(classification_data(24)), cb, max_epochs=1)
    events = read_events(tmp_path / "version_0")
    assert events.steps("grad_norm/global") == [0, 1, 2]
    assert "grad_norm/global_clipped" not in events.scalars
    for step, value in events.scalars["grad_norm/global"]:
        before, after = model.norms[step]
        assert after < before
        assert value == pytest.approx(after, rel=1e-5)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_torch_without_set_stance_trains_and_says_what_compile_loses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compiled: bool
) -> None:
    """Test that on a torch without torch.compiler.set_stance (before 2.6; the package asks for torch>=2.1)
    sampled steps run, an eager run gets every statistic and no warning (even after something else was
    compiled in the process), and a compiled run is warned once that compiled layers may miss statistics."""
    monkeypatch.delattr(torch.compiler, "set_stance")
    torch._dynamo.reset()
    torch.compile(lambda t: t * 2, backend="eager")(torch.ones(2))  # compiled before the run: not its own
    try:
        cb = Introspect(every_n_steps=2, warmup_steps=0, histograms=False)
        model = _CompiledInside() if compiled else classifier()
        ours = _fit(tmp_path, model, loader(WithIndex(classification_data(32))), cb, max_epochs=1)
    finally:
        torch._dynamo.reset()
    events = read_events(tmp_path / "version_0")
    assert events.steps("grad_norm/global") == [0, 2]
    if compiled:
        assert len(ours) == 1 and "has no `torch.compiler.set_stance`" in ours[0]
    else:
        assert ours == []
        assert events.steps("activation_mean/net.0") == [0, 2]


@pytest.mark.parametrize("batch", [32, 16])
def test_history_holds_every_epoch_with_every_example(tmp_path: Path, batch: int) -> None:
    """Test that history=True writes one file per epoch, each with every example seen in it, for epochs of
    16 and 32 steps (the per-example buffer's size and twice it)."""
    from lightning_introspect.records import read_epoch_history

    n = 512
    cb = Introspect(every_n_steps=10**6, warmup_steps=0, histograms=False, history=True)
    ours = _fit(tmp_path, classifier(return_logits=False), loader(WithIndex(classification_data(n)), batch_size=batch),
                cb, max_epochs=4)
    assert ours == []
    history = read_epoch_history(tmp_path / "version_0")
    assert [epoch for epoch, _ in history] == [0, 1, 2, 3]
    for epoch, means in history:
        assert np.isfinite(means["loss"]).sum() == n, epoch
    records, _ = read_records(tmp_path / "version_0")
    assert records["seen_epochs"].tolist() == [4] * n


def _compiles_now() -> bool:
    """Whether torch.compile compiles a fresh function now (under the `force_eager` stance it does not)."""
    calls: list[int] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        calls.append(1)
        return gm.forward

    torch.compile(lambda t: t * 3, backend=backend)(torch.ones(2))
    return bool(calls)


def test_two_callbacks_sampling_the_same_steps_give_the_stance_back(tmp_path: Path) -> None:
    """Test that two callbacks on one Trainer sampling the same steps (their step ends come in the order of
    their step starts) leave torch.compile compiling after fit, and that both get every sampled step."""
    torch._dynamo.reset()
    assert _compiles_now()
    a = Introspect(every_n_steps=2, warmup_steps=0, histograms=False, name="a")
    b = Introspect(every_n_steps=2, warmup_steps=0, histograms=False, name="b")
    tr = trainer("lightning.pytorch", tmp_path, callbacks=[a, b], max_epochs=1)
    tr.fit(_CompiledInside(), loader(WithIndex(classification_data(32))))
    try:
        assert _compiles_now()
    finally:
        torch._dynamo.reset()
    for name in ("a", "b"):
        events = read_events(tmp_path / "version_0" / name)
        assert events.steps("activation_mean/net.0") == events.steps("grad_norm/global") == [0, 2], name
