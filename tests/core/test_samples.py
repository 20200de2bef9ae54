"""Unit tests of the per-example figure kernels' row status and the store's bad-input counters."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_introspect.core.samples import BAD_INPUT_NAMES, PerSampleStore, classification_figures, sequence_figures


def test_sequence_figures_status_per_example() -> None:
    """Test that a sequence example is used (1) with its mean over kept tokens, left out and counted (0) for a
    kept token with a target out of range, left out silently (-1) when every token is ignored, and gets a NaN
    loss for a non-finite logit in a kept token."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 5, generator=g)
    targets = torch.randint(0, 5, (4, 3), generator=g)
    targets[0, 2] = -100
    targets[1, 1] = 7
    targets[2] = -100
    logits[3, 0, 1] = float("nan")
    loss, _, _, _, status = sequence_figures(logits, targets, -100)
    assert status.tolist() == [1, 0, -1, 1]
    assert loss[0].item() == pytest.approx(F.cross_entropy(logits[0, :2], targets[0, :2]).item(), rel=1e-6)
    assert math.isnan(loss[3].item())


def test_store_counts_bad_targets_but_not_ignored_rows() -> None:
    """Test that the store leaves out rows with status 0 and -1, counting only the former, and averages the
    rows of an id repeated in a batch."""
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0]])
    targets = torch.tensor([0, -100, 5, 1])
    loss, margin, conf, correct, status = classification_figures(logits, targets, -100)
    assert status.tolist() == [1, -1, 0, 1]
    store = PerSampleStore(4)
    store.observe(torch.tensor([0, 1, 2, 0]), loss, margin, conf, correct, labels=targets, valid=status)
    counts = dict(zip(BAD_INPUT_NAMES, store.take_bad_counts().tolist()))
    assert counts == {"ids_out_of_range": 0, "ids_repeated_in_batch": 1, "targets_out_of_range": 1, "nonfinite_outputs": 0}
    means = store.epoch_means()
    assert means["seen"].tolist() == [True, False, False, False]
    assert means["loss"][0].item() == pytest.approx((loss[0].item() + loss[3].item()) / 2, rel=1e-6)


# ------------------------------------------------------------------------------------- suggested label
def _runner_up_logits(given: torch.Tensor, runner_up: torch.Tensor, C: int, g: torch.Generator) -> torch.Tensor:
    """(N, C) logits in which ``given`` is the top class and ``runner_up`` the second, the rest well below."""
    logits = torch.rand(given.shape[0], C, generator=g)
    rows = torch.arange(given.shape[0])
    logits[rows, given] = 5.0
    logits[rows, runner_up] = 3.0
    return logits


def _epoch(store: PerSampleStore, epoch: int, labels: torch.Tensor, runner_up: torch.Tensor, C: int,
           g: torch.Generator, batch: int = 7) -> None:
    """One shuffled epoch of batches through the store's observe(), then the fold."""
    from lightning_introspect.core.samples import classification_figures_with_other

    perm = torch.randperm(labels.shape[0], generator=g)
    for start in range(0, labels.shape[0], batch):
        ids = perm[start : start + batch]
        logits = _runner_up_logits(labels[ids], runner_up[ids], C, g)
        loss, margin, conf, correct, status, other = classification_figures_with_other(logits, labels[ids])
        store.observe(ids, loss, margin, conf, correct, labels=labels[ids], valid=status, other=other)
    store.fold_epoch(epoch)


def test_store_suggested_label_is_the_majority_runner_up() -> None:
    """Test that the suggested label is the class that was second most likely in most epochs, though a
    different class was runner-up in a minority of them (the second and the last), and -1 for unseen ids."""
    g = torch.Generator().manual_seed(0)
    N, C = 50, 7
    labels = torch.randint(0, C, (N,), generator=g)
    truth = (labels + torch.randint(1, C, (N,), generator=g)) % C  # the oracle: never the given label
    decoy = (truth + 1) % C
    decoy = torch.where(decoy == labels, (decoy + 1) % C, decoy)
    store = PerSampleStore(N + 3)  # three ids never seen
    for epoch, runner_up in enumerate([truth, decoy, truth, truth, decoy]):
        _epoch(store, epoch, labels, runner_up, C, g)
    rec = store.records()
    assert rec["suggested_label"][:N].tolist() == truth.tolist()
    assert rec["suggested_label"][N:].tolist() == [-1, -1, -1]
    assert rec["suggested_votes"][:N].tolist() == [1] * N  # +1 -1 +1 +1 -1


def test_store_votes_equal_the_numpy_reference() -> None:
    """Test that the store's vote equals scoring.fold_epoch's with random runner-ups (no majority needed)."""
    import numpy as np

    from lightning_introspect.core.scoring import fold_epoch, init_records

    g = torch.Generator().manual_seed(1)
    N, C = 40, 4
    labels = torch.randint(0, C, (N,), generator=g)
    store = PerSampleStore(N)
    ref = init_records(N)
    for epoch in range(6):
        runner_up = (labels + torch.randint(1, C, (N,), generator=g)) % C
        seen = torch.rand(N, generator=g) < 0.8
        ids = torch.nonzero(seen).squeeze(1)
        lab = labels[ids]
        logits = _runner_up_logits(lab, runner_up[ids], C, g)
        from lightning_introspect.core.samples import classification_figures_with_other

        loss, margin, conf, correct, status, other = classification_figures_with_other(logits, lab)
        store.observe(ids, loss, margin, conf, correct, labels=lab, valid=status, other=other)
        store.fold_epoch(epoch)
        fold_epoch(ref, epoch, ids.numpy(), lab.numpy(), loss=loss.numpy(), margin=margin.numpy(),
                   confidence=conf.numpy(), correct=correct.numpy(), other=runner_up[ids].numpy())
    rec = store.records()
    np.testing.assert_array_equal(rec["suggested_label"], ref["suggested_label"])
    np.testing.assert_array_equal(rec["suggested_votes"], ref["suggested_votes"])


def test_store_votes_merge_across_ranks_as_end_epoch_reduces_them() -> None:
    """Test that two stores fed halves of each epoch (a padded duplicate on both), reduced the way the epoch
    end reduces them (sum of the epoch buffer, max of labels and runner-ups), vote as one store fed all."""
    g = torch.Generator().manual_seed(2)
    N, C = 30, 5
    labels = torch.randint(0, C, (N,), generator=g)
    whole, ranks = PerSampleStore(N), [PerSampleStore(N), PerSampleStore(N)]
    from lightning_introspect.core.samples import classification_figures_with_other

    for epoch in range(4):
        runner_up = (labels + torch.randint(1, C, (N,), generator=g)) % C
        logits = _runner_up_logits(labels, runner_up, C, g)
        figs = classification_figures_with_other(logits, labels)
        ids = torch.arange(N)
        whole.observe(ids, *figs[:4], labels=labels, valid=figs[4], other=figs[5])
        for r, part in enumerate([torch.arange(0, 16), torch.cat([torch.arange(15, N)])]):  # id 15 on both ranks
            ranks[r].observe(part, *(f[part] for f in figs[:4]), labels=labels[part], valid=figs[4][part],
                             other=figs[5][part])
        epoch_sum = ranks[0].epoch + ranks[1].epoch
        label_max = torch.maximum(ranks[0].label, ranks[1].label)
        other_max = torch.maximum(ranks[0].epoch_other, ranks[1].epoch_other)
        for st in ranks:
            st.epoch.copy_(epoch_sum)
            st.label.copy_(label_max)
            st.epoch_other.copy_(other_max)
            st.fold_epoch(epoch)
        whole.fold_epoch(epoch)
    for st in ranks:
        assert st.records()["suggested_label"].tolist() == whole.records()["suggested_label"].tolist()
        assert st.records()["suggested_votes"].tolist() == whole.records()["suggested_votes"].tolist()


def test_store_state_dict_keeps_the_votes_and_the_epoch_runner_ups() -> None:
    """Test that a store saved mid-epoch and loaded into a new one ends with the same votes as one never saved."""
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    N, C = 20, 6
    labels = torch.randint(0, C, (N,), generator=torch.Generator().manual_seed(4))
    runner = [(labels + k) % C for k in (1, 2, 1, 2, 2)]
    a = PerSampleStore(N)
    for epoch, r in enumerate(runner):
        _epoch(a, epoch, labels, r, C, g1)
    b = PerSampleStore(N)
    for epoch, r in enumerate(runner[:3]):
        _epoch(b, epoch, labels, r, C, g2)
    resumed = PerSampleStore(N)
    resumed.load_state_dict(b.state_dict())
    for epoch, r in enumerate(runner[3:], start=3):
        _epoch(resumed, epoch, labels, r, C, g2)
    assert resumed.records()["suggested_label"].tolist() == a.records()["suggested_label"].tolist()
    assert resumed.records()["suggested_label"].tolist() == ((labels + 2) % C).tolist()
    assert resumed.records()["suggested_votes"].tolist() == a.records()["suggested_votes"].tolist()


@pytest.mark.parametrize("num_classes", [2, 1000])
def test_store_memory_stays_within_64_bytes_per_example_whatever_the_classes(num_classes: int) -> None:
    """Test that the store's device tensors, suggested label included, take at most 64 B per example and do
    not grow with the number of classes."""
    N = 4096
    store = PerSampleStore(N)
    before = store.bytes_per_example()
    g = torch.Generator().manual_seed(5)
    labels = torch.randint(0, num_classes, (N,), generator=g)
    runner = (labels + 1) % num_classes
    _epoch(store, 0, labels, runner, num_classes, g, batch=512)
    assert store.bytes_per_example() == before
    assert before <= 64
    tensors = [v for v in vars(store).values() if isinstance(v, torch.Tensor) and v.numel() >= N]
    assert sum(t.numel() * t.element_size() for t in tensors) / N <= 64  # nothing per example left uncounted


def test_sequence_figures_are_the_means_over_each_examples_kept_tokens() -> None:
    """Test each example's loss, margin, probability and token accuracy against a per-example oracle over
    its tokens that are not ignored (ignored tokens at the end, in the middle, and an all-ignored example)."""
    g = torch.Generator().manual_seed(0)
    N, T, C = 4, 6, 5
    logits = torch.randn(N, T, C, generator=g)
    targets = torch.randint(0, C, (N, T), generator=g)
    targets[0, 4:] = -100
    targets[1, 1:3] = -100
    targets[3, :] = -100
    loss, margin, conf, correct, status = sequence_figures(logits, targets, -100)
    for i in range(3):
        kept = targets[i] != -100
        lg, tg = logits[i][kept], targets[i][kept]
        given = lg.gather(1, tg[:, None]).squeeze(1)
        other = lg.scatter(1, tg[:, None], float("-inf")).max(1).values
        torch.testing.assert_close(loss[i], torch.nn.functional.cross_entropy(lg, tg))
        torch.testing.assert_close(margin[i], (given - other).mean())
        torch.testing.assert_close(conf[i], lg.softmax(1).gather(1, tg[:, None]).mean())
        torch.testing.assert_close(correct[i], (lg.argmax(1) == tg).float().mean())
    assert status.tolist() == [1, 1, 1, -1]
