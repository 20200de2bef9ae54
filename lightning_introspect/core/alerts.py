"""Health rules: non-finite values and their first layer, bad per-example inputs, which layers' units are
judged dead or saturated, layers never called, an overhead budget that cannot be held. Each problem is a
warning (once per kind) and an alert text; training goes on."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
from torch import nn

from .config import ACTIVATION_TYPES, IntrospectConfig
from .contracts import Sink
from .hooks import HookSet
from .samples import BAD_INPUT_NAMES, bad_input_message
from .schedule import SamplingSchedule
from .units import unit_rule
from .writer import AsyncWriter

DIAGNOSE_STEPS = 3  # steps sampled after a non-finite loss that no sampled layer explained
_GLOBAL_GRAD_TAGS = ("grad_norm/global", "grad_norm/global_clipped")  # not layers


class Alerts:
    """The alert policy of one run; the training thread reads ``diagnose`` at each step start."""

    def __init__(
        self, config: IntrospectConfig, writer: AsyncWriter, layers: list[tuple[str, nn.Module]],
        schedule: SamplingSchedule, is_writer: bool,
    ) -> None:
        self.config = config
        self.writer = writer
        self.layers = layers
        self.schedule = schedule
        self.is_writer = is_writer
        self.hooks: Optional[HookSet] = None  # set once the hooks exist (they report skipped layers here)
        self.skipped: dict[str, str] = {}
        self.dead_layers: Optional[dict[str, str]] = None
        self.uncalled_checked = False
        self.diagnose = 0  # steps still sampled to find the origin of a non-finite value

    @property
    def _hooks(self) -> HookSet:
        assert self.hooks is not None
        return self.hooks

    def start_diagnosis(self) -> None:
        """Samples the next ``DIAGNOSE_STEPS`` steps (training thread)."""
        self.diagnose = DIAGNOSE_STEPS

    def on_skip(self, name: str, reason: str) -> None:
        """A selected layer the hooks cannot watch: warned once, then left out."""
        if name not in self.skipped:
            self.skipped[name] = reason
            self.writer.alert(
                f"lightning_introspect: layer {name!r} {reason}; it is not monitored. Leave it out with `layers=`.",
                UserWarning,
            )

    def for_flush(
        self, step: int, order: Sequence[str], extra: np.ndarray, nonfinite_layers: list[str],
        scalars: dict[str, float], sinks: Sequence[Sink], num_examples: Optional[int],
    ) -> None:
        """Warns (once per kind) and writes an alert text for a flush's non-finite values (naming the first layer
        in forward order that produced one, or sampling the next steps to find it) and its bad inputs; the
        counts ``extra`` are the flush's non-finite losses, then its bad-input counts (writer thread)."""
        loss_bad = extra[0]
        bad = dict(zip(BAD_INPUT_NAMES, extra[1:]))
        grad_bad = "grad_norm/global" in scalars and not math.isfinite(scalars["grad_norm/global"])
        if loss_bad > 0 or nonfinite_layers or grad_bad:
            first = min(nonfinite_layers, key=lambda n: order.index(n) if n in order else len(order)) if nonfinite_layers else None
            parts = []
            if loss_bad > 0:
                parts.append(f"the loss was NaN/Inf in {int(loss_bad)} step(s) up to step {step}")
            if first is not None:
                parts.append(f"the first layer in forward order with a non-finite output is {first!r}")
            elif loss_bad > 0:
                parts.append("no monitored layer produced a non-finite value on the sampled step; the next steps are sampled to find it")
            if grad_bad:
                bad_layers = [k.split("/", 1)[1] for k, v in scalars.items() if k.startswith("grad_norm/") and not math.isfinite(v) and k not in _GLOBAL_GRAD_TAGS]
                parts.append(f"non-finite gradients in {bad_layers[:5]}")
            message = f"lightning_introspect: non-finite values at step {step}: " + "; ".join(parts) + ". Training goes on."
            self.writer.alert(message, RuntimeWarning, key="nonfinite")
            for sink in sinks:
                sink.add_text("alerts/nonfinite", message, step)
            if first is None:
                self.writer.on_main_thread(self.start_diagnosis)
        problems = {k: int(v) for k, v in bad.items() if v > 0}
        if problems:
            message = f"lightning_introspect: per-example figures up to step {step}: " + bad_input_message(
                problems, num_examples, self.config.ignore_index
            )
            self.writer.alert(message, RuntimeWarning, key="bad_input:" + ",".join(sorted(problems)))
            for sink in sinks:
                sink.add_text("alerts/bad_input", message, step)

    def judged_dead_layers(self) -> dict[str, str]:
        """Layers whose units are judged, each with its tag group, "dead" or "saturated" (decided at the first
        flush, from the forward order; the rules: :mod:`~lightning_introspect.core.units`).

        An activation module is judged by its type's rule (none for activations that pass gradient
        everywhere). Any other layer is judged by the gradient reaching its output, unless a watched activation
        module comes right after it in forward order: that module judges the same units.
        """
        if self.dead_layers is None and self._hooks.order:
            order = self._hooks.order
            acts = {n for n, m in self.layers if isinstance(m, ACTIVATION_TYPES)}
            judged: dict[str, str] = {}
            for name, module in self.layers:
                rule = unit_rule(module, self.config.dead_threshold)
                if rule is None:
                    continue
                if rule.source == "gradient" and name in order:
                    i = order.index(name)
                    if i + 1 < len(order) and order[i + 1] in acts:
                        continue
                judged[name] = rule.tag
            self.dead_layers = judged
            self._hooks.dead_layers = set(judged)
        return self.dead_layers or {}

    def warn_if_budget_unreachable(self) -> None:
        """Warns once when the overhead budget is below what every step costs anyway."""
        if self.config.overhead_budget is not None:
            if self.schedule.budget_unreachable and self.is_writer:
                budget, floor = self.config.overhead_budget, self.schedule.always_on()
                room = self.schedule.MIN_ROOM
                self.writer.alert(
                    f"lightning_introspect: `overhead_budget={budget:g}` cannot be held: the work done on every step "
                    f"(per-example dynamics) alone slows training by {100 * floor:.1f} %; sampled steps keep a tenth "
                    f"of the budget, so expect about {100 * (floor + budget * room):.1f} % (the `introspect/overhead` "
                    "tag). Raise the budget, or pass `sample_dynamics=False` to drop per-example dynamics.",
                    RuntimeWarning, key="overhead_budget",
                )

    def warn_uncalled_layers(self, sampled: int) -> None:
        """Once, at the first epoch end after a sampled step: names the selected layers that no sampled step
        called (they have no statistics at all); ``sampled``: this run's sampled steps so far."""
        if self.uncalled_checked or not self.layers or sampled <= 0:
            return
        self.uncalled_checked = True
        missing = [n for n, _ in self.layers if n not in self._hooks.called and n not in self.skipped]
        if missing and self.is_writer:
            self.writer.alert(
                f"lightning_introspect: {len(missing)} selected layer(s) were not called on any of the "
                f"{sampled} sampled step(s) so far and have no statistics: {missing[:8]}"
                f"{' ...' if len(missing) > 8 else ''}. A parent module may use their weights directly, or they sit "
                "on a branch training does not take. Select modules that are called with `layers=` (name "
                "patterns) or `layer_types=`.",
                UserWarning, key="uncalled layers",
            )
            self.writer.poll()

