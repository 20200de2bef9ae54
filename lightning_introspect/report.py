"""``lightning-introspect report LOGDIR``: rank likely mislabeled examples from the records a run wrote.

Reads ``<log_dir>/introspect/samples.npz`` (no pickle), ranks the examples with
:func:`~lightning_introspect.core.scoring.find_label_issues`, prints a summary and the top suspects, and writes
``suspects.csv`` (with each example's ``suggested_label``), ``confusion.md`` (the flagged examples by class:
confused pairs, flagged share per class, the estimated noise matrix) and ``data_map.png`` next to the records
(or into ``--out``), each atomically::

    lightning-introspect report lightning_logs/version_0 --top 20 --class-names cat,dog,bird
    python -m lightning_introspect report lightning_logs --method aum --cut 100 --out /tmp/review

Exit status: 0 on success; 2 with a one-line error when no records are found, they are damaged, or an
argument is wrong; 1 when an output file could not be written.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import math
import os
import sys
from pathlib import Path
from typing import IO, Any, Mapping, Optional, Sequence, TextIO, Union

import numpy as np

from lightning_introspect.core.scoring import METHODS, Suspects, find_label_issues
from lightning_introspect.records import RecordsError, _atomic_write, read_records

__all__ = ["build_parser", "main", "suspect_columns", "write_class_view", "write_suspects_csv"]

PROG = "lightning-introspect"
SUSPECTS_CSV = "suspects.csv"
DATA_MAP_PNG = "data_map.png"
CONFUSION_MD = "confusion.md"
# The names match those of find_label_issues' own columns, so the scorer's values win when both exist.
_COLUMN_ORDER = ("aum", "confidence_mean", "variability", "correct_fraction", "forgetting_events",
                 "first_learned", "seen_epochs", "loss_mean")


class _UsageError(Exception):
    """A wrong argument or input file: reported in one line, exit status 2."""


# ------------------------------------------------------------------------------------------------- CSV
def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def write_suspects_csv(
    path: Union[str, os.PathLike[str]],
    suspects: Suspects,
    class_names: Optional[Sequence[str]] = None,
    *,
    max_rows: Optional[int] = None,
) -> Path:
    """Write the ranked suspects as CSV, most suspect first, atomically.

    The header is ``index,score,flagged,label``, then ``label_name`` when ``class_names`` are given, then
    ``suggested_label`` (and ``suggested_label_name``) when the suspects have suggested labels (-1: none), then
    ``region`` (Dataset Cartography region, or ``mislabeled`` when flagged) when known, then every entry of
    ``suspects.columns`` (``text`` among them when a ``describe`` hook gave it). ``index`` is the sample id;
    ``flagged`` is ``true``/``false``; floats have 6 significant digits, NaN is written ``nan``.

    Args:
        path: the CSV file to write; its folder is created if needed.
        suspects: the ranking, e.g. from :func:`~lightning_introspect.core.scoring.find_label_issues`.
        class_names: names of the labels, in label order.
        max_rows: write only the first (most suspect) rows; all when ``None``.

    Returns:
        The path written.

    Raises:
        ValueError: the arrays of ``suspects`` differ in length, or ``max_rows`` is negative.
        OSError: the file could not be written; the message names the path.

    Example:
        >>> import tempfile
        >>> suspects = Suspects(ids=np.array([7, 2]), scores=np.array([0.1, 0.9]), flagged=np.array([True, False]),
        ...                     labels=np.array([1, 0]), columns={"aum": np.array([-1.5, 2.0])}, method="default",
        ...                     threshold=0.5)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     print(write_suspects_csv(Path(tmp) / "s.csv", suspects, ["cat", "dog"]).read_text(), end="")
        index,score,flagged,label,label_name,aum
        7,0.1,true,1,dog,-1.5
        2,0.9,false,0,cat,2
    """
    if max_rows is not None and (not isinstance(max_rows, int) or max_rows < 0):
        raise ValueError(f"`max_rows` must be a non-negative int or None, got {max_rows!r}.")
    ids = np.asarray(suspects.ids)
    fields: dict[str, np.ndarray] = {
        "index": ids,
        "score": np.asarray(suspects.scores, dtype=np.float64),
        "flagged": np.asarray(suspects.flagged, dtype=bool),
        "label": np.asarray(suspects.labels),
    }
    names = list(class_names) if class_names is not None else None

    def named(labels: np.ndarray) -> np.ndarray:
        assert names is not None
        return np.array([names[i] if 0 <= i < len(names) else "" for i in labels.astype(np.int64).tolist()],
                        dtype=object)

    if names is not None:
        fields["label_name"] = named(fields["label"])
    if suspects.suggested_labels is not None:
        fields["suggested_label"] = np.asarray(suspects.suggested_labels)
        if names is not None:
            fields["suggested_label_name"] = named(fields["suggested_label"])
    if suspects.regions is not None:
        fields["region"] = np.asarray(suspects.regions, dtype=object)
    for name, column in suspects.columns.items():
        if name in fields:
            raise ValueError(f"`suspects.columns` must not repeat the column {name!r}.")
        fields[name] = np.asarray(column)
    bad = {name: col.shape for name, col in fields.items() if col.shape != ids.shape}
    if bad:
        raise ValueError(f"every column of `suspects` must have the shape of `ids` {ids.shape}; got {bad}.")
    rows = ids.shape[0] if max_rows is None else min(max_rows, ids.shape[0])

    def write(f: IO[bytes]) -> None:
        text = io.TextIOWrapper(f, encoding="utf-8", newline="")
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(list(fields))
        chunk = 65536
        for start in range(0, rows, chunk):
            stop = min(start + chunk, rows)
            columns = []
            for col in fields.values():
                part = col[start:stop]
                if part.dtype.kind == "f":
                    part = part.astype(np.float64)
                columns.append(part.tolist())
            writer.writerows([_format_value(v) for v in row] for row in zip(*columns))
        text.flush()
        text.detach()  # leave the binary file open for the fsync that follows

    return _atomic_write(path, write)


def write_class_view(
    path: Union[str, os.PathLike[str]], suspects: Suspects, class_names: Optional[Sequence[str]] = None
) -> Path:
    """Write the flagged examples by class as markdown, atomically: the most confused (given, suggested)
    pairs, the flagged share per class and the estimated noise matrix (see
    :meth:`~lightning_introspect.core.scoring.Suspects.class_view`).

    Raises:
        OSError: the file could not be written; the message names the path.
    """
    text = _class_view_text(suspects, class_names, top=10) + "\n"
    return _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _class_view_text(suspects: Suspects, class_names: Optional[Sequence[str]], top: int) -> str:
    return suspects.class_view().to_markdown(class_names, top=top, max_classes=30, matrix=True)


# ------------------------------------------------------------------------------------------ the ranking
def suspect_columns(records: Mapping[str, np.ndarray], ids: np.ndarray) -> dict[str, np.ndarray]:
    """Per-example figures of ``ids`` for the table and CSV, computed from the records.

    Returns:
        Those of ``aum`` (mean margin over epochs), ``confidence_mean`` and ``variability`` (mean and std
        over epochs of the probability of the given label), ``correct_fraction``, ``forgetting_events``,
        ``first_learned``, ``seen_epochs`` and ``loss_mean`` that the records allow, each ``(K,)``.

    Example:
        >>> records = {"seen_epochs": np.array([2, 4]), "margin_sum": np.array([-3.0, 8.0]),
        ...            "forgetting_events": np.array([0, 1])}
        >>> cols = suspect_columns(records, np.array([1, 0]))
        >>> cols["aum"], cols["forgetting_events"]
        (array([ 2. , -1.5]), array([1, 0]))
    """
    ids = np.asarray(ids, dtype=np.int64)
    seen = np.asarray(records["seen_epochs"], dtype=np.float64)[ids]
    n = np.where(seen > 0, seen, np.nan)
    out: dict[str, np.ndarray] = {}

    def mean_of(field: str) -> Optional[np.ndarray]:
        if field not in records:
            return None
        return np.asarray(records[field], dtype=np.float64)[ids] / n

    with np.errstate(divide="ignore", invalid="ignore"):
        aum = mean_of("margin_sum")
        if aum is not None:
            out["aum"] = aum
        confidence, second = mean_of("confidence_sum"), mean_of("confidence_sq_sum")
        if confidence is not None:
            out["confidence_mean"] = confidence
            if second is not None:
                out["variability"] = np.sqrt(np.clip(second - confidence**2, 0.0, None))
        correct = mean_of("correct_epochs")
        if correct is not None:
            out["correct_fraction"] = correct
        for field in ("forgetting_events", "first_learned"):
            if field in records:
                out[field] = np.asarray(records[field])[ids]
        out["seen_epochs"] = np.asarray(records["seen_epochs"])[ids]
        loss = mean_of("loss_sum")
        if loss is not None:
            out["loss_mean"] = loss
    return out


def _merge_columns(derived: Mapping[str, np.ndarray], given: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The scorer's own columns win; the usual ones come first, in a fixed order."""
    merged = {**derived, **given}
    ordered = {name: merged[name] for name in _COLUMN_ORDER if name in merged}
    ordered.update({name: col for name, col in merged.items() if name not in ordered})
    return ordered


# ------------------------------------------------------------------------------------------- arguments
def _parse_cut(text: str) -> Union[str, float, int]:
    text = text.strip().lower()
    if text == "auto":
        return "auto"
    message = f"--cut must be 'auto', a score in (0, 1) such as 0.3, or a count such as 100; got {text!r}"
    if text.isdigit():
        count = int(text)
        if count < 1:
            raise argparse.ArgumentTypeError(message)
        return count
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(message) from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(message)
    return value


def _parse_top(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"--top must be a count >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lightning-introspect`` (subcommand ``report``)."""
    parser = argparse.ArgumentParser(prog=PROG, description="Look inside a run logged by lightning_introspect.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    report = commands.add_parser(
        "report",
        help="rank likely mislabeled examples; write suspects.csv and data_map.png",
        description="Rank likely mislabeled examples from <LOGDIR>/**/introspect/samples.npz, print the top "
        "suspects, and write suspects.csv and data_map.png next to the records (or into --out).",
    )
    report.add_argument("logdir", metavar="LOGDIR", type=Path,
                        help="a log folder, version_* folder, introspect folder or samples.npz "
                        "(the newest records below it are used)")
    report.add_argument("--method", choices=METHODS, default="default", help="scorer (default: %(default)s)")
    report.add_argument("--top", type=_parse_top, default=20, help="suspects to print (default: %(default)s)")
    report.add_argument("--cut", type=_parse_cut, default="auto",
                        help="'auto', a score in (0, 1) to flag scores below it, or a count k to flag the "
                        "top k (default: auto)")
    report.add_argument("--class-names", metavar="A,B,...", default=None,
                        help="label names in label order, comma-separated (default: those in samples.json)")
    report.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="folder for suspects.csv and data_map.png (default: next to the records)")
    report.add_argument("--threshold-ids", type=Path, default=None, metavar="FILE",
                        help="ids of AUM threshold samples: a text file of integers or a .npy file "
                        "(default: meta 'threshold_ids', if any)")
    return parser


def _read_threshold_ids(path: Path) -> list[int]:
    if not path.is_file():
        raise _UsageError(f"--threshold-ids file {path} does not exist.")
    try:
        if path.suffix == ".npy":
            ids = np.load(path, allow_pickle=False)
            if ids.dtype.kind not in "iu":
                raise _UsageError(f"--threshold-ids file {path} must hold integers, got {ids.dtype}.")
            return [int(i) for i in ids.ravel().tolist()]
        tokens = []
        for line in path.read_text(encoding="utf-8").splitlines():
            tokens += line.split("#", 1)[0].replace(",", " ").split()
        return [int(token) for token in tokens]
    except (ValueError, UnicodeDecodeError, EOFError, OSError) as err:
        raise _UsageError(
            f"--threshold-ids file {path} must hold integer ids separated by spaces, commas or newlines "
            f"(or be a .npy of ints): {err}."
        ) from None


def _class_names(arg: Optional[str], meta: Mapping[str, Any], labels: np.ndarray) -> Optional[list[str]]:
    if arg is not None:
        names = [name.strip() for name in arg.split(",")]
        top = int(labels.max()) if labels.size else -1
        if top >= len(names):
            raise _UsageError(
                f"--class-names gives {len(names)} names but labels go up to {top}; "
                "give one name per class, in label order."
            )
        return names
    given = meta.get("class_names")
    return [str(name) for name in given] if isinstance(given, list) else None


# --------------------------------------------------------------------------------------------- printing
def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, (float, np.floating)):
        return "-" if not np.isfinite(value) else f"{value:.{digits}f}"
    return str(value)


def _table(suspects: Suspects, columns: Mapping[str, np.ndarray], names: Optional[list[str]], top: int) -> str:
    header = ["rank", "id", "label", "suggested", "score", "flagged", "region", "AUM", "confidence", "variability",
              "forgetting"]
    right = [True, True, False, False, True, False, False, True, True, True, True]
    texts = columns.get("text")
    if texts is not None:
        header.append("text")
        right.append(False)
    rows = []
    empty = np.full(len(suspects.ids), np.nan)

    def label_text(label: int) -> str:
        if label < 0:
            return "-"
        if names is not None and 0 <= label < len(names):
            return names[label] if len(names[label]) <= 24 else names[label][:23] + "…"
        return str(label)

    suggested = suspects.suggested_labels if suspects.suggested_labels is not None else np.full(len(suspects.ids), -1)
    for rank in range(min(top, len(suspects.ids))):
        forgetting = columns.get("forgetting_events")
        rows.append([
            str(rank + 1), str(int(suspects.ids[rank])), label_text(int(suspects.labels[rank])),
            label_text(int(suggested[rank])), _fmt(float(suspects.scores[rank]), 4),
            "yes" if suspects.flagged[rank] else "no",
            "-" if suspects.regions is None else str(suspects.regions[rank]),
            _fmt(float(columns.get("aum", empty)[rank]), 2),
            _fmt(float(columns.get("confidence_mean", empty)[rank])),
            _fmt(float(columns.get("variability", empty)[rank])),
            "-" if forgetting is None else str(int(forgetting[rank])),
        ])
        if texts is not None:
            text = " ".join(str(texts[rank]).split())
            rows[-1].append(repr(text if len(text) <= 60 else text[:59] + "…"))
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    lines = []
    for row in [header, *rows]:
        cells = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _report(args: argparse.Namespace, stdout: TextIO) -> int:
    try:
        records, meta = read_records(args.logdir)
    except (FileNotFoundError, NotADirectoryError) as err:
        raise _UsageError(str(err)) from err
    except RecordsError:
        raise
    except OSError as err:  # e.g. no permission to read: not a failure to write, so not exit status 1
        raise _UsageError(f"cannot read the records under {args.logdir}: {err}") from err
    npz_path = Path(meta["path"])
    if "label" not in records:
        raise _UsageError(f"{npz_path} holds {meta.get('task')} records without labels; there is nothing to rank.")
    labels = np.asarray(records["label"])
    seen = np.asarray(records["seen_epochs"]) > 0
    names = _class_names(args.class_names, meta, labels[seen])

    threshold_ids: Optional[list[int]] = None
    if args.threshold_ids is not None:
        threshold_ids = _read_threshold_ids(args.threshold_ids)
    elif isinstance(meta.get("threshold_ids"), list):
        threshold_ids = [int(i) for i in meta["threshold_ids"]]
    num_classes = meta.get("num_classes")
    if not isinstance(num_classes, int) or num_classes < 1:
        num_classes = None
    elif names is not None and len(names) > num_classes:
        num_classes = len(names)
    try:
        suspects = find_label_issues(records, method=args.method, cut=args.cut, threshold_ids=threshold_ids,
                                     num_classes=num_classes)
    except (ValueError, TypeError) as err:
        raise _UsageError(f"cannot rank {npz_path}: {err}") from err
    columns = _merge_columns(suspect_columns(records, suspects.ids), suspects.columns)
    suspects = dataclasses.replace(suspects, columns=columns)

    num, num_seen = labels.shape[0], int(seen.sum())
    num_flagged = int(np.count_nonzero(suspects.flagged))
    epochs = int(np.asarray(records["seen_epochs"]).max()) if num else 0
    if num_classes is None and num_seen:
        num_classes = int(labels[seen].max()) + 1
    classes = "unknown" if num_classes is None else f"{num_classes}"
    if names:
        shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
        classes += f" ({shown})"
    if suspects.abstained is not None:
        cut_text = "auto -> abstains, flags none (see the warning below)"
    elif not np.isfinite(suspects.threshold):
        cut_text = f"{args.cut} -> flags none"
    elif isinstance(args.cut, int):  # an int cut reports the k-th score as its threshold
        cut_text = f"top {args.cut} -> flags scores <= {suspects.threshold:.4g}"
    elif args.cut == "auto":
        cut_text = f"auto -> flags scores < {suspects.threshold:.4g}"
    else:
        cut_text = f"flags scores < {args.cut}"
    share = f" ({num_flagged / num_seen:.1%})" if num_seen else ""
    last_epoch = meta.get("epoch")
    summary = [
        ("records", str(npz_path)),
        ("epochs", f"{epochs}" + (f" (written after epoch {last_epoch})" if last_epoch is not None else "")),
        ("examples", f"{num_seen:,} seen of {num:,} ids"),
        ("classes", classes),
        ("method", suspects.method),
        ("cut", cut_text
         + (f", {len(threshold_ids)} threshold samples" if threshold_ids is not None else "")),
        ("flagged", f"{num_flagged:,} of {num_seen:,} seen{share}"
         + ("" if suspects.abstained is None else " (the cut abstained, see the warning below)")),
        ("est. noise", "- (too little evidence)" if not np.isfinite(suspects.noise_rate) else
         f"{suspects.noise_rate:.1%} of seen examples below the method's natural cut"),
    ]
    width = max(len(key) for key, _ in summary) + 1
    for key, value in summary:
        print(f"{key + ':':<{width}} {value}", file=stdout)

    if suspects.abstained is not None:
        print(f"\nwarning: the automatic cut flags nothing: {suspects.abstained}", file=stdout)
    if args.top and len(suspects.ids):
        shown = min(args.top, len(suspects.ids))
        print(f"\nTop {shown} suspects (score in [0, 1], lower = more likely mislabeled):", file=stdout)
        print(_table(suspects, columns, names, args.top), file=stdout)
    elif not len(suspects.ids):
        print("\nNo example has been seen yet: nothing to rank.", file=stdout)
    by_class = len(suspects.ids) > 0 and bool((np.asarray(suspects.labels) >= 0).all())
    if by_class and num_flagged:
        view = suspects.class_view()
        print("\nFlagged examples by class (given -> suggested label):", file=stdout)
        print(view.to_markdown(names, top=5, max_classes=10), file=stdout)

    out_dir = args.out if args.out is not None else npz_path.parent
    csv_path = write_suspects_csv(out_dir / SUSPECTS_CSV, suspects, names)
    print(f"\nwrote {csv_path}", file=stdout)
    if by_class:
        print(f"wrote {write_class_view(out_dir / CONFUSION_MD, suspects, names)}", file=stdout)
    from lightning_introspect.datamap import save_data_map  # matplotlib only when a picture is drawn

    try:
        png_path = save_data_map(out_dir / DATA_MAP_PNG, records, suspects=suspects, class_names=names,
                                 title=f"Data map — {npz_path.parent.parent.name or npz_path.parent.name}")
    except ValueError as err:  # e.g. regression records: no given-label probability to draw
        print(f"data map skipped: {err}", file=stdout)
    else:
        print(f"wrote {png_path}", file=stdout)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``lightning-introspect`` with ``argv`` (default: ``sys.argv[1:]``) and return the exit status.

    Example:
        >>> main(["report", "/no/such/folder"])
        2
    """
    args = build_parser().parse_args(argv)
    stdout, stderr = sys.stdout, sys.stderr
    try:
        return _report(args, stdout)
    except (RecordsError, _UsageError) as err:
        print(f"{PROG}: error: {err}", file=stderr)
        return 2
    except OSError as err:  # reading errors became _UsageError above: this is a file that could not be written
        message = err.strerror if err.filename is None and err.strerror else str(err)
        hint = "" if args.out is not None else "; pass --out DIR to write somewhere else"
        print(f"{PROG}: error: {message}{hint}", file=stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
