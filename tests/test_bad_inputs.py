"""Bad input: each case gives a clear error or warning, and training and the data already recorded survive.

Mid-run cases inject the bad input at step 4 (epoch 1 of 2; epoch 0's records are on disk by then): the run
must finish all 6 steps with readable records covering both epochs. Setup-time mistakes fail before
training with a message that names the fix. The list (input -> behaviour) is in docs_support_section.md.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lightning.pytorch as pl
from helpers.robust_common import TinyNet, loader, make_data, tiny_model, trainer_kwargs
from helpers.tb import read_events
from lightning_introspect import Introspect
from lightning_introspect.records import RecordsError, read_records, write_records
from lightning_introspect.report import main as report_main

BAD_STEP = 4


class BadAtStep(TinyNet):
    """TinyNet whose step output is altered by ``corrupt(out, batch)`` at global step ``BAD_STEP``."""

    def __init__(self, corrupt: Callable[[dict[str, Any], Any], dict[str, Any]]) -> None:
        torch.manual_seed(0)
        super().__init__()
        self.corrupt = corrupt

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if self.global_step == BAD_STEP:
            x, y, ids = batch
            out = self.corrupt({"x": x, "y": y, "ids": ids}, self)
            if "loss" not in out:
                logits = self(out["x"])
                loss = F.cross_entropy(logits, out["y"]) if len(out["y"]) else logits.sum() * 0.0
                out = {"loss": loss, "logits": logits.detach(), **{k: v for k, v in out.items() if k not in "xy"}}
            return out
        return super().training_step(batch, batch_idx)


def _ids_at_bad_step(change: Callable[[Tensor], Any]) -> Callable[[Any], Any]:
    state = {"calls": 0}

    def ids(batch: Any) -> Any:
        state["calls"] += 1
        return change(batch[-1]) if state["calls"] == BAD_STEP + 1 else batch[-1]

    return ids


def _logits(f: Callable[[Tensor], Tensor]) -> Callable[[dict[str, Any], Any], dict[str, Any]]:
    def corrupt(b: dict[str, Any], model: Any) -> dict[str, Any]:
        logits = model(b["x"])
        return {"loss": F.cross_entropy(logits, b["y"]), "logits": f(logits.detach())}

    return corrupt


def _same(b: dict[str, Any], model: Any) -> dict[str, Any]:
    return {"x": b["x"], "y": b["y"]}


MID_RUN = {
    # name: (corrupt the step output, ids function or None, warning pattern or None for a silent skip)
    "missing-ids": (_same, _ids_at_bad_step(lambda ids: None), "sample ids must be a 1-d integer tensor"),
    "float-ids": (_same, _ids_at_bad_step(lambda ids: ids.float()), "sample ids must be a 1-d integer tensor"),
    "repeated-ids": (_same, _ids_at_bad_step(lambda ids: ids * 0), "ids_repeated_in_batch"),
    "out-of-range-ids": (_same, _ids_at_bad_step(lambda ids: ids + 1000), "ids_out_of_range"),
    "wrong-logits-shape": (_logits(lambda lg: lg[:, :1]), None, "do not fit targets"),
    "targets-out-of-range": (lambda b, m: {**_same(b, m), "targets": b["y"] + 7}, None, "targets_out_of_range"),
    "nonfinite-logits": (_logits(lambda lg: lg * float("nan")), None, "nonfinite_outputs"),
    "nonfinite-loss": (lambda b, m: {"loss": F.cross_entropy(m(b["x"]), b["y"]) * float("inf")}, None,
                       "non-finite values"),
    "empty-batch": (lambda b, m: {"x": b["x"][:0], "y": b["y"][:0]}, _ids_at_bad_step(lambda ids: ids[:0]), None),
}


@pytest.mark.parametrize("name", list(MID_RUN))
def test_bad_input_mid_run_warns_and_training_survives(tmp_path: Path, name: str) -> None:
    """Test that a bad input at one step warns clearly (or is skipped silently when it is harmless), training
    runs to the end and the records of both epochs are on disk and readable."""
    corrupt, ids, pattern = MID_RUN[name]
    intro = Introspect(every_n_steps=1, warmup_steps=0, histograms=False, **({"ids": ids} if ids else {}))
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, callbacks=[intro]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(BadAtStep(corrupt), loader(make_data(12), batch_size=4))
    ours = [str(w.message) for w in caught if "lightning_introspect" in str(w.message)]
    if pattern is None:
        assert ours == []
    else:
        assert any(pattern in m for m in ours), ours
    assert trainer.global_step == 6
    records, meta = read_records(tmp_path / "run")
    assert meta["epoch"] == 1 and records["seen_epochs"].max() == 2
    assert (records["seen_epochs"] >= 1).all()  # epoch 0 saw every example; nothing recorded was lost


class StatsProbe(nn.Module):
    """A layer whose output is not a tensor (a shape)."""

    def forward(self, x: Tensor) -> Any:
        return x.shape


class WithProbe(TinyNet):
    def __init__(self) -> None:
        super().__init__()
        self.probe = StatsProbe()

    def forward(self, x: Tensor) -> Tensor:
        self.probe(x)
        return self.net(x)


def test_layer_with_non_tensor_output_is_skipped_with_a_warning(tmp_path: Path) -> None:
    """Test that a selected layer returning a non-tensor is left out with one warning; the others are logged."""
    intro = Introspect(every_n_steps=1, warmup_steps=0, layer_types=(nn.Linear, StatsProbe))
    with pytest.warns(UserWarning, match=r"layer 'probe' returned Size.*not monitored"):
        pl.Trainer(**trainer_kwargs(tmp_path, max_steps=3, callbacks=[intro])).fit(
            WithProbe(), loader(make_data(12), batch_size=4))
    assert intro.core is not None and "probe" not in intro.core.layer_stats and "net.0" in intro.core.layer_stats


class _NoLogits(TinyNet):
    """Returns only the loss, and its forward returns a dict of non-tensors."""

    def forward(self, x: Tensor) -> Any:
        return {"features": self.net(x).tolist()}

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y, _ = batch
        return F.cross_entropy(self.net(x), y)


@pytest.mark.parametrize(
    ("kwargs", "model", "match"),
    [
        ({"layers": ["encoder.*"]}, TinyNet, r"`layers` pattern 'encoder\.\*' matched no module"),
        ({"layer_types": (nn.Conv2d,)}, TinyNet, "No layer of TinyNet was selected"),
        ({}, _NoLogits, "Introspect found no logits"),
    ],
    ids=["layer-pattern-matches-nothing", "no-layer-selected", "model-returns-no-logits"],
)
def test_setup_mistakes_fail_before_training_with_the_fix(tmp_path: Path, kwargs: dict, model: Any,
                                                          match: str) -> None:
    """Test that mistakes found at setup or at the first batch raise a ValueError naming the fix, at the latest
    after the first step."""
    torch.manual_seed(0)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=2, callbacks=[Introspect(**kwargs)]))
    with pytest.raises(ValueError, match=match):
        trainer.fit(model(), loader(make_data(8), batch_size=4))
    assert trainer.global_step <= 1


def test_dataset_grown_between_checkpoint_and_resume_keeps_old_records(tmp_path: Path) -> None:
    """Test that resuming with a larger training set warns, keeps the old examples' records and adds the new."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def kw(epochs: int) -> dict[str, Any]:
        ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_top_k=-1, every_n_epochs=1, filename="{epoch}")
        return trainer_kwargs(tmp_path, max_epochs=epochs, enable_checkpointing=True,
                              callbacks=[Introspect(every_n_steps=1, warmup_steps=0), ckpt])

    data = make_data(16)
    small = torch.utils.data.TensorDataset(*(t[:12] for t in data.tensors))
    pl.Trainer(**kw(1)).fit(tiny_model(0), loader(small, batch_size=4))
    with pytest.warns(RuntimeWarning, match="training set grew from 12 to 16"):
        pl.Trainer(**kw(2)).fit(tiny_model(0), loader(data, batch_size=4),
                                ckpt_path=str(tmp_path / "ckpt" / "epoch=0.ckpt"))
    records, meta = read_records(tmp_path / "run")
    assert meta["num_examples"] == 16
    assert records["seen_epochs"].tolist() == [2] * 12 + [1] * 4


def _good_records(directory: Path) -> None:
    n = 5
    arrays = {
        "seen_epochs": np.full(n, 2, np.int16), "label": np.arange(n, dtype=np.int32) % 2,
        "loss_sum": np.ones(n, np.float32), "margin_sum": np.zeros(n, np.float32),
        "confidence_sum": np.full(n, 1.0, np.float32), "confidence_sq_sum": np.full(n, 0.6, np.float32),
        "correct_epochs": np.ones(n, np.int16), "forgetting_events": np.zeros(n, np.int16),
        "first_learned": np.zeros(n, np.int16), "last_correct": np.ones(n, np.int8),
    }
    write_records(directory, arrays, {"epoch": 1, "num_examples": n, "num_classes": 2, "task": "classification"})


def test_corrupted_record_file_given_to_the_report(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Test that the report refuses a truncated samples.npz with exit status 2 and a message naming the file."""
    _good_records(tmp_path)
    npz = tmp_path / "samples.npz"
    npz.write_bytes(npz.read_bytes()[:100])
    assert report_main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "samples.npz" in err and "Traceback" not in err


def test_npz_with_object_array_is_refused_without_unpickling(tmp_path: Path) -> None:
    """Test that an npz holding an object array (which would unpickle, i.e. run code) is refused by the reader
    and by the report."""
    _good_records(tmp_path)
    arrays = dict(np.load(tmp_path / "samples.npz", allow_pickle=False))
    arrays["loss_sum"] = np.array([object()] * 5, dtype=object)
    np.savez(tmp_path / "samples.npz", **arrays)  # pickles the object array into the file
    with pytest.raises(RecordsError):
        read_records(tmp_path)
    assert report_main(["report", str(tmp_path)]) == 2


def test_checkpoint_state_has_no_pickled_objects(tmp_path: Path) -> None:
    """Test that Introspect's checkpoint state loads with `torch.load(weights_only=True)` (tensors and plain
    types only), so reading a checkpoint runs no code."""
    intro = Introspect(every_n_steps=1, warmup_steps=0)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[intro]))
    trainer.fit(tiny_model(0), loader(make_data(8), batch_size=4))
    path = tmp_path / "x.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["callbacks"]["Introspect"]
    assert state["store"]["seen_epochs"].tolist() == [1] * 8
    json.dumps({k: v for k, v in state.items() if k in ("format", "samples_flushed", "epochs_done")})


class NonFiniteLossAt(TinyNet):
    """TinyNet whose reported loss is NaN on ``steps`` while its gradients stay finite (a constant NaN added)."""

    def __init__(self, steps: tuple[int, ...]) -> None:
        torch.manual_seed(0)
        super().__init__()
        self.steps = steps

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        out = super().training_step(batch, batch_idx)
        if self.global_step in self.steps:
            out["loss"] = out["loss"] + torch.tensor(float("nan"))  # d(loss + c)/dw = dloss/dw: finite
        return out


def test_nonfinite_step_losses_are_counted_while_gradients_stay_finite(tmp_path: Path) -> None:
    """Test that step losses are checked on every step, not only sampled ones: NaN losses on two unsampled
    steps are counted (one batched check) and reported at the next flush, with no layer to blame."""
    intro = Introspect(every_n_steps=10, warmup_steps=0, histograms=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=12, callbacks=[intro]))
        trainer.fit(NonFiniteLossAt(steps=(3, 6)), loader(make_data(48), batch_size=4))
    assert trainer.global_step == 12
    messages = [str(w.message) for w in caught if "the loss was NaN/Inf" in str(w.message)]
    assert len(messages) == 1 and "in 2 step(s) up to step 10" in messages[0], messages
    assert "no monitored layer produced a non-finite value" in messages[0]
    alerts = dict(read_events(tmp_path / "run").texts["alerts/nonfinite"])
    assert list(alerts) == [10] and "in 2 step(s)" in alerts[10]
