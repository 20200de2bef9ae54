"""Nothing lost: a run killed with SIGKILL mid-epoch leaves the last completed epoch's records readable; a
log dir that becomes unwritable mid-run gives one clear warning and training goes on."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest

import lightning.pytorch as pl
from helpers.robust_common import loader, make_data, read_scalars, tiny_model, trainer_kwargs
from lightning_introspect import Introspect
from lightning_introspect.records import read_records
from lightning_introspect.report import main as report_main

HELPERS = Path(__file__).parent / "helpers"


def test_sigkill_mid_epoch_leaves_last_epoch_records_readable(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Test that SIGKILL during epoch 1 leaves epoch 0's records readable by `read_records` and the report CLI."""
    proc = subprocess.Popen([sys.executable, str(HELPERS / "robust_crash_script.py"), str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    records_json = tmp_path / "run" / "introspect" / "samples.json"
    deadline = time.monotonic() + 90
    try:
        while not ((tmp_path / "epoch1_started").exists() and records_json.exists()):
            if proc.poll() is not None:
                pytest.fail(f"the training script ended early: {proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("epoch 0's records did not appear within 90 s")
            time.sleep(0.1)
        time.sleep(0.3)  # well inside epoch 1 (100 steps of >= 50 ms)
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    records, meta = read_records(tmp_path / "run")
    assert meta["epoch"] == 0 and records["seen_epochs"].tolist() == [1] * 400
    assert not [p for p in (tmp_path / "run" / "introspect").iterdir() if p.name.startswith(".")]  # no temp left
    assert report_main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "report")]) == 0
    assert "400 seen of 400 ids" in capsys.readouterr().out


class BreakLogDir(pl.Callback):
    """At the start of epoch 1, replaces the introspect folder by a file of the same name (root ignores chmod)."""

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.current_epoch == 1:
            intro = trainer.callbacks[0]
            intro.core.drain()  # epoch 0's records are written; then the folder goes away
            target = Path(intro.records_dir)
            shutil.rmtree(target)
            target.write_text("not a folder")


def test_log_dir_unwritable_mid_run_warns_once_and_training_goes_on(tmp_path: Path) -> None:
    """Test that when the records folder becomes unwritable mid-run, one clear warning is given, training runs
    to the end, and the TensorBoard figures keep coming."""
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=3, callbacks=[
        Introspect(every_n_steps=1, warmup_steps=0, histograms=False), BreakLogDir()]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(tiny_model(0), loader(make_data(8), batch_size=4))
    ours = [str(w.message) for w in caught if "could not write" in str(w.message)]
    assert len(ours) == 1, ours
    assert "training goes on" in ours[0] and "log dir" in ours[0]
    assert trainer.current_epoch == 3 and trainer.global_step == 6
    assert [s for s, _ in read_scalars(tmp_path / "run")["grad_norm/global"]] == [0, 1, 2, 3, 4, 5]
