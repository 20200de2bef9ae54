"""Scenario: one network with many activation types, trained by a real Trainer; the event files read back.

Dead units are judged by each activation's own rule: ReLU-like layers by their output, saturating ones as
``saturated_*``, activations that pass gradient everywhere not at all, and weight layers followed by a
functional activation by the gradient that reaches them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from helpers.models import trainer
from helpers.tb import read_events
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_introspect import Introspect

STEPS = 6
WINDOW = 2
#: Branches whose activation passes gradient everywhere: never judged, although half their units sit just
#: below 0 (what the ReLU rule used to call dead).
UNJUDGED = ("elu", "gelu", "lrelu", "silu")


def _linear(bias: float, weight: float = 1.0) -> nn.Linear:
    """``Linear(3, 4)`` with every weight ``weight``; units 0 and 1 get bias ``bias``, units 2 and 3 bias 0.5."""
    layer = nn.Linear(3, 4)
    with torch.no_grad():
        layer.weight.fill_(weight)
        layer.bias.copy_(torch.tensor([bias, bias, 0.5, 0.5]))
    return layer


class Branches(pl.LightningModule):
    """Seven branches on inputs in [0, 1) (a unit's pre-activation is its bias plus 0..3), concatenated, then a
    head. Units 0-1 of the ELU/GELU/LeakyReLU/SiLU and functional-GELU branches sit in (-3.2, -0.2); every unit of
    ``relu`` is below -7 (dead); every unit of ``tanh_sat`` is above 50 (saturated); ``tanh`` is healthy."""

    def __init__(self) -> None:
        super().__init__()
        self.relu_fc, self.relu = _linear(-10.0), nn.ReLU()
        self.relu_fc.bias.data.fill_(-10.0)
        self.tanh_sat_fc, self.tanh_sat = _linear(50.0, weight=100.0), nn.Tanh()
        self.tanh_sat_fc.bias.data.fill_(50.0)
        self.tanh_fc, self.tanh = _linear(0.0, weight=0.1), nn.Tanh()
        self.elu_fc, self.elu = _linear(-3.2), nn.ELU()
        self.gelu_fc, self.gelu = _linear(-3.2), nn.GELU()
        self.lrelu_fc, self.lrelu = _linear(-3.2), nn.LeakyReLU(0.01)
        self.silu_fc, self.silu = _linear(-3.2), nn.SiLU()
        self.fn_relu_fc = _linear(-10.0)  # F.relu: units 0-1 dead, by the gradient reaching the Linear
        self.fn_gelu_fc = _linear(-3.2)  # F.gelu: gradient flows, no unit dead
        self.head = nn.Linear(4 * 9, 2)

    def forward(self, x: Tensor) -> Tensor:
        parts = [
            self.relu(self.relu_fc(x)), self.tanh_sat(self.tanh_sat_fc(x)), self.tanh(self.tanh_fc(x)),
            self.elu(self.elu_fc(x)), self.gelu(self.gelu_fc(x)), self.lrelu(self.lrelu_fc(x)),
            self.silu(self.silu_fc(x)), F.relu(self.fn_relu_fc(x)), F.gelu(self.fn_gelu_fc(x)),
        ]
        return self.head(torch.cat(parts, 1))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def _fit(tmp_path: Path) -> dict[str, dict[int, float]]:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(STEPS * 8, 3, generator=g), torch.randint(0, 2, (STEPS * 8,), generator=g))
    cb = Introspect(every_n_steps=1, warmup_steps=0, dead_window=WINDOW, histograms=False, sample_dynamics=False)
    trainer("lightning.pytorch", tmp_path, callbacks=[cb], max_steps=STEPS).fit(
        Branches(), DataLoader(data, batch_size=8)
    )
    events = read_events(tmp_path / "version_0")
    return {tag: dict(points) for tag, points in events.scalars.items()}


def test_each_activation_type_is_judged_by_its_own_rule(tmp_path: Path) -> None:
    """Test that dead tags appear only for ReLU-like layers (100 % for the ReLU with a very negative bias, 50 %
    behind a functional ReLU), saturated tags only for Tanh (1.0 for huge pre-activations, 0 for a healthy
    one), and neither for ELU, GELU, LeakyReLU, SiLU or a Linear behind a functional GELU with units just below 0."""
    scalars = _fit(tmp_path)
    judged = list(range(WINDOW - 1, STEPS))  # every sampled step once dead_window windows were seen
    assert scalars["dead_fraction/relu"] == {s: 1.0 for s in judged}
    assert scalars["dead_count/relu"] == {s: 4.0 for s in judged}
    assert scalars["saturated_fraction/tanh_sat"] == {s: 1.0 for s in judged}
    assert scalars["saturated_fraction/tanh"] == {s: 0.0 for s in judged}
    assert scalars["dead_fraction/fn_relu_fc"] == {s: 0.5 for s in judged}
    assert scalars["dead_fraction/fn_gelu_fc"] == {s: 0.0 for s in judged}
    assert scalars["dead_fraction/head"] == {s: 0.0 for s in judged}  # the logits: gradient on every class
    for layer in UNJUDGED:
        assert f"activation_mean/{layer}" in scalars  # watched, with its statistics
        assert scalars[f"activation_min/{layer}_fc"][0] < 0 < scalars[f"activation_max/{layer}_fc"][0]
    prefixes = ("dead_", "saturated_")
    judged_layers = {t.split("/", 1)[1] for t in scalars if t.startswith(prefixes)}
    # the Linear before each activation module is not judged again; the rest as the rules say
    assert judged_layers == {"relu", "tanh_sat", "tanh", "fn_relu_fc", "fn_gelu_fc", "head"}
    assert not any(t.startswith("saturated_") and t.split("/", 1)[1] in {"relu", "fn_relu_fc"} for t in scalars)
    assert not any(t.startswith("dead_") and t.split("/", 1)[1].startswith("tanh") for t in scalars)


def test_units_of_a_healthy_elu_layer_just_below_zero_pass_gradient() -> None:
    """Test the oracle behind leaving ELU/GELU/LeakyReLU/SiLU unjudged: for pre-activations in (-3.2, -0.2) the
    gradient through each is not zero, while through ReLU it is exactly zero."""
    z = torch.linspace(-3.2, -0.2, 31, requires_grad=True)
    for act in (nn.ELU(), nn.GELU(), nn.LeakyReLU(0.01), nn.SiLU()):
        (grad,) = torch.autograd.grad(act(z).sum(), z)
        assert (grad != 0).all(), type(act).__name__
    (grad,) = torch.autograd.grad(nn.ReLU()(z).sum(), z)
    assert (grad == 0).all()
