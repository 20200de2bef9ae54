"""Per-layer activation statistics, dead units and gradient norms: accumulators and their tensor kernels.

Everything here launches kernels and never reads their results, except inside a flush
(:func:`~lightning_introspect.core._sync.allow_sync`). Sufficient statistics are sums, counts, minima and
firing counts with fixed shapes, so that accumulating over several calls of a layer, over the steps of a
window and across ranks is exact and each reduction is a single all-reduce.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .units import UnitRule

# ----------------------------------------------------------------------------------------------------------
# Histogram buckets: fixed, sign-symmetric, exponentially spaced (TensorBoard's own legacy scheme, coarser).
# Fixed edges make histograms of different steps, calls and ranks add exactly, and need no min/max read.
# Bucket CENTER holds |x| < e_1 (zeros); bucket CENTER +/- k holds e_k <= |x| < e_(k+1), e_k ~ HIST_LO * R**(k-1).
# Each edge is rounded up to a bfloat16 value, so that a value's bucket is a table lookup on the top 16 bits
# of its float32 pattern (sign, exponent, 7 mantissa bits): truncating |x| to those bits never crosses an
# edge that is itself such a value. One shift and one gather, exact, instead of a log per element.
# ----------------------------------------------------------------------------------------------------------
HIST_LO = 1e-6
HIST_RATIO = 1.2
HIST_K = int(math.ceil(math.log(1e6 / HIST_LO) / math.log(HIST_RATIO)))  # buckets per sign
HIST_BINS = 2 * HIST_K + 1
# Two columns past the last bucket: NaN and +/-inf (left out of histograms, counted), and exact zeros
# (|x| < 2**-133: zero patterns; part of the centre bucket, also counted on their own). A lookup thus also
# counts zeros and non-finite values, for free.
NONFINITE_BUCKET = HIST_BINS
ZERO_BUCKET = HIST_BINS + 1
HIST_WIDTH = HIST_BINS + 2
_HIST_CENTER = HIST_K


def _edge_patterns() -> np.ndarray:
    """(HIST_K,) the bfloat16 bit patterns (top 16 bits of float32) of the positive edges e_1..e_K."""
    exact = (HIST_LO * HIST_RATIO ** np.arange(HIST_K)).astype(np.float32)
    bits = exact.view(np.uint32).astype(np.int64)
    return (bits + 0xFFFF) >> 16  # rounded up to the next bfloat16 value


_EDGE_PATTERNS = _edge_patterns()


def _bucket_table() -> np.ndarray:
    """(65536,) bucket of every top-16-bit pattern of a float32 value."""
    pattern = np.arange(1 << 16, dtype=np.int64)
    magnitude = pattern & 0x7FFF
    k = np.searchsorted(_EDGE_PATTERNS, magnitude, side="right")  # positive patterns sort as their values
    table = np.where(pattern >> 15 == 1, _HIST_CENTER - k, _HIST_CENTER + k)
    table[(magnitude >> 7) == 0xFF] = NONFINITE_BUCKET  # exponent all ones: inf or NaN
    table[magnitude == 0] = ZERO_BUCKET
    return table.astype(np.int32)


_BUCKET_TABLE = _bucket_table()
_TABLES: dict[torch.device, Tensor] = {}


def histogram_edges() -> np.ndarray:
    """(HIST_BINS + 1,) left-to-right bucket edges of :func:`histogram_counts` (outer edges are +/-inf).

    Buckets are sign-symmetric: a positive bucket holds [lower edge, upper edge), a negative one the mirror
    image (lower edge, upper edge], so a value lying exactly on a negative edge counts one bucket nearer zero.
    """
    pos = (_EDGE_PATTERNS.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return np.concatenate([[-np.inf], -pos[::-1], pos, [np.inf]])


def histogram_counts(x: Tensor, out: Tensor) -> None:
    """Adds the bucket counts of ``x`` (any shape) into ``out`` (HIST_BINS,), on x's device, without a sync.

    Non-finite values are left out (they are counted separately).
    """
    counts = _bucket_counts(x.detach().reshape(1, -1))
    counts[:, _HIST_CENTER] += counts[:, ZERO_BUCKET]
    out.add_(counts[0, :HIST_BINS].to(out.dtype))


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


def _bucket_index(x: Tensor) -> Tensor:
    """Bucket of each value of ``x`` (any float dtype, any shape; same shape out, int32), the scheme of
    :func:`histogram_edges`; non-finite values -> ``NONFINITE_BUCKET``, zeros -> ``ZERO_BUCKET``."""
    table = _TABLES.get(x.device)
    if table is None:
        table = _TABLES[x.device] = torch.as_tensor(_BUCKET_TABLE, device=x.device)
    top = (x.float().view(torch.int32) >> 16).bitwise_and_(0xFFFF)  # one temporary, not two
    return table.index_select(0, top.reshape(-1)).view(top.shape)


def _bucket_counts(rows: Tensor) -> Tensor:
    """(E, HIST_WIDTH) float64 bucket counts of each row of ``rows`` (E, m), the zero and non-finite columns
    included: one lookup and one ``index_add_``, no read."""
    E, m = rows.shape
    offsets = torch.arange(E, dtype=torch.int32, device=rows.device).mul_(HIST_WIDTH).unsqueeze(1)
    bucket = _bucket_index(rows).add_(offsets).reshape(-1)
    counts = torch.zeros(E, HIST_WIDTH, dtype=torch.float64, device=rows.device)
    ones = torch.ones(1, dtype=torch.float64, device=rows.device).expand(bucket.numel())
    counts.view(-1).index_add_(0, bucket, ones)
    return counts


class LayerStats:
    """One layer's activation statistics between two flushes, and its dead-unit streaks across flushes.

    A hook calls :meth:`capture` with the layer output (a layer called twice in one forward is captured
    twice: the calls add). A capture reads every element twice on the device, for the exact minimum and for
    each unit's maximum (dead units; a two-sided or magnitude rule maps the values first and takes the
    maximum apart), whose maximum is the exact maximum (NaN/Inf show up in both, so a
    non-finite value is never missed), and copies a strided subsample of at most ``max_stat_elements``
    values for the mean, standard deviation, fraction of zeros, non-finite count and histogram: past a few
    thousand values more elements change these figures less than the step-to-step noise, and a sampled
    step's cost stays bounded whatever the layer's size. At the flush, :class:`CaptureFolder` folds the
    captures of all layers at once, in a fixed number of kernels.

    A unit *fires* in a call when a value lies in the active region of the layer's :class:`UnitRule` (default:
    the ReLU rule, above ``dead_threshold``); a gradient rule's scores come from :meth:`capture_grad`.

    ``update`` = capture + fold into this layer's own buffers (``sums`` = [sum, sum of squares, zeros,
    non-finite], ``mins`` = [min, -max], ``fired`` = per unit, in how many calls it fired,
    ``hist`` = bucket counts). ``streak`` (persistent) = per unit, for how many consecutive judged flushes it
    has not fired (a flush with no score, e.g. no backward pass for a gradient rule, leaves it as it is).
    """

    def __init__(
        self, name: str, *, unit_dim: int, dead_threshold: float, zero_threshold: float,
        rule: Optional[UnitRule] = None,
    ) -> None:
        self.name = name
        self.unit_dim = unit_dim
        self.dead_threshold = dead_threshold
        self.zero_threshold = zero_threshold
        self.rule = rule if rule is not None else UnitRule("dead", low=dead_threshold)
        self.count = 0  # subsampled elements since the last flush (host int: a shape, never a device read)
        self.calls = 0
        self.units: Optional[int] = None
        self.device: Optional[torch.device] = None
        self.sums: Optional[Tensor] = None
        self.mins: Optional[Tensor] = None
        self.fired: Optional[Tensor] = None
        self.hist: Optional[Tensor] = None
        self.streak: Optional[Tensor] = None
        self.windows_seen = 0  # flushes (dead-unit windows) this layer took part in
        self.judged_windows = 0  # flushes in which its units were judged (had scores)
        self.subs: list[Tensor] = []
        self.lows: list[Tensor] = []
        self.highs: list[Tensor] = []
        self.unit_max: list[Tensor] = []

    @property
    def allocated(self) -> bool:
        return self.units is not None

    @torch.no_grad()
    def capture(self, x: Tensor, *, moments: bool, dead: bool, max_stat_elements: int = 1 << 14) -> bool:
        """Keeps what the flush needs of ``x`` (batch first): 3-4 kernels, no read. Returns False, doing
        nothing, when the layer's number of units changed."""
        if x.ndim == 0 or x.numel() == 0:
            return True
        units = x.shape[self.unit_dim % x.ndim]
        if self.units is None:
            self.units, self.device = units, x.device
            if self.streak is None or self.streak.numel() != units:
                self.streak = torch.zeros(units, dtype=torch.float32, device=x.device)
            else:
                self.streak = self.streak.to(x.device)
        elif units != self.units:
            return False
        self.calls += 1
        numel = x.numel()
        flat = x.reshape(-1)
        if numel > max_stat_elements:  # exactly max_stat_elements values, evenly strided: a view
            flat = flat[:: numel // max_stat_elements][:max_stat_elements]
        self.subs.append(flat.to(torch.float32, copy=True))  # a copy: a later in-place op must not change it
        self.count += self.subs[-1].numel()
        # Two passes over x: its minimum, and each unit's maximum, whose maximum is x's (a NaN carries through
        # both). On a 64x16x16x16 CPU output, torch.aminmax and the units' maxima took 59 us; these take 33.
        unit_max = None
        if dead and self.rule.source == "output":
            v = self.rule.prepared(x)
            maxima = self._unit_scores(v)
            if v is x:  # the units' maxima of x itself: their maximum is x's
                unit_max = maxima
        if moments:
            self.lows.append(x.amin())
            self.highs.append(x.amax() if unit_max is None else unit_max.amax())
        return True

    @torch.no_grad()
    def capture_grad(self, grad: Tensor) -> None:
        """Keeps the unit scores of the gradient reaching the layer's output (a gradient rule, called from a
        tensor hook during backward); one kernel or two, no read."""
        if self.rule.source != "gradient" or self.units is None or grad.ndim == 0 or grad.numel() == 0:
            return  # an empty batch says nothing about any unit
        if grad.shape[self.unit_dim % grad.ndim] != self.units:
            return
        self._unit_scores(self.rule.prepared(grad.detach()))

    def _unit_scores(self, v: Tensor) -> Tensor:
        """Keeps (units,) scores of the prepared values ``v``, positive exactly for the units that fired; returns
        the units' maxima of ``v``."""
        unit_max = unit_amax(v, self.unit_dim)
        scores = unit_max - self.rule.threshold if self.rule.threshold else unit_max
        self.unit_max.append(scores)
        return unit_max

    def clear_captures(self) -> None:
        self.subs, self.lows, self.highs, self.unit_max = [], [], [], []

    def take_captures(self) -> "Captures":
        """Hands over what was captured since the last flush (to be folded, possibly on another thread); new
        captures start empty lists. The dead-unit streaks and the counters (see :meth:`reset`) stay here."""
        taken = Captures(self.subs, self.lows, self.highs, self.unit_max, self.units, self.device, self.count)
        self.clear_captures()
        return taken

    @torch.no_grad()
    def update(
        self, x: Tensor, *, moments: bool, dead: bool, histogram: bool, max_hist_elements: int,
        max_stat_elements: int = 1 << 14,
    ) -> bool:
        """Captures ``x`` and folds it into this layer's own buffers at once (see the class docstring)."""
        if not self.capture(x, moments=moments, dead=dead, max_stat_elements=max_stat_elements):
            return False
        if self.units is None:
            return True
        assert self.device is not None
        if self.sums is None:
            self.sums = torch.zeros(4, dtype=torch.float64, device=self.device)
            self.mins = torch.full((2,), math.inf, dtype=torch.float32, device=self.device)
            self.fired = torch.zeros(self.units, dtype=torch.float32, device=self.device)
            self.hist = torch.zeros(HIST_BINS, dtype=torch.float64, device=self.device)
        assert self.mins is not None and self.fired is not None and self.hist is not None
        folder = CaptureFolder(self.zero_threshold, max_hist_elements)
        folded = folder.fold([self.take_captures()], histogram)
        self.sums.add_(folded["sums"][0])
        torch.minimum(self.mins, folded["mins"][0], out=self.mins)
        self.fired.add_(folded["fired"])
        self.hist.add_(folded["hist"][0])
        return True

    def reset(self) -> None:
        """Clears the window (not the streaks)."""
        self.count = 0
        self.calls = 0
        self.clear_captures()
        for t in (self.sums, self.fired, self.hist):
            if t is not None:
                t.zero_()
        if self.mins is not None:
            self.mins.fill_(math.inf)

    def state_dict(self) -> dict:
        return {
            "unit_dim": self.unit_dim,
            "windows_seen": self.windows_seen,
            "judged_windows": self.judged_windows,
            "streak": None if self.streak is None else self.streak.detach().cpu(),
        }

    def load_state_dict(self, state: dict) -> None:
        streak = state.get("streak")
        self.streak = None if streak is None else streak.clone()
        self.windows_seen = int(state.get("windows_seen", 0))
        self.judged_windows = int(state.get("judged_windows", self.windows_seen))


@dataclass
class Captures:
    """One layer's captures of one window, handed over by :meth:`LayerStats.take_captures` to the fold."""

    subs: list[Tensor]
    lows: list[Tensor]
    highs: list[Tensor]
    unit_max: list[Tensor]
    units: Optional[int]
    device: Optional[torch.device]
    count: int


# A fold stacks the subsamples of same-sized captures into chunks of at most this many values: its
# temporaries (about six of a chunk's size) stay near 1.5 MB. Stacked all at once, the eight windows of a dense
# warm-up (the CNN benchmark: 8 x 14 captures of 4,096 values) made 10 MB of temporaries on the writer thread
# beside the training step's activations, and the peak memory of the whole run rose by about as much.
FOLD_CHUNK_ELEMENTS = 1 << 16


class CaptureFolder:
    """Folds the captures of many layers into per-layer figures with a fixed number of kernels.

    Same-sized subsamples are stacked (in chunks of at most ``FOLD_CHUNK_ELEMENTS`` values); sums, zero and
    non-finite counts go into an (L, 4) table with one ``index_add_`` keyed by each element's layer; minima
    and maxima with one ``scatter_reduce_``; firing counts into one flat (units of all layers) vector;
    histogram buckets into one (L, HIST_BINS) table. Index tensors depend only on the shapes of the captures
    and are cached. A unit fires in a call when its score (see :meth:`UnitRule.unit_scores`) is positive.
    """

    def __init__(self, zero_threshold: float, max_hist_elements: int) -> None:
        self.zero_threshold = zero_threshold
        self.max_hist_elements = max_hist_elements
        self._cache: dict[tuple, Tensor] = {}

    def _index(self, key: tuple, build: Callable[[], list[int]], device: torch.device) -> Tensor:
        full = (key, device)
        idx = self._cache.get(full)
        if idx is None:
            if len(self._cache) > 64:
                self._cache.clear()
            idx = self._cache[full] = to_device(build(), torch.long, device)
        return idx

    @torch.no_grad()
    def fold(self, layers: Sequence[Captures], histogram: bool) -> dict[str, Tensor]:
        """Per-layer figures of the captured window, layer-major in the order of ``layers``: ``sums`` (L, 4)
        float64, ``mins`` (L, 2) float32 [min, -max], ``fired`` (sum of units,) float32, ``hist`` (L, BINS)
        float64, ``judged`` (L,) float32 (calls with unit scores)."""
        L = len(layers)
        device = next((st.device for st in layers if st.device is not None), torch.device("cpu"))
        units = [st.units or 0 for st in layers]
        out = {
            "sums": torch.zeros(L, 4, dtype=torch.float64, device=device),
            "mins": torch.full((L, 2), math.inf, dtype=torch.float32, device=device),
            "fired": torch.zeros(sum(units), dtype=torch.float32, device=device),
        }
        hist = torch.zeros(L, HIST_WIDTH, dtype=torch.float64, device=device)
        groups: dict[int, list[tuple[int, Tensor]]] = {}
        for li, st in enumerate(layers):
            for t in st.subs:
                groups.setdefault(t.numel(), []).append((li, t))
        chunks = []  # big layers share one size (max_stat_elements): usually 1-3 groups, each in a few chunks
        for n, entries in groups.items():
            step = max(1, FOLD_CHUNK_ELEMENTS // n)
            chunks += [(n, entries[i : i + step]) for i in range(0, len(entries), step)]
        for n, entries in chunks:
            key = tuple(li for li, _ in entries)
            rows = self._index(("rows", key), lambda: list(key), device)
            X = torch.stack([t for _, t in entries])  # (E, n) float32
            # Bucket counts (with the zero and non-finite columns) of at most max_hist_elements values a row.
            H = X if n <= self.max_hist_elements else X[:, :: -(-n // self.max_hist_elements)]
            scale = n / H.shape[1]
            G = _bucket_counts(H)
            # Shifted by each row's first value, so that the sum of squares keeps the variance when
            # |mean| >> std; reductions accumulate in float64.
            c = X[:, :1]
            D = X - c
            s1 = D.sum(1, dtype=torch.float64)
            s2 = torch.linalg.vector_norm(D, dim=1, dtype=torch.float64).square()
            c64 = c.squeeze(1).double()
            if self.zero_threshold == 0:
                zeros = G[:, ZERO_BUCKET] * scale
            else:
                zeros = (X.abs() <= self.zero_threshold).sum(1).double()
            nonfinite = G[:, NONFINITE_BUCKET] * scale
            per_row = torch.stack([s1 + n * c64, s2 + (2 * s1 + n * c64) * c64, zeros, nonfinite], 1)
            out["sums"].index_add_(0, rows, per_row)
            if histogram:
                hist.index_add_(0, rows, G)
        hist[:, _HIST_CENTER] += hist[:, ZERO_BUCKET]
        out["hist"] = hist[:, :HIST_BINS]
        lows = [(li, lo, hi) for li, st in enumerate(layers) for lo, hi in zip(st.lows, st.highs)]
        if lows:
            key = tuple(li for li, _, _ in lows)
            idx = self._index(("mins", key), lambda: [2 * li for li in key] + [2 * li + 1 for li in key], device)
            vals = torch.cat([torch.stack([lo for _, lo, _ in lows]), -torch.stack([hi for _, _, hi in lows])]).float()
            out["mins"].view(-1).scatter_reduce_(0, idx, vals, "amin")
        maxes = [(li, m) for li, st in enumerate(layers) for m in st.unit_max]
        if maxes:
            max_key = tuple((li, m.numel()) for li, m in maxes)

            def positions() -> list[int]:  # of each unit maximum in the flat firing counts (on a cache miss)
                offsets = [0, *itertools.accumulate(units)]
                return [offsets[li] + j for li, n in max_key for j in range(n)]

            idx = self._index(("fired", max_key, tuple(units)), positions, device)
            fired = (torch.cat([m for _, m in maxes]) > 0).float()
            out["fired"].index_add_(0, idx, fired)
        judged = tuple(len(st.unit_max) for st in layers)
        out["judged"] = self._index(("judged", judged), lambda: list(judged), device).float()
        return out
