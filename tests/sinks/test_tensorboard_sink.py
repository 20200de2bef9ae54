"""Tests for the writer thread's window and the TensorBoard sink's wire encoding, with real threads and protos."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from helpers.tb import read_events
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary

from lightning_introspect.sinks import TensorBoardSink
from lightning_introspect.sinks.tensorboard import _event_wire, _histogram_value_wire


def test_spliced_summaries_equal_protobufs_own_encoding(tmp_path: Path) -> None:
    """Test that the sink's hand-spliced scalar and histogram bytes are exactly what protobuf serializes,
    for long and non-ASCII tags and values that overflow float32, and that TensorBoard reads them back."""
    sink = TensorBoardSink(tmp_path)
    values = {"a": 1.0, "activation_mean/net.0": -0.25, "x" * 300: math.nan, "é/ü": 1e39, "big": -1e300,
              "t": math.inf, "tiny": 1e-50}
    reference = Summary(value=[Summary.Value(tag=t, simple_value=v) for t, v in values.items()])
    assert sink._scalars_wire(values) == reference.SerializeToString()
    h = dict(min=-1.5, max=2.0, num=10.0, sum=3.0, sum_squares=7.5, bucket_limits=np.array([0.1, 1.0, 2.0]),
             bucket_counts=np.array([1.0, 0.0, 9.0]))
    histo = HistogramProto(min=-1.5, max=2.0, num=10, sum=3, sum_squares=7.5, bucket_limit=[0.1, 1, 2], bucket=[1, 0, 9])
    assert _histogram_value_wire("hist/é", h) == Summary(value=[Summary.Value(tag="hist/é", histo=histo)]).SerializeToString()
    wire = sink._scalars_wire(values)
    for step in (0, 4, 300, 2**40):
        event = Event(wall_time=1234.5, step=step, summary=Summary.FromString(wire))
        assert _event_wire(wire, step, 1234.5) == event.SerializeToString()
    assert sink._event_queue() is not None  # a SummaryWriter's events take the byte path
    sink.add_scalars(values, 4)
    sink.add_histograms_raw([("hist/é", h)], 4)
    sink._byte_writer = (sink.writer._get_file_writer(), None)  # as with a writer of another kind: protobuf
    sink.add_scalars({"a": 2.0}, 5)
    sink.add_histograms_raw([("hist/é", h)], 5)
    sink.close()
    ev = read_events(tmp_path)
    assert ev.scalars["activation_mean/net.0"] == [(4, -0.25)] and ev.scalars["é/ü"] == [(4, math.inf)]
    assert ev.scalars["a"] == [(4, 1.0), (5, 2.0)]
    assert [(step, list(got.bucket), list(got.bucket_limit)) for step, got in ev.histograms["hist/é"]] == [
        (4, [1, 0, 9], [0.1, 1, 2]), (5, [1, 0, 9], [0.1, 1, 2])]


def test_uint8_image_reads_back_pixel_exact(tmp_path: Path) -> None:
    """Test that an image written by the sink (PNG straight from uint8) reads back from the event file with
    its size and every pixel, and that a float image still goes through SummaryWriter's own path."""
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    sink = TensorBoardSink(tmp_path)
    sink.add_image("samples/data_map", image, 7)
    sink.add_image("float", rng.random((5, 4, 3)), 7)
    sink.close()
    ev = read_events(tmp_path)
    (step, got), = ev.images["samples/data_map"]
    assert step == 7 and (got.height, got.width) == (37, 53)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(got.encoded_image_string))), image)
    (_, flt), = ev.images["float"]
    assert (flt.height, flt.width) == (5, 4)
