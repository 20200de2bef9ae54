"""Tests for the ``Introspect`` callback: real Trainer runs, real loggers, event files read back."""
from __future__ import annotations

import csv
import math
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.models import MLP_LAYERS, PACKAGES, classification_data, classifier, lightning, loader, trainer
from helpers.tb import event_files, read_events

from lightning_introspect import Introspect, WithIndex


def expected_steps(n: int, every: int, warmup: int) -> list[int]:
    """Sampled steps of a run of ``n`` optimizer steps, counted by hand."""
    return [s for s in range(n) if s < warmup or s % every == 0]


def fit(package: str, root: Path, cb: Introspect, *, with_ids: bool = True, model: Any = None,
        **trainer_kw: Any) -> Any:
    """Fits the boring classifier on 64 examples in batches of 8 (8 steps per epoch); returns the Trainer."""
    data = classification_data()
    tr = trainer(package, root, callbacks=[cb, *trainer_kw.pop("extra_callbacks", [])], **trainer_kw)
    tr.fit(model if model is not None else classifier(package), loader(WithIndex(data) if with_ids else data))
    return tr


def documented_tags() -> list[str]:
    """Tags listed in the table of ``Introspect.__doc__`` (first column and "also ``...``" notes)."""
    lines = (Introspect.__doc__ or "").splitlines()
    rules = [i for i, line in enumerate(lines) if re.fullmatch(r"\s*=+(\s+=+)+\s*", line)]
    assert len(rules) == 3, "the tag table of Introspect's docstring is not a 3-rule RST simple table"
    body = "\n".join(lines[rules[1] + 1 : rules[2]])
    return re.findall(r"``([A-Za-z_]+/[^`\s]+)``", body)


def tag_regex(documented: str) -> re.Pattern[str]:
    """``activation_mean/{layer}`` -> ``^activation_mean/.+$`` (placeholders stand for layer/parameter names)."""
    parts = re.split(r"\{[a-z_]+\}", documented)
    return re.compile("^" + ".+".join(map(re.escape, parts)) + "$")


# ------------------------------------------------------------------------------------------------ cadence
@pytest.mark.parametrize(("every", "warmup", "n"), [(3, 0, 10), (4, 2, 13), (1, 0, 5)])
def test_cadence_points_per_tag(tmp_path: Path, every: int, warmup: int, n: int) -> None:
    """Test that every_n_steps=k with warm-up w over n steps writes one point per sampled step, at those steps."""
    cb = Introspect(every_n_steps=every, warmup_steps=warmup)
    fit("lightning.pytorch", tmp_path, cb, with_ids=False, max_steps=n)
    ev = read_events(tmp_path / "version_0")
    steps = expected_steps(n, every, warmup)
    if warmup == 0:
        assert len(steps) == math.ceil(n / every)
    for tag in ("activation_mean/net.0", "activation_std/net.5", "grad_norm/global", "grad_norm/net.3",
                "update_to_weight/global", "introspect/interval"):
        assert ev.steps(tag) == steps, tag
    assert ev.steps("activation_hist/net.4") == steps


@pytest.mark.parametrize("package", PACKAGES)
def test_both_lightning_packages(tmp_path: Path, package: str) -> None:
    """Test that one Introspect class works in a Trainer of either package: events, records and report (it
    derives from the Callback of the package imported first; the other package's Trainer runs it by its hooks,
    see also tests/core/test_no_lightning_import.py)."""
    cb = Introspect(every_n_steps=2, warmup_steps=0)
    tr = fit(package, tmp_path, cb, max_epochs=2)
    assert tr.global_step == 16
    ev = read_events(tmp_path / "version_0")
    assert ev.steps("grad_norm/global") == list(range(0, 16, 2))
    assert ev.steps("samples/learned_fraction") == [8, 16]
    records_dir = tmp_path / "version_0" / "introspect"
    assert {"samples.npz", "samples.json", "suspects.csv"} <= {p.name for p in records_dir.iterdir()}
    assert cb.mislabeled().ids.shape == (64,)


def test_data_map_redraws_are_rationed_and_the_last_epoch_is_always_drawn(tmp_path: Path) -> None:
    """Test that the data map and the suspects table, which stall training while matplotlib draws them, are
    not redrawn at every epoch end of a run whose epochs take a few milliseconds (only while the redraws stay
    within their share of the wall time), that the first epoch's is drawn, and that the last epoch's is drawn
    at close, with its flagged fraction."""
    cb = Introspect(every_n_steps=4, warmup_steps=0)
    tr = fit("lightning.pytorch", tmp_path, cb, max_epochs=6)
    assert tr.global_step == 48
    ev = read_events(tmp_path / "version_0")
    assert ev.steps("samples/learned_fraction") == [8, 16, 24, 32, 40, 48]
    drawn = [step for step, _ in ev.images["samples/data_map"]]
    assert drawn[0] == 8 and drawn[-1] == 48 and len(drawn) < 6, drawn
    assert [step for step, _ in ev.texts["samples/suspects"]] == drawn
    assert ev.steps("samples/flagged_fraction") == drawn


# ------------------------------------------------------------------------------------------------ tag table
def test_documented_tags_match_a_full_run(tmp_path: Path) -> None:
    """Test that the docstring's tag table lists exactly the tags a demo-like run writes (both directions)."""
    documented = documented_tags()
    assert "update_to_weight/global" in documented and "alerts/nonfinite" in documented
    patterns = {d: tag_regex(d) for d in documented}
    # Per-example dynamics (WithIndex + logits), per-parameter norms, enough unsampled steps for the
    # overhead estimate (>= 12 timed unsampled steps), dead units within the run, and a NaN on the last
    # sampled step (24, the first of epoch 3) for `alerts/nonfinite`; the NaN logits of that step also raise
    # `alerts/bad_input` (non-finite outputs). Gradient clipping is on (at a norm never reached) for
    # `grad_norm/global_clipped`.
    # The writer is drained after each step: on this tiny model its work would otherwise outlast the next
    # steps, which then count as the sampled step's cost, not as unsampled ones (see SamplingSchedule).
    cb = Introspect(every_n_steps=4, warmup_steps=2, param_grad_norms=True, dead_window=2)

    class DrainWriter(lightning("lightning.pytorch").Callback):  # type: ignore[misc]
        def on_train_batch_end(self, *args: Any) -> None:
            assert cb.core is not None
            cb.core.writer.drain()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        model = classifier(poison_steps=(24,))
        model.net[4] = torch.nn.Tanh()  # a saturating activation as well: its saturated_* tags
        fit("lightning.pytorch", tmp_path, cb, max_steps=25, model=model, extra_callbacks=[DrainWriter()],
            gradient_clip_val=1e3)
    logged = read_events(tmp_path / "version_0").tags()
    missing = [d for d, rx in patterns.items() if not any(rx.match(t) for t in logged)]
    undocumented = sorted(t for t in logged if not any(rx.match(t) for rx in patterns.values()))
    assert not missing, f"documented but never written: {missing}"
    assert not undocumented, f"written but not in the docstring's tag table: {undocumented}"


def test_custom_scalars_layout_covers_every_scalar(tmp_path: Path) -> None:
    """Test that the custom-scalars layout is written and its charts cover every scalar tag, one chart per stat."""
    cb = Introspect(every_n_steps=1, warmup_steps=0, param_grad_norms=True)
    fit("lightning.pytorch", tmp_path, cb, max_steps=8, gradient_clip_val=1e3)
    ev = read_events(tmp_path / "version_0")
    assert ev.layout is not None
    charts = {c.title: [re.compile(t) for t in c.multiline.tag] for cat in ev.layout.category for c in cat.chart}
    assert {"mean", "dead fraction", "gradient L2 norm (global)", "gradient L2 norm per layer", "update / weight norm",
            "gradient norm per parameter", "sampling interval (steps)"} <= set(charts)
    for tag in ev.scalars:
        assert any(rx.search(tag) for rxs in charts.values() for rx in rxs), f"{tag} is in no custom-scalars chart"
    # one multi-line chart per statistic: all layers of activation_mean share the "mean" chart
    mean_tags = [t for t in ev.scalars if any(rx.search(t) for rx in charts["mean"])]
    assert sorted(mean_tags) == sorted(f"activation_mean/{n}" for n in MLP_LAYERS)
    global_tags = [t for t in ev.scalars if any(rx.search(t) for rx in charts["gradient L2 norm (global)"])]
    assert sorted(global_tags) == ["grad_norm/global", "grad_norm/global_clipped"]
    assert not any(rx.search(t) for t in global_tags for rx in charts["gradient L2 norm per layer"])


# ------------------------------------------------------------------------------------------------ where it writes
def test_writes_through_the_trainers_tensorboard_logger(tmp_path: Path) -> None:
    """Test that with a TensorBoardLogger the figures go into the logger's own event file and log dir."""
    cb = Introspect(every_n_steps=2, warmup_steps=0)
    tr = fit("lightning.pytorch", tmp_path, cb, max_steps=4)
    log_dir = Path(tr.logger.log_dir)
    assert len(event_files(log_dir)) == 1  # the logger's writer, not a second one
    assert read_events(log_dir).steps("grad_norm/global") == [0, 2]
    assert (log_dir / "introspect" / "samples.npz").is_file()
    assert not event_files(tmp_path)


def test_own_writer_without_logger(tmp_path: Path) -> None:
    """Test that with ``logger=False`` the callback writes its own event file into the default root dir."""
    cb = Introspect(every_n_steps=2, warmup_steps=0)
    fit("lightning.pytorch", tmp_path, cb, max_steps=4, logger=False)
    assert len(event_files(tmp_path)) == 1
    assert read_events(tmp_path).steps("activation_mean/net.0") == [0, 2]
    assert (tmp_path / "introspect" / "samples.npz").is_file()


def test_own_writer_in_log_dir_argument(tmp_path: Path) -> None:
    """Test that ``Introspect(log_dir=...)`` is used when the Trainer has no TensorBoardLogger."""
    cb = Introspect(every_n_steps=2, warmup_steps=0, log_dir=tmp_path / "mine")
    fit("lightning.pytorch", tmp_path / "root", cb, max_steps=4, logger=False)
    assert read_events(tmp_path / "mine").steps("grad_norm/global") == [0, 2]
    assert (tmp_path / "mine" / "introspect" / "samples.npz").is_file()


@pytest.mark.parametrize("package", PACKAGES)
def test_csv_logger_gets_scalars_and_own_writer_gets_events(tmp_path: Path, package: str) -> None:
    """Test that with only a CSVLogger the scalars reach its metrics.csv and TensorBoard events go next to it."""
    csv_logger = lightning(package).loggers.CSVLogger(str(tmp_path), name="", version=0)
    cb = Introspect(every_n_steps=2, warmup_steps=0)
    fit(package, tmp_path, cb, max_steps=6, logger=csv_logger)
    log_dir = Path(csv_logger.log_dir)
    ev = read_events(log_dir)
    assert ev.steps("grad_norm/global") == [0, 2, 4]
    with open(log_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    grad = {int(r["step"]): float(r["grad_norm/global"]) for r in rows if r.get("grad_norm/global")}
    assert sorted(grad) == [0, 2, 4]
    for step, value in ev.scalars["grad_norm/global"]:
        assert grad[step] == pytest.approx(value, rel=1e-6)
    assert any(r.get("samples/learned_fraction") for r in rows)  # epoch-end scalars too


# ------------------------------------------------------------------------------------------------ steps
def _grad_norm_recorder(package: str, out: dict[int, float]) -> Any:
    pl = lightning(package)

    class GradNormRecorder(pl.Callback):  # type: ignore[misc,name-defined]
        """Records the L2 norm of all gradients the optimizer is about to apply (the oracle)."""

        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            out[trainer.global_step] = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))

    return GradNormRecorder()


def test_gradient_accumulation_one_point_per_optimizer_step(tmp_path: Path) -> None:
    """Test that under gradient accumulation each optimizer step gives one gradient point: the accumulated norm."""
    oracle: dict[int, float] = {}
    cb = Introspect(every_n_steps=1, warmup_steps=0)
    tr = fit("lightning.pytorch", tmp_path, cb, max_steps=3, accumulate_grad_batches=2,
             extra_callbacks=[_grad_norm_recorder("lightning.pytorch", oracle)])
    assert tr.global_step == 3
    ev = read_events(tmp_path / "version_0")
    assert [s for s, _ in ev.scalars["grad_norm/global"]] == [0, 1, 2]
    assert ev.steps("activation_mean/net.0") == [0, 1, 2]  # both micro-batches fold into the step's point
    assert ev.steps("update_to_weight/global") == [0, 1, 2]
    for step, value in ev.scalars["grad_norm/global"]:
        assert value == pytest.approx(oracle[step], rel=1e-5)


def _hook_count(model: torch.nn.Module) -> int:
    mod = torch.nn.modules.module
    total = len(mod._global_forward_hooks) + len(mod._global_forward_pre_hooks) + len(mod._global_backward_hooks)
    for m in model.modules():
        total += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        total += len(getattr(m, "_backward_pre_hooks", {}))
    return total


def test_unsampled_steps_run_without_hooks(tmp_path: Path) -> None:
    """Test that hooks are attached during sampled training steps only (none at all on the other steps)."""
    seen: dict[int, int] = {}
    model = classifier(probe=lambda m: seen.__setitem__(m.global_step, _hook_count(m)))
    cb = Introspect(every_n_steps=3, warmup_steps=0, sample_dynamics=False)
    fit("lightning.pytorch", tmp_path, cb, max_steps=7, model=model)
    assert sorted(seen) == list(range(7))
    for step, count in seen.items():
        assert count == (len(MLP_LAYERS) if step % 3 == 0 else 0), step
    assert _hook_count(model) == 0  # and none are left behind


def test_logits_taken_from_the_forward_when_training_step_returns_only_the_loss(tmp_path: Path) -> None:
    """Test that without logits in the step output the LightningModule's forward output is used: one hook on
    the module, registered once and kept (no per-layer hook on unsampled steps), none left after fit, and
    per-example figures equal to those of the same run returning its logits."""
    import numpy as np

    results = {}
    for returns_logits in (True, False):
        seen: dict[int, int] = {}
        torch.manual_seed(0)
        model = classifier(return_logits=returns_logits, probe=lambda m: seen.__setitem__(m.global_step, _hook_count(m)))
        cb = Introspect(every_n_steps=3, warmup_steps=0)
        kept: list[Any] = []

        class Kept(lightning("lightning.pytorch").Callback):  # what the tool holds from the forward, mid-step
            def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
                kept.append(cb._captured)

        fit("lightning.pytorch", tmp_path / str(returns_logits), cb, max_epochs=2, model=model, extra_callbacks=[Kept()])
        if not returns_logits:  # a detached tensor: holding the output would hold its autograd graph
            assert kept and all(isinstance(t, torch.Tensor) and t.grad_fn is None and not t.requires_grad for t in kept)
            assert {t.shape[0] for t in kept} == {8} and {t.ndim for t in kept} == {2}  # (batch, classes) logits
        for step, count in seen.items():  # the first step does not know yet where the logits come from
            capture_hook = 1 if step == 0 or not returns_logits else 0
            assert count == (len(MLP_LAYERS) if step % 3 == 0 else 0) + capture_hook, step
        assert _hook_count(model) == 0
        suspects = cb.mislabeled()
        results[returns_logits] = (suspects.ids, suspects.columns["aum"], suspects.columns["confidence_mean"])
    for a, b in zip(results[True], results[False]):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_nonfinite_sentinel_names_first_layer_and_training_goes_on(tmp_path: Path) -> None:
    """Test that a NaN born in the middle of the network is traced to the first layer in forward order."""
    cb = Introspect(every_n_steps=1, warmup_steps=0)
    model = classifier(poison_steps=(2,))  # NaN between net.1 and net.3 on step 2
    with pytest.warns(RuntimeWarning) as record:
        tr = fit("lightning.pytorch", tmp_path, cb, max_steps=5, model=model)
    assert tr.global_step == 5  # training went on
    messages = [str(w.message) for w in record if "non-finite values" in str(w.message)]
    assert messages and "at step 2:" in messages[0]
    assert "the first layer in forward order with a non-finite output is 'net.3'" in messages[0]
    ev = read_events(tmp_path / "version_0")
    alerts = dict(ev.texts["alerts/nonfinite"])
    assert min(alerts) == 2
    assert "'net.3'" in alerts[2] and "Training goes on" in alerts[2]
    assert dict(ev.scalars["activation_nonfinite/net.1"])[2] == 0
    assert dict(ev.scalars["activation_nonfinite/net.3"])[2] == 8 * 16  # every output of the batch
    # NaN logits are non-finite outputs, not bad targets; per-example inputs are batched over a few steps,
    # so the alert comes at a flush at or after step 2 ("up to step N")
    bad_steps = dict(ev.texts["alerts/bad_input"])
    bad_input = bad_steps[min(bad_steps)]
    assert min(bad_steps) >= 2
    assert "nonfinite_outputs" in bad_input and "targets_out_of_range" not in bad_input
