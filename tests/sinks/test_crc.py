"""Tests of the TensorBoard sink's fast record checksum (:mod:`lightning_introspect.sinks._crc`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from helpers.tb import read_events

from lightning_introspect.sinks import TensorBoardSink


def test_fast_crc_gives_tensorboards_checksums_and_files_read_back(tmp_path: Path) -> None:
    """Test that the sink checksums records in C, with the same masked CRC32C as TensorBoard's own, and that
    TensorBoard's reader (which checks every record's CRC) reads the file back."""
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as reference
    from tensorboard.summary.writer import record_writer

    from lightning_introspect.sinks._crc import use_fast_crc

    sink = TensorBoardSink(tmp_path)
    assert use_fast_crc() and record_writer.masked_crc32c is not reference
    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 8, 4096):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert record_writer.masked_crc32c(data) == reference(data)
    sink.add_scalars({"a": 1.5, "b": -2.0}, 3)
    sink.close()
    ev = read_events(tmp_path)
    assert ev.scalars["a"] == [(3, 1.5)] and ev.scalars["b"] == [(3, -2.0)]
