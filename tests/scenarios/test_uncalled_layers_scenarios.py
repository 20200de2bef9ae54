"""Scenario: selected layers that the forward pass never calls, with a real Trainer and event files read back.

``nn.MultiheadAttention`` uses ``out_proj.weight`` directly, so the attention module's output is watched and
``out_proj`` is left out; a registered but unused layer is named in one warning after the first epoch.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers.models import trainer
from helpers.tb import read_events
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_introspect import Introspect

STEPS_PER_EPOCH = 4


class Attention(pl.LightningModule):
    """An embedding, a bare ``nn.MultiheadAttention``, a ``TransformerEncoderLayer`` (functional ReLU) and a
    head on (N, T=5, 8) inputs; ``spare`` is registered but never called when ``use_spare`` is False."""

    def __init__(self, use_spare: bool = True) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.block = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.spare = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)
        self.use_spare = use_spare

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        h = h + self.attn(h, h, h)[0]
        h = self.block(h)
        if self.use_spare:
            h = self.spare(h)
        return self.head(h.mean(1))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    n = STEPS_PER_EPOCH * 4
    data = TensorDataset(torch.randn(n, 5, 8, generator=g), torch.randint(0, 2, (n,), generator=g))
    return DataLoader(data, batch_size=4)


def _fit(tmp_path: Path, model: Attention, epochs: int, probe: Any = None) -> list[str]:
    """Fits with every step sampled; returns the texts of lightning_introspect's warnings about uncalled layers."""
    cb = Introspect(every_n_steps=1, warmup_steps=0, dead_window=1, histograms=False, sample_dynamics=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callbacks = [cb] if probe is None else [cb, probe(caught)]
        trainer("lightning.pytorch", tmp_path, callbacks=callbacks, max_epochs=epochs).fit(model, _loader())
    return [str(w.message) for w in caught if "were not called" in str(w.message)]


def test_attention_module_is_watched_instead_of_its_out_proj(tmp_path: Path) -> None:
    """Test that the attention modules' outputs (first tensor of their tuple) get statistics on every sampled step,
    out_proj none, the encoder layer's submodules all of theirs in training mode, and no layer is reported unused."""
    model = Attention(use_spare=True)
    with torch.no_grad():  # the oracle: step 0's attention output (initial weights, first batch), by hand
        h = model.embed(_loader().dataset.tensors[0][:4])
        attn_out, attn_weights = model.attn(h, h, h)
    uncalled = _fit(tmp_path, model, epochs=1)
    scalars = read_events(tmp_path / "version_0").scalars
    steps = list(range(STEPS_PER_EPOCH))
    for layer in ("attn", "block.self_attn", "block.linear1", "block.linear2", "spare", "head"):
        assert [s for s, _ in scalars[f"activation_mean/{layer}"]] == steps, layer
    # the first tensor of the (output, weights) tuple: (4, 5, 8) values, not the weights (whose mean is 1/5)
    assert scalars["activation_mean/attn"][0][1] == pytest.approx(attn_out.mean().item(), rel=1e-5, abs=1e-6)
    assert scalars["activation_max/attn"][0][1] == pytest.approx(attn_out.max().item(), rel=1e-5)
    assert attn_out.mean().item() != pytest.approx(attn_weights.mean().item(), abs=1e-3)
    # out_proj's parameters still have gradient norms; as a layer it is not watched (it is never called)
    assert not any("out_proj" in tag for tag in scalars if not tag.startswith(("grad_norm/", "grad_to_weight/",
                                                                                "update_to_weight/")))
    assert "grad_norm/attn.out_proj" in scalars
    # a functional ReLU follows linear1: it is judged by the gradient reaching it
    assert "dead_fraction/block.linear1" in scalars
    assert uncalled == []


def test_unused_layer_is_named_once_after_the_first_epoch(tmp_path: Path) -> None:
    """Test that a registered but never-called Linear is named in exactly one warning, raised at the end of the
    first epoch (none during its steps), not repeated in later epochs, and gets no statistics."""
    seen_during_first_epoch: list[int] = []

    def probe(caught: list) -> pl.Callback:
        class Probe(pl.Callback):
            def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
                if trainer.current_epoch == 0:
                    seen_during_first_epoch.append(sum("were not called" in str(w.message) for w in caught))

        return Probe()

    uncalled = _fit(tmp_path, Attention(use_spare=False), epochs=3, probe=probe)
    assert seen_during_first_epoch == [0] * STEPS_PER_EPOCH
    assert len(uncalled) == 1
    assert "['spare']" in uncalled[0] and f"{STEPS_PER_EPOCH} sampled step(s)" in uncalled[0]
    assert "`layers=`" in uncalled[0]
    scalars = read_events(tmp_path / "version_0").scalars
    assert not any(tag.endswith("/spare") for tag in scalars)
    assert len(scalars["activation_mean/head"]) == 3 * STEPS_PER_EPOCH


def test_a_resumed_run_blames_no_layer_for_the_first_runs_sampled_steps(tmp_path: Path) -> None:
    """Test that a run resumed from a checkpoint whose layers are all called warns about none of them: the first
    run's sampled steps (counted in the checkpoint) are not taken for steps on which this run saw no call."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(epochs: int, ckpt: Any = None) -> list[str]:
        cb = Introspect(every_n_steps=10, warmup_steps=0, histograms=False, sample_dynamics=False)
        saver = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_top_k=-1, every_n_epochs=1, filename="{epoch}")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer("lightning.pytorch", tmp_path, callbacks=[cb, saver], max_epochs=epochs,
                    enable_checkpointing=True).fit(Attention(use_spare=True), _loader(), ckpt_path=ckpt)
        return [str(w.message) for w in caught if "were not called" in str(w.message)]

    assert fit(1) == []
    # Resumed at step 4: steps 4-7 are not sampled, so this run has seen no call when its epoch ends.
    assert fit(2, ckpt=str(tmp_path / "ckpt" / "epoch=0.ckpt")) == []
