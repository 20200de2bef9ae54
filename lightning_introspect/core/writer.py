"""The background writer: the core's engine that runs folding, decoding and writing jobs on one thread, in
order, so that the training thread never waits for them."""
from __future__ import annotations

import queue
import threading
import warnings
from collections import deque
from typing import Callable, Deque, Optional


class AsyncWriter:
    """Runs writing jobs on one daemon thread, in order, so the training thread never waits for I/O.

    A failing job (a full disk, an unwritable directory) never reaches training: its error becomes a
    warning, raised once per kind of failure on the training thread at the next :meth:`poll`. When the
    queue is full the newest job is dropped and counted rather than blocking the step.
    """

    #: Longest a job waits for a window (see :meth:`window`) before it runs anyway: validation, a long data
    #: load or the end of training must not hold figures back.
    MAX_WINDOW_WAIT_S = 0.25
    #: Longest :meth:`drain` and a ``required`` :meth:`submit` wait for the writer thread. A writer that takes
    #: longer is stuck (a hung file system): training goes on, with a warning where figures may be missing.
    REQUIRED_WAIT_S = 60.0

    def __init__(self, max_pending: int = 256, name: str = "lightning-introspect-writer") -> None:
        self._queue: "queue.Queue[Optional[Callable[[], None]]]" = queue.Queue(maxsize=max_pending)
        self._gated = False
        self._open = threading.Event()
        self._is_open = False  # mirrors _open, which only the training thread sets and clears (no lock to read)
        self._closed = False
        #: Whether warnings or main-thread jobs wait for :meth:`poll` (a flag, so that a training step with
        #: nothing to do reads one attribute instead of calling). Set after each is queued, cleared before the
        #: queues are emptied: a spurious poll can happen, a lost one cannot.
        self.mail = False
        self._alerts: Deque[tuple[str, type, str]] = deque()
        self._main_thread_jobs: Deque[Callable[[], None]] = deque()
        self._warned: set[str] = set()
        self.dropped = 0
        self.failures = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None], *, required: bool = False) -> None:
        """Queues ``job`` for the writer thread. When the queue is full, an ordinary job is dropped (and
        counted); for a ``required`` one (records on disk, closing the sinks) the caller waits for room, so
        that it still runs after the jobs before it, and runs it on its own thread only when the writer has
        taken no job for ``REQUIRED_WAIT_S`` or is closed."""
        if required and (self._closed or not self._thread.is_alive()):
            self._execute(job)
            return
        try:
            if required:
                self._is_open = True
                self._open.set()  # the caller waits: no reason to hold jobs back
                self._queue.put(job, timeout=self.REQUIRED_WAIT_S)
            else:
                self._queue.put_nowait(job)
        except queue.Full:
            if required:
                self._execute(job)
                return
            self.dropped += 1
            if self.dropped == 1:
                self.alert(
                    "lightning_introspect: the writer fell behind and dropped a batch of figures; sample less "
                    "often (`every_n_steps`) or log fewer statistics.", RuntimeWarning,
                )

    def offer(self, job: Callable[[], None]) -> bool:
        """Queues ``job`` for the writer thread if it runs and its queue has room; returns whether it did. A
        job offered and refused is the caller's to run (the per-example reduces: :mod:`~lightning_introspect.core.dynamics`)."""
        if self._closed or not self._thread.is_alive():
            return False
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            return False
        return True

    def busy(self) -> bool:
        """Whether a submitted job is queued or running (cheap; read without a lock)."""
        return self._queue.unfinished_tasks > 0 and not self._closed

    def window(self, is_open: bool) -> None:
        """Jobs run while the window is open (the training thread says when: during the backward pass, which
        runs mostly in C++) or after waiting ``MAX_WINDOW_WAIT_S``. Writing is Python and holds the GIL; run
        while the training thread runs Python (the loop, the forward pass), it makes that thread wait for the
        GIL, for up to the interpreter's switch interval each time. The backward pass takes the GIL too, if
        less often: jobs are kept short as well. Never called: no gating, jobs run at once."""
        self._gated = True
        if is_open:  # an Event's set and clear take a lock: only when a job can use the window
            if self._queue.unfinished_tasks and not self._is_open:
                self._is_open = True
                self._open.set()
        elif self._is_open:
            self._is_open = False
            self._open.clear()

    def alert(self, message: str, category: type = UserWarning, *, key: Optional[str] = None) -> None:
        """Queues a warning for the training thread (thread-safe). Warnings with the same ``key`` (default: the
        message's start) are raised once; later ones are dropped (TensorBoard's alert texts keep every event)."""
        self._alerts.append((message, category, key or message[:80]))
        self.mail = True

    def on_main_thread(self, job: Callable[[], None]) -> None:
        """Queues a job (e.g. forwarding scalars to a Lightning logger) for the next poll on the training thread."""
        self._main_thread_jobs.append(job)
        self.mail = True

    def poll(self) -> None:
        """On the training thread: emit pending warnings and run main-thread jobs. Cheap when there are none."""
        self.mail = False
        while self._alerts:
            message, category, key = self._alerts.popleft()
            if key not in self._warned:
                self._warned.add(key)
                warnings.warn(message, category, stacklevel=2)
        while self._main_thread_jobs:
            job = self._main_thread_jobs.popleft()
            try:
                job()
            except Exception as err:  # a broken logger must not break training
                self.alert(f"lightning_introspect: forwarding figures to a logger failed: {err!r}", RuntimeWarning)

    def drain(self, timeout: Optional[float] = None) -> bool:
        """Blocks until every submitted job ran (flush points: epoch end, teardown, checkpoint); returns
        whether they did, False after ``timeout`` (default ``REQUIRED_WAIT_S``) with jobs still pending."""
        timeout = self.REQUIRED_WAIT_S if timeout is None else timeout
        if not self._thread.is_alive() or not self._queue.unfinished_tasks:
            # closed, or every job submitted so far has run (jobs are submitted from this thread, and the
            # count drops after a job ran): no round trip through the writer thread, whose wake-up a step pays
            self.poll()
            return True
        done = threading.Event()
        self._is_open = True
        self._open.set()  # the training thread waits here: no reason to hold jobs back
        try:
            self._queue.put(done.set, timeout=timeout)
        except queue.Full:
            return False
        finished = done.wait(timeout)
        self.poll()
        return finished

    def close(self) -> None:
        if self._thread.is_alive():
            self.drain()
            try:
                self._queue.put(None, timeout=self.REQUIRED_WAIT_S)
            except queue.Full:
                pass
            self._thread.join(timeout=30)
            if self._thread.is_alive():
                self.alert(
                    "lightning_introspect: the writer thread was still busy when training ended (a slow or hung "
                    "log directory); figures it had not written yet may be missing.", RuntimeWarning,
                )
        self._closed = True
        self.poll()

    def _execute(self, job: Callable[[], None]) -> None:
        """Runs one job; its error becomes a warning (see the class docstring)."""
        try:
            job()
        except Exception as err:
            self.failures += 1
            self.alert(
                f"lightning_introspect could not write figures ({type(err).__name__}: {err}); training goes on "
                "and figures already written are kept. Check free space and permissions of the log dir.",
                RuntimeWarning,
            )

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                self._queue.task_done()
                return
            if self._gated:
                self._open.wait(self.MAX_WINDOW_WAIT_S)
            try:
                self._execute(job)
            finally:
                self._queue.task_done()
