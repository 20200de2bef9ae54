"""Trainer features around the training loop: accumulation, several optimizers, manual optimization, the
validation/test/predict loops, fast_dev_run, max_steps mid-epoch, and checkpoint -> resume continuing exactly."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import lightning.pytorch as pl
from helpers.robust_common import TinyNet, layer_tags, loader, make_data, read_scalars, tiny_model, trainer_kwargs
from lightning_introspect import Introspect
from lightning_introspect.records import read_records


def _intro(**kwargs: Any) -> Introspect:
    return Introspect(**{"every_n_steps": 1, "warmup_steps": 0, "dead_window": 2, "histograms": False, **kwargs})


def test_gradient_accumulation_gives_one_point_per_optimizer_step(tmp_path: Path) -> None:
    """Test that with `accumulate_grad_batches=2` every statistic has one point per optimizer step, and the
    activations of both micro-batches of a step are folded into that point."""
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=3, accumulate_grad_batches=2, callbacks=[_intro()])).fit(
        tiny_model(0), loader(make_data(24), batch_size=4))
    scalars = read_scalars(tmp_path / "run")
    for tag in ("grad_norm/global", "activation_mean/net.0", "update_to_weight/global"):
        assert [s for s, _ in scalars[tag]] == [0, 1, 2], tag


class TwoOptimizers(TinyNet):
    """Manual optimization with one optimizer per Linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y, _ = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.manual_backward(loss)
        for opt in self.optimizers():
            opt.step()
            opt.zero_grad()
        return {"loss": loss.detach(), "logits": logits.detach()}

    def configure_optimizers(self) -> Any:
        return [torch.optim.SGD(self.net[0].parameters(), lr=0.1), torch.optim.SGD(self.net[2].parameters(), lr=0.1)]


def test_manual_optimization_with_two_optimizers(tmp_path: Path) -> None:
    """Test that manual optimization with two optimizers logs each layer's gradient norm once per step and the
    per-example records."""
    torch.manual_seed(0)
    intro = _intro()
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[intro])).fit(
        TwoOptimizers(), loader(make_data(12), batch_size=4))
    scalars = read_scalars(tmp_path / "run")
    # Manual optimization: trainer.global_step counts optimizer steps (2 per batch), so steps are 0, 2, 4.
    steps = [s for s, _ in scalars["grad_norm/net.0"]]
    assert len(steps) == 3 and steps == [s for s, _ in scalars["grad_norm/net.2"]]
    assert intro.core is not None and intro.core.records()["seen_epochs"].tolist() == [1] * 12


def test_validation_test_predict_loops_add_no_points(tmp_path: Path) -> None:
    """Test that validation, test and predict loops attach no hooks and add no points or records."""
    intro = _intro()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, callbacks=[intro], num_sanity_val_steps=2))
    model = tiny_model(0)
    train, val = loader(make_data(8), batch_size=4), loader(make_data(8, seed=1), batch_size=4)
    trainer.fit(model, train, val)
    before = read_scalars(tmp_path / "run")
    records_before = read_records(tmp_path / "run")[0]
    assert [s for s, _ in before["activation_mean/net.0"]] == [0, 1, 2, 3]  # training steps only
    trainer.validate(model, val)
    trainer.test(model, val)
    trainer.predict(model, val)
    after = read_scalars(tmp_path / "run")
    assert {t: after[t] for t in layer_tags(before)} == {t: before[t] for t in layer_tags(before)}
    for key, values in read_records(tmp_path / "run")[0].items():
        np.testing.assert_array_equal(values, records_before[key])
    assert not any(m._forward_hooks for m in model.modules())


def test_fast_dev_run(tmp_path: Path) -> None:
    """Test that `fast_dev_run` (no logger, one batch) trains with Introspect and keeps the records in memory."""
    intro = _intro()
    pl.Trainer(default_root_dir=str(tmp_path), accelerator="cpu", fast_dev_run=True, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[intro]).fit(tiny_model(0), loader(make_data(8), batch_size=4))
    assert intro.core is not None and int(intro.core.records()["seen_epochs"].sum()) == 4


def test_max_steps_mid_epoch_flushes_the_last_step(tmp_path: Path) -> None:
    """Test that `max_steps` ending mid-epoch still writes the last sampled step and the partial epoch's records."""
    intro = _intro()
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=3, callbacks=[intro])).fit(
        tiny_model(0), loader(make_data(20), batch_size=4))
    scalars = read_scalars(tmp_path / "run")
    assert [s for s, _ in scalars["grad_norm/global"]] == [0, 1, 2]
    records, meta = read_records(tmp_path / "run")
    assert records["seen_epochs"].tolist() == [1] * 12 + [0] * 8


def _resume_kwargs(root: Path, epochs: int, intro: Introspect, **kw: Any) -> dict[str, Any]:
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=str(root / "ckpt"), save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    return trainer_kwargs(root, max_epochs=epochs, callbacks=[intro, ckpt], enable_checkpointing=True, **kw)


def test_resume_from_epoch_checkpoint_continues_exactly(tmp_path: Path) -> None:
    """Test that fit -> epoch checkpoint -> resume gives the curves of an uninterrupted run (no gap, no repeated
    step, same values across all event files of the run) and the same per-example records."""
    data = make_data(14)
    full = tmp_path / "full"
    pl.Trainer(**_resume_kwargs(full, 4, _intro(every_n_steps=3, warmup_steps=1))).fit(
        tiny_model(0), loader(data, batch_size=4))
    part = tmp_path / "part"
    pl.Trainer(**_resume_kwargs(part, 2, _intro(every_n_steps=3, warmup_steps=1))).fit(
        tiny_model(0), loader(data, batch_size=4))
    resumed_intro = _intro(every_n_steps=3, warmup_steps=1)
    pl.Trainer(**_resume_kwargs(part, 4, resumed_intro)).fit(
        tiny_model(1), loader(data, batch_size=4), ckpt_path=str(part / "ckpt" / "epoch=1.ckpt"))
    assert len(list((part / "run").glob("events.out.tfevents.*"))) == 2
    want, got = read_scalars(full / "run"), read_scalars(part / "run")
    for tag in layer_tags(want) + ["samples/learned_fraction", "samples/forgotten_fraction"]:
        steps = [s for s, _ in got[tag]]
        assert steps == [s for s, _ in want[tag]], tag  # no gap, no repeated step
        np.testing.assert_allclose([v for _, v in got[tag]], [v for _, v in want[tag]], rtol=1e-5, atol=1e-6,
                                   err_msg=tag)
    assert [s for s, _ in want["grad_norm/global"]] == [0, 3, 6, 9, 12, 15]
    want_records, _ = read_records(full / "run")
    got_records, meta = read_records(part / "run")
    assert meta["epoch"] == 3
    for key, values in want_records.items():
        np.testing.assert_allclose(got_records[key], values, rtol=1e-5, atol=1e-6, err_msg=key)
