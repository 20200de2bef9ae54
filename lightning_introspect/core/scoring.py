"""Mislabel scorers: per-example training-dynamics records in, ranked suspects out.

Numpy only. Records are the arrays that :class:`~lightning_introspect.core.samples.PerSampleStore` keeps
(one entry per sample id; the index into each array *is* the id) and writes to ``samples.npz``:

=====================  =======  ===================================================================
field                  dtype    meaning (sums run over the epochs in which the example was seen)
=====================  =======  ===================================================================
``seen_epochs``        int16    epochs in which the example appeared at least once
``label``              int32    given label (last seen); -1 if never seen
``loss_sum``           float32  sum of the epoch-mean loss
``margin_sum``         float32  sum of the epoch-mean margin: given-label logit minus largest other logit
``confidence_sum``     float32  sum of the epoch-mean probability of the given label
``confidence_sq_sum``  float32  sum of its square (for the variability across epochs)
``correct_epochs``     int16    epochs with epoch-mean correctness >= 0.5
``forgetting_events``  int16    correct -> incorrect transitions between consecutive seen epochs
``first_learned``      int16    first epoch in which it was correct; -1 if never
``last_correct``       int8     correctness in the latest seen epoch; -1 if never seen
=====================  =======  ===================================================================

Convention (as cleanlab): scores lie in [0, 1], **lower = more likely mislabeled**; examples never seen get
NaN and rank last.
"""
# CONTRACT STUB: filled in by the scoring work; signatures below are what the callback and report call.
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Optional, Sequence, Union

import numpy as np

Method = Literal["default", "loss", "aum", "confidence", "correctness", "forgetting"]
METHODS: tuple[str, ...] = ("default", "loss", "aum", "confidence", "correctness", "forgetting")


@dataclass(frozen=True)
class Suspects:
    """Examples ranked most suspect first.

    Attributes:
        ids: (K,) sample ids, most suspect first (only examples seen at least once).
        scores: (K,) label-quality scores in [0, 1], lower = more likely mislabeled.
        flagged: (K,) bool, the automatic (or given) cut.
        labels: (K,) given labels.
        columns: extra per-example figures for export (aum, confidence, variability, ...), each (K,).
        method: scorer used.  threshold: score at the cut.
    """

    ids: np.ndarray
    scores: np.ndarray
    flagged: np.ndarray
    labels: np.ndarray
    columns: Mapping[str, np.ndarray]
    method: str
    threshold: float


def label_quality_scores(records: Mapping[str, np.ndarray], *, method: str = "default") -> np.ndarray:
    """(N,) scores in [0, 1], lower = more likely mislabeled; NaN where never seen."""
    raise NotImplementedError


def find_label_issues(
    records: Mapping[str, np.ndarray],
    *,
    method: str = "default",
    cut: Union[Literal["auto"], float, int] = "auto",
    threshold_ids: Optional[Sequence[int]] = None,
) -> Suspects:
    """Rank seen examples most suspect first and flag them with an automatic cut (no noise rate needed).

    ``cut``: "auto"; a float in (0, 1) = flag scores below it; an int = flag the top k.
    ``threshold_ids``: ids of AUM threshold samples (fake class), see ``ThresholdSamples``; when given, the
    cut is the AUM threshold-samples procedure and those ids are left out of the ranking.
    """
    raise NotImplementedError
