"""The Sink protocol (what the core calls on a sink); ``AsyncWriter`` is re-exported from the core."""
from __future__ import annotations

from typing import Mapping, Protocol, Sequence

import numpy as np

from ..core.writer import AsyncWriter

__all__ = ["AsyncWriter", "Sink"]


class Sink(Protocol):
    """Receives host values (never tensors). Called from the writer thread only."""

    def add_scalars(self, values: Mapping[str, float], step: int) -> None: ...

    def add_histogram_raw(
        self, tag: str, step: int, *, min: float, max: float, num: float, sum: float, sum_squares: float,
        bucket_limits: Sequence[float], bucket_counts: Sequence[float],
    ) -> None: ...

    def add_histogram(self, tag: str, values: np.ndarray, step: int) -> None: ...

    def add_image(self, tag: str, image_hwc: np.ndarray, step: int) -> None: ...

    def add_text(self, tag: str, text: str, step: int) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...
