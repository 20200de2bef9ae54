"""The runnable examples: each runs in a subprocess with reduced sizes, exits 0 and writes real logs and records."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from lightning_introspect.records import read_records
from tests.helpers.tb import read_events

ROOT = Path(__file__).resolve().parents[1]


#: script -> reduced-size arguments (the examples' own defaults take about a minute each).
EXAMPLES = {
    "nlp_transformer.py": ("--epochs", "2", "--windows", "192", "--seq-len", "32", "--top", "3"),
    "plain_loop.py": ("--epochs", "3"),
    "digits.py": ("--epochs", "3"),
}


@pytest.fixture(scope="module")
def started(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[subprocess.Popen, Path]]]:
    """Starts the three examples at once (one thread each), so that the file's wall time is the slowest one's."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = {}
    for script, args in EXAMPLES.items():
        out = tmp_path_factory.mktemp(script.removesuffix(".py"))
        cmd = [sys.executable, str(ROOT / "examples" / script), "--out", str(out), *args]
        procs[script] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True), out)
    yield procs
    for proc, _ in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def finished(started: dict[str, tuple[subprocess.Popen, Path]], script: str) -> tuple[str, Path]:
    """Waits for ``script``; fails with its output unless it exited 0. Returns (stdout, its --out folder)."""
    proc, out = started[script]
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\n{stdout[-3000:]}\n{stderr[-3000:]}"
    return stdout, out


def single_run_dir(out: Path) -> Path:
    """The one folder under ``out`` that holds an event file."""
    dirs = {p.parent for p in out.rglob("events.out.tfevents.*")}
    assert len(dirs) == 1, f"expected one folder with event files under {out}, got {sorted(dirs)}"
    return dirs.pop()


def test_nlp_transformer_example_logs_layers_and_window_dynamics(started: dict) -> None:
    """Test that the Transformer example trains, logs its layers and writes per-window sequence records."""
    stdout, out = finished(started, "nlp_transformer.py")
    run = single_run_dir(out)
    events = read_events(run)
    for tag in ("activation_mean/encoder.layers.0.linear1", "dead_fraction/encoder.layers.1.activation",
                "grad_norm/global", "grad_norm/head", "samples/learned_fraction"):
        assert tag in events.tags(), f"{tag} missing; tags: {sorted(events.tags())[:12]}"
    assert "activation_hist/encoder.layers.0.linear1" in events.histograms
    table = events.texts["samples/suspects"][-1][1]  # sequences have no labels: "hardest", not "mislabeled"
    assert "hardest" in table and "not wrong labels" in table and "given label" not in table
    records, meta = read_records(run / "introspect")
    assert meta["task"] == "sequence" and meta["num_examples"] == 192
    assert (records["seen_epochs"] == 2).all()
    assert np.isfinite(records["loss_sum"]).all() and (records["loss_sum"] > 0).all()
    assert "Hardest windows" in stdout and "Most-forgotten windows" in stdout and "'wrong label'" in stdout


def test_plain_loop_example_writes_events_records_and_suspects(started: dict) -> None:
    """Test that the plain-PyTorch example writes TensorBoard events and records, and prints the top suspects."""
    stdout, out = finished(started, "plain_loop.py")
    out = single_run_dir(out)
    events = read_events(out)
    for tag in ("activation_mean/0", "dead_fraction/1", "grad_norm/global", "samples/learned_fraction"):
        assert tag in events.tags(), f"{tag} missing; tags: {sorted(events.tags())[:12]}"
    assert events.layout is not None  # the global gradient norm has its own chart, apart from the layers
    charts = {c.title: c.multiline.tag for cat in events.layout.category for c in cat.chart}
    assert re.fullmatch(charts["gradient L2 norm (global)"][0], "grad_norm/global")
    per_layer = re.compile(charts["gradient L2 norm per layer"][0])
    assert not per_layer.match("grad_norm/global") and per_layer.match("grad_norm/0")
    records, meta = read_records(out / "introspect")
    assert meta["task"] == "classification" and meta["num_examples"] == 1797
    assert (records["seen_epochs"] == 3).all()
    assert "Top 10 suspects" in stdout and stdout.count("\n") >= 13


def test_digits_demo_runs_with_few_epochs_and_writes_the_report(started: dict) -> None:
    """Test that the README demo runs with --epochs 3 and writes events, records, suspects.csv and the data map."""
    stdout, out = finished(started, "digits.py")
    run = single_run_dir(out)
    assert "grad_norm/global" in read_events(run).tags()
    records, _ = read_records(run / "introspect")
    assert (records["seen_epochs"] == 3).all()
    for name in ("suspects.csv", "data_map.png"):
        assert (run / "introspect" / name).stat().st_size > 0
    assert "labels were flipped" in stdout
