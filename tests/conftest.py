"""Shared test setup: every test starts from the same seeds, on one CPU thread."""
from __future__ import annotations

import random
import threading
from typing import Iterator

import numpy as np
import pytest
import torch

#: tests/helpers holds importable helpers and scripts that subprocess tests run, never tests to collect.
collect_ignore = ["helpers"]


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    """Seed Python, NumPy and torch, and use one thread (the test machine's cores are shared)."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    torch.set_num_threads(1)



def _writer_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("lightning-introspect") and t.is_alive()}


@pytest.fixture(autouse=True)
def _no_writer_thread_left() -> Iterator[None]:
    """Fail a test that leaves a writer thread of its own running: every run must close what it started."""
    before = _writer_threads()
    yield
    left = _writer_threads() - before
    if left:
        pytest.fail(f"the test left {len(left)} writer thread(s) running: close the Introspector / finish the fit")
