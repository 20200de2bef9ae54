"""Per-example training-dynamics records on disk: ``samples.npz`` + ``samples.json``, written atomically.

Numpy and the standard library only (no torch, no Lightning), so the report can read records anywhere.

Layout, next to the logger's files (``<log_dir>/introspect/``)::

    samples.npz                 the record arrays (uncompressed ``np.savez``), one entry per sample id
    samples.json                meta: {"format": 1, "epoch", "num_examples", "num_classes", "class_names",
                                "task", ...}
    history/epoch_0003.npz      opt-in per-epoch history, one file per epoch

The fields and their meaning are the contract in :mod:`lightning_introspect.core.scoring`. Every file is
written under a temporary name in the same folder, flushed, fsynced and moved into place with
:func:`os.replace`, so a reader sees either the previous file or the new one, never half of one. The JSON is
written after the arrays, so the meta a reader finds is never newer than the data. Nothing is pickled:
files are read with ``allow_pickle=False``.
"""
from __future__ import annotations

import errno
import json
import os
import re
import tempfile
import zipfile
from pathlib import Path
from typing import IO, Any, Callable, Mapping, Union

import numpy as np

__all__ = [
    "FORMAT_VERSION",
    "RECORD_FIELDS",
    "RecordsError",
    "locate_records",
    "read_epoch_history",
    "read_records",
    "write_epoch_history",
    "write_records",
]

PathLike = Union[str, "os.PathLike[str]"]

FORMAT_VERSION = 1
"""Version of the on-disk layout written into ``samples.json`` as ``"format"``."""

RECORD_FIELDS: dict[str, str] = {
    "seen_epochs": "int",
    "label": "int",
    "loss_sum": "float",
    "margin_sum": "float",
    "confidence_sum": "float",
    "confidence_sq_sum": "float",
    "correct_epochs": "int",
    "forgetting_events": "int",
    "first_learned": "int",
    "last_correct": "int",
    "suggested_label": "int",
    "suggested_votes": "int",
}
"""Record fields of the scoring contract and their kind (``"int"`` or ``"float"``)."""

_OPTIONAL = ("suggested_label", "suggested_votes")  # absent from records written before they existed
_REQUIRED = tuple(name for name in RECORD_FIELDS if name not in _OPTIONAL)
_REQUIRED_BY_TASK: dict[str, tuple[str, ...]] = {
    "classification": _REQUIRED,
    "sequence": _REQUIRED,
    "regression": ("seen_epochs", "loss_sum"),
}
TASKS: tuple[str, ...] = tuple(_REQUIRED_BY_TASK)

SAMPLES_NPZ = "samples.npz"
SAMPLES_JSON = "samples.json"
INTROSPECT_DIR = "introspect"
HISTORY_DIR = "history"
_HISTORY_RE = re.compile(r"^epoch_(\d+)\.npz$")
_DAMAGED_HINT = "the file is damaged; re-run training or point at another version_* folder"


class RecordsError(ValueError):
    """Records on disk are missing a field, inconsistent or damaged. The message names the file."""


# ----------------------------------------------------------------------------------------------- writing
def _fsync_dir(directory: Path) -> None:
    """Best effort: make a rename in ``directory`` durable (not possible on every OS or filesystem)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: PathLike, write: Callable[[IO[bytes]], object]) -> Path:
    """Write ``path`` through ``write(file)`` under a temporary name, fsync, then ``os.replace`` it.

    The folder is created if needed. On any failure the temporary file is removed and the previous ``path``
    (if any) is left untouched. ``OSError`` is re-raised as the same ``OSError`` subclass with ``path`` in
    the message.
    """
    path = Path(path)
    directory = path.parent
    tmp_name: str | None = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_name, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp_name, path)
        tmp_name = None
    except OSError as err:
        code = err.errno if err.errno is not None else errno.EIO
        reason = err.strerror or str(err) or type(err).__name__
        raise OSError(code, f"could not write {path}: {reason}") from err
    finally:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass
    _fsync_dir(directory)
    return path


def _check_arrays(arrays: Mapping[str, Any], task: str) -> list[str]:
    """Problems with a set of record arrays, as readable phrases; empty when they are fine."""
    problems: list[str] = []
    missing = [name for name in _REQUIRED_BY_TASK[task] if name not in arrays]
    if missing:
        problems.append(f"missing field(s) {missing} (task {task!r})")
    lengths: dict[str, int] = {}
    for name, value in arrays.items():
        if not isinstance(value, np.ndarray):
            problems.append(f"field {name!r} is a {type(value).__name__}, not a numpy array")
            continue
        kind = RECORD_FIELDS.get(name)
        if value.dtype.kind == "O":
            problems.append(f"field {name!r} is an object array")
        elif kind == "int" and value.dtype.kind not in "iu":
            problems.append(f"field {name!r} must have an integer dtype, got {value.dtype}")
        elif kind == "float" and value.dtype.kind != "f":
            problems.append(f"field {name!r} must have a float dtype, got {value.dtype}")
        elif kind is None and value.dtype.kind not in "biuf":
            problems.append(f"field {name!r} must be bool, integer or float, got {value.dtype}")
        if value.ndim == 0:
            problems.append(f"field {name!r} is a scalar, expected one entry per example")
        elif kind is not None and value.ndim != 1:
            problems.append(f"field {name!r} must be 1-D (N,), got shape {value.shape}")
        else:
            lengths[name] = value.shape[0]
    if len(set(lengths.values())) > 1:
        values = list(lengths.values())
        common = max(set(values), key=values.count)
        odd = ", ".join(f"{name!r} has {n}" for name, n in lengths.items() if n != common)
        problems.append(f"fields differ in length: {odd}, the others {common}")
    return problems


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def write_records(directory: PathLike, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> Path:
    """Write ``samples.npz`` (the arrays) and then ``samples.json`` (the meta) into ``directory``, atomically.

    Args:
        directory: the ``introspect`` folder, e.g. ``<log_dir>/introspect``; created if missing.
        arrays: record fields (see :data:`RECORD_FIELDS`), each ``(N,)``, plus any extra numeric ``(N, ...)``
            arrays.
        meta: must hold ``"epoch"`` (int); may hold ``"num_classes"``, ``"class_names"``, ``"task"``
            (``"classification"``, the default, ``"sequence"`` or ``"regression"``) and any other
            JSON-serializable entries, which are kept. ``"format"`` and ``"num_examples"`` are filled in.

    Returns:
        The path of ``samples.npz``.

    Raises:
        ValueError: the arrays or meta do not follow the contract.
        OSError: the folder or a file could not be written (permissions, disk full); the message names the
            path. The previous files, if any, are left as they were.

    Example:
        >>> import tempfile
        >>> arrays = {name: np.zeros(3, np.float32 if kind == "float" else np.int16)
        ...           for name, kind in RECORD_FIELDS.items()}
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = write_records(Path(tmp) / "introspect", arrays, {"epoch": 0, "num_classes": 2})
        ...     records, meta = read_records(tmp)
        >>> path.name, meta["num_examples"], meta["task"], records["label"].dtype
        ('samples.npz', 3, 'classification', dtype('int16'))
    """
    epoch = meta.get("epoch")
    if isinstance(epoch, np.integer):
        epoch = int(epoch)
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise ValueError(f"`meta['epoch']` must be a non-negative int, got {epoch!r}.")
    task = meta.get("task", "classification")
    if task not in _REQUIRED_BY_TASK:
        raise ValueError(f"`meta['task']` must be one of {TASKS}, got {task!r}.")
    arrays = dict(arrays)
    problems = _check_arrays(arrays, task)
    if problems:
        raise ValueError(f"`arrays` do not follow the records contract: {'; '.join(problems)}.")
    num_examples = next(iter(arrays.values())).shape[0] if arrays else 0
    class_names = meta.get("class_names")
    full_meta: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "epoch": epoch,
        "num_examples": int(num_examples),
        "num_classes": meta.get("num_classes"),
        "class_names": list(class_names) if class_names is not None else None,
        "task": task,
    }
    full_meta.update({k: v for k, v in meta.items() if k not in full_meta})
    try:
        meta_bytes = json.dumps(full_meta, indent=1, default=_json_default).encode("utf-8")
    except (TypeError, ValueError) as err:
        raise ValueError(f"`meta` must be JSON-serializable: {err}.") from err

    directory = Path(directory)
    npz_path = _atomic_write(directory / SAMPLES_NPZ, lambda f: np.savez(f, **arrays))  # type: ignore[arg-type]
    _atomic_write(directory / SAMPLES_JSON, lambda f: f.write(meta_bytes))
    return npz_path


def write_epoch_history(directory: PathLike, epoch: int, arrays: Mapping[str, np.ndarray]) -> Path:
    """Write one epoch's per-example arrays to ``<directory>/history/epoch_0003.npz``, atomically.

    Float arrays are stored as float32 (float64 is narrowed); integer and bool arrays keep their dtype.

    Args:
        directory: the ``introspect`` folder.
        epoch: the epoch number, a non-negative int.
        arrays: numeric arrays for this epoch, e.g. ``{"confidence": (N,), "correct": (N,)}``.

    Returns:
        The path of the written file.

    Raises:
        ValueError: ``epoch`` or ``arrays`` are not as described.
        OSError: the file could not be written; the message names the path.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = write_epoch_history(tmp, 3, {"confidence": np.array([0.5, 0.25])})
        ...     history = read_epoch_history(tmp)
        >>> path.name, [(epoch, a["confidence"].dtype.name) for epoch, a in history]
        ('epoch_0003.npz', [(3, 'float32')])
    """
    if isinstance(epoch, np.integer):
        epoch = int(epoch)
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise ValueError(f"`epoch` must be a non-negative int, got {epoch!r}.")
    stored: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        value = np.asarray(value)
        if value.dtype.kind not in "biuf":
            raise ValueError(f"`arrays[{name!r}]` must be bool, integer or float, got {value.dtype}.")
        stored[name] = value.astype(np.float32) if value.dtype.kind == "f" else value
    path = Path(directory) / HISTORY_DIR / f"epoch_{epoch:04d}.npz"
    return _atomic_write(path, lambda f: np.savez(f, **stored))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------- reading
def _newest(paths: list[Path]) -> Path:
    return max(paths, key=lambda p: (p.stat().st_mtime_ns, str(p)))


def locate_records(path: PathLike) -> Path:
    """Find the ``samples.npz`` that ``path`` points at.

    ``path`` may be the npz itself, its ``samples.json``, the ``introspect`` folder, a ``version_*`` folder,
    or any folder above; in the last case the newest ``introspect/samples.npz`` found below it is used.

    Raises:
        FileNotFoundError: ``path`` does not exist or holds no records.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a log folder such as lightning_logs/version_0.")
    if path.is_file():
        if path.name == SAMPLES_JSON:
            path = path.with_name(SAMPLES_NPZ)
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing next to its {SAMPLES_JSON}; re-run training.")
        return path
    for candidate in (path / SAMPLES_NPZ, path / INTROSPECT_DIR / SAMPLES_NPZ):
        if candidate.is_file():
            return candidate
    found = [p for p in path.rglob(f"{INTROSPECT_DIR}/{SAMPLES_NPZ}") if p.is_file()]
    if not found:
        raise FileNotFoundError(
            f"no {INTROSPECT_DIR}/{SAMPLES_NPZ} under {path}; train with the Introspect callback first, "
            "or point at the folder it logged to (e.g. lightning_logs/version_0)."
        )
    return _newest(found)


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    """All arrays of an npz file, read fully, without pickle; any damage becomes a RecordsError."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a plain .npy file loads as an ndarray
            raise RecordsError(f"{path} is not an .npz archive; {_DAMAGED_HINT}.")
        with loaded as npz:
            return {name: npz[name] for name in npz.files}
    except RecordsError:
        raise
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zipfile.LargeZipFile) as err:
        if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError)):
            raise
        if isinstance(err, ValueError) and ("object" in str(err).lower() or "pickle" in str(err).lower()):
            reason = "it holds pickled or object data, which lightning_introspect never unpickles"
        else:
            reason = f"{type(err).__name__}: {err}"
        raise RecordsError(f"cannot read {path} ({reason}); {_DAMAGED_HINT}.") from err


def _read_meta(json_path: Path, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    if not json_path.is_file():
        # The arrays are written first: a crash between the two writes of the first epoch leaves no meta.
        num = next(iter(arrays.values())).shape[0] if arrays else 0
        return {"format": FORMAT_VERSION, "epoch": None, "num_examples": num, "num_classes": None,
                "class_names": None, "task": "classification", "meta_missing": True}
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RecordsError(f"cannot parse {json_path} ({err}); {_DAMAGED_HINT}.") from err
    if not isinstance(meta, dict):
        raise RecordsError(f"{json_path} must hold a JSON object, got {type(meta).__name__}; {_DAMAGED_HINT}.")
    fmt = meta.get("format")
    if not isinstance(fmt, int) or fmt < 1:
        raise RecordsError(f"{json_path} has no valid 'format' entry (got {fmt!r}); {_DAMAGED_HINT}.")
    if fmt > FORMAT_VERSION:
        raise RecordsError(
            f"{json_path} has format {fmt}, newer than this lightning_introspect understands "
            f"({FORMAT_VERSION}); upgrade lightning_introspect."
        )
    meta.setdefault("task", "classification")
    if meta["task"] not in _REQUIRED_BY_TASK:
        raise RecordsError(f"{json_path} names an unknown task {meta['task']!r}; expected one of {TASKS}.")
    return meta


def read_records(path: PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read and validate the records that ``path`` points at (see :func:`locate_records`).

    Args:
        path: a log folder, ``version_*`` folder, ``introspect`` folder or the ``samples.npz`` itself.

    Returns:
        ``(arrays, meta)``: the record arrays by field name and the meta from ``samples.json``, with
        ``meta["path"]`` set to the npz read. If the JSON is missing (a crash between the two writes of the
        first epoch), a minimal meta is returned with ``meta["meta_missing"] = True``.

    Raises:
        FileNotFoundError: nothing found at ``path``.
        RecordsError: the files are damaged or do not follow the contract; the message names the file.

    Example:
        >>> import tempfile
        >>> arrays = {name: np.ones(2, np.float32 if kind == "float" else np.int32)
        ...           for name, kind in RECORD_FIELDS.items()}
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     _ = write_records(Path(tmp) / "version_0" / "introspect", arrays, {"epoch": 4})
        ...     records, meta = read_records(tmp)
        >>> sorted(records) == sorted(RECORD_FIELDS), meta["epoch"]
        (True, 4)
    """
    npz_path = locate_records(path)
    arrays = _load_npz(npz_path)
    meta = _read_meta(npz_path.with_name(SAMPLES_JSON), arrays)
    problems = _check_arrays(arrays, meta["task"])
    if problems:
        raise RecordsError(f"{npz_path} does not hold valid records: {'; '.join(problems)}; {_DAMAGED_HINT}.")
    num = next(iter(arrays.values())).shape[0] if arrays else 0
    if meta.get("num_examples") not in (None, num):
        raise RecordsError(
            f"{npz_path} holds {num} examples but {SAMPLES_JSON} says {meta['num_examples']}; "
            "if training is still writing, read again; otherwise " + _DAMAGED_HINT + "."
        )
    meta["path"] = str(npz_path)
    return arrays, meta


def read_epoch_history(path: PathLike) -> list[tuple[int, dict[str, np.ndarray]]]:
    """Read the opt-in per-epoch history next to the records that ``path`` points at.

    Args:
        path: the ``history`` folder, the ``introspect`` folder, or anything :func:`locate_records` accepts.

    Returns:
        ``[(epoch, arrays), ...]`` sorted by epoch; empty if no history was written.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        RecordsError: a history file is damaged; the message names it.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a log folder such as lightning_logs/version_0.")
    if path.is_dir() and path.name == HISTORY_DIR:
        history_dir = path
    elif path.is_dir() and (path / HISTORY_DIR).is_dir():
        history_dir = path / HISTORY_DIR
    else:
        history_dir = locate_records(path).parent / HISTORY_DIR
    if not history_dir.is_dir():
        return []
    out: list[tuple[int, dict[str, np.ndarray]]] = []
    for file in history_dir.iterdir():
        match = _HISTORY_RE.match(file.name)
        if match and file.is_file():
            out.append((int(match.group(1)), _load_npz(file)))
    out.sort(key=lambda item: item[0])
    return out
