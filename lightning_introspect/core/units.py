"""When a unit counts as dead or saturated: one rule per activation type.

A unit passes (almost) no gradient when every value it took lies outside its activation's *active region*.
Each rule names that region, in the layer's output or in the gradient that reaches the output, and the tag
group its figures go to:

- ``dead`` (a flat region at the bottom): ReLU, LeakyReLU with slope 0 (active above ``dead_threshold``),
  ReLU6 (active strictly between ``dead_threshold`` and 6: a unit pinned at 6 gets no gradient either),
  Threshold (above its threshold, when its fill value is not above it), Hardswish (output not exactly 0).
- ``saturated`` (bounded activations): Tanh (``|y| < sqrt(0.99)``), Sigmoid (``r < y < 1 - r``,
  ``r = (1 - sqrt(0.99)) / 2``), Softsign (``|y| < 0.9``): where the derivative is at least
  ``SATURATION_GRADIENT`` (1 %) of its peak; Hardtanh (strictly between min_val and max_val) and Hardsigmoid
  (strictly between 0 and 1), whose derivative is exactly 0 outside.
- none (no region without gradient, or none that the output can tell): LeakyReLU, PReLU, RReLU, ELU, CELU,
  SELU, GELU, SiLU, Mish, Softplus. Their units are not judged.
- any other module (Linear, Conv, attention, ...): ``dead`` by the gradient reaching its output, active where
  that gradient is not exactly 0. Behind a functional ``F.relu`` this is the ReLU rule on the
  pre-activation; behind anything that passes gradient (``F.gelu``, ``torch.tanh``, a residual sum) no unit
  is ever called dead; with no backward pass there is no verdict.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

from torch import Tensor, nn

from .config import ACTIVATION_TYPES

#: A value is saturated where the activation's derivative is below this share of its largest derivative.
SATURATION_GRADIENT = 0.01
_TANH_EDGE = math.sqrt(1 - SATURATION_GRADIENT)  # 1 - y**2 = 0.01
_SIGMOID_EDGE = (1 - math.sqrt(1 - SATURATION_GRADIENT)) / 2  # y * (1 - y) = 0.01 * 0.25
_SOFTSIGN_EDGE = 1 - math.sqrt(SATURATION_GRADIENT)  # (1 - |y|)**2 = 0.01


@dataclass(frozen=True)
class UnitRule:
    """A layer's active region: values ``low < v < high`` (of ``|v|`` with ``magnitude``) of its output, or of the
    gradient reaching its output (``source="gradient"``); ``tag`` is the group its figures are logged under."""

    tag: Literal["dead", "saturated"]
    source: Literal["output", "gradient"] = "output"
    low: float = -math.inf
    high: float = math.inf
    magnitude: bool = False

    @property
    def threshold(self) -> float:
        """A value lies in the active region exactly when its :meth:`prepared` value exceeds this."""
        return self.low if self.magnitude or math.isinf(self.high) else 0.0

    def prepared(self, x: Tensor) -> Tensor:
        """``x`` itself for a one-sided region (``low < v``), else mapped elementwise (``|x|``, or the distance
        inside the interval) so that a unit's largest prepared value minus :attr:`threshold` is positive exactly
        when one of its values lay in the region (NaN: not). Launches kernels, reads nothing."""
        if self.magnitude:
            return x.float().abs() if x.element_size() < 4 else x.abs()
        if math.isinf(self.high):
            return x
        if x.element_size() < 4:
            x = x.float()  # the interval's edges would move in half precision
        mid, half = (self.low + self.high) / 2, (self.high - self.low) / 2
        return (x - mid).abs_().neg_().add_(half)


GRADIENT_RULE = UnitRule("dead", "gradient", low=0.0, magnitude=True)


def unit_rule(module: nn.Module, dead_threshold: float = 0.0) -> Optional[UnitRule]:
    """The rule that judges ``module``'s units (see the module docstring), or None when they are not judged."""
    dt = float(dead_threshold)
    if isinstance(module, nn.ReLU6):  # a Hardtanh subclass: checked first
        return UnitRule("dead", low=dt, high=6.0)
    if isinstance(module, nn.ReLU) or isinstance(module, nn.LeakyReLU) and module.negative_slope == 0:
        return UnitRule("dead", low=dt)
    if isinstance(module, nn.Threshold):
        return UnitRule("dead", low=module.threshold) if module.value <= module.threshold else None
    if isinstance(module, nn.Hardswish):
        return UnitRule("dead", low=0.0, magnitude=True)
    if isinstance(module, nn.Tanh):
        return UnitRule("saturated", low=-_TANH_EDGE, high=_TANH_EDGE)
    if isinstance(module, nn.Sigmoid):
        return UnitRule("saturated", low=_SIGMOID_EDGE, high=1 - _SIGMOID_EDGE)
    if isinstance(module, nn.Softsign):
        return UnitRule("saturated", low=-_SOFTSIGN_EDGE, high=_SOFTSIGN_EDGE)
    if isinstance(module, nn.Hardtanh):
        return UnitRule("saturated", low=float(module.min_val), high=float(module.max_val))
    if isinstance(module, nn.Hardsigmoid):
        return UnitRule("saturated", low=0.0, high=1.0)
    if isinstance(module, ACTIVATION_TYPES):
        return None
    return GRADIENT_RULE
