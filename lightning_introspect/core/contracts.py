"""What the core hands to the layers above it: the :class:`Sink` protocol (every method the core calls on a
sink), the epoch :class:`Publisher` protocol and the records of an epoch it publishes. Declared here so that
the core depends on nothing above it; sinks and publishers implement them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, NamedTuple, Optional, Protocol, Sequence

import numpy as np

from .config import IntrospectConfig

# Optional epoch-end pictures (the data map, the suspects table) are redrawn only while they take at most this
# share of the wall time since the last redraw: drawn on the writer thread, they still hold the GIL and slow
# training about as much as they take (see docs/decisions.md). The last epoch's picture is always drawn.
EXTRAS_DUTY = 0.01


class LayerHistograms(NamedTuple):
    """Bucket counts of the sampled activations of several layers, one row each, on the fixed edges of
    :func:`~lightning_introspect.core.stats.histogram_edges`; a sink turns them into its own format."""

    tags: list[str]
    hist: np.ndarray  # (L, BINS) bucket counts of a strided subsample
    mins: np.ndarray  # (L, 2) [min, -max]
    sums: np.ndarray  # (L, 4) [sum, sum of squares, zeros, non-finite] over all subsampled elements
    counts: np.ndarray  # (L,) subsampled elements
    edges: np.ndarray  # (BINS + 1,) bucket edges


class Sink(Protocol):
    """Receives host values (never tensors). Called from the writer thread only."""

    def add_layout(self, config: IntrospectConfig) -> None:
        """Called once, before the first figures: what the run records (a sink may lay out charts by it)."""

    def add_scalars(self, values: Mapping[str, float], step: int) -> None: ...

    def add_layer_histograms(self, histograms: LayerHistograms, step: int) -> None: ...

    def add_histogram(self, tag: str, values: np.ndarray, step: int) -> None: ...

    def add_image(self, tag: str, image_hwc: np.ndarray, step: int) -> None: ...

    def add_text(self, tag: str, text: str, step: int) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class EpochOutput:
    """One epoch's per-example results, as the core hands them to a :class:`Publisher` (writer thread)."""

    records: dict[str, np.ndarray]  # the per-example aggregates (host arrays)
    means: Optional[dict[str, np.ndarray]]  # this epoch's per-example means, where the writer computed them
    meta: dict[str, Any]  # the records' metadata, written beside them
    epoch: int
    step: int
    scalars: dict[str, float]  # the epoch's scalars so far (learned and forgotten fractions)
    threshold_ids: Optional[np.ndarray]


class Publisher(Protocol):
    """Writes an epoch's outputs (records on disk, suspects, pictures) to files and sinks, on the writer
    thread. The core computes; a publisher writes."""

    def publish_epoch(self, out: EpochOutput, sinks: Sequence[Sink]) -> dict[str, float]:
        """Writes the epoch; returns its scalars (``out.scalars`` and any it added), already sent to ``sinks``."""

    def finish(self, sinks: Sequence[Sink]) -> None:
        """At close: whatever an epoch deferred (e.g. a picture skipped to save time) is written now."""


class NoPublisher:
    """Writes the epoch's scalars and nothing else (no files, no pictures)."""

    def publish_epoch(self, out: EpochOutput, sinks: Sequence[Sink]) -> dict[str, float]:
        for sink in sinks:
            sink.add_scalars(out.scalars, out.step)
            sink.flush()
        return out.scalars

    def finish(self, sinks: Sequence[Sink]) -> None:
        pass


PublisherFactory = Callable[[IntrospectConfig, Optional[Any], Optional[Sequence[str]]], Publisher]
_default_factory: Optional[PublisherFactory] = None


def set_default_publisher(factory: Optional[PublisherFactory]) -> None:
    """Sets what an :class:`~lightning_introspect.core.Introspector` made without ``publisher=`` publishes
    with: ``factory(config, records_dir, class_names)``. The package registers its records-and-pictures
    publisher when it is imported; None falls back to :class:`NoPublisher`."""
    global _default_factory
    _default_factory = factory


def default_publisher(
    config: IntrospectConfig, records_dir: Optional[Any], class_names: Optional[Sequence[str]]
) -> Publisher:
    """The publisher of an Introspector made without one (see :func:`set_default_publisher`)."""
    if _default_factory is None:
        return NoPublisher()
    return _default_factory(config, records_dir, class_names)
