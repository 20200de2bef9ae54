"""Tests for lightning_introspect.records: atomic writes, validation on read, no pickle."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lightning_introspect import records as rec_module
from lightning_introspect.records import (
    RECORD_FIELDS,
    RecordsError,
    locate_records,
    read_epoch_history,
    read_records,
    write_epoch_history,
    write_records,
)

_DTYPES = {
    "seen_epochs": np.int16, "label": np.int32, "loss_sum": np.float32, "margin_sum": np.float32,
    "confidence_sum": np.float32, "confidence_sq_sum": np.float32, "correct_epochs": np.int16,
    "forgetting_events": np.int16, "first_learned": np.int16, "last_correct": np.int8,
    "suggested_label": np.int32, "suggested_votes": np.int16,
}


def _arrays(n: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: (rng.uniform(0, 5, n) if np.dtype(dt).kind == "f" else rng.integers(-1, 5, n)).astype(dt)
            for name, dt in _DTYPES.items()}


def _write(directory: Path, arrays: dict[str, np.ndarray], **meta: Any) -> Path:
    return write_records(directory, arrays, {"epoch": 2, "num_classes": 5, **meta})


def test_contract_fields_are_the_scoring_fields() -> None:
    """Test that the fields the reader requires are those of the scoring contract's table."""
    from lightning_introspect.core import scoring

    for name in RECORD_FIELDS:
        assert f"``{name}``" in (scoring.__doc__ or "")
    assert set(_DTYPES) == set(RECORD_FIELDS)


def test_roundtrip_keeps_values_dtypes_and_meta(tmp_path: Path) -> None:
    """Test that arrays and meta read back exactly as written, with format and num_examples filled in."""
    arrays = _arrays()
    arrays["extra_2d"] = np.ones((6, 3), np.float64)
    path = _write(tmp_path / "introspect", arrays, class_names=list("abcde"), note={"k": np.int64(3)})
    assert path == tmp_path / "introspect" / "samples.npz"
    got, meta = read_records(path)
    assert set(got) == set(arrays)
    for name, value in arrays.items():
        np.testing.assert_array_equal(got[name], value)
        assert got[name].dtype == value.dtype
    assert meta["format"] == 1 and meta["epoch"] == 2 and meta["num_examples"] == 6
    assert meta["num_classes"] == 5 and meta["class_names"] == list("abcde")
    assert meta["task"] == "classification" and meta["note"] == {"k": 3}
    assert meta["path"] == str(path)
    assert json.loads((path.parent / "samples.json").read_text())["epoch"] == 2


def test_json_is_written_after_npz(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Test that samples.json is moved into place after samples.npz, so meta is never newer than data."""
    order: list[str] = []
    real_replace = os.replace

    def spy(src: Any, dst: Any) -> None:
        order.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(rec_module.os, "replace", spy)
    _write(tmp_path, _arrays())
    assert order == ["samples.npz", "samples.json"]


def test_crash_mid_write_leaves_previous_files_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Test that a failure at os.replace leaves the previous records readable and no temp file behind."""
    _write(tmp_path, _arrays(seed=1))

    def crash(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rec_module.os, "replace", crash)
    with pytest.raises(OSError, match="samples.npz") as info:
        write_records(tmp_path, _arrays(seed=2), {"epoch": 3})
    assert info.value.errno == 28
    monkeypatch.undo()
    got, meta = read_records(tmp_path)
    np.testing.assert_array_equal(got["loss_sum"], _arrays(seed=1)["loss_sum"])
    assert meta["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.json", "samples.npz"]


def test_unwritable_directory_raises_oserror_naming_the_path(tmp_path: Path) -> None:
    """Test that a folder that cannot be created gives an OSError whose message names the path."""
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(OSError, match="not_a_dir"):
        _write(blocker / "introspect", _arrays())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a.pop("margin_sum"), "missing field"),
        (lambda a: a.update(label=a["label"].astype(np.float32)), "integer dtype"),
        (lambda a: a.update(loss_sum=a["loss_sum"][:3]), "differ in length"),
        (lambda a: a.update(loss_sum=a["loss_sum"].astype(str)), "float dtype"),
    ],
)
def test_write_rejects_arrays_off_contract(tmp_path: Path, change: Any, message: str) -> None:
    """Test that write_records refuses arrays the reader would reject, saying what is wrong."""
    arrays = _arrays()
    change(arrays)
    with pytest.raises(ValueError, match=message):
        _write(tmp_path, arrays)


@pytest.mark.parametrize("epoch", [None, -1, 1.5, True])
def test_write_rejects_bad_epoch(tmp_path: Path, epoch: Any) -> None:
    """Test that meta['epoch'] must be a non-negative int."""
    with pytest.raises(ValueError, match="epoch"):
        write_records(tmp_path, _arrays(), {"epoch": epoch})


@pytest.mark.parametrize("keep", [0, 10, 200, 0.5, -30])
def test_truncated_npz_raises_records_error(tmp_path: Path, keep: float) -> None:
    """Test that a truncated samples.npz gives a RecordsError naming the file and what to do."""
    path = _write(tmp_path, _arrays())
    data = path.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else (keep if keep >= 0 else len(data) + keep)
    path.write_bytes(data[:cut])
    with pytest.raises(RecordsError, match=r"samples\.npz.*damaged; re-run training"):
        read_records(tmp_path)


def test_flipped_byte_raises_records_error(tmp_path: Path) -> None:
    """Test that a corrupted byte inside the archive is caught (zip CRC) as a RecordsError."""
    path = _write(tmp_path, _arrays(n=200))
    data = bytearray(path.read_bytes())
    data[300] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(RecordsError, match="samples.npz"):
        read_records(path)


def test_object_arrays_are_never_unpickled(tmp_path: Path) -> None:
    """Test that an npz holding an object array gives a RecordsError instead of unpickling it."""
    path = _write(tmp_path, _arrays())
    arrays: dict[str, Any] = _arrays()
    arrays["label"] = np.array([{"x": 1}] * 6, dtype=object)
    np.savez(path, **arrays)
    with pytest.raises(RecordsError, match="pickled or object data"):
        read_records(tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a.pop("confidence_sum"), "missing field"),
        (lambda a: a.update(correct_epochs=a["correct_epochs"].astype(np.float64)), "integer dtype"),
        (lambda a: a.update(seen_epochs=a["seen_epochs"][:2]), "differ in length"),
    ],
)
def test_invalid_fields_on_disk_raise_records_error(tmp_path: Path, change: Any, message: str) -> None:
    """Test that an npz that parses but breaks the contract gives a RecordsError saying how."""
    path = _write(tmp_path, _arrays())
    arrays = _arrays()
    change(arrays)
    np.savez(path, **arrays)
    with pytest.raises(RecordsError, match=message):
        read_records(tmp_path)


@pytest.mark.parametrize(
    ("text", "message"),
    [("{not json", "cannot parse"), ("[1, 2]", "JSON object"), ('{"format": 99}', "upgrade"),
     ('{"epoch": 1}', "format"), ('{"format": 1, "num_examples": 7}', "says 7")],
)
def test_bad_meta_raises_records_error(tmp_path: Path, text: str, message: str) -> None:
    """Test that a damaged, foreign or inconsistent samples.json gives a RecordsError."""
    path = _write(tmp_path, _arrays())
    (path.parent / "samples.json").write_text(text)
    with pytest.raises(RecordsError, match=message):
        read_records(tmp_path)


def test_missing_meta_is_tolerated(tmp_path: Path) -> None:
    """Test that an npz without its JSON (crash between the two writes) still reads, marked meta_missing."""
    path = _write(tmp_path, _arrays())
    (path.parent / "samples.json").unlink()
    arrays, meta = read_records(path)
    assert meta["meta_missing"] is True and meta["num_examples"] == 6 and len(arrays) == len(RECORD_FIELDS)


def test_locate_accepts_every_kind_of_path(tmp_path: Path) -> None:
    """Test that the npz, the json, the introspect dir, a version dir and the logs root all find the records."""
    npz = _write(tmp_path / "lightning_logs" / "version_0" / "introspect", _arrays())
    for path in (npz, npz.with_name("samples.json"), npz.parent, npz.parent.parent, tmp_path):
        assert locate_records(path) == npz


def test_locate_picks_newest_of_several(tmp_path: Path) -> None:
    """Test that under a logs root holding several runs, the newest samples.npz is read."""
    old = _write(tmp_path / "version_1" / "introspect", _arrays())
    new = _write(tmp_path / "version_0" / "introspect", _arrays())
    os.utime(old, (1_000_000, 1_000_000))
    os.utime(new, (2_000_000, 2_000_000))
    assert locate_records(tmp_path) == new


def test_missing_path_and_no_records_raise_file_not_found(tmp_path: Path) -> None:
    """Test that a missing folder, or one without records, gives a FileNotFoundError saying what to do."""
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_records(tmp_path / "nope")
    (tmp_path / "version_0").mkdir()
    with pytest.raises(FileNotFoundError, match="Introspect callback"):
        read_records(tmp_path)


def test_epoch_history_roundtrip_sorted_float32(tmp_path: Path) -> None:
    """Test that history files read back sorted by epoch, floats as float32 and ints unchanged."""
    _write(tmp_path / "introspect", _arrays())
    for epoch in (10, 2, 0):
        write_epoch_history(tmp_path / "introspect", epoch,
                            {"confidence": np.full(4, epoch / 10), "correct": np.arange(4, dtype=np.int8)})
    (tmp_path / "introspect" / "history" / "notes.txt").write_text("ignored")
    history = read_epoch_history(tmp_path)
    assert [epoch for epoch, _ in history] == [0, 2, 10]
    assert (tmp_path / "introspect" / "history" / "epoch_0002.npz").is_file()
    arrays = history[1][1]
    assert arrays["confidence"].dtype == np.float32 and arrays["correct"].dtype == np.int8
    np.testing.assert_allclose(arrays["confidence"], 0.2)
    assert read_epoch_history(tmp_path / "introspect" / "history")[2][0] == 10


def test_epoch_history_empty_when_not_written(tmp_path: Path) -> None:
    """Test that records without history give an empty list."""
    _write(tmp_path, _arrays())
    assert read_epoch_history(tmp_path) == []


def test_damaged_history_raises_records_error(tmp_path: Path) -> None:
    """Test that a truncated history file gives a RecordsError naming it."""
    path = write_epoch_history(tmp_path, 1, {"confidence": np.zeros(3)})
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(RecordsError, match="epoch_0001.npz"):
        read_epoch_history(tmp_path)
