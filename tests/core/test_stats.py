"""Tests for the on-device statistics: closed-form answers and one-shot torch oracles, no Trainer."""
from __future__ import annotations

import math
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pytest
import torch
from helpers.models import DeadUnitNet, ReusedNet, TupleDictNet, unit_inputs
from helpers.tb import read_events
from torch import Tensor, nn

from lightning_introspect.core import IntrospectConfig, Introspector, LayerStats, histogram_counts, histogram_edges
from lightning_introspect.core.stats import HIST_BINS, HIST_K, HIST_LO, HIST_RATIO
from lightning_introspect.sinks import TensorBoardSink

Scalars = dict[str, dict[int, float]]


def config(**kwargs: Any) -> IntrospectConfig:
    """Every step sampled; gradient figures off unless asked for."""
    base: dict[str, Any] = dict(every_n_steps=1, warmup_steps=0, grad_norms=False)
    base.update(kwargs)
    return IntrospectConfig(**base)


def run_forwards(model: nn.Module, cfg: IntrospectConfig, batches: Sequence[Sequence[Tensor]],
                 sinks: Sequence[Any] = (), backward: bool = False) -> Scalars:
    """Step ``s`` runs one forward per tensor of ``batches[s]`` (and a backward of the output's sum with
    ``backward``); returns the scalars written (tag -> step -> value)."""
    out: Scalars = defaultdict(dict)

    def collect(scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            out[tag][step] = value

    intro = Introspector(model, cfg, on_scalars=collect, sinks=sinks)
    with torch.set_grad_enabled(backward):
        for step, xs in enumerate(batches):
            with intro.step(step):
                for x in xs:
                    y = model(x)
                    if backward:
                        y.sum().backward()
    intro.close()
    return out


def record_outputs(module: nn.Module) -> tuple[list[Tensor], Callable[[], None]]:
    """An independent oracle: every output tensor of ``module`` (first tensor of tuples/dicts), and a remover."""
    seen: list[Tensor] = []

    def hook(_m: nn.Module, _a: Any, out: Any) -> None:
        if isinstance(out, tuple):
            out = out[0]
        if isinstance(out, dict):
            out = next(iter(out.values()))
        seen.append(out.detach().clone())

    handle = module.register_forward_hook(hook)
    return seen, handle.remove


def oracle(x: Tensor) -> dict[str, float]:
    """One-shot statistics of all elements of ``x`` in float64."""
    x = x.double().reshape(-1)
    return {"mean": x.mean().item(), "std": x.std(correction=0).item(), "min": x.min().item(),
            "max": x.max().item(), "zero_fraction": (x == 0).double().mean().item()}


def assert_activation_stats(scalars: Scalars, layer: str, step: int, data: Tensor) -> None:
    expected = oracle(data)
    for key in ("mean", "std", "min", "max", "zero_fraction"):
        assert scalars[f"activation_{key}/{layer}"][step] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), key
    assert scalars[f"activation_nonfinite/{layer}"][step] == 0


# ------------------------------------------------------------------------------------------------ dead units
@pytest.mark.parametrize("inplace", [False, True], ids=["relu", "inplace_relu"])
@pytest.mark.parametrize("window", [1, 3])
def test_dead_fraction_is_exactly_one_quarter_after_dead_window(inplace: bool, window: int) -> None:
    """Test that Linear(3,4) with bias (-10,1,1,1) has dead fraction exactly 0.25 once ``dead_window`` steps passed:
    on the ReLU by its output, on the Linear (named alone: no ReLU module watched after it) by its gradient."""
    g = torch.Generator().manual_seed(1)
    steps = window + 10  # windows of consecutive steps are folded FOLD_BATCH at a time: more than one batch
    batches = [[unit_inputs(16, g)] for _ in range(steps)]
    for layer in ("linear", "relu"):
        scalars = run_forwards(
            DeadUnitNet(inplace=inplace), config(dead_window=window, layers=[layer]), batches, backward=True
        )
        assert sorted(scalars[f"dead_fraction/{layer}"]) == list(range(window - 1, steps))
        assert set(scalars[f"dead_fraction/{layer}"].values()) == {0.25}
        assert set(scalars[f"dead_count/{layer}"].values()) == {1.0}
        # streak of the dead unit after step s: s + 1 steps -> that many whole windows
        assert scalars[f"dead_windows/{layer}"] == {s: float((s + 1) // window) for s in range(window - 1, steps)}


def test_windows_folded_together_give_the_figures_of_windows_folded_one_by_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Test that every-step windows handed to the writer FOLD_BATCH at a time (one fold, one copy) give exactly
    the figures of the same windows folded one at a time: activation statistics of two calls a step and the
    dead-unit streaks, carried from batch to batch."""
    import lightning_introspect.core.introspector as module

    def run(batch: int) -> Scalars:
        monkeypatch.setattr(module, "FOLD_BATCH", batch)
        g = torch.Generator().manual_seed(3)
        batches = [[unit_inputs(16, g), unit_inputs(5, g)] for _ in range(19)]
        return run_forwards(DeadUnitNet(), config(dead_window=2, layers=["linear", "relu"]), batches)

    batch = module.FOLD_BATCH
    together, alone = run(batch), run(1)
    assert batch > 1 and len(together["dead_windows/relu"]) == 18
    assert together == alone


def test_default_selection_judges_activation_modules_only() -> None:
    """Test that by default dead units are judged on the ReLU module, not again on the Linear before it."""
    g = torch.Generator().manual_seed(1)
    scalars = run_forwards(DeadUnitNet(), config(dead_window=2), [[unit_inputs(16, g)] for _ in range(3)])
    assert set(scalars["dead_fraction/relu"].values()) == {0.25}
    assert "dead_fraction/linear" not in scalars and "activation_mean/linear" in scalars


class _Functional(nn.Module):
    """DeadUnitNet's Linear with unit 0's bias at -3.2 (pre-activation in (-3.2, -0.2) for inputs in [0, 1): just
    below 0), then a functional activation, then a Linear(4, 2) with weights 1."""

    def __init__(self, activation: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fc1, self.fc2, self.activation = DeadUnitNet().linear, nn.Linear(4, 2), activation
        with torch.no_grad():
            self.fc1.bias[0] = -3.2
            self.fc2.weight.fill_(1.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.activation(self.fc1(x)))


@pytest.mark.parametrize(
    "activation, dead", [(torch.relu, 0.25), (torch.tanh, 0.0), (nn.functional.gelu, 0.0), (torch.sigmoid, 0.0)],
    ids=["relu", "tanh", "gelu", "sigmoid"],
)
def test_functional_activation_is_judged_by_the_gradient(activation: Callable[[Tensor], Tensor], dead: float) -> None:
    """Test that a weight layer followed by a functional activation is judged by the gradient reaching it: the
    pre-activation rule behind F.relu (unit 0 stays below 0), no false dead unit behind tanh, GELU or sigmoid
    (they pass gradient there), and none in the logits layer."""
    g = torch.Generator().manual_seed(1)
    scalars = run_forwards(_Functional(activation), config(dead_window=2), [[unit_inputs(8, g)] for _ in range(4)],
                           backward=True)
    assert scalars["dead_fraction/fc1"] == {1: dead, 2: dead, 3: dead}
    assert set(scalars["dead_fraction/fc2"].values()) == {0.0}


def test_without_a_backward_pass_a_gradient_rule_gives_no_verdict() -> None:
    """Test that with forward passes only (no gradient ever reaches the layers) no dead tag is written."""
    g = torch.Generator().manual_seed(1)
    scalars = run_forwards(_Functional(torch.relu), config(dead_window=1), [[unit_inputs(8, g)] for _ in range(3)])
    assert "activation_mean/fc1" in scalars and not any(t.startswith("dead_") for t in scalars)


def test_inplace_relu_sees_pre_activations() -> None:
    """Test that with ReLU(inplace=True) the Linear's figures are its own output, read before ReLU overwrites it."""
    g = torch.Generator().manual_seed(2)
    x = unit_inputs(8, g)
    model = DeadUnitNet(inplace=True)
    with torch.no_grad():
        pre = model.linear(x)
    scalars = run_forwards(model, config(), [[x]])
    assert_activation_stats(scalars, "linear", 0, pre)
    assert scalars["activation_min/linear"][0] < -7  # negatives: the pre-activation, not the ReLU output
    assert_activation_stats(scalars, "relu", 0, pre.clamp_min(0))


def test_inplace_relu_trains_with_gradient_figures() -> None:
    """Test that hooks on a Linear followed by an in-place ReLU do not break backward, and norms are written."""
    model = DeadUnitNet(inplace=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out: Scalars = defaultdict(dict)
    intro = Introspector(model, config(grad_norms=True),
                         on_scalars=lambda s, step: out["g"].update({step: s["grad_norm/global"]}))
    g = torch.Generator().manual_seed(3)
    for step in range(2):
        with intro.step(step):
            loss = model(unit_inputs(8, g)).sum()
            opt.zero_grad()
            loss.backward()
            intro.observe_gradients(opt)
            opt.step()
    intro.close()
    assert sorted(out["g"]) == [0, 1] and all(v > 0 for v in out["g"].values())


# ------------------------------------------------------------------------------------------------ streamed = one-shot
def test_streamed_statistics_equal_one_shot_on_concatenated_data() -> None:
    """Test that three forwards folded into one step give the statistics of their outputs concatenated."""
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU())
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(n, 5, generator=g) for n in (6, 9, 3)]
    outs, remove = record_outputs(model[0])
    relu_outs, remove_relu = record_outputs(model[1])
    scalars = run_forwards(model, config(max_rows=64), [xs])
    remove(), remove_relu()
    assert_activation_stats(scalars, "0", 0, torch.cat(outs))
    assert_activation_stats(scalars, "1", 0, torch.cat(relu_outs))
    assert scalars["activation_zero_fraction/1"][0] > 0.2  # ReLU zeros are counted


def test_max_rows_cuts_each_call() -> None:
    """Test that only the first ``max_rows`` rows of each call enter the statistics."""
    model = nn.Sequential(nn.Linear(5, 7))
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(10, 5, generator=g) for _ in range(2)]
    outs, remove = record_outputs(model[0])
    scalars = run_forwards(model, config(max_rows=4), [xs])
    remove()
    assert_activation_stats(scalars, "0", 0, torch.cat([o[:4] for o in outs]))


def test_nonfinite_values_are_counted() -> None:
    """Test that NaN and Inf outputs are counted per layer and the histogram leaves them out."""
    model = nn.Sequential(nn.Identity())
    x = torch.tensor([[1.0, float("nan"), 0.0], [float("inf"), -2.0, float("-inf")]])
    stats = LayerStats("x", unit_dim=-1, dead_threshold=0.0, zero_threshold=0.0)
    stats.update(x, moments=True, dead=True, histogram=True, max_hist_elements=1 << 16)
    assert stats.sums is not None and stats.hist is not None
    assert stats.sums[3].item() == 3.0  # non-finite count
    assert stats.sums[2].item() == 1.0  # zeros
    assert stats.hist.sum().item() == 3.0  # finite values only
    with pytest.warns(RuntimeWarning, match="first layer in forward order with a non-finite output is '0'"):
        scalars = run_forwards(model, config(layer_types=(nn.Identity,)), [[x]])
    assert scalars["activation_nonfinite/0"][0] == 3.0
    assert math.isnan(scalars["activation_mean/0"][0])


def _stream(chunks: Sequence[Tensor], unit_dim: int = -1, dead: bool = True) -> LayerStats:
    st = LayerStats("l", unit_dim=unit_dim, dead_threshold=0.0, zero_threshold=0.0)
    for c in chunks:
        assert st.update(c, moments=True, dead=dead, histogram=True, max_hist_elements=1 << 20)
    return st


@pytest.mark.parametrize("dead", [True, False])
@pytest.mark.parametrize("unit_dim", [-1, 1])
def test_layer_stats_streamed_equal_one_shot(unit_dim: int, dead: bool) -> None:
    """Test that LayerStats fed chunks holds sum, sum of squares, zeros, min, max, firing and bucket counts of
    all, with the dead-unit pass (whose unit maxima give the maximum) and without it."""
    g = torch.Generator().manual_seed(6)
    chunks = [torch.randn(n, 4, 3, generator=g).relu_() - 0.2 for n in (5, 2, 7)]
    st = _stream(chunks, unit_dim, dead)
    allx = torch.cat(chunks).double()
    assert st.sums is not None and st.mins is not None and st.hist is not None
    torch.testing.assert_close(st.sums[:2], torch.stack([allx.sum(), allx.square().sum()]), rtol=1e-6, atol=1e-6)
    assert st.sums[2].item() == (allx == 0).sum().item()
    assert st.mins.tolist() == pytest.approx([allx.min().item(), -allx.max().item()])
    assert st.count == allx.numel()
    units = allx.movedim(unit_dim, -1).reshape(-1, allx.shape[unit_dim])
    per_call = torch.stack([(c.movedim(unit_dim, -1).reshape(-1, units.shape[1]) > 0).any(0) for c in chunks])
    if dead:  # one count per call in which the unit fired
        assert st.fired is not None
        torch.testing.assert_close(st.fired, per_call.float().sum(0))
    one_shot = torch.zeros(HIST_BINS, dtype=torch.float64)
    histogram_counts(allx, one_shot)
    torch.testing.assert_close(st.hist, one_shot, rtol=0, atol=0)


def test_a_fold_in_chunks_gives_the_figures_of_one_fold_of_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    """Test that folding the captures in chunks (bounded temporaries) gives the figures of one fold over all of
    them: sums to rounding, minima, firing and bucket counts exactly, with layers of two capture sizes."""
    import lightning_introspect.core.stats as module
    from lightning_introspect.core.stats import CaptureFolder

    g = torch.Generator().manual_seed(9)
    layers = []
    for i in range(7):  # 4 layers captured at max_stat_elements, 3 smaller ones; 3 calls each
        st = LayerStats(f"l{i}", unit_dim=1, dead_threshold=0.0, zero_threshold=0.0)
        shape = (16, 8, 6, 6) if i < 4 else (16, 5)
        for _ in range(3):
            assert st.capture(torch.randn(*shape, generator=g).relu_() - 0.1, moments=True, dead=True,
                              max_stat_elements=1024)
        layers.append(st.take_captures())

    def fold(chunk_elements: int) -> dict[str, Tensor]:
        monkeypatch.setattr(module, "FOLD_CHUNK_ELEMENTS", chunk_elements)
        return CaptureFolder(0.0, max_hist_elements=512).fold(layers, histogram=True)

    chunked, whole = fold(2000), fold(1 << 30)  # 2000: one or two captures a chunk
    torch.testing.assert_close(chunked["sums"], whole["sums"], rtol=1e-12, atol=1e-9)
    for key in ("mins", "fired", "hist"):
        torch.testing.assert_close(chunked[key], whole[key], rtol=0, atol=0)
    assert whole["hist"].sum().item() == 4 * 3 * 512 + 3 * 3 * 80  # each capture: its subsample, or all of it


def test_two_accumulators_fed_halves_equal_one_fed_everything() -> None:
    """Test that merging (sum/min) the states of two LayerStats fed halves equals one LayerStats fed all."""
    g = torch.Generator().manual_seed(7)
    chunks = [torch.randn(6, 5, generator=g) for _ in range(4)]
    a, b, full = _stream(chunks[:2]), _stream(chunks[2:]), _stream(chunks)
    assert a.sums is not None and b.sums is not None and full.sums is not None
    torch.testing.assert_close(a.sums + b.sums, full.sums, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(torch.minimum(a.mins, b.mins), full.mins, rtol=0, atol=0)  # type: ignore[arg-type]
    torch.testing.assert_close(a.fired + b.fired, full.fired, rtol=0, atol=0)  # type: ignore[operator]
    torch.testing.assert_close(a.hist + b.hist, full.hist, rtol=0, atol=0)  # type: ignore[operator]
    assert a.count + b.count == full.count


def test_histogram_buckets_closed_form() -> None:
    """Test that values at bucket centres land in bucket CENTER +/- k, zeros in the centre, counts as placed."""
    rng = np.random.default_rng(0)
    k = rng.integers(1, HIST_K + 1, size=200)
    sign = rng.choice([-1.0, 1.0], size=200)
    values = np.concatenate([sign * HIST_LO * HIST_RATIO ** (k - 0.5), np.zeros(5), [1e-9]])
    counts = torch.zeros(HIST_BINS, dtype=torch.float64)
    histogram_counts(torch.tensor(values, dtype=torch.float32), counts)
    expected = np.zeros(HIST_BINS)
    np.add.at(expected, (HIST_K + sign * k).astype(int), 1)
    expected[HIST_K] += 6
    np.testing.assert_array_equal(counts.numpy(), expected)
    edges = histogram_edges()
    assert edges.shape == (HIST_BINS + 1,)
    idx = np.searchsorted(edges, values[:200], side="right") - 1  # the documented edges say the same
    np.testing.assert_array_equal(idx, (HIST_K + sign * k).astype(int))


def test_histogram_lookup_agrees_with_edges_at_and_beside_every_edge() -> None:
    """Test the table lookup against a binary search over the documented edges (negative values mirrored: a
    negative bucket holds its edge nearer zero): on every edge, one float32 step nearer zero, random values
    over all magnitudes, zeros, and the non-finite values it leaves out."""
    edges = histogram_edges()
    inner = edges[1:-1].astype(np.float32)
    assert np.all(np.diff(edges) > 0) and np.array_equal(inner.astype(np.float64), edges[1:-1])  # exact floats
    below = np.nextafter(inner, np.float32(0))
    rng = np.random.default_rng(1)
    spread = (rng.choice([-1, 1], 5000) * 10.0 ** rng.uniform(-9, 8, 5000)).astype(np.float32)
    values = np.concatenate([inner, below, spread, np.float32([0.0, -0.0, 1e-30, -1e-30, 3e38, -3e38])])
    counts = torch.zeros(HIST_BINS, dtype=torch.float64)
    histogram_counts(torch.from_numpy(np.concatenate([values, np.float32([np.nan, np.inf, -np.inf])])), counts)
    v = values.astype(np.float64)
    right = np.searchsorted(edges, np.abs(v), side="right") - 1  # bucket [edge, next edge) of |v|
    mirrored = np.where(v < 0, HIST_BINS - 1 - right, right)  # negative buckets mirror the positive ones
    expected = np.bincount(mirrored, minlength=HIST_BINS)
    np.testing.assert_array_equal(counts.numpy(), expected)


def test_histogram_written_to_tensorboard_matches_data(tmp_path: Path) -> None:
    """Test that the histogram read back from the event file has the data's counts, sum, min and max."""
    model = nn.Sequential(nn.Linear(4, 6))
    g = torch.Generator().manual_seed(8)
    xs = [torch.randn(8, 4, generator=g) for _ in range(2)]
    outs, remove = record_outputs(model[0])
    run_forwards(model, config(), [xs], sinks=[TensorBoardSink(tmp_path)])
    remove()
    data = torch.cat(outs).double().reshape(-1).numpy()
    (step, h), = read_events(tmp_path).histograms["activation_hist/0"]
    assert step == 0
    assert h.num == data.size and sum(h.bucket) == data.size
    assert h.min == pytest.approx(data.min(), rel=1e-6) and h.max == pytest.approx(data.max(), rel=1e-6)
    assert h.sum == pytest.approx(data.sum(), rel=1e-5, abs=1e-6)
    assert h.sum_squares == pytest.approx((data**2).sum(), rel=1e-6)
    # each bucket [limit[i-1], limit[i]) holds the values between its limits
    limits = np.asarray(h.bucket_limit)
    lower = np.concatenate([[-np.inf], limits[:-1]])
    for lo, hi, c in zip(lower, limits, h.bucket):
        inside = ((data >= lo) & (data < hi)) | ((data == hi) & (hi == limits[-1]))
        assert c == inside.sum()


# ------------------------------------------------------------------------------------------------ model shapes
def test_module_called_twice_folds_both_calls() -> None:
    """Test that a Linear called twice in one forward contributes both outputs to its statistics."""
    model = ReusedNet()
    g = torch.Generator().manual_seed(11)
    x = torch.randn(6, 3, generator=g)
    first, second = model.linear_outputs(x)
    scalars = run_forwards(model, config(), [[x]])
    assert_activation_stats(scalars, "linear", 0, torch.cat([first, second]))
    assert_activation_stats(scalars, "relu", 0, torch.cat([first.relu(), second.relu()]))


def test_layers_returning_tuples_and_dicts_are_watched() -> None:
    """Test that a layer returning a tuple or a dict is watched through its first tensor, without a skip warning."""
    model = TupleDictNet()
    g = torch.Generator().manual_seed(12)
    x = torch.randn(5, 3, generator=g)
    with torch.no_grad():
        pair, _ = model.pair(x)
        named = model.named(pair)["out"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scalars = run_forwards(model, config(), [[x]])
    assert_activation_stats(scalars, "pair", 0, pair)
    assert_activation_stats(scalars, "named", 0, named)


def test_layer_returning_no_tensor_is_skipped_with_a_warning() -> None:
    """Test that a watched layer whose output has no floating-point tensor is skipped with a warning naming it."""

    class IntOut(nn.Linear):
        def forward(self, x: Tensor) -> Any:  # type: ignore[override]
            return (super().forward(x) > 0).long()

    model = nn.Sequential(IntOut(3, 2))
    with pytest.warns(UserWarning, match=r"layer '0' returned .*not a floating-point tensor"):
        scalars = run_forwards(model, config(), [[torch.randn(4, 3)], [torch.randn(4, 3)]])
    assert not any(t.endswith("/0") and t.startswith("activation_") for t in scalars)


@pytest.mark.parametrize(
    "module, fires, still",
    [
        (nn.ReLU(), [0.0, 1e-3], [0.0, -5.0]),
        (nn.ReLU6(), [6.0, 5.9], [6.0, 0.0]),  # pinned at 6 or 0: no gradient either way
        (nn.Hardswish(), [0.0, -0.3], [0.0, 0.0]),
        (nn.Tanh(), [0.999, 0.99], [0.999, -0.9999]),  # |y| > sqrt(0.99) = 0.99499 is saturated
        (nn.Sigmoid(), [0.001, 0.01], [0.001, 0.999]),
        (nn.Hardtanh(), [1.0, 0.5], [1.0, -1.0]),
        (nn.Hardsigmoid(), [0.0, 0.5], [0.0, 1.0]),
        (nn.Threshold(0.5, 0.0), [0.0, 0.6], [0.0, 0.0]),
    ],
    ids=["relu", "relu6", "hardswish", "tanh", "sigmoid", "hardtanh", "hardsigmoid", "threshold"],
)
def test_a_unit_fires_exactly_when_an_output_lies_in_its_activations_active_region(
    module: nn.Module, fires: list[float], still: list[float]
) -> None:
    """Test each activation's rule on two units fed two outputs each: unit 0 with ``fires`` (one value inside the
    active region) fires, unit 1 with ``still`` (both outside) does not."""
    from lightning_introspect.core.units import unit_rule

    rule = unit_rule(module)
    assert rule is not None and rule.source == "output"
    st = LayerStats("l", unit_dim=-1, dead_threshold=0.0, zero_threshold=0.0, rule=rule)
    x = torch.tensor([fires, still]).T.contiguous()  # (2 outputs, 2 units)
    assert st.update(x, moments=True, dead=True, histogram=False, max_hist_elements=64)
    assert st.fired is not None and st.fired.tolist() == [1.0, 0.0]
    assert st.mins is not None and -st.mins[1].item() == pytest.approx(x.max().item())  # the exact maximum


@pytest.mark.parametrize("module", [nn.ELU(), nn.GELU(), nn.LeakyReLU(), nn.SiLU(), nn.Softplus(), nn.PReLU()])
def test_activations_that_pass_gradient_everywhere_are_not_judged(module: nn.Module) -> None:
    """Test that activations with no region without gradient have no rule, and others fall back to the gradient."""
    from lightning_introspect.core.units import GRADIENT_RULE, unit_rule

    assert unit_rule(module) is None
    assert unit_rule(nn.Linear(2, 2)) == GRADIENT_RULE and unit_rule(nn.LeakyReLU(0.0)) is not None


def test_multihead_attention_is_selected_and_its_out_proj_is_not() -> None:
    """Test that default selection keeps an nn.MultiheadAttention and leaves out its never-called out_proj, unless
    ``layers`` names it exactly."""
    from lightning_introspect.core.hooks import select_layers

    model = nn.Sequential(nn.MultiheadAttention(4, 1), nn.Linear(4, 4))
    assert [n for n, _ in select_layers(model, IntrospectConfig())] == ["0", "1"]
    with pytest.raises(ValueError, match=r"Left out: \['0.out_proj'\] \(never called"):
        select_layers(model, IntrospectConfig(layers=["0.*"]))
    assert [n for n, _ in select_layers(model, IntrospectConfig(layers=["0.out_proj"]))] == ["0.out_proj"]
