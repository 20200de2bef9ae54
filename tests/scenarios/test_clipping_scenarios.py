"""Scenario: gradient clipping, by Lightning (``gradient_clip_val``, norm and value algorithms, a module's own
``configure_gradient_clipping``) and in a plain loop (``clip_grad_norm_`` between ``observe_gradients`` and
``opt.step()``).

``grad_norm/global`` is the norm before clipping, ``grad_norm/global_clipped`` the norm the optimizer step used.
Oracles come from the gradients a second callback records before clipping: torch's ``clip_grad_norm_`` rule
``g * min(1, clip / (norm + 1e-6))``, or each element clamped to ``[-clip, clip]``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import pytest
import torch
import torch.nn.functional as F
from helpers.models import classification_data, lightning, loader, mlp, trainer
from helpers.tb import read_events
from torch import Tensor

from lightning_introspect import Introspect
from lightning_introspect.core import IntrospectConfig, Introspector
from lightning_introspect.sinks import TensorBoardSink

SAMPLED = [0, 2, 4]  # every_n_steps=2, no warm-up, 6 steps


def _module(package: str, own_clip: Optional[float] = None) -> Any:
    pl = lightning(package)

    class Net(pl.LightningModule):  # type: ignore[misc,name-defined]
        """:func:`mlp` with SGD (momentum, weight decay: an optimizer whose update is not ``-lr * grad``)."""

        def __init__(self) -> None:
            super().__init__()
            self.net = mlp()

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)

    if own_clip is None:
        return Net()

    class OwnClipping(Net):
        def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Any = None,
                                        gradient_clip_algorithm: Any = None) -> None:
            self.clip_gradients(optimizer, gradient_clip_val=own_clip, gradient_clip_algorithm="norm")

    return OwnClipping()


def _recorder(package: str) -> Any:
    pl = lightning(package)

    class Recorder(pl.Callback):  # type: ignore[misc,name-defined]
        """Every parameter's gradient at each optimizer step, as ``on_before_optimizer_step`` sees it."""

        def __init__(self) -> None:
            self.grads: dict[int, list[Tensor]] = {}

        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            self.grads[trainer.global_step] = [p.grad.detach().double().clone() for p in pl_module.parameters()]

    return Recorder()


def _norm(tensors: list[Tensor]) -> float:
    return torch.linalg.vector_norm(torch.cat([t.reshape(-1) for t in tensors])).item()


def _clipped_by_norm(grads: list[Tensor], clip: float) -> float:
    total = _norm(grads)
    return total * min(1.0, clip / (total + 1e-6))


def _fit(tmp_path: Path, package: str, own_clip: Optional[float] = None, **trainer_kwargs: Any) -> tuple[dict, Any]:
    recorder = _recorder(package)
    intro = Introspect(every_n_steps=2, warmup_steps=0, activations=False, histograms=False, dead_units=False)
    tr = trainer(package, tmp_path, max_steps=6, callbacks=[intro, recorder], **trainer_kwargs)
    tr.fit(_module(package, own_clip), loader(classification_data(n=48)))
    assert tr.global_step == 6
    if "plugins" in trainer_kwargs:
        assert tr.precision_plugin.scaler is not None
    return read_events(tmp_path / "version_0").scalars, recorder


@pytest.mark.parametrize(("package", "algorithm", "precision"), [
    ("lightning.pytorch", "norm", "32-true"), ("pytorch_lightning", "norm", "32-true"),
    ("lightning.pytorch", "value", "32-true"),
    ("lightning.pytorch", "norm", "16-mixed"),  # a grad scaler: unscale, clip, then scaler.step(optimizer)
])
def test_gradient_clip_val_logs_the_norm_before_and_after_clipping(
    tmp_path: Path, package: str, algorithm: str, precision: str
) -> None:
    """Test that with gradient_clip_val both global norms are written at every sampled step, equal to the oracles."""
    clip = 0.3 if algorithm == "norm" else 0.02
    kwargs: dict[str, Any] = {}
    if precision == "16-mixed":  # on a CPU, Lightning's "16-mixed" becomes bf16 without a scaler: given here
        plugin = lightning(package).plugins.precision.MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))
        kwargs["plugins"] = [plugin]
    scalars, recorder = _fit(tmp_path, package, gradient_clip_val=clip, gradient_clip_algorithm=algorithm, **kwargs)
    assert [s for s, _ in scalars["grad_norm/global"]] == SAMPLED
    assert [s for s, _ in scalars["grad_norm/global_clipped"]] == SAMPLED
    before, after = dict(scalars["grad_norm/global"]), dict(scalars["grad_norm/global_clipped"])
    for step in SAMPLED:
        grads = recorder.grads[step]
        if algorithm == "norm":
            expected = _clipped_by_norm(grads, clip)
        else:
            expected = _norm([g.clamp(-clip, clip) for g in grads])
        assert before[step] == pytest.approx(_norm(grads), rel=1e-5)
        assert after[step] == pytest.approx(expected, rel=1e-5)
    assert any(after[s] < 0.9 * before[s] for s in SAMPLED)  # the clipping did bite


def test_a_modules_own_configure_gradient_clipping_logs_the_clipped_norm(tmp_path: Path) -> None:
    """Test that a module clipping in its own configure_gradient_clipping (no gradient_clip_val) gets both tags."""
    scalars, recorder = _fit(tmp_path, "lightning.pytorch", own_clip=0.3)
    after = dict(scalars["grad_norm/global_clipped"])
    assert sorted(after) == SAMPLED
    for step in SAMPLED:
        assert after[step] == pytest.approx(_clipped_by_norm(recorder.grads[step], 0.3), rel=1e-5)
    assert any(after[s] < 0.9 * _norm(recorder.grads[s]) for s in SAMPLED)


def test_without_clipping_there_is_no_clipped_tag(tmp_path: Path) -> None:
    """Test that without gradient clipping only grad_norm/global is written, the norm of the gradients."""
    scalars, recorder = _fit(tmp_path, "lightning.pytorch")
    assert "grad_norm/global_clipped" not in scalars
    assert [s for s, _ in scalars["grad_norm/global"]] == SAMPLED
    for step, value in scalars["grad_norm/global"]:
        assert value == pytest.approx(_norm(recorder.grads[step]), rel=1e-5)


class GradDecaySGD(torch.optim.SGD):
    """Adds weight decay into ``.grad`` in place before stepping, as some hand-written optimizers do."""

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.add_(p, alpha=0.5)
        return super().step(closure)


@pytest.mark.parametrize("optimizer", ["adam", "grad_decay_sgd"])
@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_plain_loop_that_clips_gets_the_norm_the_step_used(tmp_path: Path, algorithm: str, optimizer: str) -> None:
    """Test the plain-loop order: observe_gradients(opt, clipping=True), clip, opt.step(): both norms right, also
    with an optimizer that changes the gradients in place (the clipped norm is read as the step starts)."""
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.05) if optimizer == "adam" else GradDecaySGD(model.parameters(), lr=0.1)
    intro = Introspector(model, IntrospectConfig(every_n_steps=2, warmup_steps=0, activations=False,
                                                 dead_units=False, histograms=False), sinks=[TensorBoardSink(tmp_path)])
    data = classification_data(n=48)
    clip = 0.3 if algorithm == "norm" else 0.02
    seen: dict[int, list[Tensor]] = {}
    for step in range(6):
        x, y = data.tensors[0][step * 8:(step + 1) * 8], data.tensors[1][step * 8:(step + 1) * 8]
        with intro.step(step):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            intro.observe_gradients(opt, clipping=True)
            seen[step] = [p.grad.detach().double().clone() for p in model.parameters()]
            if algorithm == "norm":
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            else:
                torch.nn.utils.clip_grad_value_(model.parameters(), clip)
            opt.step()
    intro.close()
    scalars = read_events(tmp_path).scalars
    before, after = dict(scalars["grad_norm/global"]), dict(scalars["grad_norm/global_clipped"])
    assert sorted(before) == sorted(after) == SAMPLED
    for step in SAMPLED:
        grads = seen[step]
        expected = _clipped_by_norm(grads, clip) if algorithm == "norm" else _norm([g.clamp(-clip, clip) for g in grads])
        assert before[step] == pytest.approx(_norm(grads), rel=1e-5)
        assert after[step] == pytest.approx(expected, rel=1e-5)
    assert any(after[s] < 0.9 * before[s] for s in SAMPLED)


def test_clipping_without_an_optimizer_is_an_error() -> None:
    """Test that observe_gradients(clipping=True) without the optimizer says to pass it."""
    model = mlp()
    intro = Introspector(model, IntrospectConfig(every_n_steps=1, warmup_steps=0))
    try:
        with intro.step(0):
            model(torch.randn(4, 8)).sum().backward()
            with pytest.raises(ValueError, match=r"observe_gradients\(optimizer, clipping=True\)"):
                intro.observe_gradients(clipping=True)
    finally:
        intro.close()
