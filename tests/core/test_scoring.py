"""Tests for the mislabel scorers, the cuts and the AUM threshold samples."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from lightning_introspect.core.scoring import (
    FIELDS,
    METHODS,
    MIN_EPOCHS,
    find_label_issues,
    fold_epoch,
    init_records,
    label_quality_scores,
    otsu_threshold,
)
from lightning_introspect.core.threshold import ThresholdSamples


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)


def _records_from_history(
    labels: np.ndarray, loss: np.ndarray, margin: np.ndarray, confidence: np.ndarray, correct: np.ndarray
) -> dict[str, np.ndarray]:
    """Fold (N, E) per-epoch means (NaN = not seen that epoch) into records."""
    records = init_records(len(labels))
    for epoch in range(loss.shape[1]):
        ids = np.flatnonzero(~np.isnan(loss[:, epoch]))
        fold_epoch(records, epoch, ids, labels[ids], loss=loss[ids, epoch], margin=margin[ids, epoch],
                   confidence=confidence[ids, epoch], correct=correct[ids, epoch])
    return records


def _tiny_records() -> dict[str, np.ndarray]:
    """Three examples over three epochs; the last one is never seen."""
    nan = np.nan
    return _records_from_history(
        labels=np.array([0, 1, 2, 0]),
        loss=np.array([[0.5, 0.2, 0.1], [2.0, 1.0, 3.0], [1.0, nan, 1.0], [nan, nan, nan]]),
        margin=np.array([[1.0, 2.0, 3.0], [-2.0, 0.5, -1.5], [-1.0, nan, 0.0], [nan, nan, nan]]),
        confidence=np.array([[0.6, 0.8, 0.9], [0.1, 0.4, 0.05], [0.3, nan, 0.5], [nan, nan, nan]]),
        correct=np.array([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, nan, 0.5], [nan, nan, nan]]),
    )


# ------------------------------------------------------------------------------------------- reference
def test_fold_epoch_matches_hand_computed_records() -> None:
    """Test that folding per-epoch means gives the contract's sums, counts and transitions."""
    r = _tiny_records()
    np.testing.assert_array_equal(r["seen_epochs"], [3, 3, 2, 0])
    np.testing.assert_array_equal(r["label"], [0, 1, 2, -1])
    np.testing.assert_allclose(r["loss_sum"], [0.8, 6.0, 2.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(r["margin_sum"], [6.0, -3.0, -1.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(r["confidence_sum"], [2.3, 0.55, 0.8, 0.0], rtol=1e-6)
    np.testing.assert_allclose(r["confidence_sq_sum"], [1.81, 0.1725, 0.34, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(r["correct_epochs"], [3, 1, 1, 0])  # 0.5 counts as correct
    np.testing.assert_array_equal(r["forgetting_events"], [0, 1, 0, 0])
    np.testing.assert_array_equal(r["first_learned"], [0, 1, 2, -1])
    np.testing.assert_array_equal(r["last_correct"], [1, 0, 1, -1])
    for name, dtype in FIELDS.items():
        assert r[name].dtype == dtype


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("aum", [_sigmoid(2.0), _sigmoid(-1.0), _sigmoid(-0.5)]),
        ("default", [_sigmoid(2.0), _sigmoid(-1.0), _sigmoid(-0.5)]),
        ("loss", [math.exp(-0.8 / 3), math.exp(-2.0), math.exp(-1.0)]),
        ("confidence", [2.3 / 3, 0.55 / 3, 0.4]),
        ("correctness", [1.0, 1 / 3, 0.5]),
        # 2**-events * (1 - first_learned / seen / 2); never learned would be 0.
        ("forgetting", [1.0, 0.5 * (1 - 1 / 6), 1 - 2 / 2 / 2]),
    ],
)
def test_scores_equal_hand_computed_reference(method: str, expected: list[float]) -> None:
    """Test that each scorer maps the tiny records to the documented formula, NaN where never seen."""
    scores = label_quality_scores(_tiny_records(), method=method)
    np.testing.assert_allclose(scores[:3], expected, rtol=1e-6)
    assert np.isnan(scores[3])


def test_forgetting_ranks_never_learned_lowest() -> None:
    """Test that a never-learned example scores 0, below one forgotten many times."""
    r = init_records(2)
    for epoch, correct in enumerate([[1, 0], [0, 0], [1, 0], [0, 0]]):
        fold_epoch(r, epoch, np.arange(2), np.zeros(2, int), loss=np.ones(2), margin=np.zeros(2),
                   confidence=np.full(2, 0.5), correct=np.array(correct, float))
    scores = label_quality_scores(r, method="forgetting")
    assert scores[1] == 0.0
    assert scores[0] == pytest.approx(0.25)


@pytest.mark.parametrize("method", METHODS)
def test_scores_lie_in_unit_interval_and_nonfinite_sums_score_zero(method: str) -> None:
    """Test that scores stay in [0, 1] for extreme sums and a NaN/inf sum scores 0 instead of NaN."""
    r = init_records(4)
    r["seen_epochs"][:] = 1
    r["label"][:] = 0
    r["loss_sum"][:] = [0.0, 1e30, np.nan, np.inf]
    r["margin_sum"][:] = [1e30, -1e30, np.nan, -np.inf]
    r["confidence_sum"][:] = [1.0, 0.0, np.nan, np.nan]
    r["correct_epochs"][:] = [1, 0, 0, 0]
    r["first_learned"][:] = [0, -1, -1, -1]
    scores = label_quality_scores(r, method=method)
    assert np.all((scores >= 0) & (scores <= 1))
    if method != "correctness":
        assert scores[2] == 0.0


# ----------------------------------------------------------------------------------- realistic ranking
def _train_blobs(
    num: int = 300, classes: int = 3, flip_fraction: float = 0.1, epochs: int = 12, threshold: bool = False
) -> tuple[dict[str, np.ndarray], np.ndarray, Optional[np.ndarray]]:
    """Train a linear model on seeded Gaussian blobs with flipped labels; return records, flipped ids."""
    gen = torch.Generator().manual_seed(0)
    y_true = torch.arange(num) % classes
    centers = 3.0 * torch.randn(classes, 2, generator=gen)
    x = centers[y_true] + torch.randn(num, 2, generator=gen)
    y = y_true.clone()
    flipped = torch.randperm(num, generator=gen)[: int(flip_fraction * num)]
    y[flipped] = (y[flipped] + 1 + torch.randint(0, classes - 1, (len(flipped),), generator=gen)) % classes
    data = [(x[i], y[i]) for i in range(num)]
    threshold_ids = None
    outputs = classes
    if threshold:
        wrapped = ThresholdSamples(data, num_classes=classes, seed=0)
        data = [wrapped[i] for i in range(num)]
        threshold_ids = wrapped.threshold_ids
        outputs = wrapped.num_classes
    xs = torch.stack([d[0] for d in data])
    ys = torch.stack([d[1] for d in data])
    model = torch.nn.Linear(2, outputs)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    records = init_records(num)
    for epoch in range(epochs):
        perm = torch.randperm(num, generator=gen)
        for start in range(0, num, 50):
            ids = perm[start : start + 50]
            logits = model(xs[ids])
            loss = F.cross_entropy(logits, ys[ids], reduction="none")
            with torch.no_grad():
                given = logits.gather(1, ys[ids, None]).squeeze(1)
                other = logits.scatter(1, ys[ids, None], float("-inf")).max(1).values
                fold_epoch(records, epoch, ids.numpy(), ys[ids].numpy(), loss=loss.detach().numpy(),
                           margin=(given - other).numpy(),
                           confidence=logits.softmax(1).gather(1, ys[ids, None]).squeeze(1).numpy(),
                           correct=(logits.argmax(1) == ys[ids]).float().numpy())
            opt.zero_grad()
            loss.mean().backward()
            opt.step()
    return records, np.sort(flipped.numpy()), threshold_ids


@pytest.mark.parametrize("method", METHODS)
def test_flipped_labels_lead_the_ranking(method: str) -> None:
    """Test that seeded flipped labels make up most of the top of a real training's ranking."""
    records, flipped, _ = _train_blobs()
    suspects = find_label_issues(records, method=method)
    top = suspects.ids[: len(flipped)]
    assert np.isin(top, flipped).mean() >= (0.9 if method != "forgetting" else 0.75)


def test_default_auto_cut_flags_the_flipped_labels() -> None:
    """Test that the automatic cut (AUM < 0) recovers the flipped labels with F1 >= 0.8."""
    records, flipped, _ = _train_blobs()
    suspects = find_label_issues(records)
    flagged = suspects.flagged_ids
    precision = np.isin(flagged, flipped).mean()
    recall = np.isin(flipped, flagged).mean()
    assert 2 * precision * recall / (precision + recall) >= 0.8
    assert suspects.threshold == 0.5


def test_suspects_carry_export_columns() -> None:
    """Test that the export columns line up with the ranked ids."""
    r = _tiny_records()
    s = find_label_issues(r)
    np.testing.assert_array_equal(s.ids, [1, 2, 0])  # the never-seen id 3 is left out
    np.testing.assert_array_equal(s.labels, [1, 2, 0])
    np.testing.assert_allclose(s.columns["aum"], [-1.0, -0.5, 2.0])
    np.testing.assert_allclose(s.columns["loss_mean"], [2.0, 1.0, 0.8 / 3], rtol=1e-6)
    np.testing.assert_allclose(s.columns["correct_fraction"], [1 / 3, 0.5, 1.0])
    np.testing.assert_array_equal(s.columns["forgetting_events"], [1, 0, 0])
    np.testing.assert_array_equal(s.columns["first_learned"], [1, 2, 0])
    var0 = np.std([0.6, 0.8, 0.9])
    np.testing.assert_allclose(s.columns["variability"][2], var0, rtol=1e-4)
    np.testing.assert_allclose(s.columns["confidence_mean"], [0.55 / 3, 0.4, 2.3 / 3], rtol=1e-6)
    for name in ("aum", "confidence_mean", "variability", "correct_fraction", "forgetting_events",
                 "first_learned", "loss_mean"):
        assert s.columns[name].shape == s.ids.shape


# ------------------------------------------------------------------------------------------------ cuts
def _flat_records(scores_margin: list[float], epochs: int = 1) -> dict[str, np.ndarray]:
    """Records whose mean margin is ``scores_margin`` over ``epochs`` epochs; an example with a margin >= 0
    was right in every epoch (so with ``epochs >= MIN_EPOCHS`` the run fits what the cut keeps)."""
    r = init_records(len(scores_margin))
    r["seen_epochs"][:] = epochs
    r["label"][:] = 0
    r["margin_sum"][:] = np.asarray(scores_margin) * epochs
    right = np.asarray(scores_margin) >= 0
    r["correct_epochs"][:] = right * epochs
    r["last_correct"][:] = right
    return r


def test_ties_keep_id_order() -> None:
    """Test that equal scores rank in ascending id order (stable ties)."""
    s = find_label_issues(_flat_records([1.0, -1.0, 1.0, -1.0, 0.0]))
    np.testing.assert_array_equal(s.ids, [1, 3, 4, 0, 2])


@pytest.mark.parametrize(("cut", "expected_flagged"), [(0, 0), (2, 2), (10, 5), (0.3, 2), (0.6, 3), ("auto", 2)])
def test_cut_variants(cut: object, expected_flagged: int) -> None:
    """Test that int cuts flag the top k (clipped to K), float cuts flag scores below, auto flags AUM < 0."""
    s = find_label_issues(_flat_records([1.0, -1.0, 2.0, -3.0, 0.0], epochs=MIN_EPOCHS), method="aum",
                          cut=cut)  # type: ignore[arg-type]
    assert s.flagged.sum() == expected_flagged
    assert not np.any(s.flagged[1:] & ~s.flagged[:-1])  # a prefix of the ranking


def test_int_cut_reports_kth_score_and_nan_for_zero() -> None:
    """Test that an int cut's threshold is the k-th score, NaN when k = 0."""
    r = _flat_records([1.0, -1.0, 2.0])
    assert find_label_issues(r, cut=1).threshold == pytest.approx(_sigmoid(-1.0))
    assert math.isnan(find_label_issues(r, cut=0).threshold)


def test_auto_cut_uses_otsu_for_loss() -> None:
    """Test that the loss scorer's automatic cut splits two loss clusters with Otsu's threshold."""
    r = init_records(6)
    r["seen_epochs"][:] = MIN_EPOCHS
    r["label"][:] = 0
    r["loss_sum"][:] = np.array([3.0, 0.05, 2.5, 0.1, 0.02, 0.08]) * MIN_EPOCHS
    r["last_correct"][:] = [0, 1, 0, 1, 1, 1]
    s = find_label_issues(r, method="loss")
    np.testing.assert_array_equal(s.flagged_ids, [0, 2])
    assert s.threshold == pytest.approx(otsu_threshold(s.scores))


def test_otsu_of_constant_scores_flags_nothing() -> None:
    """Test that Otsu's threshold on equal scores flags nothing."""
    assert otsu_threshold(np.full(4, 0.3)) == -math.inf


def test_auto_cut_flags_nothing_on_clean_confident_records() -> None:
    """Test that the default's natural zero flags nothing when every example is learned."""
    assert not find_label_issues(_flat_records([0.5, 1.0, 3.0])).flagged.any()


# ---------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r.pop("margin_sum"), "lacks the fields"),
        (lambda r: r.__setitem__("loss_sum", np.zeros(2, np.float32)), "same length"),
        (lambda r: r.__setitem__("seen_epochs", np.ones(3, np.float32)), "integer dtype"),
        (lambda r: r.__setitem__("margin_sum", np.ones(3, np.int32)), "floating dtype"),
        (lambda r: r.__setitem__("label", [0, 1, 2]), "numpy array"),
        (lambda r: r.__setitem__("label", np.zeros((3, 1), np.int32)), "1-D"),
    ],
)
def test_invalid_records_raise(mutate: object, message: str) -> None:
    """Test that missing fields, length mismatches, wrong dtypes and shapes raise a ValueError saying so."""
    r = init_records(3)
    mutate(r)  # type: ignore[operator]
    with pytest.raises(ValueError, match=message):
        label_quality_scores(r)
    with pytest.raises(ValueError, match=message):
        find_label_issues(r)


def test_records_must_be_a_mapping() -> None:
    """Test that passing something other than a mapping raises a ValueError."""
    with pytest.raises(ValueError, match="mapping"):
        label_quality_scores([np.zeros(3)])  # type: ignore[arg-type]


def test_unknown_method_raises() -> None:
    """Test that an unknown method names the valid ones."""
    with pytest.raises(ValueError, match="`method` must be one of"):
        label_quality_scores(init_records(2), method="entropy")
    with pytest.raises(ValueError, match="`method` must be one of"):
        find_label_issues(init_records(2), method="entropy")


@pytest.mark.parametrize(
    ("cut", "message"),
    [("otsu", "'auto'"), (True, "bool"), (-1, ">= 0"), (0.0, r"\(0, 1\)"), (1.5, r"\(0, 1\)"), (None, "NoneType")],
)
def test_invalid_cut_raises(cut: object, message: str) -> None:
    """Test that bad cuts raise a ValueError naming the accepted forms."""
    with pytest.raises(ValueError, match=message):
        find_label_issues(_flat_records([0.0, 1.0]), cut=cut)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("ids", "cut", "message"),
    [
        ([0], 3, "either `cut` or `threshold_ids`"),
        ([5], "auto", r"lie in \[0, 3\)"),
        ([0, 0], "auto", "distinct"),
        ([0.5], "auto", "int ids"),
        ([], "auto", "non-empty"),
        ([2], "auto", "never seen"),
    ],
)
def test_invalid_threshold_ids_raise(ids: list, cut: object, message: str) -> None:
    """Test that threshold ids out of range, repeated, non-int, empty or unseen raise a ValueError."""
    r = _flat_records([0.0, 1.0, 2.0])
    r["seen_epochs"][2] = 0
    with pytest.raises(ValueError, match=message):
        find_label_issues(r, cut=cut, threshold_ids=ids)  # type: ignore[arg-type]


def test_fold_epoch_rejects_bad_ids() -> None:
    """Test that repeated or out-of-range ids and shape mismatches raise in the reference fold."""
    r = init_records(3)
    kw = dict(loss=np.ones(2), margin=np.ones(2), confidence=np.ones(2), correct=np.ones(2))
    with pytest.raises(ValueError, match="distinct"):
        fold_epoch(r, 0, np.array([1, 1]), np.zeros(2, int), **kw)
    with pytest.raises(ValueError, match="lie in"):
        fold_epoch(r, 0, np.array([1, 3]), np.zeros(2, int), **kw)
    with pytest.raises(ValueError, match="shape of `ids`"):
        fold_epoch(r, 0, np.array([0]), np.zeros(1, int), **kw)
    with pytest.raises(ValueError, match="non-negative int"):
        init_records(-1)


# ----------------------------------------------------------------------------------- threshold samples
def test_threshold_samples_relabel_a_seeded_share() -> None:
    """Test that round(N / (C + 1)) seeded examples get the fake class C and the rest pass through."""
    data = [(torch.tensor([float(i)]), torch.tensor(i % 4)) for i in range(100)]
    ds = ThresholdSamples(data, num_classes=4, seed=3)
    assert ds.num_classes == 5 and ds.fake_class == 4 and len(ds) == 100
    assert len(ds.threshold_ids) == 20 and ds.threshold_ids.dtype == np.int64
    np.testing.assert_array_equal(ds.threshold_ids, ThresholdSamples(data, num_classes=4, seed=3).threshold_ids)
    assert not np.array_equal(ds.threshold_ids, ThresholdSamples(data, num_classes=4, seed=4).threshold_ids)
    for i in range(100):
        x, y = ds[i]
        assert torch.equal(x, data[i][0])
        assert y.dtype == data[i][1].dtype
        assert int(y) == (4 if i in set(ds.threshold_ids.tolist()) else i % 4)


def test_threshold_samples_compose_with_with_index() -> None:
    """Test that WithIndex(ThresholdSamples(raw)) appends ids that match threshold_ids, for tuples and dicts."""
    from lightning_introspect.core.samples import WithIndex

    tuples = WithIndex(ThresholdSamples([(float(i), 0, "extra") for i in range(12)], num_classes=2))
    fake = {i for i in range(12) if tuples[i][1] == 2}
    assert fake == set(tuples.threshold_ids.tolist()) and len(fake) == 4
    assert tuples[5][2:] == ("extra", 5)
    assert tuples.num_classes == 3
    dicts = WithIndex(ThresholdSamples([{"x": i, "label": 1} for i in range(12)], num_classes=2, seed=1))
    for i in dicts.threshold_ids:
        assert dicts[int(i)] == {"x": int(i), "label": 2, "index": int(i)}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"dataset": 5, "num_classes": 3}, "map-style"), ({"dataset": [(0, 0)] * 10, "num_classes": 1}, ">= 2"),
     ({"dataset": [(0, 0)], "num_classes": 3}, "too small")],
)
def test_threshold_samples_validate(kwargs: dict, message: str) -> None:
    """Test that bad datasets and class counts raise a ValueError."""
    with pytest.raises(ValueError, match=message):
        ThresholdSamples(**kwargs)


def test_threshold_cut_is_99th_percentile_and_excludes_threshold_ids() -> None:
    """Test that threshold samples set the cut at their 99th-percentile score and are not ranked."""
    margins = [-3.0, -2.0, -1.0, 0.5, 1.0, 2.0, -0.5, -0.2]
    r = _flat_records(margins)
    s = find_label_issues(r, method="aum", threshold_ids=[6, 7])
    expected = np.percentile([_sigmoid(-0.5), _sigmoid(-0.2)], 99)
    assert s.threshold == pytest.approx(expected)
    assert not np.isin([6, 7], s.ids).any()
    np.testing.assert_array_equal(s.flagged_ids, [0, 1, 2])


def test_threshold_samples_flag_flipped_labels_in_training() -> None:
    """Test that training with threshold samples yields a cut that recovers most flipped labels."""
    records, flipped, threshold_ids = _train_blobs(num=400, flip_fraction=0.1, threshold=True, epochs=15)
    s = find_label_issues(records, threshold_ids=threshold_ids)
    flipped = np.setdiff1d(flipped, threshold_ids)  # relabelled to the fake class: not a flip any more
    recall = np.isin(flipped, s.flagged_ids).mean()
    precision = np.isin(s.flagged_ids, flipped).mean()
    assert recall >= 0.9 and precision >= 0.9


# ------------------------------------------------------------------------------------------- figure kernel
def test_classification_figures_match_a_row_by_row_reference() -> None:
    """Test that the per-example figures equal cross-entropy, softmax and a Python margin row by row, that
    out-of-range targets and non-finite rows are invalid, and that the caller's logits are left untouched
    (also when the transpose is free: one row, or logits that are themselves a transposed view)."""
    from lightning_introspect.core.samples import classification_figures

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(40, 7, generator=g) * 4
    targets = torch.randint(0, 7, (40,), generator=g)
    logits[5, 2] = float("nan")
    logits[6, 0] = float("inf")
    logits[7, 3] = float("-inf")
    targets[8], targets[9] = 7, -1
    logits[10] = 1.5  # a tie everywhere: not correct, margin 0
    before = logits.clone()
    loss, margin, conf, correct, valid = classification_figures(logits, targets)
    torch.testing.assert_close(logits, before, equal_nan=True)
    bad = {5, 6, 7, 8, 9}
    assert [i for i in range(40) if not valid[i]] == sorted(bad)
    for i in sorted(set(range(40)) - bad):
        row, t = logits[i].double(), int(targets[i])
        others = torch.cat([row[:t], row[t + 1 :]])
        assert loss[i].item() == pytest.approx(F.cross_entropy(row[None], targets[i : i + 1]).item(), rel=1e-5, abs=1e-6)
        assert conf[i].item() == pytest.approx(row.softmax(0)[t].item(), rel=1e-5, abs=1e-7)
        assert margin[i].item() == pytest.approx((row[t] - others.max()).item(), abs=1e-5)
        assert correct[i].item() == float(row[t] > others.max())
    assert margin[10].item() == 0.0 and correct[10].item() == 0.0

    one = logits[11:12].clone()
    classification_figures(one, targets[11:12])
    torch.testing.assert_close(one, logits[11:12])
    stored = logits[11:20].t().contiguous()  # (C, N) storage, passed as its (N, C) transpose
    copy = stored.clone()
    _, m2, *_ = classification_figures(stored.t(), targets[11:20])
    torch.testing.assert_close(stored, copy)
    torch.testing.assert_close(m2, margin[11:20])


def test_introspector_records_equal_a_per_batch_reference_over_odd_batches() -> None:
    """Test that per-example sums buffered across many steps (batches of a usual size, odd sizes among them,
    a new usual size after a while) equal the figures of each batch computed on its own: every batch counted
    once, none lost between batched passes, the epoch's last smaller batch included."""
    from torch import nn

    from lightning_introspect.core.config import IntrospectConfig
    from lightning_introspect.core import Introspector
    from lightning_introspect.core.dynamics import SAMPLE_BUFFER_STEPS
    from lightning_introspect.core.samples import classification_figures

    n, classes = 5000, 5
    g = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(4, classes))
    intro = Introspector(model, IntrospectConfig(every_n_steps=10**6, warmup_steps=0), num_examples=n)
    order = torch.randperm(n, generator=g)
    sizes = [16] * (SAMPLE_BUFFER_STEPS + 5) + [7] + [16] * 3 + [24] * (2 * SAMPLE_BUFFER_STEPS + 3) + [9]
    assert sum(sizes) <= n
    expected = {k: torch.zeros(n) for k in ("count", "loss", "margin", "conf")}
    start = 0
    for step, size in enumerate(sizes):
        ids = order[start : start + size]
        start += size
        logits = torch.randn(size, classes, generator=g) * 3
        targets = torch.randint(0, classes, (size,), generator=g)
        with intro.step(step):
            intro.observe_batch(ids, targets=targets, logits=logits, loss=logits.sum())
        loss, margin, conf, _, _ = classification_figures(logits, targets)
        for key, value in (("count", torch.ones(size)), ("loss", loss), ("margin", margin), ("conf", conf)):
            expected[key][ids] += value
    intro.end_epoch(0, len(sizes))
    records = intro.records()
    intro.close()
    seen = expected["count"] > 0
    np.testing.assert_array_equal(records["seen_epochs"], seen.numpy().astype(np.int16))
    np.testing.assert_allclose(records["loss_sum"], expected["loss"].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(records["margin_sum"], expected["margin"].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(records["confidence_sum"], expected["conf"].numpy(), rtol=1e-5, atol=1e-6)


def test_per_example_passes_run_on_the_writer_thread_or_are_taken_back_in_order() -> None:
    """Test that full per-example buffers are handed to the writer thread, which reduces them when it is free,
    and that an epoch end finding them still queued behind slow writer work takes them back and reduces them on
    the training thread, in order: each example counted exactly once either way."""
    import threading

    from torch import nn

    from lightning_introspect.core.config import IntrospectConfig
    from lightning_introspect.core import Introspector
    from lightning_introspect.core.dynamics import SAMPLE_BUFFER_STEPS

    n, size, classes = 3 * SAMPLE_BUFFER_STEPS * 8 + 40, 8, 3
    steps = n // size
    main = threading.get_ident()

    def epoch(writer_held: bool) -> tuple[list[int], dict]:
        model = nn.Sequential(nn.Linear(4, classes))
        intro = Introspector(model, IntrospectConfig(every_n_steps=10**6, warmup_steps=0), num_examples=n)
        threads: list[int] = []
        reduce = intro.dynamics._reduce

        def watched(raw: object, figs: list) -> None:  # records the thread that runs each reduce
            threads.append(threading.get_ident())
            reduce(raw, figs)  # type: ignore[arg-type]

        intro.dynamics._reduce = watched  # type: ignore[method-assign]
        release = threading.Event()
        if writer_held:
            intro.writer.submit(release.wait)  # the writer is behind: the reduces queue up behind this
        g = torch.Generator().manual_seed(2)
        for step in range(steps):
            with intro.step(step):
                intro.observe_batch(
                    torch.arange(step * size, (step + 1) * size),
                    targets=torch.randint(0, classes, (size,), generator=g),
                    logits=torch.randn(size, classes, generator=g), loss=torch.tensor(1.0),
                )
        if writer_held:
            assert threads == []  # all queued behind the held job
        else:
            intro.writer.drain()  # the writer is free: it has reduced every full buffer
        intro.end_epoch(0, steps)
        records = intro.records()
        release.set()
        intro.close()
        return threads, records

    full = steps // SAMPLE_BUFFER_STEPS
    for held in (False, True):
        threads, records = epoch(held)
        assert len(threads) == full + 1  # every full buffer, then the last partial one
        if held:
            assert threads == [main] * (full + 1)  # taken back by the epoch end
        else:
            assert all(t != main for t in threads[:-1]) and threads[-1] == main
        np.testing.assert_array_equal(records["seen_epochs"], np.ones(n, dtype=np.int16))


def test_batches_reduced_together_off_thread_keep_their_ids_apart() -> None:
    """Test that the same ids in different steps' batches (a sampler drawing with replacement, or a small set)
    count as seen once per batch and never as ids repeated within a batch, when whole buffers of batches are
    joined and reduced on the writer thread."""
    from torch import nn

    from lightning_introspect.core.config import IntrospectConfig
    from lightning_introspect.core import Introspector
    from lightning_introspect.core.dynamics import SAMPLE_BUFFER_STEPS
    from lightning_introspect.core.samples import BAD_INPUT_NAMES

    n, classes, steps = 8, 3, 2 * SAMPLE_BUFFER_STEPS
    intro = Introspector(nn.Sequential(nn.Linear(4, classes)), IntrospectConfig(every_n_steps=10**6, warmup_steps=0), num_examples=n)
    for step in range(steps):
        with intro.step(step):
            intro.observe_batch(torch.arange(n), targets=torch.arange(n) % classes, logits=torch.randn(n, classes))
    intro.dynamics.wait_for_reduces()
    assert intro.store is not None
    bad = dict(zip(BAD_INPUT_NAMES, intro.store.bad.tolist()))
    counts = intro.store.epoch[:n, 0]
    intro.close()
    assert bad["ids_repeated_in_batch"] == 0
    assert counts.tolist() == [float(steps)] * n


# ---------------------------------------------------------------------------- suggested label, per class
def _voted_records() -> dict[str, np.ndarray]:
    """Four examples of 3 classes over three epochs, with hand-chosen runner-ups (the votes):
    id 0: 1, 1, 2 -> 1; id 1: 2, 0, 0 -> 0 (Boyer-Moore: 2, cancelled, then 0); id 2: never a vote -> -1;
    id 3: 0 only in the last epoch -> 0."""
    r = init_records(4)
    labels = np.array([0, 1, 2, 1])
    votes = [np.array([1, 2, -1]), np.array([1, 0, -1, 0]), np.array([2, 0, -1, 0])]
    idss = [np.array([0, 1, 2]), np.array([0, 1, 2, 3]), np.array([0, 1, 2, 3])]
    margins = {0: -1.0, 1: -2.0, 2: 3.0, 3: -0.5}
    for epoch, (ids, other) in enumerate(zip(idss, votes)):
        m = np.array([margins[i] for i in ids])
        fold_epoch(r, epoch, ids, labels[ids], loss=-m, margin=m, confidence=np.full(len(ids), 0.25),
                   correct=(m > 0).astype(float), other=other)
    return r


def test_fold_epoch_votes_the_majority_runner_up() -> None:
    """Test that the numpy reference casts one Boyer-Moore vote per epoch with a runner-up."""
    r = _voted_records()
    np.testing.assert_array_equal(r["suggested_label"], [1, 0, -1, 0])
    np.testing.assert_array_equal(r["suggested_votes"], [1, 1, 0, 2])


def test_suspects_carry_the_suggested_labels_in_ranking_order() -> None:
    """Test that Suspects.suggested_labels line up with the ranked ids, and are -1 for records without votes."""
    s = find_label_issues(_voted_records())
    np.testing.assert_array_equal(s.ids, [1, 0, 3, 2])
    np.testing.assert_array_equal(s.suggested_labels, [0, 1, 0, -1])
    old = {k: v for k, v in _voted_records().items() if k in FIELDS}  # records written before the field
    np.testing.assert_array_equal(find_label_issues(old).suggested_labels, [-1, -1, -1, -1])


def test_pred_probs_put_the_mean_confidence_on_the_given_label_and_the_rest_on_the_suggested() -> None:
    """Test that pred_probs rows follow ids, sum to 1, give the given label its mean confidence and the rest
    to the suggested label (spread over the other classes where there is none)."""
    s = find_label_issues(_voted_records(), num_classes=4)
    p = s.pred_probs
    assert p.shape == (4, 4) and p.dtype == np.float32
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(p[0], [0.75, 0.25, 0, 0])  # id 1: given 1, suggested 0
    np.testing.assert_allclose(p[1], [0.25, 0.75, 0, 0])  # id 0: given 0, suggested 1
    np.testing.assert_allclose(p[3], [0.25, 0.25, 0.25, 0.25])  # id 2: given 2, no vote: 0.75 over 3 others
    assert find_label_issues(_voted_records()).pred_probs.shape == (4, 3)  # classes from the labels


def test_pred_probs_refuse_records_without_class_labels() -> None:
    """Test that pred_probs raise a clear error for sequence-style records (labels -1)."""
    r = _voted_records()
    r["label"][:] = -1
    with pytest.raises(ValueError, match="class label per example"):
        find_label_issues(r).pred_probs


def test_class_view_counts_flagged_examples_by_given_and_suggested_label() -> None:
    """Test the noise matrix, the top pairs and the flagged share per class against hand counts."""
    s = find_label_issues(_voted_records(), num_classes=3, cut=0.5)
    assert s.flagged_ids.tolist() == [1, 0, 3]  # AUM < 0
    view = s.class_view()
    expected = np.zeros((3, 3), int)
    expected[1, 0] = 2  # ids 1 and 3: given 1, suggested 0
    expected[0, 1] = 1  # id 0
    np.testing.assert_array_equal(view.noise_matrix, expected)
    assert view.top_pairs(5) == [(1, 0, 2), (0, 1, 1)]
    np.testing.assert_array_equal(view.seen, [1, 2, 1])
    np.testing.assert_array_equal(view.flagged, [1, 2, 0])
    np.testing.assert_allclose(view.flagged_share, [1.0, 1.0, 0.0])
    text = view.to_markdown(["cat", "dog", "bird"], matrix=True)
    assert "| dog | cat | 2 | 100.0% |" in text
    assert "| dog | 0 | 2 | 0 |" not in text and "| dog | 2 | 0 | 0 |" in text  # matrix row of 'dog'


def test_to_pandas_is_the_table_indexed_by_id() -> None:
    """Test that to_pandas gives one row per ranked id, in ranking order, with the suggested label."""
    pd = pytest.importorskip("pandas")
    s = find_label_issues(_voted_records())
    df = s.to_pandas()
    assert isinstance(df, pd.DataFrame)
    assert df.index.name == "id" and df.index.tolist() == s.ids.tolist()
    assert df["suggested_label"].tolist() == [0, 1, 0, -1]
    assert df["flagged"].tolist() == s.flagged.tolist()
    assert list(df.columns[:4]) == ["score", "flagged", "label", "suggested_label"] and "aum" in df.columns


def test_to_pandas_without_pandas_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Test that to_pandas raises an ImportError naming the install command when pandas is missing."""
    import sys

    monkeypatch.setitem(sys.modules, "pandas", None)  # makes `import pandas` raise ImportError
    with pytest.raises(ImportError, match="pip install pandas"):
        find_label_issues(_voted_records()).to_pandas()


# ------------------------------------------------------------------------------- calibrated cut, regions
def _fitted_records(correct: list[int], margins: list[float], epochs: int = 10,
                    last: list[int] | None = None) -> dict[str, np.ndarray]:
    """Records of ``epochs`` epochs with each example's epochs-correct count and mean margin."""
    r = init_records(len(correct))
    r["seen_epochs"][:] = epochs
    r["label"][:] = 0
    r["correct_epochs"][:] = correct
    r["margin_sum"][:] = np.asarray(margins) * epochs
    r["last_correct"][:] = last if last is not None else [int(c > 0) for c in correct]
    return r


def test_default_ranks_by_epochs_correct_then_aum() -> None:
    """Test that with >= MIN_EPOCHS epochs the default orders by epochs correct, AUM breaking ties, so a
    memorised example (large AUM, few epochs correct) ranks before a clean one (small AUM, always correct)."""
    r = _fitted_records([3, 10, 3, 9], [5.0, 0.2, 1.0, 4.0])
    s = find_label_issues(r, cut=0)
    assert s.ids.tolist() == [2, 0, 3, 1]
    assert find_label_issues(r, method="aum", cut=0).ids.tolist() == [1, 2, 3, 0]


def test_default_cut_ignores_a_split_between_two_learned_groups() -> None:
    """Test that a clean run whose examples split into 'right in every epoch' and 'wrong in the first epoch
    only' (two clear Otsu groups, both learned) flags nothing: the cut moves to Otsu only when the lower group
    lost on average."""
    r = _fitted_records([10] * 80 + [9] * 20, [3.0] * 100)
    s = find_label_issues(r)
    assert s.abstained is None and not s.flagged.any() and s.noise_rate == 0.0


def test_default_cut_moves_to_otsu_for_a_separated_group_that_lost() -> None:
    """Test that examples right in 1 of 10 epochs and those memorised by mid-run (right in 6 of 10, above the
    natural zero) both flag when together they form a separated lower group that lost on average."""
    r = _fitted_records([10] * 80 + [1] * 10 + [6] * 10, [3.0] * 80 + [-1.0] * 10 + [-0.5] * 10)
    s = find_label_issues(r)
    assert sorted(s.flagged_ids.tolist()) == list(range(80, 100))
    assert s.noise_rate == pytest.approx(0.1)  # below the natural zero: the 10 right in 1 of 10 epochs
    assert s.flagged_share == pytest.approx(0.2)


@pytest.mark.parametrize(("epochs", "last", "reason"), [
    (4, None, "the run has 4 epochs; the automatic cut needs at least 5"),
    (10, [1] * 90 + [0] * 10, "in the last epoch the model was right on 90.0% of the 100 examples the cut keeps"),
    (10, [0] * 100, "the cut would flag 100.0% of the examples"),
])
def test_auto_cut_abstains_on_thin_evidence(epochs: int, last: list[int] | None, reason: str) -> None:
    """Test that the automatic cut flags nothing and says why for too few epochs or a model that does not fit
    what it keeps, while an explicit cut still flags."""
    right = 0 if last == [0] * 100 else epochs
    r = _fitted_records([right] * 100 + [0] * 5, [2.0 if right else -1.0] * 100 + [-2.0] * 5, epochs=epochs,
                        last=None if last is None else last + [0] * 5)
    s = find_label_issues(r)
    assert not s.flagged.any() and s.abstained is not None and s.abstained.startswith(reason)
    assert np.isnan(s.noise_rate) and (s.regions != "mislabeled").all()
    assert find_label_issues(r, cut=5).flagged.sum() == 5


def test_regions_follow_dataset_cartography_and_keep_flagged_apart() -> None:
    """Test the easy / ambiguous / hard regions from confidence and variability, and that flagged examples get
    ``mislabeled`` instead."""
    r = _fitted_records([10, 10, 8, 0, 0], [3.0, 3.0, 0.1, -1.0, -3.0])
    r["confidence_sum"][:] = np.array([0.9, 0.6, 0.5, 0.3, 0.05]) * 10
    std = np.array([0.05, 0.3, 0.1, 0.05, 0.01])
    r["confidence_sq_sum"][:] = (np.square(std) + np.square(r["confidence_sum"] / 10)) * 10
    s = find_label_issues(r, cut=0)
    assert dict(zip(s.ids.tolist(), s.regions.tolist())) == {0: "easy", 1: "ambiguous", 2: "easy", 3: "hard",
                                                             4: "hard"}
    s = find_label_issues(r)
    assert s.abstained is None and sorted(s.flagged_ids.tolist()) == [3, 4]
    assert dict(zip(s.ids.tolist(), s.regions.tolist()))[4] == "mislabeled"


def test_describe_fills_the_text_column_in_ranking_order() -> None:
    """Test that ``describe`` gives the ``text`` column, one call per ranked id, and a non-callable is refused."""
    s = find_label_issues(_fitted_records([10, 0, 10], [2.0, -2.0, 1.0]), describe=lambda i: f"#{i}")
    assert s.columns["text"].tolist() == [f"#{i}" for i in s.ids.tolist()]
    with pytest.raises(ValueError, match="`describe` must be a callable"):
        find_label_issues(_fitted_records([10], [1.0]), describe="text")  # type: ignore[arg-type]
