"""Scenario: FSDP2 (Lightning's ``ModelParallelStrategy``, ``fully_shard``) on 2 CPU processes (gloo), and the
strategies the callback does not support.

Both ranks get the same batches, so FSDP2's averaged gradient is one process's gradient and every statistic
must equal a one-process run: activations (full tensors on each rank), dead units, the gradient, weight and
update norms taken from the ranks' shards (10-row and 3-row weights split 5/5 and 2/1), the norm after
clipping, per-parameter norms and the per-example records.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from helpers.models import PACKAGES
from helpers.robust_common import read_scalars

from lightning_introspect import Introspect
from lightning_introspect.callback import _check_strategy
from lightning_introspect.records import read_records

HELPERS = Path(__file__).parents[1] / "helpers"
sys.path.insert(0, str(HELPERS))
import fsdp_script  # noqa: E402  (the worker script, imported for the one-process reference)

_ENV = {**os.environ, "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore"}


def test_fsdp2_on_two_ranks_equals_one_process(tmp_path: Path) -> None:
    """Test that a 2-rank FSDP2 run with the same data on both ranks logs every tag at every step of a
    one-process run, within 1e-4, and the same per-example records."""
    fsdp_script.fit(tmp_path / "single", "single")
    cmd = [sys.executable, str(HELPERS / "fsdp_script.py"), str(tmp_path / "fsdp"), "fsdp"]
    proc = subprocess.run(cmd, env=_ENV, capture_output=True, text=True, timeout=110, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref, got = read_scalars(tmp_path / "single" / "run"), read_scalars(tmp_path / "fsdp" / "run")
    steps = fsdp_script.EPOCHS * fsdp_script.N // fsdp_script.BATCH
    for tag in ("grad_norm/global", "grad_norm/global_clipped", "grad_norm/net.0", "grad_norm/net.2",
                "grad_to_weight/net.2", "update_to_weight/global", "update_to_weight/net.0",
                "param_grad_norm/net.2.bias", "activation_mean/net.1", "dead_fraction/net.1"):
        assert tag in ref, tag
    assert [s for s, _ in ref["grad_norm/global"]] == list(range(steps))
    assert sorted(got) == sorted(ref)
    for tag, points in ref.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag
        np.testing.assert_allclose([v for _, v in got[tag]], [v for _, v in points], rtol=1e-4, atol=1e-5, err_msg=tag)
    records, _ = read_records(tmp_path / "fsdp" / "run")
    ref_records, _ = read_records(tmp_path / "single" / "run")
    assert records["seen_epochs"].tolist() == [fsdp_script.EPOCHS] * fsdp_script.N
    for key, values in ref_records.items():
        np.testing.assert_allclose(records[key], values, rtol=1e-4, atol=1e-5, err_msg=key)


@pytest.mark.parametrize("package", PACKAGES)
@pytest.mark.parametrize("strategy", ["FSDPStrategy", "DeepSpeedStrategy"])
def test_fsdp1_and_deepspeed_are_refused_at_setup(package: str, strategy: str, tmp_path: Path) -> None:
    """Test that setup under Lightning's FSDPStrategy (FSDP1) or DeepSpeedStrategy raises an error that names
    the strategy and the ones to use, before anything is written."""
    strategies = importlib.import_module(f"{package}.strategies")
    if strategy == "FSDPStrategy":
        instance = strategies.FSDPStrategy()  # the Trainer refuses it on a CPU, the class does not
    else:  # deepspeed is not installed here: a subclass of the name the check looks for
        instance = type("DeepSpeedStrategy", (strategies.DDPStrategy,), {})()
    intro = Introspect()
    trainer = SimpleNamespace(strategy=instance, loggers=[], is_global_zero=True, log_dir=str(tmp_path),
                              default_root_dir=str(tmp_path))
    with pytest.raises(ValueError, match=rf"`{strategy}`.*ModelParallelStrategy\(\).*fully_shard.*\"ddp\""):
        intro.setup(trainer, None, "fit")
    assert intro.core is None and not any(tmp_path.iterdir())


@pytest.mark.parametrize("strategy", ["DDPStrategy", "ModelParallelStrategy"])
def test_ddp_and_fsdp2_pass_the_strategy_check(strategy: str) -> None:
    """Test that the strategies the callback supports are not refused."""
    from lightning.pytorch import strategies

    _check_strategy(SimpleNamespace(strategy=getattr(strategies, strategy)()))
