"""Per-layer activation statistics, dead units and gradient norms: accumulators and their tensor kernels.

Everything here launches kernels and never reads their results, except inside a flush
(:func:`~lightning_introspect.core._sync.allow_sync`). Sufficient statistics are sums, counts, minima and
firing counts with fixed shapes, so that accumulating over several calls of a layer, over the steps of a
window and across ranks is exact and each reduction is a single all-reduce.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

# ----------------------------------------------------------------------------------------------------------
# Histogram buckets: fixed, sign-symmetric, exponentially spaced (TensorBoard's own legacy scheme, coarser).
# Fixed edges make histograms of different steps, calls and ranks add exactly, and need no min/max read.
# Bucket CENTER holds |x| < HIST_LO (zeros); bucket CENTER +/- k holds HIST_LO * R**(k-1) <= |x| < HIST_LO * R**k.
# ----------------------------------------------------------------------------------------------------------
HIST_LO = 1e-6
HIST_RATIO = 1.2
HIST_K = int(math.ceil(math.log(1e6 / HIST_LO) / math.log(HIST_RATIO)))  # buckets per sign
HIST_BINS = 2 * HIST_K + 1
_HIST_CENTER = HIST_K
_INV_LOG_R = 1.0 / math.log(HIST_RATIO)


def histogram_edges() -> np.ndarray:
    """(HIST_BINS + 1,) left-to-right bucket edges of :func:`histogram_counts` (outer edges are +/-inf)."""
    pos = HIST_LO * HIST_RATIO ** np.arange(HIST_K)  # lower edges of positive buckets 1..K
    right = np.concatenate([-pos[::-1], pos])  # internal edges, 2K of them
    return np.concatenate([[-np.inf], right, [np.inf]])


def histogram_counts(x: Tensor, out: Tensor) -> None:
    """Adds the bucket counts of ``x`` (any shape) into ``out`` (HIST_BINS,), on x's device, without a sync.

    Non-finite values are left out (they are counted separately).
    """
    xf = x.detach().reshape(-1).float()
    finite = torch.isfinite(xf)
    a = xf.abs()
    k = torch.log(a * (1.0 / HIST_LO)).mul_(_INV_LOG_R).floor_().add_(1).clamp_(0, HIST_K)
    k = torch.nan_to_num_(k, nan=0.0)
    idx = (torch.sign(xf).mul_(k).add_(_HIST_CENTER)).long()
    out.index_add_(0, idx, finite.to(out.dtype))


def to_device(values: Sequence[float], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small host list as a tensor on ``device``; on CUDA through pinned memory, without a sync."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def unit_amax(x: Tensor, unit_dim: int) -> Tensor:
    """(units,) the largest value each unit took over every other dimension."""
    ud = unit_dim % x.ndim
    dims = tuple(d for d in range(x.ndim) if d != ud)
    return x.amax(dim=dims) if dims else x


class LayerStats:
    """One layer's activation statistics between two flushes, and its dead-unit streaks across flushes.

    ``update`` folds a layer output in (a layer called twice in one forward is folded twice: updates add).
    Per flush: ``count`` elements, ``sums`` = [sum, sum of squares, zeros, non-finite], ``mins`` = [min, -max],
    ``fired`` = per unit, in how many calls it exceeded the threshold, ``hist`` = bucket counts.
    ``streak`` (persistent) = per unit, for how many consecutive flushes it has not fired.
    """

    def __init__(self, name: str, *, unit_dim: int, dead_threshold: float, zero_threshold: float) -> None:
        self.name = name
        self.unit_dim = unit_dim
        self.dead_threshold = dead_threshold
        self.zero_threshold = zero_threshold
        self.count = 0  # elements seen since the last flush (host int: a shape, never a device read)
        self.calls = 0
        self.units: Optional[int] = None
        self.sums: Optional[Tensor] = None
        self.mins: Optional[Tensor] = None
        self.fired: Optional[Tensor] = None
        self.hist: Optional[Tensor] = None
        self.streak: Optional[Tensor] = None
        self.windows_seen = 0  # flushes (dead-unit windows) this layer took part in

    def _allocate(self, units: int, device: torch.device) -> None:
        self.units = units
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)
        self.mins = torch.full((2,), math.inf, dtype=torch.float32, device=device)
        self.fired = torch.zeros(units, dtype=torch.float32, device=device)
        self.hist = torch.zeros(HIST_BINS, dtype=torch.float64, device=device)
        if self.streak is None or self.streak.numel() != units:
            self.streak = torch.zeros(units, dtype=torch.float32, device=device)
        else:
            self.streak = self.streak.to(device)

    @property
    def allocated(self) -> bool:
        return self.sums is not None

    @torch.no_grad()
    def update(
        self, x: Tensor, *, moments: bool, dead: bool, histogram: bool, max_hist_elements: int,
        max_stat_elements: int = 1 << 16,
    ) -> bool:
        """Folds ``x`` (batch first) in. Returns False, doing nothing, when its unit count changed.

        Every element is read twice: once for the exact minimum and maximum (NaN/Inf show up there, so a
        non-finite value is never missed) and once for each unit's maximum (dead units). Mean, standard
        deviation, the fraction of zeros and the non-finite count are taken on a strided subsample of at
        most ``max_stat_elements`` elements, the histogram on at most ``max_hist_elements``: past a few
        ten thousand values more elements change these figures less than the step-to-step noise, and the
        cost of a sampled step stays bounded whatever the layer's size.
        """
        if x.ndim == 0 or x.numel() == 0:
            return True
        units = x.shape[self.unit_dim % x.ndim]
        if self.sums is None:
            self._allocate(units, x.device)
        elif units != self.units:
            return False
        assert self.sums is not None and self.mins is not None and self.fired is not None and self.hist is not None
        self.calls += 1
        numel = x.numel()
        flat = x.reshape(-1)
        if numel > max_stat_elements:
            flat = flat[:: -(-numel // max_stat_elements)]  # strided subsample: a view, no copy
        xf = flat.float()
        n = xf.numel()
        self.count += n
        if moments:
            lo, hi = torch.aminmax(x)
            torch.minimum(self.mins, torch.stack([lo, -hi]).float(), out=self.mins)
            # Plain sums, not torch.var_mean (several times slower than a conv on CPU); the squares are of
            # x - c with c one of the values (a device scalar, never read), so that the fp32 sum of squares
            # keeps the variance when |mean| >> std; shifted back in float64. x - x is NaN exactly where x
            # is NaN or +/-inf, so count_nonzero (fast on an all-zero tensor) counts the non-finite values.
            zeros = (xf.abs() <= self.zero_threshold).sum()  # not count_nonzero(x): branchy, slow on ReLU output
            nonfinite = torch.count_nonzero(xf - xf)
            c = xf[:1]
            d = xf - c
            s1, s2, c64 = xf.sum().double(), d.square().sum().double(), c.double().squeeze(0)
            upd = torch.stack([s1, s2 + (2 * s1 - n * c64) * c64, zeros.double(), nonfinite.double()])
            self.sums.add_(upd)
        if dead:
            self.fired.add_((unit_amax(x, self.unit_dim) > self.dead_threshold).float())
        if histogram:
            hflat = xf
            if n > max_hist_elements:
                hflat = xf[:: -(-n // max_hist_elements)]
            histogram_counts(hflat, self.hist)
        return True

    def reset(self) -> None:
        """Clears the window (not the streaks)."""
        self.count = 0
        self.calls = 0
        if self.sums is not None:
            assert self.mins is not None and self.fired is not None and self.hist is not None
            self.sums.zero_()
            self.mins.fill_(math.inf)
            self.fired.zero_()
            self.hist.zero_()

    @torch.no_grad()
    def close_dead_window(self) -> None:
        """After the cross-rank reduction: units that fired reset their streak, the others extend it."""
        if self.fired is not None and self.streak is not None:
            self.streak = torch.where(self.fired > 0, torch.zeros_like(self.streak), self.streak + 1)

    def state_dict(self) -> dict:
        return {
            "unit_dim": self.unit_dim,
            "windows_seen": self.windows_seen,
            "streak": None if self.streak is None else self.streak.detach().cpu(),
        }

    def load_state_dict(self, state: dict) -> None:
        streak = state.get("streak")
        self.streak = None if streak is None else streak.clone()
        self.windows_seen = int(state.get("windows_seen", 0))


class GradNorms:
    """Per-layer squared norms of gradients, weights and optimizer updates for one sampled step.

    Layers are the modules that own parameters (a parameter ``a.b.weight`` belongs to layer ``a.b``).
    Squared norms come from ``torch._foreach_norm`` (one fused launch per dtype/device group), are summed
    per layer with one ``index_add_`` and are read on the host only at the flush.
    """

    def __init__(self, param_names: Sequence[str]) -> None:
        self.param_names = list(param_names)
        self.layer_names: list[str] = []
        layer_index: dict[str, int] = {}
        self._param_layer: list[int] = []
        for name in self.param_names:
            layer = name.rsplit(".", 1)[0] if "." in name else "(root)"
            if layer not in layer_index:
                layer_index[layer] = len(self.layer_names)
                self.layer_names.append(layer)
            self._param_layer.append(layer_index[layer])
        self._index_cache: dict[tuple, Tensor] = {}
        self.grad_sq: Optional[Tensor] = None  # (L,)
        self.weight_sq: Optional[Tensor] = None  # (L,)
        self.update_sq: Optional[Tensor] = None  # (L,)
        self.param_grad: Optional[Tensor] = None  # (P,)
        self.observed = False  # host flags: whether grads / updates arrived this window
        self.updated = False
        self.observed_params: set[int] = set()
        self.skipped_updates = 0

    def _index(self, positions: tuple, device: torch.device) -> Tensor:
        key = (positions, device)
        idx = self._index_cache.get(key)
        if idx is None:
            idx = to_device([self._param_layer[i] for i in positions], torch.long, device)
            self._index_cache[key] = idx
        return idx

    def _buffers(self, device: torch.device) -> None:
        if self.grad_sq is None:
            L, P = len(self.layer_names), len(self.param_names)
            self.grad_sq = torch.zeros(L, dtype=torch.float64, device=device)
            self.weight_sq = torch.zeros(L, dtype=torch.float64, device=device)
            self.update_sq = torch.zeros(L, dtype=torch.float64, device=device)
            self.param_grad = torch.zeros(P, dtype=torch.float64, device=device)

    @staticmethod
    def _sq_norms(tensors: list[Tensor]) -> Tensor:
        norms = torch._foreach_norm(tensors)
        return torch.stack([n.to(norms[0].device) for n in norms]).double().square()

    @torch.no_grad()
    def observe(self, positions: Sequence[int], grads: list[Tensor], params: list[Tensor], per_param: bool) -> None:
        """Adds the squared gradient and weight norms of parameters ``positions`` (indices into param_names)."""
        if not grads:
            return
        device = grads[0].device
        self._buffers(device)
        assert self.grad_sq is not None and self.weight_sq is not None and self.param_grad is not None
        pos = tuple(positions)
        idx = self._index(pos, device)
        g2 = self._sq_norms(grads)
        self.grad_sq.index_add_(0, idx, g2)
        self.weight_sq.index_add_(0, idx, self._sq_norms(params))
        if per_param:
            self.param_grad.index_add_(0, self._pidx(pos, device), g2)
        self.observed = True
        self.observed_params.update(pos)

    def observed_layers(self) -> set[int]:
        """Indices of the layers with a gradient in this window (host bookkeeping)."""
        return {self._param_layer[i] for i in self.observed_params}

    def _pidx(self, positions: tuple, device: torch.device) -> Tensor:
        key = ("p", positions, device)
        idx = self._index_cache.get(key)
        if idx is None:
            idx = to_device(list(positions), torch.long, device)
            self._index_cache[key] = idx
        return idx

    @torch.no_grad()
    def observe_update(self, positions: Sequence[int], before: list[Tensor], after: list[Tensor]) -> None:
        """Adds the squared norms of the real parameter change ``after - before`` made by an optimizer step."""
        if not before:
            return
        device = before[0].device
        self._buffers(device)
        assert self.update_sq is not None
        deltas = torch._foreach_sub(after, before)
        self.update_sq.index_add_(0, self._index(tuple(positions), device), self._sq_norms(deltas))
        self.updated = True

    def reset(self) -> None:
        self.observed = False
        self.updated = False
        self.observed_params = set()
        if self.grad_sq is not None:
            for t in (self.grad_sq, self.weight_sq, self.update_sq, self.param_grad):
                assert t is not None
                t.zero_()
