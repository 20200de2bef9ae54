"""Tests for the report: the ``lightning-introspect report`` command, suspects.csv and the data map."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.image import imread

from lightning_introspect.core.scoring import Suspects, find_label_issues
from lightning_introspect.datamap import _build_figure, data_map_coordinates, render_data_map, save_data_map
from lightning_introspect.records import write_records
from lightning_introspect.report import main, write_suspects_csv

REPO_ROOT = Path(__file__).resolve().parents[1]
CLASS_NAMES = ["cat", "dog", "bird"]


def make_records(n: int = 240, epochs: int = 8, classes: int = 3, flip_fraction: float = 0.1,
                 seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Records of a run in which a seeded share of labels was flipped: those get a low given-label probability.

    Returns the records and the ids of the flipped examples.
    """
    rng = np.random.default_rng(seed)
    flipped = np.sort(rng.choice(n, size=int(n * flip_fraction), replace=False))
    is_flipped = np.zeros(n, bool)
    is_flipped[flipped] = True
    t = np.linspace(0.0, 1.0, epochs)[:, None]                   # (E, 1) training progress
    clean = 0.45 + 0.5 * t * rng.uniform(0.6, 1.0, n)              # learned over time
    noisy = 0.05 + 0.15 * t * rng.uniform(0.0, 1.0, n)             # the model keeps disagreeing
    p = np.where(is_flipped, noisy, clean) + rng.normal(0, 0.03, (epochs, n))
    p = np.clip(p, 1e-3, 1 - 1e-3)                                 # (E, N) probability of the given label
    correct = p > 0.5
    margin = np.log(p) - np.log((1 - p) / (classes - 1))
    records = {
        "seen_epochs": np.full(n, epochs, np.int16),
        "label": rng.integers(0, classes, n).astype(np.int32),
        "loss_sum": (-np.log(p)).sum(0).astype(np.float32),
        "margin_sum": margin.sum(0).astype(np.float32),
        "confidence_sum": p.sum(0).astype(np.float32),
        "confidence_sq_sum": (p**2).sum(0).astype(np.float32),
        "correct_epochs": correct.sum(0).astype(np.int16),
        "forgetting_events": (correct[:-1] & ~correct[1:]).sum(0).astype(np.int16),
        "first_learned": np.where(correct.any(0), correct.argmax(0), -1).astype(np.int16),
        "last_correct": correct[-1].astype(np.int8),
    }
    return records, flipped


@pytest.fixture
def logdir(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A lightning_logs folder with one run's records, class names in the meta."""
    records, flipped = make_records()
    records["seen_epochs"][[3, 4]] = 0  # two ids never seen
    records["label"][[3, 4]] = -1
    flipped = np.setdiff1d(flipped, [3, 4])
    write_records(tmp_path / "lightning_logs" / "version_0" / "introspect", records,
                  {"epoch": 7, "num_classes": 3, "class_names": CLASS_NAMES})
    return tmp_path / "lightning_logs", flipped


def _hand_suspects() -> Suspects:
    return Suspects(ids=np.array([5, 0, 2]), scores=np.array([0.05, 0.4, 0.9]),
                    flagged=np.array([True, False, False]), labels=np.array([2, 0, 1]),
                    columns={"aum": np.array([-2.0, 0.5, np.nan]), "forgetting_events": np.array([1, 0, 3])},
                    method="default", threshold=0.1)


# --------------------------------------------------------------------------------------- suspects.csv
def test_write_suspects_csv_header_order_and_values(tmp_path: Path) -> None:
    """Test that the CSV starts with index,score,flagged,label, keeps the ranking order and writes nan."""
    path = write_suspects_csv(tmp_path / "out" / "suspects.csv", _hand_suspects(), ["a", "b, with comma", "c"])
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["index", "score", "flagged", "label", "label_name", "aum", "forgetting_events"]
    assert rows[1] == ["5", "0.05", "true", "2", "c", "-2", "1"]
    assert rows[3] == ["2", "0.9", "false", "1", "b, with comma", "nan", "3"]
    assert [p.name for p in path.parent.iterdir()] == ["suspects.csv"]


def test_write_suspects_csv_max_rows_and_no_class_names(tmp_path: Path) -> None:
    """Test that max_rows keeps the most suspect rows and that label_name is left out without names."""
    path = write_suspects_csv(tmp_path / "s.csv", _hand_suspects(), max_rows=1)
    assert path.read_text().splitlines() == ["index,score,flagged,label,aum,forgetting_events", "5,0.05,true,2,-2,1"]


def test_write_suspects_csv_rejects_ragged_columns(tmp_path: Path) -> None:
    """Test that a column whose length differs from the ids is refused before anything is written."""
    bad = _hand_suspects()
    bad = Suspects(ids=bad.ids, scores=bad.scores, flagged=bad.flagged, labels=bad.labels,
                   columns={"aum": np.zeros(2)}, method="default", threshold=0.1)
    with pytest.raises(ValueError, match="shape of `ids`"):
        write_suspects_csv(tmp_path / "s.csv", bad)
    assert not (tmp_path / "s.csv").exists()


# ------------------------------------------------------------------------------------------- data map
def test_data_map_coordinates_match_per_epoch_statistics() -> None:
    """Test that confidence/variability/correctness equal mean/std/share computed from per-epoch values."""
    p = np.array([[0.2, 0.9], [0.6, 0.7], [0.4, 0.8]])  # (E=3, N=2)
    records = {"seen_epochs": np.array([3, 3]), "confidence_sum": p.sum(0), "confidence_sq_sum": (p**2).sum(0),
               "correct_epochs": (p > 0.5).sum(0)}
    coords = data_map_coordinates(records)
    np.testing.assert_allclose(coords["confidence"], p.mean(0))
    np.testing.assert_allclose(coords["variability"], p.std(0), atol=1e-7)
    np.testing.assert_allclose(coords["correctness"], [1 / 3, 1.0])


def test_render_data_map_returns_hwc_uint8() -> None:
    """Test that the rendered map is a (700, 900, 3) uint8 image, not blank, with suspects marked."""
    records, flipped = make_records(n=120)
    order = np.argsort(records["confidence_sum"])
    suspects = Suspects(ids=order, scores=np.linspace(0, 1, 120), flagged=np.isin(order, flipped),
                        labels=records["label"][order], columns={}, method="default", threshold=0.1)
    image = render_data_map(records, suspects=suspects, class_names=CLASS_NAMES, title="t")
    assert image.shape == (700, 900, 3) and image.dtype == np.uint8
    assert image.std() > 10
    red = (image[..., 0] > 200) & (image[..., 1] < 60) & (image[..., 2] < 90)
    assert red.sum() > 50  # the red circles of the flagged examples


@pytest.mark.parametrize("case", ["unseen", "nan", "one"])
def test_render_data_map_degenerate_inputs(case: str) -> None:
    """Test that all-unseen, all-NaN and single-example records still give a picture."""
    records, _ = make_records(n=10)
    if case == "unseen":
        records["seen_epochs"][:] = 0
    elif case == "nan":
        records["confidence_sum"][:] = np.nan
    else:
        records = {k: v[:1] for k, v in records.items()}
    assert render_data_map(records).shape == (700, 900, 3)


def test_data_map_subsamples_large_inputs_and_says_so() -> None:
    """Test that past max_points a seeded sample is drawn and the caption says how many of how many."""
    records, _ = make_records(n=3000, epochs=3)
    fig = _build_figure(records, suspects=None, class_names=None, title=None, max_points=500, seed=0,
                        size_px=(900, 700))
    caption = " ".join(t.get_text() for t in fig.texts)
    assert "random sample (seed 0) of 500 of 3,000" in caption
    assert len(fig.axes[0].collections[0].get_offsets()) == 500


def test_render_data_map_on_a_background_thread() -> None:
    """Test that the map renders off the main thread (object API, no pyplot) to the same pixels."""
    import threading

    records, _ = make_records(n=40)
    result: dict[str, np.ndarray] = {}
    worker = threading.Thread(target=lambda: result.setdefault("image", render_data_map(records)))
    worker.start()
    worker.join(timeout=60)
    np.testing.assert_array_equal(result["image"], render_data_map(records))


def test_data_map_rejects_suspects_from_other_records() -> None:
    """Test that suspect ids outside the records' range are refused with a clear message."""
    records, _ = make_records(n=10)
    suspects = Suspects(ids=np.array([50]), scores=np.array([0.1]), flagged=np.array([True]),
                        labels=np.array([0]), columns={}, method="default", threshold=0.5)
    with pytest.raises(ValueError, match="outside the records' range"):
        render_data_map(records, suspects=suspects)


def test_save_data_map_writes_png_of_expected_size(tmp_path: Path) -> None:
    """Test that save_data_map writes a decodable 900x700 PNG and nothing else."""
    records, _ = make_records(n=50)
    path = save_data_map(tmp_path / "maps" / "data_map.png", records)
    assert imread(path).shape[:2] == (700, 900)
    assert [p.name for p in path.parent.iterdir()] == ["data_map.png"]


# -------------------------------------------------------------------------------------------- the CLI
def test_main_end_to_end(logdir: tuple[Path, np.ndarray], capsys: pytest.CaptureFixture[str]) -> None:
    """Test that the report prints a summary and table, and writes a ranked CSV and a PNG next to the records."""
    root, flipped = logdir
    assert main(["report", str(root), "--top", "5"]) == 0
    out = capsys.readouterr().out
    introspect = root / "version_0" / "introspect"
    for needle in ("samples.npz", "epochs:", "238 seen of 240 ids", "3 (cat, dog, bird)", "method:",
                   "flagged:", "cut:", "rank", "AUM", "variability", "forgetting"):
        assert needle in out
    assert str(introspect / "suspects.csv") in out and str(introspect / "data_map.png") in out

    with (introspect / "suspects.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    header = list(rows[0])
    assert header[:5] == ["index", "score", "flagged", "label", "label_name"]
    assert {"aum", "confidence_mean", "variability", "forgetting_events"} <= set(header)
    assert len(rows) == 238 and {"3", "4"}.isdisjoint(r["index"] for r in rows)
    scores = np.array([float(r["score"]) for r in rows])
    assert np.all(np.diff(scores) >= -1e-6), "rows must be sorted most suspect (lowest score) first"
    top = {int(r["index"]) for r in rows[: len(flipped)]}
    assert len(top & set(flipped.tolist())) >= 0.9 * len(flipped), "flipped examples must lead the ranking"
    assert all(r["label_name"] in CLASS_NAMES for r in rows)
    assert imread(introspect / "data_map.png").shape[:2] == (700, 900)


def test_main_out_dir_cut_and_class_names(logdir: tuple[Path, np.ndarray], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Test --out, --cut as a count and --class-names: exactly k flagged, names from the flag."""
    root, _ = logdir
    out_dir = tmp_path / "review"
    assert main(["report", str(root / "version_0"), "--cut", "7", "--class-names", "x,y,z", "--top", "3",
                 "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "top 7" in out and "3 (x, y, z)" in out
    with (out_dir / "suspects.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["flagged"] for r in rows].count("true") == 7
    assert {r["label_name"] for r in rows} <= {"x", "y", "z"}
    assert (out_dir / "data_map.png").is_file()
    assert not (root / "version_0" / "introspect" / "suspects.csv").exists()


def test_main_unwritable_out_exits_1(logdir: tuple[Path, np.ndarray], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Test that an output folder that cannot be created gives exit status 1 and names the path."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["report", str(logdir[0]), "--out", str(blocker / "out")]) == 1
    assert "could not write" in capsys.readouterr().err


@pytest.mark.parametrize("problem", ["missing_dir", "no_records", "truncated", "object_array", "bad_json"])
def test_main_exits_2_with_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], problem: str) -> None:
    """Test that missing, absent or damaged records give exit status 2 and one clear line on stderr."""
    root = tmp_path / "logs"
    records, _ = make_records(n=20)
    npz = write_records(root / "version_0" / "introspect", records, {"epoch": 1})
    target = root
    if problem == "missing_dir":
        target = tmp_path / "nope"
    elif problem == "no_records":
        target = tmp_path / "empty"
        target.mkdir()
    elif problem == "truncated":
        npz.write_bytes(npz.read_bytes()[:100])
    elif problem == "object_array":
        np.savez(npz, **{**records, "label": np.array([None] * 20, dtype=object)})
    else:
        npz.with_name("samples.json").write_text("{")
    assert main(["report", str(target)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("lightning-introspect: error: ") and "\n" not in err and "Traceback" not in err
    assert captured.out == ""
    expected = {"missing_dir": "does not exist", "no_records": "no introspect/samples.npz",
                "truncated": "damaged", "object_array": "pickled or object data", "bad_json": "samples.json"}
    assert expected[problem] in err


@pytest.mark.parametrize("argv", [["--cut", "1.5"], ["--cut", "zero"], ["--top", "-1"], ["--method", "nope"]])
def test_main_bad_arguments_exit_2(logdir: tuple[Path, np.ndarray], argv: list[str],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Test that wrong options are refused by argparse with exit status 2."""
    with pytest.raises(SystemExit) as info:
        main(["report", str(logdir[0]), *argv])
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_main_too_few_class_names_exits_2(logdir: tuple[Path, np.ndarray], capsys: pytest.CaptureFixture[str]) -> None:
    """Test that --class-names with fewer names than labels is refused with a one-line error."""
    assert main(["report", str(logdir[0]), "--class-names", "a,b"]) == 2
    assert "give one name per class" in capsys.readouterr().err


def test_python_m_report_runs_in_a_subprocess(logdir: tuple[Path, np.ndarray]) -> None:
    """Test that `python -m lightning_introspect report LOGDIR` runs and writes its files."""
    root, _ = logdir
    env: dict[str, Any] = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    result = subprocess.run([sys.executable, "-m", "lightning_introspect", "report", str(root), "--top", "3"],
                            capture_output=True, text=True, env=env, cwd=root, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "suspects.csv" in result.stdout and "Traceback" not in result.stderr
    assert (root / "version_0" / "introspect" / "data_map.png").is_file()


@pytest.mark.parametrize(("name", "content"), [("ids.txt", "7, 8\n# a comment\n9\n"), ("ids.npy", None)])
def test_threshold_ids_file_reaches_the_scorer(logdir: tuple[Path, np.ndarray], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch, name: str,
                                               content: Any) -> None:
    """Test that --threshold-ids (text or .npy) is parsed and handed to find_label_issues with the options."""
    import lightning_introspect.report as report

    seen: dict[str, Any] = {}

    def spy(records: Any, **kwargs: Any) -> Suspects:
        seen.update(kwargs)
        return _hand_suspects()

    monkeypatch.setattr(report, "find_label_issues", spy)
    path = tmp_path / name
    if content is None:
        np.save(path, np.array([7, 8, 9], np.int64))
    else:
        path.write_text(content)
    assert main(["report", str(logdir[0]), "--threshold-ids", str(path), "--method", "aum", "--cut", "0.25",
                 "--out", str(tmp_path / "o")]) == 0
    assert seen == {"method": "aum", "cut": 0.25, "threshold_ids": [7, 8, 9], "num_classes": 3}


def test_bad_threshold_ids_file_exits_2(logdir: tuple[Path, np.ndarray], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Test that a threshold-ids file that is not a list of integers is refused with a one-line error."""
    path = tmp_path / "ids.txt"
    path.write_text("1, two, 3")
    assert main(["report", str(logdir[0]), "--threshold-ids", str(path)]) == 2
    assert "--threshold-ids file" in capsys.readouterr().err
