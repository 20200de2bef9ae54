"""Mixed precision (bf16 autocast on CPU; fp16 + GradScaler on GPU) and ``torch.compile`` with Introspect."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import lightning.pytorch as pl
from helpers.robust_common import TinyNet, layer_tags, loader, make_data, read_scalars, tiny_model, trainer_kwargs
from lightning_introspect import Introspect


def _fit(root: Path, model: pl.LightningModule, steps: int, **trainer: Any) -> dict[str, list[tuple[int, float]]]:
    intro = Introspect(every_n_steps=2, warmup_steps=0, dead_window=2)
    pl.Trainer(**trainer_kwargs(root, max_steps=steps, callbacks=[intro], **trainer)).fit(
        model, loader(make_data(40), batch_size=8)
    )
    return read_scalars(root / "run")


def test_bf16_mixed_statistics_are_fp32_and_match_fp32_run(tmp_path: Path) -> None:
    """Test that under `precision="bf16-mixed"` the statistics are computed in fp32 (finite, not rounded to bf16)
    and the first step's activation statistics and gradient norms match an fp32 run within bf16 tolerance."""
    ref = _fit(tmp_path / "fp32", tiny_model(0), 2)
    got = _fit(tmp_path / "bf16", tiny_model(0), 2, precision="bf16-mixed")
    assert layer_tags(got) == layer_tags(ref)
    for tag in ("activation_mean/net.0", "activation_std/net.2", "activation_max/net.1", "grad_norm/global",
                "grad_norm/net.0", "grad_to_weight/net.2"):
        (step, value), = [p for p in got[tag] if p[0] == 0]
        (_, expected), = [p for p in ref[tag] if p[0] == 0]
        assert np.isfinite(value)
        np.testing.assert_allclose(value, expected, rtol=3e-2, atol=3e-3, err_msg=tag)
    # The mean of bf16 outputs accumulated in fp32/fp64 is not itself a bf16 number (8 mantissa bits).
    mean = got["activation_mean/net.0"][0][1]
    assert torch.tensor(mean).to(torch.bfloat16).float().item() != pytest.approx(mean, rel=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 + GradScaler needs a CUDA device")
def test_fp16_grad_norms_are_unscaled_and_skipped_steps_are_not_updates(tmp_path: Path) -> None:
    """Test that under `precision="16-mixed"` gradient norms are read after unscaling (equal to fp32's, not
    65536 times larger), and a step the GradScaler skips (inf gradients) logs no update ratio."""

    class BadStep(TinyNet):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            out = super().training_step(batch, batch_idx)
            if self.global_step == 2:  # a sampled step with inf gradients: the scaler skips optimizer.step
                out["loss"] = out["loss"] * float("inf")
            return out

    ref = _fit(tmp_path / "fp32", tiny_model(0), 1, accelerator="gpu")
    torch.manual_seed(0)
    got = _fit(tmp_path / "fp16", BadStep(), 4, accelerator="gpu", precision="16-mixed")
    np.testing.assert_allclose(got["grad_norm/global"][0][1], ref["grad_norm/global"][0][1], rtol=2e-2)
    assert 0 in dict(got["update_to_weight/global"])
    assert 2 not in dict(got["update_to_weight/global"])  # skipped by the scaler: not counted as an update


def test_compiled_submodule_matches_eager_with_bounded_recompilations(tmp_path: Path) -> None:
    """Test that a LightningModule with a `torch.compile`d submodule trains with Introspect, logs the eager tags
    (no `_orig_mod`) with the eager values, and that sampling every other step compiles a bounded number of
    frames that does not grow with the number of steps.

    Measures: Dynamo frame compilations (`torch._dynamo.utils.counters["frames"]["total"]`) over 6 and over
    12 steps; the count is the same (sampled steps run eagerly, so only the unsampled steps' graph is
    compiled). Backend "eager": Dynamo's guards (what decides recompilation) without the C++ compile time of
    inductor.
    """
    import torch._dynamo
    from torch._dynamo.utils import counters

    def compiled(steps: int, root: Path) -> tuple[dict[str, Any], int]:
        torch._dynamo.reset()
        counters.clear()
        model = tiny_model(0)
        model.net = torch.compile(model.net, backend="eager")
        scalars = _fit(root, model, steps)
        return scalars, int(counters["frames"]["total"])

    eager = _fit(tmp_path / "eager", tiny_model(0), 6)
    short, frames_short = compiled(6, tmp_path / "c6")
    _, frames_long = compiled(12, tmp_path / "c12")
    assert layer_tags(short) == layer_tags(eager)
    assert not any("_orig_mod" in tag for tag in short)
    for tag in layer_tags(eager):
        np.testing.assert_allclose([v for _, v in short[tag]], [v for _, v in eager[tag]], rtol=1e-5, atol=1e-6,
                                   err_msg=tag)
    print(f"dynamo frames compiled: {frames_short} over 6 steps, {frames_long} over 12 steps")
    assert frames_long == frames_short <= 2
