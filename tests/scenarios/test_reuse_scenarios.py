"""One ``Introspect`` instance reused: a hyper-parameter loop or a notebook re-run (a new Trainer each time),
and a second ``fit`` on the same Trainer. A new Trainer starts fresh records, TensorBoard points in its own
log dir and hooks on its own model; the same Trainer and model continue like a resume; a different model on
the same Trainer is refused before training, as is a new run that would write into the previous run's dir."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from helpers.models import MLP_LAYERS, classification_data, classifier, loader, trainer
from helpers.tb import read_events
from lightning_introspect import Introspect, WithIndex
from lightning_introspect.records import read_records

STEPS = 8  # 64 examples in batches of 8


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


_OTHERS: set[threading.Thread] = set()


@pytest.fixture(autouse=True)
def _threads_before() -> None:
    """Writer threads alive before the test (another test's failure may leave one): not this test's."""
    _OTHERS.clear()
    _OTHERS.update(threading.enumerate())


def _writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("lightning-introspect") and t not in _OTHERS]


def _data() -> Any:
    return loader(WithIndex(classification_data()))


def test_new_trainers_start_fresh_runs(tmp_path: Path) -> None:
    """Test that a callback reused with a new Trainer and model writes the second run's points to the second
    log dir only, starts fresh records there, hooks only the second model and leaves no writer thread."""
    cb = Introspect(every_n_steps=2, warmup_steps=0, histograms=False)
    models, hooks_seen = [], []
    for run in ("a", "b"):
        torch.manual_seed(0)
        model = classifier(return_logits=False, probe=lambda m: hooks_seen.append(
            (m.global_step, [_hooks(x) for x in models])))
        models.append(model)
        trainer("lightning.pytorch", tmp_path / run, callbacks=[cb], max_epochs=2).fit(model, _data())
        assert _writer_threads() == []
        assert cb.core is not None and cb.core.model is model
    first, second = (read_events(tmp_path / run / "version_0") for run in ("a", "b"))
    sampled = list(range(0, 2 * STEPS, 2))
    for events in (first, second):  # the first run's dir got nothing from the second run
        assert events.steps("activation_mean/net.0") == sampled
        assert events.steps("grad_norm/global") == sampled
        assert events.steps("samples/learned_fraction") == [STEPS, 2 * STEPS]
    for run in ("a", "b"):
        records, _ = read_records(tmp_path / run / "version_0")
        assert records["seen_epochs"].tolist() == [2] * 64  # fresh: not 2 + 2
    np.testing.assert_allclose(*(read_records(tmp_path / r / "version_0")[0]["loss_sum"] for r in "ab"), rtol=1e-6)
    # During the second run: no hook on the first model; the second one's on sampled steps (+1 capture hook).
    second_run = hooks_seen[len(hooks_seen) // 2 :]
    assert [h[0] for h in second_run] == list(range(2 * STEPS))
    for step, (old, new) in second_run:
        assert old == 0 and new == (len(MLP_LAYERS) if step % 2 == 0 else 0) + 1, step
    assert [_hooks(m) for m in models] == [0, 0]


def test_second_fit_on_the_same_trainer_continues(tmp_path: Path) -> None:
    """Test that fitting the same model again on the same Trainer continues the records and curves, as an
    uninterrupted run of all the epochs would have them."""
    cb = Introspect(every_n_steps=2, warmup_steps=0, histograms=False)
    torch.manual_seed(0)
    model = classifier()
    tr = trainer("lightning.pytorch", tmp_path / "twice", callbacks=[cb], max_epochs=2)
    tr.fit(model, _data())
    tr.fit_loop.max_epochs = 4
    tr.fit(model, _data())
    assert _writer_threads() == []
    torch.manual_seed(0)
    trainer("lightning.pytorch", tmp_path / "once", callbacks=[Introspect(every_n_steps=2, warmup_steps=0,
            histograms=False)], max_epochs=4).fit(classifier(), _data())
    twice, _ = read_records(tmp_path / "twice" / "version_0")
    once, _ = read_records(tmp_path / "once" / "version_0")
    assert twice["seen_epochs"].tolist() == [4] * 64
    for key in once:
        np.testing.assert_allclose(twice[key], once[key], rtol=1e-5, atol=1e-6, err_msg=key)
    events = read_events(tmp_path / "twice" / "version_0")
    assert events.steps("activation_mean/net.0") == list(range(0, 4 * STEPS, 2))  # no gap, no repeat
    assert events.steps("samples/learned_fraction") == [STEPS * e for e in (1, 2, 3, 4)]


def test_another_model_on_the_same_trainer_is_refused(tmp_path: Path) -> None:
    """Test that fitting a different model on a Trainer the callback already recorded raises before training."""
    cb = Introspect(every_n_steps=2, warmup_steps=0)
    tr = trainer("lightning.pytorch", tmp_path, callbacks=[cb], max_epochs=1)
    tr.fit(classifier(), _data())
    tr.fit_loop.max_epochs = 2
    other = classifier()
    with pytest.raises(RuntimeError, match="different model .* same Trainer"):
        tr.fit(other, _data())
    assert _hooks(other) == 0 and _writer_threads() == []
    assert read_records(tmp_path / "version_0")[0]["seen_epochs"].tolist() == [1] * 64


def test_a_new_trainer_in_the_previous_runs_dir_is_refused(tmp_path: Path) -> None:
    """Test that a new Trainer whose log dir is the previous run's raises before training instead of mixing
    both runs' records and points."""
    cb = Introspect(every_n_steps=2, warmup_steps=0)
    trainer("lightning.pytorch", tmp_path, callbacks=[cb], max_epochs=1).fit(classifier(), _data())
    events_before = read_events(tmp_path / "version_0").steps("activation_mean/net.0")
    with pytest.raises(RuntimeError, match="already wrote a run to"):
        trainer("lightning.pytorch", tmp_path, callbacks=[cb], max_epochs=1).fit(classifier(), _data())
    assert read_events(tmp_path / "version_0").steps("activation_mean/net.0") == events_before
    assert _writer_threads() == []
