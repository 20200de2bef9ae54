"""Shared test setup: every test starts from the same seeds, on one CPU thread."""
from __future__ import annotations

import random

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
