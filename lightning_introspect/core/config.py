"""All knobs of the introspection, validated once."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Type

from torch import nn

ACTIVATION_TYPES: Tuple[Type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Softplus, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardsigmoid, nn.Softsign, nn.Threshold,
)
#: Layers monitored by default: weight layers, attention modules (their output: ``out_proj`` is never called,
#: attention uses its weight directly) and activation modules.
DEFAULT_LAYER_TYPES: Tuple[Type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.MultiheadAttention, *ACTIVATION_TYPES,
)


@dataclass(frozen=True)
class IntrospectConfig:
    """What to record, how often, and at what cost. See :class:`~lightning_introspect.Introspect` for each knob."""

    every_n_steps: int = 50
    warmup_steps: int = 5
    overhead_budget: Optional[float] = None
    layers: Optional[Sequence[str]] = None
    layer_types: Tuple[Type[nn.Module], ...] = DEFAULT_LAYER_TYPES
    max_rows: int = 64
    activations: bool = True
    histograms: bool = True
    histogram_every_n_samples: int = 1
    max_histogram_elements: int = 1 << 12
    max_stat_elements: int = 1 << 12
    dead_units: bool = True
    dead_threshold: float = 0.0
    dead_window: int = 4
    zero_threshold: float = 0.0
    grad_norms: bool = True
    param_grad_norms: bool = False
    update_ratios: bool = True
    sample_dynamics: Optional[bool] = None
    num_examples: Optional[int] = None
    ignore_index: int = -100
    history: bool = False
    detect_nonfinite: bool = True
    max_interval: int = 10_000

    def __post_init__(self) -> None:
        for name in ("every_n_steps", "max_rows", "histogram_every_n_samples", "max_histogram_elements",
                     "max_stat_elements", "dead_window", "max_interval"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"`{name}` must be a positive int, got {v!r}.")
        if not isinstance(self.warmup_steps, int) or isinstance(self.warmup_steps, bool) or self.warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be an int >= 0, got {self.warmup_steps!r}.")
        b = self.overhead_budget
        if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b < 1):
            raise ValueError(
                f"`overhead_budget` must be a fraction in (0, 1), e.g. 0.02 for a 2 % slowdown, or None; got {b!r}."
            )
        for name in ("dead_threshold", "zero_threshold"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"`{name}` must be a finite number, got {v!r}.")
        if self.layers is not None:
            if isinstance(self.layers, str) or not all(isinstance(p, str) and p for p in self.layers):
                raise ValueError(
                    f"`layers` must be a list of name patterns such as ['encoder.*', 'head'], got {self.layers!r}."
                )
        if not isinstance(self.layer_types, tuple) or not all(
            isinstance(t, type) and issubclass(t, nn.Module) for t in self.layer_types
        ):
            raise ValueError(f"`layer_types` must be a tuple of nn.Module classes, got {self.layer_types!r}.")
        if self.num_examples is not None and (
            not isinstance(self.num_examples, int) or isinstance(self.num_examples, bool) or self.num_examples < 1
        ):
            raise ValueError(f"`num_examples` must be a positive int or None, got {self.num_examples!r}.")
        if self.sample_dynamics not in (None, True, False):
            raise ValueError(f"`sample_dynamics` must be True, False or None (auto), got {self.sample_dynamics!r}.")
