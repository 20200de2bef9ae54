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
``suggested_label``    int32    optional: the majority vote of the epochs' best other class; -1 if none
``suggested_votes``    int16    optional: the vote's counter (Boyer-Moore), 0 if no vote
=====================  =======  ===================================================================

The per-step figures come from the training forward pass (train mode, the minibatch logits computed before
that step's optimizer update): loss = cross-entropy of the given label, margin = given-label logit minus the
largest other logit, confidence = softmax probability of the given label, correctness = 1 if the argmax is
the given label else 0. At each epoch end, every example seen in that epoch (epoch index ``e``, 0-based)
has its epoch means ``l, m, p, c`` of those figures folded in; :func:`fold_epoch` is the executable numpy
reference of that update::

    seen_epochs += 1;  label = given label;  loss_sum += l;  margin_sum += m
    confidence_sum += p;  confidence_sq_sum += p * p;  k = (c >= 0.5);  correct_epochs += k
    forgetting_events += (last_correct == 1 and not k);  first_learned = e if first_learned == -1 and k
    last_correct = k
    # o = the best class other than the given label (the runner-up of the margin), from the epoch's logits
    if suggested_votes == 0: suggested_label = o; suggested_votes = 1
    elif suggested_label == o: suggested_votes += 1
    else: suggested_votes -= 1

The suggested label is thus a running majority vote over the epochs (Boyer-Moore): the class that was the
runner-up in more than half of the epochs whenever one was, else a recent runner-up. It takes O(1) memory per
example whatever the number of classes. For a flipped example the runner-up is the true class both before the
network memorises the wrong label (the true class wins, the given label is not in the running) and after it
(the true class comes second), so the vote recovers the true class; for a clean example it is merely the
closest other class, which is why it is the label to relabel a *flagged* example to.

Scores (convention as cleanlab): they lie in [0, 1], **lower = more likely mislabeled**; examples never seen
get NaN and rank last. With ``n = seen_epochs``:

================  ==============================================================  =====================
method            score                                                            automatic cut
================  ==============================================================  =====================
``"default"``     ``(correct_epochs + sigmoid(AUM)) / (n + 1)`` from              score < 0.5, or Otsu
                  ``MIN_EPOCHS`` epochs on (the run's largest ``n``), else as     (see below); abstains
                  ``"aum"``; see below                                             on thin evidence
``"aum"``         ``sigmoid(margin_sum / n)``: area under the margin, Pleiss et    score < 0.5 (AUM < 0)
                  al. 2020; 0.5 = the given label ties the best other class
``"loss"``        ``exp(-loss_sum / n)``: geometric-mean given-label probability   Otsu on the scores
``"confidence"``  ``confidence_sum / n``: data-maps confidence, Swayamdipta et     Otsu on the scores
                  al. 2020
``"correctness"`` ``correct_epochs / n``: fraction of epochs correct               score < 0.5
``"forgetting"``  0 if never learned, else ``2**-f * (1 - t / 2)`` with ``f`` the  Otsu on the scores
                  forgetting events (Toneva et al. 2019) and ``t =
                  first_learned / n`` clipped to [0, 1): more forgetting, then
                  later learning, is more suspect
================  ==============================================================  =====================

Why ``"default"`` counts epochs: a network that memorises a wrong label ends with a large margin on it, which
pulls its AUM up in proportion to the epochs after memorisation, while the epochs in which the given label
lost are what sets it apart from a clean example; AUM (in [0, 1] after the sigmoid, so it never outweighs one
epoch) breaks the count's ties. Below ``MIN_EPOCHS`` the count is too coarse to rank by and the default is
AUM. On the 40-epoch runs of ``benchmarks/mislabeled.py --grid`` it had a higher mean AP than every single
scorer for the MLP at every noise setting and for the CNN at 20 and 40 % pairwise noise; for the CNN's other
four settings AUM was ahead by at most 0.0017 AP.

The default's automatic cut flags ``score < 0.5`` (the given label lost in most epochs), moved up to Otsu's
threshold when the scores split into two clear groups (separability >= ``SEPARATED``) of which the lower one
lost on average. It abstains (flags nothing, :attr:`Suspects.abstained` says why) when the run gives too
little evidence: fewer than ``MIN_EPOCHS`` epochs, a cut that would flag more than half of the examples, or
a last-epoch accuracy below ``MIN_FIT`` on the examples the cut keeps; any automatic cut of the other methods
abstains on the same grounds. ``"aum"``'s cut uses its natural zero, ``"loss"`` and ``"confidence"`` have none
and use Otsu's threshold.

With AUM threshold samples (``threshold_ids``, see :class:`~lightning_introspect.core.threshold.
ThresholdSamples`) the cut is Pleiss et al.'s: the 99th percentile of the threshold samples' scores; seen
examples scoring strictly below it are flagged, and the threshold samples themselves are not ranked.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, MutableMapping, Optional, Sequence, Union

import numpy as np

Method = Literal["default", "loss", "aum", "confidence", "correctness", "forgetting"]
METHODS: tuple[str, ...] = ("default", "loss", "aum", "confidence", "correctness", "forgetting")

#: Record fields and the dtype the callback writes; inputs may use any integer / floating width.
FIELDS: dict[str, np.dtype] = {
    "seen_epochs": np.dtype(np.int16),
    "label": np.dtype(np.int32),
    "loss_sum": np.dtype(np.float32),
    "margin_sum": np.dtype(np.float32),
    "confidence_sum": np.dtype(np.float32),
    "confidence_sq_sum": np.dtype(np.float32),
    "correct_epochs": np.dtype(np.int16),
    "forgetting_events": np.dtype(np.int16),
    "first_learned": np.dtype(np.int16),
    "last_correct": np.dtype(np.int8),
}

# Scores at or above which nothing is flagged by the natural-zero cut of these methods.
#: Optional record fields (absent from records written before they existed; read as "no vote").
OPTIONAL_FIELDS: dict[str, np.dtype] = {
    "suggested_label": np.dtype(np.int32),
    "suggested_votes": np.dtype(np.int16),
}

_NATURAL_ZERO: dict[str, float] = {"default": 0.5, "aum": 0.5, "correctness": 0.5}
_THRESHOLD_PERCENTILE = 99.0
#: Fewest epochs for the epoch count to rank by and for the automatic cut to flag (see the module docstring).
MIN_EPOCHS = 5
#: Least last-epoch training accuracy, on the examples the cut keeps, for the automatic cut to flag.
MIN_FIT = 0.95
#: Otsu separability at or above which the default's cut moves up to Otsu's threshold (two clear groups).
SEPARATED = 0.8
#: Dataset Cartography thresholds: std of the epoch-mean confidence at or above which an example is
#: ambiguous, and mean confidence below which a not-ambiguous one is hard to learn.
AMBIGUOUS_VARIABILITY = 0.2
HARD_CONFIDENCE = 0.5


@dataclass(frozen=True)
class Suspects:
    """Examples ranked most suspect first.

    Attributes:
        ids: (K,) sample ids, most suspect first (only examples seen at least once, threshold samples
            excluded); ties keep ascending id order.
        scores: (K,) label-quality scores in [0, 1], lower = more likely mislabeled.
        flagged: (K,) bool, the automatic (or given) cut; always a prefix of the ranking.
        labels: (K,) given labels.
        columns: extra per-example figures for export, each (K,): ``aum`` (mean margin),
            ``confidence_mean``, ``variability`` (std of the epoch-mean confidence across epochs),
            ``correct_fraction``, ``forgetting_events``, ``first_learned``, ``loss_mean``, ``seen_epochs``.
        method: scorer used.
        threshold: score at the cut. Auto, float and threshold-sample cuts flag ``scores < threshold``; an
            int cut ``k`` reports the k-th score (NaN when nothing is flagged).
        suggested_labels: (K,) the label the run's dynamics favour over the given one (the majority vote of
            each epoch's best other class, see the module docstring): what to relabel a flagged example to.
            -1 where there was no vote (sequence or regression records, records without the field); None
            when unknown.
        num_classes: the number of classes, when known (else taken from the labels for :attr:`pred_probs`).
        noise_rate: the estimated share of mislabeled examples among the ranked ones: the share below the
            method's natural cut (default, ``aum``, ``correctness``), else the flagged share; NaN when the
            automatic cut abstains (the run gives too little evidence for an estimate).
        abstained: None when the automatic cut flagged; else why it flagged nothing (the run gives too little
            evidence: too few epochs, or a model that does not fit the examples it keeps) and what to do.
        regions: (K,) str, the Dataset Cartography region of each example (``easy``, ``ambiguous``, ``hard``)
            or ``mislabeled`` for a flagged one; see :func:`cartography_regions`. None when unknown.
    """

    ids: np.ndarray
    scores: np.ndarray
    flagged: np.ndarray
    labels: np.ndarray
    columns: Mapping[str, np.ndarray]
    method: str
    threshold: float
    suggested_labels: Optional[np.ndarray] = None
    num_classes: Optional[int] = None
    noise_rate: float = float("nan")
    abstained: Optional[str] = None
    regions: Optional[np.ndarray] = None

    @property
    def flagged_share(self) -> float:
        """Flagged / ranked examples (NaN when nothing is ranked)."""
        return float(np.count_nonzero(self.flagged) / self.ids.size) if self.ids.size else float("nan")

    @property
    def flagged_ids(self) -> np.ndarray:
        """(F,) ids of the flagged examples, most suspect first."""
        return self.ids[self.flagged]

    @property
    def pred_probs(self) -> np.ndarray:
        """(K, C) float32 class probabilities per example, rows in the order of :attr:`ids`, for tools that take
        ``pred_probs`` (``cleanlab.filter.find_label_issues(suspects.labels, suspects.pred_probs)``).

        They are a summary of the in-sample training dynamics, not out-of-fold predictions: the given label
        gets its mean softmax probability over the epochs (``columns["confidence_mean"]``) and the rest goes
        to the suggested label (spread evenly over the other classes where there is none). The store keeps
        O(1) figures per example, not a probability per class, so every other class gets 0; the cost is none
        (computed here from the records). For cleanlab's own procedure train out-of-fold instead.

        Raises:
            ValueError: the labels are not classes (sequence or regression records), ``confidence_mean`` is
                missing from :attr:`columns`, or there are fewer than 2 classes.
        """
        labels = np.asarray(self.labels, dtype=np.int64)
        if labels.size and labels.min() < 0:
            raise ValueError(
                "`pred_probs` needs a class label per example; these suspects come from sequence or regression "
                "records (labels -1)."
            )
        if "confidence_mean" not in self.columns:
            raise ValueError("`pred_probs` needs `columns['confidence_mean']`, as `find_label_issues` gives it.")
        suggested = (np.full(labels.shape, -1, np.int64) if self.suggested_labels is None
                     else np.asarray(self.suggested_labels, dtype=np.int64))
        C = self.num_classes
        if C is None:
            C = int(max(labels.max(initial=-1), suggested.max(initial=-1))) + 1
        if C < 2 or (labels.size and max(labels.max(), suggested.max()) >= C):
            raise ValueError(
                f"`pred_probs` needs num_classes >= 2 above every label, got num_classes={C} with labels up to "
                f"{labels.max(initial=-1)}; pass `num_classes=` to `find_label_issues`."
            )
        p = np.clip(np.nan_to_num(np.asarray(self.columns["confidence_mean"], dtype=np.float64)), 0.0, 1.0)
        rows = np.arange(labels.size)
        has = suggested >= 0
        probs = np.where(has[:, None], 0.0, ((1.0 - p) / (C - 1))[:, None]) * np.ones((1, C))
        probs[rows[has], suggested[has]] = 1.0 - p[has]
        probs[rows, labels] = p
        return probs.astype(np.float32)

    def class_view(self) -> "ClassView":
        """Per-class view of the flagged examples: noise matrix, confused pairs, flagged share per class."""
        labels = np.asarray(self.labels, dtype=np.int64)
        suggested = (np.full(labels.shape, -1, np.int64) if self.suggested_labels is None
                     else np.asarray(self.suggested_labels, dtype=np.int64))
        C = self.num_classes or int(max(labels.max(initial=-1), suggested.max(initial=-1))) + 1
        ok = (labels >= 0) & (labels < C)
        seen = np.bincount(labels[ok], minlength=C)[:C]
        flagged = np.asarray(self.flagged, dtype=bool)
        per_class = np.bincount(labels[ok & flagged], minlength=C)[:C]
        pair = ok & flagged & (suggested >= 0) & (suggested < C)
        matrix = np.zeros((C, C), dtype=np.int64)
        np.add.at(matrix, (labels[pair], suggested[pair]), 1)
        return ClassView(noise_matrix=matrix, seen=seen.astype(np.int64), flagged=per_class.astype(np.int64))

    def to_pandas(self) -> "Any":
        """The table as a ``pandas.DataFrame`` indexed by sample id (``id``), most suspect first: ``score``,
        ``flagged``, ``label``, ``suggested_label``, ``region``, then every entry of :attr:`columns`.

        Raises:
            ImportError: pandas is not installed (it is optional).
        """
        try:
            import pandas as pd
        except ImportError as err:
            raise ImportError(
                "`Suspects.to_pandas()` needs pandas, which is not installed: `pip install pandas`. Without it "
                "the same table is in the arrays (`ids`, `scores`, `flagged`, `labels`, `suggested_labels`, "
                "`columns`) and in suspects.csv."
            ) from err
        data: dict[str, np.ndarray] = {"score": np.asarray(self.scores), "flagged": np.asarray(self.flagged),
                                       "label": np.asarray(self.labels)}
        if self.suggested_labels is not None:
            data["suggested_label"] = np.asarray(self.suggested_labels)
        if self.regions is not None:
            data["region"] = np.asarray(self.regions)
        data.update({name: np.asarray(col) for name, col in self.columns.items() if name not in data})
        return pd.DataFrame(data, index=pd.Index(np.asarray(self.ids), name="id"))


@dataclass(frozen=True)
class ClassView:
    """The flagged examples by class (from :meth:`Suspects.class_view`).

    Attributes:
        noise_matrix: (C, C) int64, row = given label, column = suggested label: how many flagged examples
            of each given class the run's dynamics assign to each other class; an estimate of the label-noise
            transitions (flagged examples without a suggestion are left out, so rows may sum to less than
            ``flagged``). The diagonal is 0: the suggestion is never the given label.
        seen: (C,) ranked (seen) examples per given label.
        flagged: (C,) flagged examples per given label.
    """

    noise_matrix: np.ndarray
    seen: np.ndarray
    flagged: np.ndarray

    @property
    def flagged_share(self) -> np.ndarray:
        """(C,) flagged / seen per given label; NaN for a class with no example."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.seen > 0, self.flagged / np.maximum(self.seen, 1), np.nan)

    def top_pairs(self, k: int = 5) -> list[tuple[int, int, int]]:
        """The ``k`` most frequent (given, suggested, count) pairs among the flagged examples, most first
        (ties: lower given label, then lower suggested label); pairs with no example are left out."""
        flat = self.noise_matrix.reshape(-1)
        order = np.argsort(-flat, kind="stable")[: max(int(k), 0)]
        C = self.noise_matrix.shape[0]
        return [(int(i // C), int(i % C), int(flat[i])) for i in order if flat[i] > 0]

    def to_markdown(self, class_names: Optional[Sequence[str]] = None, *, top: int = 5,
                    max_classes: int = 20, matrix: bool = False) -> str:
        """Markdown: the most confused pairs, the flagged share of the classes with the highest share (at
        most ``max_classes``), and with ``matrix`` the full noise matrix when there are at most
        ``max_classes`` classes."""
        C = self.noise_matrix.shape[0]

        def name(label: int) -> str:
            if class_names is not None and 0 <= label < len(class_names):
                return str(class_names[label])
            return str(label)

        lines = [f"**Most confused class pairs** (given label -> suggested label, over {int(self.flagged.sum())} "
                 "flagged examples)", ""]
        pairs = self.top_pairs(top)
        if pairs:
            lines += ["| given | suggested | flagged | share of the given class |", "|:---|:---|---:|---:|"]
            for g, sug, n in pairs:
                share = n / self.seen[g] if self.seen[g] else float("nan")
                lines.append(f"| {name(g)} | {name(sug)} | {n} | {share:.1%} |")
        else:
            lines.append("No flagged example has a suggested label.")
        share = self.flagged_share
        order = np.argsort(-np.nan_to_num(share, nan=-1.0), kind="stable")[:max_classes]
        shown = "" if C <= max_classes else f" (the {max_classes} highest of {C} classes)"
        lines += ["", f"**Flagged share per given label**{shown}", "", "| class | seen | flagged | share |",
                  "|:---|---:|---:|---:|"]
        for c in order.tolist():
            if self.seen[c]:
                lines.append(f"| {name(c)} | {int(self.seen[c])} | {int(self.flagged[c])} | {share[c]:.1%} |")
        if matrix and C <= max_classes:
            lines += ["", "**Estimated noise matrix** (flagged examples; row = given label, column = suggested "
                      "label)", "", "| given / suggested | " + " | ".join(name(c) for c in range(C)) + " |",
                      "|:---|" + "---:|" * C]
            for g in range(C):
                lines.append(f"| {name(g)} | " + " | ".join(str(int(v)) for v in self.noise_matrix[g]) + " |")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- records
def init_records(num_samples: int) -> dict[str, np.ndarray]:
    """Empty records for ``num_samples`` ids, in the dtypes of the ``samples.npz`` contract.

    Args:
        num_samples: number of sample ids (the dataset length).

    Returns:
        A dict of (N,) arrays: zeros, with ``label``, ``first_learned`` and ``last_correct`` at -1.

    Raises:
        ValueError: if ``num_samples`` is not a non-negative int.

    Example:
        >>> records = init_records(3)
        >>> records["first_learned"]
        array([-1, -1, -1], dtype=int16)
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 0:
        raise ValueError(f"`num_samples` must be a non-negative int, got {num_samples!r}.")
    records = {name: np.zeros(int(num_samples), dtype=dtype) for name, dtype in {**FIELDS, **OPTIONAL_FIELDS}.items()}
    for name in ("label", "first_learned", "last_correct", "suggested_label"):
        records[name][:] = -1
    return records


def fold_epoch(
    records: MutableMapping[str, np.ndarray],
    epoch: int,
    ids: np.ndarray,
    labels: np.ndarray,
    *,
    loss: np.ndarray,
    margin: np.ndarray,
    confidence: np.ndarray,
    correct: np.ndarray,
    other: Optional[np.ndarray] = None,
) -> None:
    """Fold one epoch's per-example means into ``records`` in place (the numpy reference of the contract).

    Args:
        records: records from :func:`init_records` (or a previous fold), modified in place.
        epoch: the epoch index (0-based), stored in ``first_learned``.
        ids: (M,) distinct ids of the examples seen in this epoch.
        labels: (M,) their given labels.
        loss: (M,) epoch-mean cross-entropy of the given label.
        margin: (M,) epoch-mean given-label logit minus the largest other logit.
        confidence: (M,) epoch-mean softmax probability of the given label.
        correct: (M,) epoch-mean correctness (argmax == given label), in [0, 1].
        other: (M,) the epoch's best class other than the given label (-1: no vote), voted into
            ``suggested_label``; ``records`` gets the optional fields when it lacks them.

    Raises:
        ValueError: on missing fields, ids out of range or repeated, or arrays of different lengths.

    Example:
        >>> records = init_records(2)
        >>> fold_epoch(records, 0, np.array([1]), np.array([4]), loss=np.array([0.1]),
        ...            margin=np.array([2.0]), confidence=np.array([0.9]), correct=np.array([1.0]))
        >>> records["seen_epochs"], records["first_learned"], records["label"]
        (array([0, 1], dtype=int16), array([-1,  0], dtype=int16), array([-1,  4], dtype=int32))
    """
    n = _validate_records(records)
    ids = np.asarray(ids)
    if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
        raise ValueError(f"`ids` must be a 1-D integer array, got shape {ids.shape} dtype {ids.dtype}.")
    if ids.size and (ids.min() < 0 or ids.max() >= n):
        raise ValueError(f"`ids` must lie in [0, {n}), got values in [{ids.min()}, {ids.max()}].")
    if len(np.unique(ids)) != len(ids):
        raise ValueError("`ids` must be distinct: average each example's figures over the epoch first.")
    arrays = {"labels": labels, "loss": loss, "margin": margin, "confidence": confidence, "correct": correct}
    if other is not None:
        arrays["other"] = other
    for name, value in arrays.items():
        if np.shape(value) != ids.shape:
            raise ValueError(f"`{name}` must have the shape of `ids` {ids.shape}, got {np.shape(value)}.")
    learned = np.asarray(correct) >= 0.5
    was_correct = records["last_correct"][ids] == 1
    records["seen_epochs"][ids] += 1
    records["label"][ids] = labels
    records["loss_sum"][ids] += loss
    records["margin_sum"][ids] += margin
    records["confidence_sum"][ids] += confidence
    records["confidence_sq_sum"][ids] += np.square(np.asarray(confidence, dtype=np.float64))
    records["correct_epochs"][ids] += learned
    records["forgetting_events"][ids] += was_correct & ~learned
    first = ids[learned & (records["first_learned"][ids] < 0)]
    records["first_learned"][first] = epoch
    records["last_correct"][ids] = learned
    if other is not None:
        for name, dtype in OPTIONAL_FIELDS.items():
            if name not in records:
                records[name] = np.full(n, -1 if name == "suggested_label" else 0, dtype=dtype)
        other = np.asarray(other).astype(np.int64)
        voters, votes = ids[other >= 0], other[other >= 0]
        count = records["suggested_votes"][voters].astype(np.int64)
        take = count == 0
        same = ~take & (records["suggested_label"][voters] == votes)
        records["suggested_label"][voters] = np.where(take, votes, records["suggested_label"][voters])
        records["suggested_votes"][voters] = count + take + same - (~take & ~same)


# ------------------------------------------------------------------------------------------------ scores
def label_quality_scores(records: Mapping[str, np.ndarray], *, method: str = "default") -> np.ndarray:
    """Label-quality score of every id: lower = more likely mislabeled.

    Args:
        records: the per-example records (a dict of (N,) arrays, or ``np.load("samples.npz")``).
        method: one of :data:`METHODS`; the mappings to [0, 1] are in the module docstring.

    Returns:
        (N,) float64 scores in [0, 1]; NaN where the example was never seen. A seen example whose sums are
        not finite (a diverged loss) scores 0, so it is flagged rather than hidden.

    Raises:
        ValueError: on an unknown method, missing fields, arrays of different lengths or a wrong dtype.

    Example:
        >>> records = init_records(3)
        >>> for epoch in range(2):
        ...     fold_epoch(records, epoch, np.array([0, 1]), np.array([0, 1]),
        ...                loss=np.array([0.05, 2.0]), margin=np.array([3.0, -1.0]),
        ...                confidence=np.array([0.95, 0.1]), correct=np.array([1.0, 0.0]))
        >>> label_quality_scores(records, method="aum").round(3)
        array([0.953, 0.269,   nan])
        >>> label_quality_scores(records, method="correctness")
        array([ 1.,  0., nan])
    """
    _validate_method(method)
    _validate_records(records)
    return _compute_scores(records, method)


def _compute_scores(records: Mapping[str, np.ndarray], method: str) -> np.ndarray:
    seen = records["seen_epochs"] > 0
    n = np.maximum(records["seen_epochs"].astype(np.float64), 1.0)
    with np.errstate(over="ignore", invalid="ignore"):
        # sigmoid via tanh: no overflow for large |AUM|.
        aum = 0.5 * (1.0 + np.tanh(0.5 * records["margin_sum"].astype(np.float64) / n))
        epochs = int(records["seen_epochs"].max(initial=0))
        if method == "default" and epochs >= MIN_EPOCHS:
            # Epochs in which the given label won, ties broken by AUM (which lies in [0, 1], so it never
            # outweighs one epoch): robust to memorisation, which inflates a late-learned example's AUM.
            score = (records["correct_epochs"].astype(np.float64) + aum) / (n + 1.0)
        elif method in ("default", "aum"):
            score = aum
        elif method == "loss":
            score = np.exp(-np.maximum(records["loss_sum"].astype(np.float64) / n, 0.0))
        elif method == "confidence":
            score = records["confidence_sum"].astype(np.float64) / n
        elif method == "correctness":
            score = records["correct_epochs"].astype(np.float64) / n
        else:  # forgetting
            events = np.maximum(records["forgetting_events"].astype(np.float64), 0.0)
            late = np.clip(records["first_learned"].astype(np.float64) / n, 0.0, np.nextafter(1.0, 0.0))
            learned = records["first_learned"] >= 0
            score = np.where(learned, np.exp2(-events) * (1.0 - 0.5 * late), 0.0)
    score = np.clip(np.nan_to_num(score, nan=0.0), 0.0, 1.0)
    return np.where(seen, score, np.nan)


def _compute_columns(records: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    n = np.maximum(records["seen_epochs"].astype(np.float64), 1.0)
    confidence_mean = records["confidence_sum"] / n
    variance = records["confidence_sq_sum"] / n - np.square(confidence_mean)
    return {
        "aum": records["margin_sum"] / n,
        "confidence_mean": confidence_mean,
        "variability": np.sqrt(np.maximum(variance, 0.0)),
        "correct_fraction": records["correct_epochs"] / n,
        "forgetting_events": records["forgetting_events"].astype(np.int64),
        "first_learned": records["first_learned"].astype(np.int64),
        "loss_mean": records["loss_sum"] / n,
        "seen_epochs": records["seen_epochs"].astype(np.int64),
    }


# ------------------------------------------------------------------------------------------------- cuts
def otsu_threshold(scores: np.ndarray, *, bins: int = 256) -> float:
    """Otsu's threshold: the cut that maximizes the between-group variance of a 1-D histogram.

    Args:
        scores: (K,) finite values.
        bins: histogram bins.

    Returns:
        The upper edge of the best lower group (``scores < threshold`` is the lower group); ``-inf`` when
        the scores are empty or all equal.

    Example:
        >>> otsu_threshold(np.array([0.1, 0.12, 0.11, 0.9, 0.92, 0.95])) > 0.12
        True
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0 or scores.min() == scores.max():
        return float("-inf")
    counts, edges = np.histogram(scores, bins=bins)
    centers = 0.5 * (edges[:-1] + edges[1:])
    low_n = np.cumsum(counts)[:-1]
    high_n = scores.size - low_n
    low_sum = np.cumsum(counts * centers)[:-1]
    low_mean = low_sum / np.maximum(low_n, 1)
    high_mean = (np.sum(counts * centers) - low_sum) / np.maximum(high_n, 1)
    between = low_n * high_n * np.square(low_mean - high_mean)
    best = int(np.argmax(between))
    # Upper edge of the lower group's last bin, nudged so that `scores < threshold` holds for that bin.
    return float(np.nextafter(edges[best + 1], np.inf))


def find_label_issues(
    records: Mapping[str, np.ndarray],
    *,
    method: str = "default",
    cut: Union[Literal["auto"], float, int] = "auto",
    threshold_ids: Optional[Sequence[int]] = None,
    num_classes: Optional[int] = None,
    describe: Optional[Callable[[int], str]] = None,
) -> Suspects:
    """Rank seen examples most suspect first and flag them with an automatic cut (no noise rate needed).

    Args:
        records: the per-example records (a dict of (N,) arrays, or ``np.load("samples.npz")``).
        method: one of :data:`METHODS` (see the module docstring).
        cut: ``"auto"`` (the method's natural zero, else Otsu's threshold; see the module docstring); a float
            in (0, 1) flags scores below it; an int ``k >= 0`` flags the top ``k``.
        threshold_ids: ids of AUM threshold samples (fake class), see ``ThresholdSamples``. When given, the
            cut is the threshold-samples procedure (flag scores below the 99th percentile of theirs) and
            those ids are left out of the ranking; ``cut`` must then stay ``"auto"``.
        num_classes: the number of classes, kept in the result for :attr:`Suspects.pred_probs` and
            :meth:`Suspects.class_view` (default: the largest label or suggested label plus one).
        describe: ``describe(sample_id) -> str``, e.g. the text of the example; its result is the column
            ``text`` of the table (CSV, TensorBoard suspects text).

    Returns:
        The ranked :class:`Suspects`; ties keep ascending id order.

    Raises:
        ValueError: on an unknown method or cut, invalid records, or threshold ids that are not distinct
            ids of seen examples.

    Example:
        >>> records = init_records(4)
        >>> fold_epoch(records, 0, np.arange(4), np.array([0, 1, 2, 0]),
        ...            loss=np.array([0.1, 3.0, 0.2, 2.5]), margin=np.array([2.0, -2.0, 1.5, -1.0]),
        ...            confidence=np.array([0.9, 0.05, 0.8, 0.08]), correct=np.array([1.0, 0.0, 1.0, 0.0]))
        >>> suspects = find_label_issues(records)  # one epoch: too little evidence for the automatic cut
        >>> suspects.ids, suspects.flagged, suspects.abstained[:20]
        (array([1, 3, 2, 0]), array([False, False, False, False]), 'the run has 1 epoch;')
        >>> find_label_issues(records, cut=0.5).flagged_ids
        array([1, 3])
        >>> find_label_issues(records, cut=1).flagged_ids
        array([1])
    """
    _validate_method(method)
    n = _validate_records(records)
    if threshold_ids is not None:
        if not (isinstance(cut, str) and cut == "auto"):
            raise ValueError(
                f"Pass either `cut` or `threshold_ids`, not both: threshold samples set the cut (got cut={cut!r})."
            )
        threshold_ids = _validate_threshold_ids(threshold_ids, records, n)
    else:
        _validate_cut(cut)
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1
    ):
        raise ValueError(f"`num_classes` must be a positive int or None, got {num_classes!r}.")
    if describe is not None and not callable(describe):
        raise ValueError(f"`describe` must be a callable `describe(sample_id) -> str` or None, got {describe!r}.")
    return _compute_label_issues(records, method, cut, threshold_ids, None if num_classes is None else int(num_classes),
                                 describe)


def _compute_label_issues(
    records: Mapping[str, np.ndarray],
    method: str,
    cut: Union[str, float, int],
    threshold_ids: Optional[np.ndarray],
    num_classes: Optional[int] = None,
    describe: Optional[Callable[[int], str]] = None,
) -> Suspects:
    scores = _compute_scores(records, method)
    rankable = records["seen_epochs"] > 0
    if threshold_ids is not None:
        rankable[threshold_ids] = False
    ids = np.flatnonzero(rankable)
    order = np.argsort(scores[ids], kind="stable")  # ids ascending, so ties keep id order
    ids = ids[order]
    ranked = scores[ids]

    if threshold_ids is not None:
        threshold = float(np.percentile(scores[threshold_ids], _THRESHOLD_PERCENTILE))
        flagged = ranked < threshold
    elif isinstance(cut, str):  # "auto"
        threshold = _NATURAL_ZERO[method] if method in _NATURAL_ZERO else otsu_threshold(ranked)
        if method == "default":
            threshold = _default_threshold(ranked)
        flagged = ranked < threshold
    elif isinstance(cut, (int, np.integer)):
        k = min(int(cut), ids.size)
        flagged = np.arange(ids.size) < k
        threshold = float(ranked[k - 1]) if k > 0 else float("nan")
    else:
        threshold = float(cut)
        flagged = ranked < threshold

    if not ranked.size:
        noise_rate = float("nan")
    elif method in _NATURAL_ZERO:
        noise_rate = float(np.mean(ranked < _NATURAL_ZERO[method]))
    else:
        noise_rate = float(np.mean(flagged))
    abstained = None
    if threshold_ids is None and isinstance(cut, str):  # the automatic cut needs a run that fits the data
        abstained = _evidence_problem(records, ids, flagged)
        if abstained is not None:  # then there is no estimate either: the same evidence is lacking
            flagged = np.zeros(ids.shape, dtype=bool)
            noise_rate = float("nan")
    columns = {name: values[ids] for name, values in _compute_columns(records).items()}
    if describe is not None:
        columns["text"] = np.array([str(describe(int(i))) for i in ids], dtype=object)
    suggested = (records["suggested_label"][ids].astype(np.int64) if "suggested_label" in records
                 else np.full(ids.shape, -1, np.int64))
    regions = cartography_regions(columns["confidence_mean"], columns["variability"])
    if abstained is None:
        regions[flagged] = "mislabeled"
    return Suspects(
        ids=ids,
        scores=ranked,
        flagged=flagged,
        labels=records["label"][ids].astype(np.int64),
        columns=columns,
        method=method,
        threshold=float(threshold),
        suggested_labels=suggested,
        num_classes=num_classes,
        noise_rate=noise_rate,
        abstained=abstained,
        regions=regions,
    )


def _default_threshold(scores: np.ndarray) -> float:
    """The default's cut: Otsu's threshold when the scores split into two clear groups (separability
    ``SEPARATED``) of which the lower one, on average, lost (mean score below the natural zero 0.5), but never
    below 0.5; else the natural zero. Otsu alone always splits in two, so on clean data it would flag the hardest
    examples (or those a fast learner got wrong in the first epoch only); the natural zero alone misses a
    mislabeled example that the network memorised in the first half of the run."""
    threshold = _NATURAL_ZERO["default"]
    otsu = otsu_threshold(scores)
    if (np.isfinite(otsu) and otsu_separability(scores, otsu) >= SEPARATED
            and float(scores[scores < otsu].mean()) < threshold):
        threshold = max(threshold, otsu)
    return float(threshold)


def otsu_separability(scores: np.ndarray, threshold: float) -> float:
    """Otsu's separability of a two-group split: between-group variance over total variance, in [0, 1].

    Example:
        >>> round(otsu_separability(np.array([0.0, 0.0, 1.0, 1.0]), 0.5), 3)
        1.0
    """
    scores = np.asarray(scores, dtype=np.float64)
    low = scores < threshold
    total = float(scores.var()) if scores.size else 0.0
    if total == 0.0 or low.all() or not low.any():
        return 0.0
    w = float(low.mean())
    return float(w * (1.0 - w) * (scores[low].mean() - scores[~low].mean()) ** 2 / total)


def _evidence_problem(records: Mapping[str, np.ndarray], ids: np.ndarray, flagged: np.ndarray) -> Optional[str]:
    """Why the run gives too little evidence for the automatic cut (and what to do), or None.

    An example the model has not learned yet looks like a mislabeled one until the model fits the data, so the
    cut flags only after ``MIN_EPOCHS`` epochs, when it would flag at most half of the examples, and once the
    last epoch's training accuracy on the examples it keeps reaches ``MIN_FIT``.
    """
    if ids.size == 0:
        return None
    epochs = int(records["seen_epochs"][ids].max())
    if epochs < MIN_EPOCHS:
        return (f"the run has {epochs} epoch{'s' if epochs != 1 else ''}; the automatic cut needs at least "
                f"{MIN_EPOCHS} (and a model that fits the data) to tell an example not learned yet from a "
                f"mislabeled one. Train longer, or use the ranking with an explicit `cut=`.")
    share = float(np.mean(flagged))
    if share > 0.5:
        return (f"the cut would flag {share:.1%} of the examples; when most examples are not learned the model "
                f"has not learned the task yet (or the labels are not classes, e.g. next-token targets), so this "
                f"is no evidence of wrong labels. Train longer or with a larger model, or use the ranking with an "
                f"explicit `cut=`.")
    kept = ids[~flagged]
    accuracy = float(np.mean(records["last_correct"][kept] == 1))
    if accuracy < MIN_FIT:
        return (f"in the last epoch the model was right on {accuracy:.1%} of the {kept.size} examples the cut "
                f"keeps; the automatic cut needs at least {MIN_FIT:.0%} (a model that fits the data) to tell an "
                f"example not learned yet from a mislabeled one. Train longer or with a larger model, or use "
                f"the ranking with an explicit `cut=`.")
    return None


def cartography_regions(confidence_mean: np.ndarray, variability: np.ndarray) -> np.ndarray:
    """Dataset Cartography regions (Swayamdipta et al. 2020) from the mean and the std across epochs of the
    given-label probability: ``ambiguous`` when the probability swings (variability >= ``AMBIGUOUS_VARIABILITY``),
    else ``easy`` when it is high (confidence >= ``HARD_CONFIDENCE``) and ``hard`` when it stays low.

    Example:
        >>> cartography_regions(np.array([0.95, 0.5, 0.1]), np.array([0.02, 0.3, 0.05])).tolist()
        ['easy', 'ambiguous', 'hard']
    """
    confidence_mean = np.nan_to_num(np.asarray(confidence_mean, dtype=np.float64))
    variability = np.nan_to_num(np.asarray(variability, dtype=np.float64))
    regions = np.where(confidence_mean >= HARD_CONFIDENCE, "easy", "hard").astype(object)
    regions[variability >= AMBIGUOUS_VARIABILITY] = "ambiguous"
    return regions


# ------------------------------------------------------------------------------------------- validation
def _validate_method(method: object) -> None:
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")


def _validate_records(records: object) -> int:
    """Check fields, shapes and dtypes; return the number of ids."""
    if not isinstance(records, Mapping):
        raise ValueError(
            f"`records` must be a mapping of field name to array (e.g. `np.load('samples.npz')`), "
            f"got {type(records).__name__}."
        )
    missing = [name for name in FIELDS if name not in records]
    if missing:
        raise ValueError(
            f"`records` lacks the fields {missing}; it needs all of {list(FIELDS)}. Pass the arrays the "
            f"Introspect callback writes to samples.npz, or build them with `init_records` + `fold_epoch`."
        )
    lengths = {}
    for name, expected in FIELDS.items():
        value = records[name]
        if not isinstance(value, np.ndarray):
            raise ValueError(f"`records[{name!r}]` must be a numpy array, got {type(value).__name__}.")
        if value.ndim != 1:
            raise ValueError(f"`records[{name!r}]` must be 1-D (one entry per id), got shape {value.shape}.")
        wanted = "iu" if expected.kind == "i" else "f"
        if value.dtype.kind not in wanted:
            kind = "an integer" if expected.kind == "i" else "a floating"
            raise ValueError(
                f"`records[{name!r}]` must have {kind} dtype (written as {expected}), got {value.dtype}; "
                f"convert it with `.astype(np.{expected})`."
            )
        lengths[name] = len(value)
    for name in OPTIONAL_FIELDS:
        value = records.get(name)
        if value is not None:
            if not isinstance(value, np.ndarray) or value.ndim != 1 or value.dtype.kind not in "iu":
                raise ValueError(
                    f"`records[{name!r}]` must be a 1-D integer numpy array (one entry per id), got "
                    f"{type(value).__name__} {getattr(value, 'shape', '')} {getattr(value, 'dtype', '')}."
                )
            lengths[name] = len(value)
    if len(set(lengths.values())) > 1:
        raise ValueError(
            f"All record arrays must have one entry per id (the same length), got lengths {lengths}."
        )
    return next(iter(lengths.values()))


def _validate_cut(cut: object) -> None:
    if isinstance(cut, str):
        if cut != "auto":
            raise ValueError(f"`cut` must be 'auto', a float in (0, 1) or an int >= 0, got {cut!r}.")
    elif isinstance(cut, (bool, np.bool_)):
        raise ValueError(f"`cut` must be 'auto', a float in (0, 1) or an int >= 0, got the bool {cut!r}.")
    elif isinstance(cut, (int, np.integer)):
        if cut < 0:
            raise ValueError(f"An int `cut` is the number of examples to flag and must be >= 0, got {cut}.")
    elif isinstance(cut, (float, np.floating)):
        if not 0.0 < cut < 1.0:
            raise ValueError(
                f"A float `cut` is a score threshold and must lie in (0, 1), got {cut}; "
                f"pass an int to flag the top k."
            )
    else:
        raise ValueError(
            f"`cut` must be 'auto', a float in (0, 1) or an int >= 0, got {type(cut).__name__} {cut!r}."
        )


def _validate_threshold_ids(threshold_ids: Sequence[int], records: Mapping[str, np.ndarray], n: int) -> np.ndarray:
    ids = np.asarray(threshold_ids)
    if ids.ndim != 1 or ids.size == 0 or ids.dtype.kind not in "iu":
        raise ValueError(
            f"`threshold_ids` must be a non-empty 1-D sequence of int ids (ThresholdSamples.threshold_ids), "
            f"got shape {ids.shape} dtype {ids.dtype}."
        )
    if ids.min() < 0 or ids.max() >= n:
        raise ValueError(f"`threshold_ids` must lie in [0, {n}), got values in [{ids.min()}, {ids.max()}].")
    if len(np.unique(ids)) != ids.size:
        raise ValueError("`threshold_ids` must be distinct.")
    unseen = ids[records["seen_epochs"][ids] <= 0]
    if unseen.size:
        raise ValueError(
            f"{unseen.size} threshold ids were never seen in training (e.g. {unseen[:3].tolist()}); train on the "
            f"ThresholdSamples dataset the ids come from."
        )
    return ids.astype(np.int64)
