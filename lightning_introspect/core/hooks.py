"""Selecting layers and attaching forward hooks for sampled steps only.

With no hook registered, ``nn.Module.__call__`` takes its fast path, so an unsampled step runs the user's
model untouched. Hooks launch kernels and never read their results.
"""
from __future__ import annotations

import fnmatch
import functools
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .config import ACTIVATION_TYPES, IntrospectConfig
from .dist import is_dtensor, local_part
from .stats import LayerStats
from .units import unit_rule

_CHANNEL_FIRST = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
    nn.GroupNorm, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.Dropout2d, nn.Dropout3d,
)


def unit_dim_of(module: nn.Module) -> Optional[int]:
    """The unit (channel) dimension of a module's output: 1 for convolution-like layers, -1 for linear-like
    ones, None when it follows its input (activations, dropout: decided by the layer before it)."""
    if isinstance(module, _CHANNEL_FIRST):
        return 1
    if isinstance(module, ACTIVATION_TYPES) or isinstance(module, (nn.Dropout, nn.Identity)):
        return None
    return -1


def first_tensor(output: Any) -> Optional[Tensor]:
    """The first tensor of a layer's output: itself, or depth-first in a tuple, list or dict."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for o in output:
            t = first_tensor(o)
            if t is not None:
                return t
    if isinstance(output, dict):
        for o in output.values():
            t = first_tensor(o)
            if t is not None:
                return t
    return None


def plain_name(name: str) -> str:
    """A module or parameter name without the ``_orig_mod`` level that ``torch.compile`` inserts, so that a
    compiled model logs the same tags as the eager one (``net._orig_mod.0`` -> ``net.0``)."""
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def select_layers(model: nn.Module, config: IntrospectConfig) -> list[tuple[str, nn.Module]]:
    """Modules to monitor: those named by ``config.layers`` patterns (fnmatch on qualified names, e.g.
    ``"encoder.*"``), of the types in ``config.layer_types``. The ``out_proj`` of an ``nn.MultiheadAttention``
    is left out unless ``layers`` names it exactly: attention uses its weight directly and never calls it (the
    attention module's own output is watched instead). Raises ValueError naming the fix when a pattern
    matches nothing or nothing is selected."""
    # A compiled module and the module it wraps share a plain name: the wrapped (eager) one is kept.
    named = list({plain_name(n): m for n, m in model.named_modules() if plain_name(n)}.items())
    names = [n for n, _ in named]
    uncalled = {f"{n}.out_proj" for n, m in named if isinstance(m, nn.MultiheadAttention)}
    uncalled -= set(config.layers or ())
    left_out = [n for n in names if n in uncalled]
    named = [(n, m) for n, m in named if n not in uncalled]
    if config.layers is not None:
        for pattern in config.layers:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise ValueError(
                    f"`layers` pattern {pattern!r} matched no module of {type(model).__name__}; names look like "
                    f"{names[:4]}. List them with `[n for n, _ in model.named_modules()]`."
                )
        named = [(n, m) for n, m in named if any(fnmatch.fnmatchcase(n, p) for p in config.layers)]
    selected = [(n, m) for n, m in named if isinstance(m, config.layer_types)]
    if not selected:
        kinds = sorted({type(m).__name__ for _, m in named})[:8]
        raise ValueError(
            f"No layer of {type(model).__name__} was selected: `layers`={config.layers!r} and `layer_types` "
            f"{[t.__name__ for t in config.layer_types][:6]}... match none of its modules (types here: {kinds}). "
            "Widen `layers` or add the types you want to `layer_types`."
            + (f" Left out: {left_out[:4]} (never called: attention uses out_proj's weight directly; name one "
               "exactly in `layers` to select it anyway)." if left_out else "")
        )
    return selected


def _grad_hook(stats: LayerStats, max_rows: int, grad: Tensor) -> None:
    """Tensor hook on a judged layer's output: folds the gradient reaching it (first ``max_rows`` rows, as the
    forward hook) into the layer's unit scores; the gradient passes on unchanged."""
    stats.capture_grad(grad[:max_rows] if grad.ndim > 1 else grad)


class HookSet:
    """Forward hooks over the selected layers, attached only while a sampled step runs.

    Use as a context manager (``with hooks: model(x)``) or ``attach()``/``detach()``. Each call of a hooked
    layer folds its output into that layer's :class:`LayerStats`; the first call order of each step is kept
    (for naming the first layer that produced a non-finite value).
    """

    def __init__(
        self,
        layers: Sequence[tuple[str, nn.Module]],
        stats: dict[str, LayerStats],
        config: IntrospectConfig,
        on_skip: Callable[[str, str], None],
    ) -> None:
        self.layers = list(layers)
        self.stats = stats
        self.config = config
        self.on_skip = on_skip
        self.histogram = config.histograms
        self.dead_layers: Optional[set[str]] = None  # layers whose units are judged; None: not decided yet, all
        self.order: list[str] = []
        self.called: set[str] = set()  # layers called on some sampled step (or skipped: see on_skip)
        self._handles: list[RemovableHandle] = []
        self._hooks: dict[str, Callable[..., None]] = {}  # made once: attaching on every sampled step is cheap
        self._last_unit_dim = -1

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> None:
        if self._handles:
            return
        self.order = []
        self._last_unit_dim = -1
        for name, module in self.layers:
            hook = self._hooks.get(name)
            if hook is None:
                hook = self._hooks[name] = self._make_hook(name, module)
            self._handles.append(module.register_forward_hook(hook))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "HookSet":
        self.attach()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def _make_hook(self, name: str, module: nn.Module) -> Callable[..., None]:
        fixed_unit_dim = unit_dim_of(module)
        cfg = self.config
        rule = unit_rule(module, cfg.dead_threshold)

        @torch.no_grad()
        def hook(mod: nn.Module, args: Any, output: Any) -> None:
            x = out = first_tensor(output)
            if x is not None and is_dtensor(x):  # tensor parallelism (FSDP2 layers return plain tensors)
                # Rows split across ranks or replicated: the flush's sums merge the ranks' local parts as it does
                # DDP's. Split along another dimension, a unit's values would merge with other units' values.
                placements = x.placements  # type: ignore[attr-defined]
                if not all(pl.is_replicate() or (pl.is_shard() and pl.dim == 0) for pl in placements):
                    self.on_skip(name, f"returned a DTensor split across ranks along a dimension other than the "
                                       f"rows ({tuple(placements)}), whose units cannot be merged across ranks")
                    return
                x = local_part(x)
            if x is None or not (x.is_floating_point() or x.is_complex()):
                self.on_skip(name, f"returned {type(output).__name__}, not a floating-point tensor")
                return
            if x.ndim == 0:
                self.on_skip(name, "returned a 0-d tensor (no units)")
                return
            x = x.detach()
            if x.ndim > 1:
                x = x[: cfg.max_rows]
            st = self.stats.get(name)
            if st is None:
                ud = fixed_unit_dim
                if ud is None:  # an activation: its units are those of the layer before it
                    ud = self._last_unit_dim if x.ndim > 2 else -1
                    if x.ndim >= 4 and self._last_unit_dim == -1:
                        ud = 1
                st = self.stats[name] = LayerStats(
                    name, unit_dim=ud, dead_threshold=cfg.dead_threshold, zero_threshold=cfg.zero_threshold,
                    rule=rule,
                )
            if fixed_unit_dim is not None:
                self._last_unit_dim = fixed_unit_dim
            if name not in self.order:
                self.order.append(name)
                self.called.add(name)
            dead = rule is not None and cfg.dead_units and (self.dead_layers is None or name in self.dead_layers)
            ok = st.capture(x, moments=cfg.activations, dead=dead, max_stat_elements=cfg.max_stat_elements)
            if not ok:
                self.on_skip(name, f"changed its number of units (now {tuple(x.shape)})")
            elif dead and st.rule.source == "gradient" and out.requires_grad and not is_dtensor(out):  # type: ignore[union-attr]
                out.register_hook(functools.partial(_grad_hook, st, cfg.max_rows))  # type: ignore[union-attr]

        # Sampled steps run compiled code eagerly (core/compile.py), so this hook normally never meets Dynamo; where
        # the step itself is being traced and no stance can be set, it still runs eagerly instead of being traced
        # (and recompiled) per layer name and output shape.
        return torch.compiler.disable(hook)

    def __iter__(self) -> Iterator[tuple[str, nn.Module]]:
        return iter(self.layers)
