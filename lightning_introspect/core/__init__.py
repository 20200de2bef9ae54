"""Torch-only core: hooks, schedule, statistics, per-example store, scoring. Never imports Lightning."""
from .config import DEFAULT_LAYER_TYPES, IntrospectConfig
from .hooks import HookSet, select_layers
from .introspector import Introspector
from .samples import PerSampleStore, WithIndex, classification_figures, sequence_figures
from .schedule import SamplingSchedule
from .gradients import GradNorms
from .stats import LayerStats, histogram_counts, histogram_edges

__all__ = [
    "DEFAULT_LAYER_TYPES", "GradNorms", "HookSet", "IntrospectConfig", "Introspector", "LayerStats",
    "PerSampleStore", "SamplingSchedule", "WithIndex", "classification_figures", "histogram_counts",
    "histogram_edges", "select_layers", "sequence_figures",
]
