"""Tests of the background writer (:mod:`lightning_introspect.core.writer`): ordering, the backward window,
mail to the training thread, required jobs."""
from __future__ import annotations

import threading
import time

import pytest

from lightning_introspect.core.writer import AsyncWriter


def test_jobs_wait_for_the_window_then_run_in_order() -> None:
    """Test that once gated, jobs wait while the window is closed, run when it opens, in order."""
    w = AsyncWriter()
    ran: list[int] = []
    waiting = threading.Event()

    class _Watched(threading.Event):  # tells when the writer thread starts to wait for the window
        def wait(self, timeout: float | None = None) -> bool:
            waiting.set()
            return super().wait(timeout)

    w._open = _Watched()
    w.window(False)
    w.MAX_WINDOW_WAIT_S = 30.0
    for i in range(3):
        w.submit(lambda i=i: ran.append(i))
    assert waiting.wait(10)  # the thread holds the first job at the window
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
    w.MAX_WINDOW_WAIT_S = 3600.0  # a drain that did not open the window would outlast its own timeout
    ran: list[int] = []
    w.submit(lambda: ran.append(1))
    assert w.drain(timeout=60)
    assert ran == [1]
    w.close()
    assert w.drain(timeout=0)  # closed: nothing to wait for


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
