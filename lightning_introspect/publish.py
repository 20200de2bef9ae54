"""Epoch outputs: the per-example records on disk, the suspects table and the data-map picture. The core hands
each epoch's results to a :class:`RecordsPublisher` (on its writer thread); a plain loop gets one by default."""
from __future__ import annotations

import gc
import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .core.config import IntrospectConfig
from .core.contracts import EXTRAS_DUTY, EpochOutput, Sink


class RecordsPublisher:
    """Writes an epoch's records atomically under ``records_dir`` (None: none written), and its suspects
    table, per-class view and data map to the sinks, rationed to ``EXTRAS_DUTY`` of the wall time.

    Args:
        config: the run's configuration (``history`` writes each epoch's per-example means too).
        records_dir: folder for ``samples.npz``/``.json`` and the epoch history; None keeps nothing on disk.
        class_names: names of the classes, for the tables.
        describe: ``describe(sample_id) -> str``, the ``text`` column of the suspects table (the core sets it).
    """

    def __init__(
        self, config: IntrospectConfig, records_dir: Optional[str | Path] = None,
        class_names: Optional[Sequence[str]] = None, describe: Optional[Callable[[int], str]] = None,
    ) -> None:
        self.config = config
        self.records_dir = Path(records_dir) if records_dir is not None else None
        self.class_names = list(class_names) if class_names is not None else None
        self.describe = describe
        self._extras_cost = 0.0  # seconds the last picture + suspects table took
        self._extras_done = -math.inf
        self._skipped: Optional[tuple[EpochOutput, Optional[np.ndarray]]] = None

    def publish_epoch(self, out: EpochOutput, sinks: Sequence[Sink]) -> dict[str, float]:
        """Writes the records, the epoch's scalars and histograms and, unless rationed away, the pictures."""
        from . import records as rec_io

        records, means = out.records, out.means
        if self.records_dir is not None:
            rec_io.write_records(self.records_dir, records, out.meta)
            if self.config.history and means is not None:
                rec_io.write_epoch_history(self.records_dir, out.epoch, means)
        scalars = dict(out.scalars)
        n_seen = max(int((records["seen_epochs"] > 0).sum()), 1)
        # The pictures stall training while they are drawn (see EXTRAS_DUTY): they are refreshed only while they
        # take at most EXTRAS_DUTY of the wall time since the previous refresh.
        t0 = time.monotonic()
        extras = t0 - self._extras_done >= self._extras_cost / EXTRAS_DUTY
        suspects = self._suspects_for(out) if extras else None
        if suspects is not None:
            scalars["samples/flagged_fraction"] = float(suspects.flagged.sum() / n_seen)
        for sink in sinks:
            sink.add_scalars(scalars, out.step)
            if means is not None:
                for key in ("loss", "margin", "confidence"):
                    sink.add_histogram(f"samples/{key}", means[key][means["seen"]], out.step)
        self._write_pictures(records, suspects, out.epoch, out.step, sinks)
        for sink in sinks:
            sink.flush()
        # A skipped refresh is done at close, so that the last picture always shows the end of training.
        self._skipped = None if extras else (out, None)
        if extras:
            self._extras_done = time.monotonic()
            self._extras_cost = self._extras_done - t0
        return scalars

    def finish(self, sinks: Sequence[Sink]) -> None:
        """Draws the last epoch's pictures if their refresh was skipped."""
        if self._skipped is not None:
            out, _ = self._skipped
            self._skipped = None
            suspects = self._suspects_for(out)
            if suspects is not None:
                n_seen = max(int((out.records["seen_epochs"] > 0).sum()), 1)
                for sink in sinks:
                    sink.add_scalars({"samples/flagged_fraction": float(suspects.flagged.sum() / n_seen)}, out.step)
            self._write_pictures(out.records, suspects, out.epoch, out.step, sinks)

    def _suspects_for(self, out: EpochOutput) -> Any:
        if out.meta["task"] == "regression":
            return None
        from .core.scoring import find_label_issues

        return find_label_issues(out.records, threshold_ids=out.threshold_ids, num_classes=out.meta["num_classes"])  # type: ignore[arg-type]

    def _write_pictures(
        self, records: dict[str, np.ndarray], suspects: Any, epoch: int, step: int, sinks: Sequence[Sink]
    ) -> None:
        """The suspects table and the data-map image."""
        if suspects is None or not sinks:
            return
        from .datamap import render_data_map

        image = render_data_map(records, suspects=suspects, class_names=self.class_names)
        # A matplotlib figure is a web of reference cycles: only the cyclic collector frees it, and a full
        # collection is rare in a training process, so each epoch's figure would pile up until then. The
        # young generations hold most of it: collecting them is cheap.
        gc.collect(1)
        confusion = confusion_markdown(suspects, self.class_names, epoch)
        for sink in sinks:
            sink.add_text("samples/suspects", suspects_markdown(suspects, self.class_names, epoch,
                                                                describe=self.describe), step)
            if confusion is not None:
                sink.add_text("samples/confusion", confusion, step)
            sink.add_image("samples/data_map", image, step)


def write_report_files(
    records_dir: Path, suspects_of: Callable[[], Any], records_of: Callable[[], dict[str, np.ndarray]],
    task: Optional[str], class_names: Optional[Sequence[str]],
) -> None:
    """After training: ``suspects.csv``, the per-class view (classification) and ``data_map.png`` under
    ``records_dir``; a failure is a warning (training is over, its records are kept)."""
    try:
        from .datamap import save_data_map
        from .report import CONFUSION_MD, write_class_view, write_suspects_csv

        suspects = suspects_of()
        write_suspects_csv(records_dir / "suspects.csv", suspects, class_names=class_names)
        if task == "classification":
            write_class_view(records_dir / CONFUSION_MD, suspects, class_names=class_names)
        save_data_map(records_dir / "data_map.png", records_of(), suspects=suspects, class_names=class_names)
    except (OSError, NotImplementedError) as err:
        warnings.warn(f"lightning_introspect could not write the suspects report: {err}", RuntimeWarning)


def default_publisher(
    config: IntrospectConfig, records_dir: Optional[Any], class_names: Optional[Sequence[str]]
) -> RecordsPublisher:
    """The publisher of an Introspector made without one (registered with the core on import)."""
    return RecordsPublisher(config, records_dir, class_names)


def suspects_markdown(suspects: Any, class_names: Optional[Sequence[str]], epoch: int, top: int = 10,
                      describe: Optional[Callable[[int], str]] = None) -> str:
    """The ``top`` suspects of an epoch as a markdown table (the hardest examples, for sequence data), with a
    ``text`` column from ``describe(sample_id)`` when given, each row's region, the flagged share and noise
    estimate, or why the cut abstains."""
    def name(label: int) -> str:
        if class_names is not None and 0 <= label < len(class_names):
            return str(class_names[label])
        return str(label)

    def text(rank: int) -> str:  # the shown rows only: describe may be slow, and the table has `top` rows
        if describe is None:
            return ""
        words = " ".join(str(describe(int(suspects.ids[rank]))).split()).replace("|", "\\|")
        return " " + (words if len(words) <= 80 else words[:79] + "…") + " |"

    text_head, text_rule = (" text |", ":---|") if describe is not None else ("", "")
    n_flag = int(np.sum(suspects.flagged))
    share = f"{n_flag / len(suspects.ids):.1%}" if len(suspects.ids) else "-"
    rate = f"{suspects.noise_rate:.1%}" if np.isfinite(suspects.noise_rate) else "- (too little evidence)"
    summary = f" Flagged share {share}; estimated noise rate {rate}." if len(suspects.ids) else ""
    if suspects.abstained is not None:
        summary += f" The automatic cut flags nothing: {suspects.abstained}"
    if len(suspects.ids) and (np.asarray(suspects.labels) < 0).all():  # no class labels: sequence (N, T, C) data
        lines = [
            f"**Epoch {epoch}: the {min(top, len(suspects.ids))} hardest of {len(suspects.ids)} examples** (scorer "
            f"`{suspects.method}` over their tokens, lower = harder; "
            + (f"{n_flag} score below {suspects.threshold:.3f}). " if suspects.abstained is None else "no cut). ")
            + "For sequences these are hard, atypical or noisy examples, not wrong labels." + summary,
            "",
            "| rank | id | score | region |" + text_head,
            "|---:|---:|---:|:---|" + text_rule,
        ]
        lines += [f"| {r + 1} | {int(suspects.ids[r])} | {float(suspects.scores[r]):.3f} | "
                  f"{'-' if suspects.regions is None else suspects.regions[r]} |{text(r)}"
                  for r in range(min(top, len(suspects.ids)))]
        return "\n".join(lines)
    lines = [
        f"**Epoch {epoch}: {n_flag} of {len(suspects.ids)} examples flagged as likely mislabeled** "
        f"(scorer `{suspects.method}`, "
        + (f"cut at score {suspects.threshold:.3f}; " if suspects.abstained is None else "")
        + "lower score = more suspect)." + summary,
        "",
        "| rank | id | given label | suggested label | score | flagged | region |" + text_head,
        "|---:|---:|:---|:---|---:|:---:|:---|" + text_rule,
    ]
    suggested = suspects.suggested_labels
    for r in range(min(top, len(suspects.ids))):
        sug = "-" if suggested is None or suggested[r] < 0 else name(int(suggested[r]))
        lines.append(
            f"| {r + 1} | {int(suspects.ids[r])} | {name(int(suspects.labels[r]))} | {sug} | "
            f"{float(suspects.scores[r]):.3f} | {'yes' if suspects.flagged[r] else 'no'} | "
            f"{'-' if suspects.regions is None else suspects.regions[r]} |{text(r)}"
        )
    return "\n".join(lines)


def confusion_markdown(suspects: Any, class_names: Optional[Sequence[str]], epoch: int) -> Optional[str]:
    """The per-class view of the flagged examples (top pairs, flagged share per class), or None without
    class labels (sequence data)."""
    if len(suspects.ids) == 0 or (np.asarray(suspects.labels) < 0).all():
        return None
    view = suspects.class_view()
    return f"**Epoch {epoch}: flagged examples by class**\n\n" + view.to_markdown(class_names, top=5, max_classes=10)
