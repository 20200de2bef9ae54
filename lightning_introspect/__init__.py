"""lightning_introspect: see inside training while it runs.

Public names: :class:`Introspect` (the Lightning callback), :class:`WithIndex` (sample ids),
:class:`Introspector` and :class:`IntrospectConfig` (the torch-only core for plain loops),
:func:`find_label_issues` / :func:`label_quality_scores` (mislabel scoring on saved records).
"""
from .core.config import IntrospectConfig
from .core.contracts import set_default_publisher
from .core.introspector import Introspector
from .core.samples import WithIndex
from .core.scoring import Suspects, find_label_issues, label_quality_scores
from .publish import default_publisher

# The core publishes epochs through whatever the package gives it (it imports nothing above itself): an
# Introspector made in a plain loop writes records and pictures as one made by the callback.
set_default_publisher(default_publisher)

__all__ = [
    "Introspect", "IntrospectConfig", "Introspector", "Suspects", "ThresholdSamples", "WithIndex",
    "find_label_issues", "label_quality_scores",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:  # Lightning is imported only when the callback is asked for
    if name == "Introspect":
        from .callback import Introspect

        return Introspect
    if name == "ThresholdSamples":
        from .core.threshold import ThresholdSamples

        return ThresholdSamples
    raise AttributeError(f"module 'lightning_introspect' has no attribute {name!r}")
