"""TensorBoard sink over ``torch.utils.tensorboard.SummaryWriter`` (the writer Lightning's logger uses)."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np

from ._crc import use_fast_crc


class TensorBoardSink:
    """Writes to an existing ``SummaryWriter`` (e.g. ``TensorBoardLogger.experiment``) or its own one.

    Scalars are plain floats (a ``SummaryWriter`` given tensors would copy them one by one). The event file
    is flushed at most every ``flush_secs`` so that a running TensorBoard shows new points within seconds.
    Records are checksummed in C where ``google-crc32c`` is installed (a dependency), not in Python.
    """

    def __init__(self, writer_or_dir: Union[Any, str, os.PathLike], *, flush_secs: float = 2.0) -> None:
        use_fast_crc()  # the same bytes, checksummed in C: see ``_crc``
        if isinstance(writer_or_dir, (str, os.PathLike)):
            from torch.utils.tensorboard import SummaryWriter

            self.log_dir = Path(writer_or_dir)
            self.writer = SummaryWriter(str(self.log_dir), flush_secs=int(max(flush_secs, 1)))
            self._owns_writer = True
        else:
            self.writer = writer_or_dir
            self.log_dir = Path(getattr(writer_or_dir, "log_dir", None) or writer_or_dir.get_logdir())
            self._owns_writer = False
        self.flush_secs = flush_secs
        self._last_flush = time.monotonic()

    def add_scalars(self, values: Mapping[str, float], step: int) -> None:
        """All scalars of one step as ONE event (a Summary with many values): a per-tag ``add_scalar`` builds
        and queues an event each, which on a background thread still takes the GIL from training."""
        if not values:
            return
        from tensorboard.compat.proto.summary_pb2 import Summary  # here: importing the core loads no TensorBoard

        summary = Summary(value=[Summary.Value(tag=tag, simple_value=float(v)) for tag, v in values.items()])
        self.writer._get_file_writer().add_summary(summary, step)

    def add_histogram_raw(
        self, tag: str, step: int, *, min: float, max: float, num: float, sum: float, sum_squares: float,
        bucket_limits: Sequence[float], bucket_counts: Sequence[float],
    ) -> None:
        self.writer.add_histogram_raw(
            tag, min=min, max=max, num=num, sum=sum, sum_squares=sum_squares,
            bucket_limits=list(bucket_limits), bucket_counts=list(bucket_counts), global_step=step,
        )

    def add_histograms_raw(self, histograms: Sequence[tuple[str, Mapping[str, Any]]], step: int) -> None:
        """Several pre-bucketed histograms (keyword sets of :meth:`add_histogram_raw`) as ONE event: built
        straight as protos, about ten times cheaper for the writer thread than one ``add_histogram_raw`` each."""
        if not histograms:
            return
        from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary

        values = [
            Summary.Value(tag=tag, histo=HistogramProto(
                min=h["min"], max=h["max"], num=h["num"], sum=h["sum"], sum_squares=h["sum_squares"],
                bucket_limit=h["bucket_limits"], bucket=h["bucket_counts"],
            ))
            for tag, h in histograms
        ]
        self.writer._get_file_writer().add_summary(Summary(value=values), step)

    def add_histogram(self, tag: str, values: np.ndarray, step: int) -> None:
        values = np.asarray(values, dtype=np.float64)
        values = values[np.isfinite(values)]
        if values.size:
            self.writer.add_histogram(tag, values, global_step=step, bins=min(64, max(8, int(np.sqrt(values.size)))))

    def add_image(self, tag: str, image_hwc: np.ndarray, step: int) -> None:
        self.writer.add_image(tag, image_hwc, global_step=step, dataformats="HWC")

    def add_text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, global_step=step)

    def add_layout(self, layout: Mapping[str, Mapping[str, list]]) -> None:
        self.writer.add_custom_scalars(dict(layout))

    def flush(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_flush >= self.flush_secs:
            self.writer.flush()
            self._last_flush = now

    def close(self) -> None:
        self.writer.flush()
        if self._owns_writer:
            self.writer.close()
