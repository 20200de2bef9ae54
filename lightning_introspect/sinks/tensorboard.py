"""TensorBoard sink over ``torch.utils.tensorboard.SummaryWriter`` (the writer Lightning's logger uses)."""
from __future__ import annotations

import math
import os
import struct
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from ..core.config import IntrospectConfig
from ..core.contracts import LayerHistograms
from ._crc import use_fast_crc

MAX_WRITTEN_BUCKETS = 40  # histogram buckets per event (adjacent ones merged beyond)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(key: bytes, payload: bytes) -> bytes:
    """A length-delimited protobuf field: its key byte, the payload's length as a varint, the payload."""
    return key + _varint(len(payload)) + payload


# Keys (field number << 3 | wire type) of the fields written: Summary.value = 1; Value.tag = 1,
# Value.simple_value = 2 (32-bit), Value.histo = 5; HistogramProto min..sum_squares = 1..5 (64-bit),
# bucket_limit = 6 and bucket = 7 (packed doubles).
_VALUE, _TAG, _SIMPLE, _HISTO, _LIMITS, _BUCKETS = b"\x0a", b"\x0a", b"\x15", b"\x2a", b"\x32", b"\x3a"
_HISTO_DOUBLES = (b"\x09", b"\x11", b"\x19", b"\x21", b"\x29")
# Event.wall_time = 1 (64-bit), Event.step = 2 (varint), Event.summary = 5
_WALL_TIME, _STEP, _SUMMARY = b"\x09", b"\x10", b"\x2a"


def _event_wire(summary_wire: bytes, step: int, wall_time: float) -> bytes:
    """Protobuf wire bytes of ``Event{wall_time, step, summary}`` around a serialized ``Summary`` (``step`` >= 0:
    a negative int64 is a ten-byte varint, left to protobuf). Like protobuf, a step of 0 is left out (the default)."""
    head = _WALL_TIME + struct.pack("<d", wall_time)
    return head + (_STEP + _varint(step) if step else b"") + _field(_SUMMARY, summary_wire)


def _scalar_value_head(tag: str) -> bytes:
    """Wire bytes of a ``Summary.value`` entry holding ``Value{tag, simple_value}``, up to the 4 bytes of the
    float (the entry's length counts them)."""
    inner = _field(_TAG, tag.encode("utf-8")) + _SIMPLE
    return _VALUE + _varint(len(inner) + 4) + inner


def _histogram_value_wire(tag: str, h: Mapping[str, Any]) -> bytes:
    """Protobuf wire bytes of a ``Summary.value`` entry holding ``Value{tag, histo: HistogramProto{...}}``, the
    bucket arrays packed straight from their float64 bytes."""
    head = np.array([h["min"], h["max"], h["num"], h["sum"], h["sum_squares"]], dtype="<f8").tobytes()
    histo = b"".join(key + head[8 * i : 8 * i + 8] for i, key in enumerate(_HISTO_DOUBLES))
    histo += _field(_LIMITS, np.asarray(h["bucket_limits"], dtype="<f8").tobytes())
    histo += _field(_BUCKETS, np.asarray(h["bucket_counts"], dtype="<f8").tobytes())
    return _field(_VALUE, _field(_TAG, tag.encode("utf-8")) + _field(_HISTO, histo))


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
        self._tag_wire: dict[str, bytes] = {}
        self._byte_writer: tuple[Any, Any] = (None, None)  # (file writer, its queue of serialized events)

    def _add_summary(self, summary: Any, step: int) -> None:
        """Queues a ready ``Summary`` proto as one event of the writer's file (no conversion on the way)."""
        self.writer._get_file_writer().add_summary(summary, step)

    def _event_queue(self) -> Any:
        """The byte-level writer of TensorBoard's event file (``EventFileWriter``'s queue of serialized events,
        which a TensorBoard thread checksums and appends in order with every other event of the file), or None
        where the writer is another one (tensorboardX): then events go through protobuf objects."""
        fw = self.writer._get_file_writer()  # recreated by SummaryWriter after a close: looked up each time
        cached_fw, queue = self._byte_writer
        if fw is cached_fw:
            return queue
        queue = None
        try:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            ew = getattr(fw, "event_writer", None)
            if type(ew) is EventFileWriter and callable(getattr(getattr(ew, "_async_writer", None), "write", None)):
                queue = ew._async_writer  # type: ignore[union-attr]
        except ImportError:  # pragma: no cover - tensorboard is a dependency
            pass
        self._byte_writer = (fw, queue)
        return queue

    def _add_summary_wire(self, wire: bytes, step: int) -> None:
        """Queues a serialized ``Summary`` as one event. The event's bytes are spliced and handed to the event
        file's own queue: parsing the summary into a proto, wrapping it in an ``Event`` and serializing that
        again cost the writer thread about 60 us a step with the GIL held, and the training thread waits for the
        GIL even in its backward pass (1.5 ms of Python on another thread made a CNN's backward 1.7 ms longer)."""
        queue = self._event_queue()
        step = int(step)
        if queue is not None and step >= 0:
            queue.write(_event_wire(wire, step, time.time()))
            return
        from tensorboard.compat.proto.summary_pb2 import Summary

        self._add_summary(Summary.FromString(wire), step)

    def add_scalars(self, values: Mapping[str, float], step: int) -> None:
        """All scalars of one step as ONE event (a Summary with many values): a per-tag ``add_scalar`` builds
        and queues an event each, which on a background thread still takes the GIL from training."""
        if values:
            self._add_summary_wire(self._scalars_wire(values), step)

    def _scalars_wire(self, values: Mapping[str, float]) -> bytes:
        """The serialized ``Summary`` of ``values`` (tag -> float32 ``simple_value``), spliced from a cached
        encoding of each tag and the values' bytes: building a ``Summary.Value`` object per tag costs the
        writer thread microseconds each, with the GIL held, and a step can have hundreds of tags."""
        with np.errstate(over="ignore", invalid="ignore"):  # float32 like the proto field: overflow -> inf
            floats = np.fromiter(values.values(), dtype=np.float64, count=len(values)).astype("<f4").tobytes()
        cache = self._tag_wire
        if len(cache) > 100_000:  # tags are layer names, a bounded set; a pathological caller gets no leak
            cache.clear()
        parts = []
        for i, tag in enumerate(values):
            head = cache.get(tag)
            if head is None:
                head = cache[tag] = _scalar_value_head(tag)
            parts.append(head)
            parts.append(floats[4 * i : 4 * i + 4])
        return b"".join(parts)

    def add_histogram_raw(
        self, tag: str, step: int, *, min: float, max: float, num: float, sum: float, sum_squares: float,
        bucket_limits: Sequence[float], bucket_counts: Sequence[float],
    ) -> None:
        self.writer.add_histogram_raw(
            tag, min=min, max=max, num=num, sum=sum, sum_squares=sum_squares,
            bucket_limits=list(bucket_limits), bucket_counts=list(bucket_counts), global_step=step,
        )

    def add_histograms_raw(self, histograms: Sequence[tuple[str, Mapping[str, Any]]], step: int) -> None:
        """Several pre-bucketed histograms (keyword sets of :meth:`add_histogram_raw`) as ONE event, spliced as
        wire bytes: far cheaper for the writer thread than one ``add_histogram_raw`` (and proto objects) each."""
        if histograms:
            self._add_summary_wire(b"".join(_histogram_value_wire(tag, h) for tag, h in histograms), step)

    def add_histogram(self, tag: str, values: np.ndarray, step: int) -> None:
        values = np.asarray(values, dtype=np.float64)
        values = values[np.isfinite(values)]
        if values.size:
            self.writer.add_histogram(tag, values, global_step=step, bins=min(64, max(8, int(np.sqrt(values.size)))))

    def add_image(self, tag: str, image_hwc: np.ndarray, step: int) -> None:
        """An (H, W, 3 or 4) image. uint8 images are PNG-encoded straight from their bytes:
        ``SummaryWriter.add_image`` first converts to float32 and back, about 20 MB of temporaries for a
        900x700 picture (a peak-memory spike at every epoch end)."""
        image = np.asarray(image_hwc)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
            self.writer.add_image(tag, image, global_step=step, dataformats="HWC")
            return
        import io

        from PIL import Image
        from tensorboard.compat.proto.summary_pb2 import Summary

        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
        h, w, c = image.shape
        png = Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=buffer.getvalue())
        self._add_summary(Summary(value=[Summary.Value(tag=tag, image=png)]), step)

    def add_text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, global_step=step)

    def add_layout(self, config: IntrospectConfig) -> None:
        """The custom-scalars layout of what ``config`` records (see :func:`tensorboard_layout`)."""
        self.writer.add_custom_scalars(tensorboard_layout(config))

    def add_layer_histograms(self, histograms: LayerHistograms, step: int) -> None:
        """Each layer's activation histogram, trimmed to its non-empty buckets, all in one event."""
        h = histograms
        args = _hist_proto_args(h.hist, h.mins, h.sums, h.counts, h.edges)
        self.add_histograms_raw([(tag, a) for tag, a in zip(h.tags, args) if a is not None], step)

    def flush(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_flush >= self.flush_secs:
            self.writer.flush()
            self._last_flush = now

    def close(self) -> None:
        self.writer.flush()
        if self._owns_writer:
            self.writer.close()


def tensorboard_layout(config: IntrospectConfig) -> dict[str, dict[str, list]]:
    """Custom-scalars layout: one multi-line chart per statistic, one line per layer (tags are regexes)."""
    layout: dict[str, dict[str, list]] = {}
    if config.activations:
        layout["Activations (one line per layer)"] = {
            title: ["Multiline", [rf"^activation_{key}/"]]
            for title, key in (("mean", "mean"), ("std", "std"), ("min", "min"), ("max", "max"),
                               ("fraction of zeros", "zero_fraction"), ("non-finite values", "nonfinite"))
        }
    if config.dead_units:
        layout["Dead units (one line per layer)"] = {
            "dead fraction": ["Multiline", [r"^dead_fraction/"]],
            "dead count": ["Multiline", [r"^dead_count/"]],
            "windows the longest-dead unit has stayed dead": ["Multiline", [r"^dead_windows/"]],
        }
        layout["Saturated units (one line per layer)"] = {
            "saturated fraction": ["Multiline", [r"^saturated_fraction/"]],
            "saturated count": ["Multiline", [r"^saturated_count/"]],
            "windows the longest-saturated unit has stayed saturated": ["Multiline", [r"^saturated_windows/"]],
        }
    if config.grad_norms:
        # The global norm is apart: on one axis with the layers it is the largest line and squashes them.
        charts = {"gradient L2 norm (global)": ["Multiline", [r"^grad_norm/global(_clipped)?$"]],
                  "gradient L2 norm per layer": ["Multiline", [r"^grad_norm/(?!global(_clipped)?$)"]],
                  "gradient / weight norm": ["Multiline", [r"^grad_to_weight/"]]}
        if config.update_ratios:
            charts["update / weight norm"] = ["Multiline", [r"^update_to_weight/"]]
        if config.param_grad_norms:
            charts["gradient norm per parameter"] = ["Multiline", [r"^param_grad_norm/"]]
        layout["Gradients"] = charts
    layout["Per-example dynamics"] = {
        "learned, forgotten and flagged fractions": ["Multiline", [r"^samples/.*_fraction$"]],
    }
    layout["Introspection cost"] = {
        "sampling interval (steps)": ["Multiline", [r"^introspect/interval$"]],
        "estimated slowdown": ["Multiline", [r"^introspect/overhead$"]],
    }
    return layout




def _hist_proto_args(
    hist: np.ndarray, mins: np.ndarray, sums: np.ndarray, counts: np.ndarray, edges: np.ndarray
) -> list[Optional[dict[str, Any]]]:
    """Keyword arguments of ``add_histogram_raw`` for each layer's bucket counts (rows of ``hist`` (L, BINS),
    on ``edges``, with the layers' ``mins`` [min, -max], ``sums`` [sum, sum of squares, ...] and subsampled ``counts``):
    only the span of non-empty buckets, the outer edges clipped to the exact min and max; more than
    ``MAX_WRITTEN_BUCKETS`` adjacent buckets merged (TensorBoard shows ~30 bins anyway, and smaller events cost
    the writer less). None for a layer with nothing to show. The span search and the totals are one numpy pass
    over all layers."""
    nonzero = hist != 0
    shown = nonzero.any(1)
    first = nonzero.argmax(1)
    last = hist.shape[1] - 1 - nonzero[:, ::-1].argmax(1)
    num = hist.sum(1)
    with np.errstate(all="ignore"):
        scale = np.where(counts > 0, num / counts, 0.0)  # the histogram sees a strided subsample
    out: list[Optional[dict[str, Any]]] = []
    for i, (ok, i0, i1, lo, neg_hi, n, sc) in enumerate(
        zip(shown.tolist(), first.tolist(), last.tolist(), mins[:, 0].tolist(), mins[:, 1].tolist(), num.tolist(),
            scale.tolist())
    ):
        if not ok:
            out.append(None)
            continue
        hi = -neg_hi
        limits = edges[i0 + 1 : i1 + 2].copy()
        limits[-1] = min(limits[-1], hi) if math.isfinite(limits[-1]) else hi
        span = hist[i, i0 : i1 + 1]
        if span.size > MAX_WRITTEN_BUCKETS:  # groups of g adjacent buckets, the last one possibly shorter
            g = -(-span.size // MAX_WRITTEN_BUCKETS)
            starts = np.arange(0, span.size, g)
            span = np.add.reduceat(span, starts)
            limits = limits[np.minimum(starts + g - 1, limits.size - 1)]
        out.append({
            "min": lo, "max": hi, "num": n, "sum": float(sums[i, 0]) * sc, "sum_squares": float(sums[i, 1]) * sc,
            "bucket_limits": limits, "bucket_counts": span,
        })
    return out
