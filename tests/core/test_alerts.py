"""Tests of the alert policy (:mod:`lightning_introspect.core.alerts`) fed a flush's decoded counts directly:
which layer is named, when the next steps are sampled, what each sink is told."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import pytest
from torch import nn

from lightning_introspect.core.alerts import DIAGNOSE_STEPS, Alerts
from lightning_introspect.core.config import IntrospectConfig
from lightning_introspect.core.samples import BAD_INPUT_NAMES
from lightning_introspect.core.schedule import SamplingSchedule
from lightning_introspect.core.writer import AsyncWriter


class _Texts:
    """A sink that keeps the alert texts (the only sink method the alert policy calls)."""

    def __init__(self) -> None:
        self.texts: list[tuple[str, str, int]] = []

    def add_text(self, tag: str, text: str, step: int) -> None:
        self.texts.append((tag, text, step))


@pytest.fixture
def alerts() -> Iterator[Alerts]:
    writer = AsyncWriter()
    cfg = IntrospectConfig(every_n_steps=1, warmup_steps=0)
    layers: list[tuple[str, nn.Module]] = [("a", nn.Linear(2, 2)), ("b", nn.ReLU())]
    yield Alerts(cfg, writer, layers, SamplingSchedule(1, 0, None, None), is_writer=True)
    writer.close()


def _extra(loss_bad: float = 0.0, **bad: float) -> np.ndarray:
    return np.array([loss_bad, *(bad.get(n, 0.0) for n in BAD_INPUT_NAMES)])


def test_nonfinite_values_name_the_first_layer_in_forward_order(alerts: Alerts) -> None:
    """Test that of two layers with non-finite outputs the one that ran first is named, and no diagnosis starts."""
    sink = _Texts()
    alerts.for_flush(7, ["b", "a"], _extra(loss_bad=2), ["a", "b"], {}, [sink], 10)  # type: ignore[list-item]
    with pytest.warns(RuntimeWarning, match=r"NaN/Inf in 2 step\(s\) up to step 7; the first layer .* is 'b'"):
        alerts.writer.poll()
    assert [(t, s) for t, _, s in sink.texts] == [("alerts/nonfinite", 7)] and alerts.diagnose == 0


def test_a_nonfinite_loss_no_layer_explains_samples_the_next_steps(alerts: Alerts) -> None:
    """Test that a non-finite loss without a non-finite layer output starts DIAGNOSE_STEPS sampled steps."""
    alerts.for_flush(3, ["a", "b"], _extra(loss_bad=1), [], {}, [], 10)
    with pytest.warns(RuntimeWarning, match="the next steps are sampled to find it"):
        alerts.writer.poll()  # runs the diagnosis start on this (the training) thread
    assert alerts.diagnose == DIAGNOSE_STEPS


def test_bad_inputs_are_reported_with_their_counts(alerts: Alerts) -> None:
    """Test that bad-input counts become one warning and one alert text, and clean counts none."""
    sink = _Texts()
    alerts.for_flush(5, [], _extra(), [], {}, [sink], 10)  # type: ignore[list-item]
    assert sink.texts == []
    alerts.for_flush(6, [], _extra(ids_out_of_range=3), [], {}, [sink], 10)  # type: ignore[list-item]
    with pytest.warns(RuntimeWarning, match="per-example figures up to step 6"):
        alerts.writer.poll()
    assert [(t, s) for t, _, s in sink.texts] == [("alerts/bad_input", 6)]
    assert "3" in sink.texts[0][1]
