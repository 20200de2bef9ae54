"""Tests for the writer thread's window and the TensorBoard sink's wire encoding, with real threads and protos."""
from __future__ import annotations

import math
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers.tb import read_events
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary

from lightning_introspect.sinks import AsyncWriter, TensorBoardSink
from lightning_introspect.sinks.tensorboard import _event_wire, _histogram_value_wire


def test_jobs_wait_for_the_window_then_run_in_order() -> None:
    """Test that once gated, jobs wait while the window is closed, run when it opens, in order."""
    w = AsyncWriter()
    ran: list[int] = []
    w.window(False)
    w.MAX_WINDOW_WAIT_S = 5.0
    for i in range(3):
        w.submit(lambda i=i: ran.append(i))
    time.sleep(0.2)
    assert ran == []  # held back
    w.window(True)
    deadline = time.monotonic() + 5
    while len(ran) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ran == [0, 1, 2]
    w.close()


def test_a_closed_window_delays_a_job_at_most_the_wait_and_drain_does_not_wait() -> None:
    """Test that a job never opened for still runs after MAX_WINDOW_WAIT_S, and that drain runs jobs at once."""
    w = AsyncWriter()
    w.window(False)
    done = threading.Event()
    t0 = time.monotonic()
    w.submit(done.set)
    assert done.wait(5)
    assert time.monotonic() - t0 >= w.MAX_WINDOW_WAIT_S * 0.9
    w.window(False)
    w.MAX_WINDOW_WAIT_S = 30.0
    ran: list[int] = []
    w.submit(lambda: ran.append(1))
    t0 = time.monotonic()
    w.drain()
    assert ran == [1] and time.monotonic() - t0 < 5
    w.close()
    t0 = time.monotonic()
    w.drain()  # closed: returns at once
    assert time.monotonic() - t0 < 1


def test_drain_waits_for_a_running_job_and_an_idle_drain_leaves_the_window_shut() -> None:
    """Test that drain returns only once a running job has finished, and that a drain with nothing queued or
    running (the common case at a checkpoint or an epoch end) makes no round trip through the writer thread: it
    leaves a gated writer's window shut, so that the next job still waits for a backward pass, and still
    emits the warnings that finished jobs left."""
    w = AsyncWriter()
    started, release = threading.Event(), threading.Event()
    finished: list[int] = []

    def job() -> None:
        started.set()
        release.wait(5)
        finished.append(1)

    w.submit(job)
    assert started.wait(5)
    threading.Timer(0.2, release.set).start()
    w.drain()
    assert finished == [1]

    w.window(False)
    w.MAX_WINDOW_WAIT_S = 0.05
    w.submit(lambda: w.alert("disk full", RuntimeWarning))
    deadline = time.monotonic() + 5
    while w.busy() and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.warns(RuntimeWarning, match="disk full"):
        w.drain()
    assert not w._open.is_set() and not w._is_open
    w.close()


def test_busy_while_a_job_is_queued_or_running_and_not_after() -> None:
    """Test that ``busy`` (which the overhead budget reads at each step start) is true from submit until the
    job has finished, including a job that failed, and false once closed."""
    w = AsyncWriter()
    assert not w.busy()
    release, started = threading.Event(), threading.Event()

    def job() -> None:
        started.set()
        release.wait(5)

    w.submit(job)
    assert w.busy()
    assert started.wait(5)
    assert w.busy()  # running
    release.set()
    w.drain()
    assert not w.busy()
    w.submit(lambda: 1 / 0)
    w.drain()
    assert not w.busy() and w.failures == 1
    w.close()
    assert not w.busy()


def test_mail_from_the_writer_thread_is_flagged_until_the_training_thread_polls() -> None:
    """Test that a warning and, separately, a main-thread job queued by a writer job each raise ``mail`` (the one
    attribute a training step reads before it calls ``poll``), that ``poll`` then emits the warning once and runs
    the job on the training thread, and that ``mail`` is down again afterwards."""
    w = AsyncWriter()
    assert not w.mail
    ran: list[int] = []

    def settle() -> None:
        deadline = time.monotonic() + 5
        while w.busy() and time.monotonic() < deadline:
            time.sleep(0.01)

    def warn_twice() -> None:
        w.alert("disk full", RuntimeWarning)
        w.alert("disk full", RuntimeWarning)  # the same key: raised once

    w.submit(warn_twice)
    settle()
    assert w.mail
    with pytest.warns(RuntimeWarning, match="disk full") as caught:
        w.poll()
    assert len(caught) == 1 and not w.mail

    w.submit(lambda: w.on_main_thread(lambda: ran.append(threading.get_ident())))
    settle()
    assert w.mail and ran == []
    w.poll()
    assert ran == [threading.get_ident()] and not w.mail
    w.close()


def test_a_required_job_runs_on_the_callers_thread_when_the_queue_is_full_or_the_writer_closed() -> None:
    """Test that an ordinary job is dropped (and counted) when the queue is full while a ``required`` one runs
    at once on the caller's thread, as it does after ``close``; queued jobs still run in order."""
    w = AsyncWriter(max_pending=1)
    release = threading.Event()
    where: list[tuple[str, int]] = []
    w.submit(release.wait)  # taken by the thread: it blocks there
    deadline = time.monotonic() + 5
    while w._queue.qsize() and time.monotonic() < deadline:
        time.sleep(0.01)
    w.submit(lambda: where.append(("queued", threading.get_ident())))  # fills the queue
    w.submit(lambda: where.append(("dropped", threading.get_ident())))
    w.submit(lambda: where.append(("required", threading.get_ident())), required=True)
    assert where == [("required", threading.get_ident())] and w.dropped == 1
    release.set()
    with pytest.warns(RuntimeWarning, match="dropped"):
        w.drain()
    assert [k for k, _ in where] == ["required", "queued"] and where[1][1] != threading.get_ident()
    w.close()
    w.submit(lambda: where.append(("closed", threading.get_ident())), required=True)
    w.submit(lambda: where.append(("closed, dropped", threading.get_ident())))
    assert where[-1] == ("closed", threading.get_ident())


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
