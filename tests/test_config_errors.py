"""Tests that misconfiguration fails early (constructor, setup or the first batch) with an error naming the fix."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers.models import classification_data, classifier, lightning, loader, trainer
from torch import nn

from lightning_introspect import Introspect, WithIndex

PACKAGE = "lightning.pytorch"


def fit(tmp_path: Path, cb: Introspect, *, model: Any = None, data: Any = None, **kw: Any) -> Any:
    tr = trainer(PACKAGE, tmp_path, callbacks=[cb], max_steps=2, **kw)
    tr.fit(model if model is not None else classifier(PACKAGE),
           loader(data if data is not None else WithIndex(classification_data())))
    return tr


# ------------------------------------------------------------------------------------------------ option values
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every_n_steps": 0}, "`every_n_steps` must be a positive int, got 0"),
        ({"every_n_steps": 2.5}, "`every_n_steps` must be a positive int, got 2.5"),
        ({"every_n_steps": True}, "`every_n_steps` must be a positive int, got True"),
        ({"warmup_steps": -1}, "`warmup_steps` must be an int >= 0, got -1"),
        ({"overhead_budget": 2}, r"`overhead_budget` must be a fraction in \(0, 1\), e.g. 0.02 .* got 2"),
        ({"overhead_budget": 0.0}, r"`overhead_budget` must be a fraction in \(0, 1\)"),
        ({"max_rows": -1}, "`max_rows` must be a positive int, got -1"),
        ({"dead_window": 0}, "`dead_window` must be a positive int, got 0"),
        ({"histogram_every_n_samples": 0}, "`histogram_every_n_samples` must be a positive int"),
        ({"dead_threshold": math.nan}, "`dead_threshold` must be a finite number, got nan"),
        ({"zero_threshold": "0"}, "`zero_threshold` must be a finite number, got '0'"),
        ({"layers": "encoder.*"},
         r"`layers` must be a list of name patterns such as \['encoder.\*', 'head'\], got 'encoder.\*'"),
        ({"layers": ["net.0", ""]}, "`layers` must be a list of name patterns"),
        ({"layer_types": (nn.Linear, int)}, "`layer_types` must be a tuple of nn.Module classes"),
        ({"layer_types": nn.Linear}, r"`layer_types` must be a tuple of nn.Module classes, got <class"),
        ({"sample_dynamics": "yes"}, r"`sample_dynamics` must be True, False or None \(auto\), got 'yes'"),
        ({"num_examples": 0}, "`num_examples` must be a positive int or None, got 0"),
        ({"ids": 2.5}, "`ids` must be 'auto', a tuple position, a dict key or a function, got 2.5"),
        ({"ids": [0]}, "`ids` must be 'auto', a tuple position, a dict key or a function"),
        ({"targets": 1.0}, "`targets` must be 'auto', a tuple position, a dict key or a function, got 1.0"),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else None,
)
def test_invalid_option_fails_in_constructor(kwargs: dict[str, Any], message: str) -> None:
    """Test that each invalid option value raises ValueError in ``Introspect(...)`` naming the option and value."""
    with pytest.raises(ValueError, match=message):
        Introspect(**kwargs)


# ------------------------------------------------------------------------------------------------ setup
def test_layer_pattern_matching_nothing_fails_at_setup(tmp_path: Path) -> None:
    """Test that a ``layers`` pattern that matches no module fails at setup, showing real names and how to list them."""
    with pytest.raises(ValueError, match=r"`layers` pattern 'encoder\.\*' matched no module of BoringClassifier\w*.*"
                                         r"names look like \['net', 'net\.0'.*model\.named_modules\(\)"):
        fit(tmp_path, Introspect(layers=["net.*", "encoder.*"]))


def test_no_layer_selected_fails_at_setup(tmp_path: Path) -> None:
    """Test that patterns and types that select nothing fail at setup and say to widen them."""
    with pytest.raises(ValueError, match=r"No layer of BoringClassifier\w* was selected.*types here: .*'Linear'.*"
                                         r"Widen `layers` or add the types you want to `layer_types`"):
        fit(tmp_path, Introspect(layer_types=(nn.Conv2d,)))


def test_unwritable_log_dir_fails_at_setup(tmp_path: Path) -> None:
    """Test that a log dir that cannot be created fails at setup, naming the directory and the options to change."""
    blocker = tmp_path / "afile"
    blocker.write_text("a regular file, so nothing can be created under it (chmod does not stop root)")
    target = blocker / "sub"
    with pytest.raises(PermissionError, match=rf"cannot write to {re.escape(str(target / 'introspect'))} .*"
                                              r"`default_root_dir`.*`Introspect\(log_dir=\.\.\.\)`"):
        fit(tmp_path, Introspect(log_dir=target), logger=False)


# ------------------------------------------------------------------------------------------------ sample ids and logits
def test_sample_dynamics_required_without_ids_fails_at_train_start(tmp_path: Path) -> None:
    """Test that sample_dynamics=True on a dataset without ids fails before the first step and names WithIndex."""
    seen: list[int] = []
    model = classifier(PACKAGE, probe=lambda m: seen.append(m.global_step))
    with pytest.raises(ValueError, match=r"sample_dynamics=True\) found no sample ids: wrap the training set as "
                                         r"`WithIndex\(dataset\)`, or pass `ids=`"):
        fit(tmp_path, Introspect(sample_dynamics=True), model=model, data=classification_data())
    assert seen == []


def test_ids_pointing_at_float_data_fail_on_the_first_batch(tmp_path: Path) -> None:
    """Test that ``ids=`` naming a batch element that is not integer ids fails on the first batch, naming the fix."""
    with pytest.raises(ValueError, match=r"sample ids must be a 1-d integer tensor .* got Tensor\(8, 8\).*"
                                         r"Wrap the dataset in `WithIndex` or pass `ids=`"):
        fit(tmp_path, Introspect(ids=0))


def test_ids_position_out_of_range_fails_on_the_first_batch(tmp_path: Path) -> None:
    """Test that an ``ids=`` position the batch does not have fails on the first batch."""
    with pytest.raises(ValueError, match=r"the batch has 3 elements; ids position 7 is not among them"):
        fit(tmp_path, Introspect(ids=7))


def _no_logits_module() -> Any:
    pl = lightning(PACKAGE)

    class EmbeddingsOnly(pl.LightningModule):  # type: ignore[misc,name-defined]
        """training_step returns only the loss and never calls forward (no logits anywhere)."""

        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(8, 4)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y, _ = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return EmbeddingsOnly()


def test_model_without_logits_fails_on_the_first_batch(tmp_path: Path) -> None:
    """Test that per-example dynamics without logits fail on the first batch, saying what to return."""
    with pytest.raises(ValueError, match=r"Introspect found no logits: .*forward returned nothing \(forward was "
                                         r"not called\).*Return \{'loss': loss, 'logits': logits\}.*"
                                         r"`sample_dynamics=False`"):
        fit(tmp_path, Introspect(), model=_no_logits_module())


def test_model_without_logits_trains_with_sample_dynamics_off(tmp_path: Path) -> None:
    """Test that the fix named by that error works: the same model trains with sample_dynamics=False."""
    tr = fit(tmp_path, Introspect(sample_dynamics=False), model=_no_logits_module())
    assert tr.global_step == 2
