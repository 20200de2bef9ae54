"""Two ``Introspect`` callbacks with different settings on one Trainer, told apart by ``name=``: each writes
its own TensorBoard run and records under ``<log_dir>/<name>/``, keeps its own state in the checkpoint, and
a resume restores both."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from helpers.models import classification_data, classifier, loader, trainer
from helpers.tb import read_events
from lightning_introspect import Introspect, WithIndex
from lightning_introspect.records import read_records

STEPS = 8  # 64 examples in batches of 8


def _pair() -> list[Introspect]:
    return [Introspect(name="dense", every_n_steps=1, warmup_steps=0, histograms=False),
            Introspect(name="sparse", every_n_steps=4, warmup_steps=0, grad_norms=False, layers=["net.0"])]


def _data() -> Any:
    return loader(WithIndex(classification_data()))


def test_two_named_callbacks_write_apart(tmp_path: Path) -> None:
    """Test that two named callbacks each write their own cadence and layers to their own folder, and nothing
    to the logger's own run."""
    torch.manual_seed(0)
    trainer("lightning.pytorch", tmp_path, callbacks=_pair(), max_epochs=1).fit(classifier(), _data())
    dense, sparse = (read_events(tmp_path / "version_0" / name) for name in ("dense", "sparse"))
    assert dense.steps("activation_mean/net.0") == list(range(STEPS))
    assert dense.steps("grad_norm/global") == list(range(STEPS))
    assert sparse.steps("activation_mean/net.0") == [0, 4]
    assert not any(t.startswith(("activation_mean/net.3", "grad_norm/")) for t in sparse.tags())
    assert not any(t.startswith(("activation_", "samples/")) for t in read_events(tmp_path / "version_0").tags())
    for name in ("dense", "sparse"):
        assert read_records(tmp_path / "version_0" / name)[0]["seen_epochs"].tolist() == [1] * 64


def test_two_named_callbacks_checkpoint_and_resume_their_own_state(tmp_path: Path) -> None:
    """Test that the checkpoint holds both callbacks' states under their own keys and that a resume restores
    both: their records equal those of an uninterrupted run."""
    torch.manual_seed(0)
    first = _pair()
    tr = trainer("lightning.pytorch", tmp_path / "a", callbacks=first, max_epochs=1)
    model = classifier()
    tr.fit(model, _data())
    ckpt = tmp_path / "epoch1.ckpt"
    tr.save_checkpoint(ckpt)
    states = torch.load(ckpt, weights_only=True)["callbacks"]
    keys = [cb.state_key for cb in first]
    assert len(set(keys)) == 2 and set(keys) <= set(states)
    assert states[keys[0]]["schedule"] != states[keys[1]]["schedule"]

    resumed = _pair()
    trainer("lightning.pytorch", tmp_path / "b", callbacks=resumed, max_epochs=2).fit(classifier(), _data(),
                                                                                       ckpt_path=str(ckpt))
    torch.manual_seed(0)
    trainer("lightning.pytorch", tmp_path / "c", callbacks=_pair(), max_epochs=2).fit(classifier(), _data())
    for name in ("dense", "sparse"):
        got, _ = read_records(tmp_path / "b" / "version_0" / name)
        want, _ = read_records(tmp_path / "c" / "version_0" / name)
        assert got["seen_epochs"].tolist() == [2] * 64
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=f"{name}: {key}")
    sparse = read_events(tmp_path / "b" / "version_0" / "sparse")
    assert sparse.steps("activation_mean/net.0") == [8, 12]  # its own cadence, continued


def test_two_unnamed_callbacks_are_refused_with_a_state_key_hint(tmp_path: Path) -> None:
    """Test that two unnamed callbacks on one Trainer are refused when the Trainer is built."""
    with pytest.raises(RuntimeError, match="state_key"):
        trainer("lightning.pytorch", tmp_path, callbacks=[Introspect(), Introspect(every_n_steps=3)])


@pytest.mark.parametrize("name", ["", "a/b", "..", 3])
def test_bad_names_are_refused(name: Any) -> None:
    """Test that a name that is not a plain folder name is refused."""
    with pytest.raises(ValueError, match="`name` must be"):
        Introspect(name=name)
