"""The flush pipeline: a sampled step's window of statistics is taken on the training thread, folded, reduced
across ranks, packed into one float64 row by a :class:`PackedLayout`, copied to the host once, and decoded into
scalars and histograms on the writer thread by the same layout."""
from __future__ import annotations

import functools
import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from . import dist
from ._sync import allow_sync
from .alerts import Alerts
from .config import IntrospectConfig
from .contracts import LayerHistograms, Sink
from .dynamics import Dynamics
from .hooks import HookSet
from .samples import BAD_INPUT_NAMES
from .schedule import SamplingSchedule, quantize_interval
from .gradients import GradNorms
from .stats import HIST_BINS, CaptureFolder, LayerStats, histogram_edges, to_device
from .writer import AsyncWriter

_EDGES = histogram_edges()
# Windows of consecutive sampled steps are handed to the writer thread this many at a time, for one fold, one
# pack and one host copy: the fold's Python, which holds the GIL, costs about as much for eight windows as for
# one (see docs/decisions.md). TensorBoard sees them at most this many steps later.
FOLD_BATCH = 8
# Scalars of a layer (activation statistics, dead units), of a parameter-owning layer and of a parameter.
_ACTIVATION_TAGS = ("activation_mean", "activation_std", "activation_min", "activation_max",
                    "activation_zero_fraction", "activation_nonfinite")
_DEAD_TAGS = ("dead_fraction", "dead_count", "dead_windows")
_SATURATED_TAGS = ("saturated_fraction", "saturated_count", "saturated_windows")
_UNIT_TAGS = {"dead": _DEAD_TAGS, "saturated": _SATURATED_TAGS}
_GRAD_TAGS = ("grad_norm", "grad_to_weight", "update_to_weight")
_PARAM_TAGS = ("param_grad_norm",)
_HIST_TAGS = ("activation_hist",)
_GRAD_BLOCKS = ("grad_sq", "weight_sq", "update_sq", "clipped_sq", "param_grad")  # GradNorms.take's order


@dataclass(frozen=True)
class PackedLayout:
    """The blocks of one packed flush row, in order, each with its shape: the pack concatenates them and the
    decode cuts them out with the same object, so the two cannot drift apart."""

    blocks: tuple[tuple[str, tuple[int, ...]], ...]

    @classmethod
    def of(cls, units: Sequence[int], grad_sizes: Sequence[int]) -> "PackedLayout":
        """The layout of a window of layers with ``units`` units each and gradient parts of ``grad_sizes``."""
        L = len(units)
        blocks: list[tuple[str, tuple[int, ...]]] = [
            ("sums", (L, 4)), ("mins", (L, 2)), ("fired", (sum(units),)), ("hist", (L, HIST_BINS)),
            ("dead", (L, 2)), ("counts", (L + 1,)), ("extra", (1 + len(BAD_INPUT_NAMES),)), ("interval", (1,)),
        ]
        blocks += [(name, (n,)) for name, n in zip(_GRAD_BLOCKS, grad_sizes)]
        return cls(tuple(blocks))

    @property
    def size(self) -> int:
        """Values in one row."""
        return sum(math.prod(shape) for _, shape in self.blocks)

    def pack(self, parts: dict[str, Tensor], rows: int, device: torch.device) -> Tensor:
        """One (rows, size) float64 tensor of ``parts`` (each (rows, ...) or broadcastable to it), in block
        order. Raises if a part's size does not fit its block (shapes only: no host sync)."""
        out = []
        for name, shape in self.blocks:
            t = parts[name].reshape(rows, -1)
            if t.shape[1] != math.prod(shape):
                raise RuntimeError(f"packed block {name!r} has {t.shape[1]} values per row where {shape} was laid out")
            out.append(t.to(device, torch.float64))
        return torch.cat(out, 1)

    def unpack(self, row: np.ndarray) -> dict[str, np.ndarray]:
        """The blocks of one packed row, each in its shape (views of ``row``)."""
        if row.shape != (self.size,):
            raise RuntimeError(f"a packed row of {row.shape} values does not fit the layout's {self.size}")
        out, off = {}, 0
        for name, shape in self.blocks:
            n = math.prod(shape)
            out[name] = row[off : off + n].reshape(shape)
            off += n
        return out


def _same(row: np.ndarray) -> np.ndarray:
    return row


class LayerMeta(NamedTuple):
    """What the decode needs to know of one flushed layer."""

    name: str
    units: int
    called: bool
    judged_windows: int  # windows in which its units were judged, this one included


@dataclass
class FlushMeta:
    """Everything the writer thread needs, besides the packed row, to write one flushed window."""

    step: int
    layers: list[LayerMeta]
    grad_layers: list[int]
    grad_observed: bool
    grad_updated: bool
    grad_clipped: bool
    param_positions: list[int]
    order: list[str]
    histogram: bool
    counters_only: bool
    dead_layers: dict[str, str]
    interval: float
    overhead: Optional[float]
    layout: PackedLayout


class _Window(NamedTuple):
    """One flushed window, as the training thread hands it over: what the fold and the pack read."""

    stats: list[LayerStats]  # the allocated layers, sorted by name
    captures: list[Any]  # their Captures, in the same order
    counts: Tensor  # (L + 1,) subsampled elements per layer (the last slot unused)
    extra: Tensor  # the non-finite-loss and bad-input counters
    interval: Tensor  # (1,) minus the proposed interval (reduced with "min" across ranks)
    grad_parts: list[Tensor]  # squared gradient, weight and update norms (see GradNorms.take)


class _HeldKey(NamedTuple):
    """Windows folded together share their layers, layout, histogram flag and device."""

    layers: tuple[str, ...]
    layout: PackedLayout
    histogram: bool
    device: torch.device


class FlushPipeline:
    """Takes each window's statistics and turns them into written figures, off the training thread where it
    can; on the writer thread it runs in order with every other job."""

    def __init__(
        self, config: IntrospectConfig, *, writer: AsyncWriter, hooks: HookSet, grad: GradNorms,
        schedule: SamplingSchedule, alerts: Alerts, dynamics: Dynamics, layer_stats: dict[str, LayerStats],
        sinks: list[Sink], on_scalars: Optional[Callable[[dict[str, float], int], None]], is_writer: bool,
    ) -> None:
        self.config = config
        self.writer = writer
        self.hooks = hooks
        self.grad = grad
        self.schedule = schedule
        self.alerts = alerts
        self.dynamics = dynamics
        self.layer_stats = layer_stats
        self.sinks = sinks  # the core's list: emptied in place when the sinks are closed
        self.on_scalars = on_scalars
        self.is_writer = is_writer
        self.folder = CaptureFolder(config.zero_threshold, config.max_histogram_elements)
        self._held: list[tuple[_Window, FlushMeta]] = []  # flushed windows not yet handed to the writer
        self._held_key: Optional[_HeldKey] = None
        self._layout_written = False
        self._tag_cache: dict[tuple[str, tuple[str, ...]], tuple[str, ...]] = {}

    @property
    def holding(self) -> bool:
        """Whether flushed windows wait to be handed to the writer (see :meth:`submit_held`)."""
        return bool(self._held)

    # ---------------------------------------------------------------------------------------- training thread
    def flush_window(self, step: int, counters_only: bool, drain: bool, device: torch.device) -> None:
        """Ends the pending window: takes its captures and gradient buffers and hands them to the writer
        thread, which folds, packs and copies them to the host (during the next backward pass); while the
        next step is sampled too, the window is held, up to ``FOLD_BATCH`` of them. Under DDP the fold and its
        all-reduce run here, on the training thread, so that every rank issues its collectives in the same
        order. ``counters_only``: no sampled step is pending, only the counters are read."""
        cfg = self.config
        layers = [] if counters_only else [(n, st) for n, st in sorted(self.layer_stats.items()) if st.allocated]
        grad = self.grad
        distributed = dist.is_distributed()
        with allow_sync():
            sts = [st for _, st in layers]
            captures = [st.take_captures() for st in sts]
            counts = to_device([float(c.count) for c in captures] + [0.0], torch.float64, device)
            extra = self.dynamics.take_counters(device)  # a reduce running on the writer keeps its counts
            proposed = self.schedule.proposed_interval()
            interval = to_device([-float(proposed)], torch.float32, device)
            grad_observed = grad.observed and not counters_only
            grad_layers = sorted(grad.observed_layers()) if grad_observed else []
            grad_updated = grad.updated and not counters_only
            grad_clipped = grad.clipped and not counters_only
            param_positions = sorted(grad.observed_params) if grad_observed and cfg.param_grad_norms else []
            if grad_observed:
                grad_parts = grad.take(cfg.param_grad_norms)
            else:
                grad_parts = []
                if not counters_only:
                    grad.reset()
                    if grad.sharded and distributed:  # the same payload as the ranks that have gradients
                        grad_parts = grad.zero_parts(cfg.param_grad_norms, device)
            histogram = self.hooks.histogram and not counters_only
            layout = PackedLayout.of([c.units or 0 for c in captures], [t.numel() for t in grad_parts])
            window = _Window(sts, captures, counts, extra, interval, grad_parts)
            if distributed:  # collectives stay on the training thread, in the same order on every rank
                packed = self.fold_and_pack([window], layout, histogram, device, distributed=True)
                host = self.to_host(packed.reshape(-1))
            if not counters_only:  # under DDP, the interval all ranks agreed on in the reduce
                self.apply_interval(proposed, interval if distributed else None)
        meta = FlushMeta(
            step=step,
            layers=[LayerMeta(n, c.units or 0, c.count > 0, st.judged_windows + bool(c.unit_max))
                    for (n, st), c in zip(layers, captures)],
            grad_layers=grad_layers, grad_observed=grad_observed, grad_updated=grad_updated,
            grad_clipped=grad_clipped, param_positions=param_positions, order=list(self.hooks.order),
            histogram=histogram, counters_only=counters_only, dead_layers=self.alerts.judged_dead_layers(),
            interval=self.schedule.interval, overhead=self.schedule.expected_overhead(), layout=layout,
        )
        for (_, st), c in zip(layers, captures):
            st.reset()
            st.windows_seen += 1
            st.judged_windows += bool(c.unit_max)
        if distributed:
            self.submit(lambda: self.write_flush(host, meta))
            return
        key = _HeldKey(tuple(n for n, _ in layers), layout, histogram, device)
        if self._held and key != self._held_key:
            self.submit_held()
        self._held.append((window, meta))
        self._held_key = key
        if counters_only or drain or len(self._held) >= FOLD_BATCH:
            self.submit_held()

    def submit_held(self) -> None:
        """Hands the held windows (see ``FOLD_BATCH``) to the writer thread, which folds, packs and copies them
        to the host together (on CUDA on the training thread's stream), during the next backward pass (see
        :meth:`AsyncWriter.window`), then writes each window's figures in order."""
        held, self._held = self._held, []
        if not held:
            return
        windows = [w for w, _ in held]
        metas = [m for _, m in held]
        assert self._held_key is not None
        layout, histogram, device = self._held_key.layout, self._held_key.histogram, self._held_key.device
        stream = torch.cuda.current_stream(device) if device.type == "cuda" else None

        def fold_and_write() -> None:
            with allow_sync(), torch.no_grad(), (torch.cuda.stream(stream) if stream is not None else nullcontext()):
                packed = self.fold_and_pack(windows, layout, histogram, device, distributed=False)
                rows = self.to_host(packed)()
            assert rows is not None
            for row, meta in zip(rows, metas):
                self.write_flush(functools.partial(_same, row), meta)

        self.submit(fold_and_write)

    def fold_and_pack(
        self, windows: list[_Window], layout: PackedLayout, histogram: bool, device: torch.device, *,
        distributed: bool,
    ) -> Tensor:
        """Folds the captures of ``windows`` (consecutive windows of the same layers), reduces them across
        ranks (``distributed``, one window), moves the dead-unit streaks on window after window and packs
        everything the writer reads into one float64 tensor, a row per window, by ``layout``. The fold's
        kernels and their Python are paid once for all windows. Streaks are only touched here, one window
        after another."""
        cfg = self.config
        K = len(windows)
        sts = windows[0].stats
        L = len(sts)
        units = [c.units or 0 for c in windows[0].captures]
        U = sum(units)
        sum_parts: list[Tensor] = []
        min_parts: list[Tensor] = []
        folded: dict[str, Tensor] = {}
        if L:
            folded = self.folder.fold([c for w in windows for c in w.captures], histogram)  # window-major rows
            sum_parts = [folded["sums"], folded["fired"], folded["hist"], folded["judged"]]
            min_parts = [folded["mins"]]
        if distributed:
            assert K == 1
            (window,) = windows
            # Sharded parameters' squared norms are sums over ranks' shards: they ride in the same collective.
            grad_sums = window.grad_parts if self.grad.sharded else []
            dist.flush_reduce([*sum_parts, window.counts, window.extra, *grad_sums], [*min_parts, window.interval], device)
        empty = torch.zeros(K, 0, dtype=torch.float64, device=device)
        parts: dict[str, Tensor] = {"sums": empty, "mins": empty, "fired": empty, "hist": empty, "dead": empty}
        if L:
            # Dead-unit windows, all layers at once: a unit that fired resets its streak, the others extend it,
            # in the windows where their layer was judged (had unit scores on some rank); elsewhere it stays.
            fired = folded["fired"].view(K, U)
            unit_layer = self.folder._index(
                ("unit_layer", tuple(units)), lambda: [li for li, u in enumerate(units) for _ in range(u)], device
            )
            judged = folded["judged"].view(K, L).index_select(1, unit_layer) > 0
            streak = torch.cat([st.streak.to(device) for st in sts])  # type: ignore[union-attr]
            zero = streak.new_zeros(())
            streaks = []
            for k in range(K):
                streak = torch.where(fired[k] > 0, zero, streak + judged[k])
                streaks.append(streak)
            for st, piece in zip(sts, streak.split(units)):
                st.streak = piece
            S = torch.stack(streaks)
            w = cfg.dead_window
            zeros = torch.zeros(K, L, dtype=torch.float64, device=device)
            dead_count = zeros.index_add(1, unit_layer, (S >= w).double())
            dead_windows = zeros.scatter_reduce(
                1, unit_layer.expand(K, U), torch.div(S, w, rounding_mode="floor").double(), "amax", include_self=True
            )
            parts.update(sums=folded["sums"], mins=folded["mins"], fired=fired, hist=folded["hist"],
                         dead=torch.stack([dead_count, dead_windows], 2))
        parts.update(counts=torch.stack([w.counts for w in windows]), extra=torch.stack([w.extra for w in windows]),
                     interval=torch.stack([w.interval for w in windows]))
        for name, pieces in zip(_GRAD_BLOCKS, zip(*(w.grad_parts for w in windows))):
            parts[name] = torch.stack(pieces)
        return layout.pack(parts, K, device)

    @staticmethod
    def to_host(packed: Optional[Tensor]) -> Callable[[], Optional[np.ndarray]]:
        """One batched device-to-host copy. On CUDA it is asynchronous (pinned buffer + event): the writer
        thread waits for it, the training thread never does."""
        if packed is None:
            return lambda: None
        if packed.device.type == "cuda":
            buf = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            buf.copy_(packed, non_blocking=True)
            event = torch.cuda.Event()
            event.record()

            def wait() -> np.ndarray:
                event.synchronize()
                return buf.numpy()

            return wait
        arr = packed.cpu().numpy()
        return lambda: arr

    def submit(self, job: Callable[[], None], *, required: bool = False) -> None:
        """Hands ``job`` to the writer thread (the writing rank only); a ``required`` one is never dropped (see
        :meth:`AsyncWriter.submit`): the records on disk and the forgotten fraction need every epoch's."""
        if self.is_writer:
            self.writer.submit(job, required=required)

    def apply_interval(self, proposed: float, reduced_interval: Optional[Tensor]) -> None:
        """On the training thread, at the flush, on every rank: the budget's new interval. Under DDP all
        ranks take the largest proposal (reduced with the flush), so they keep sampling the same steps."""
        if self.config.overhead_budget is None:
            return
        interval = proposed
        if reduced_interval is not None:  # flush: DDP already synchronised here
            interval = quantize_interval(-float(reduced_interval.item()))
        if interval >= 1:
            self.schedule.interval = interval

    # ------------------------------------------------------------------------------------------ writer thread
    def write_flush(self, host: Callable[[], Optional[np.ndarray]], meta: FlushMeta) -> None:
        """Decodes one packed row by ``meta.layout`` into scalars and histograms, raises the flush's alerts and
        writes everything to the sinks (writer thread)."""
        data = host()
        if data is None:
            return
        cfg = self.config
        step = meta.step
        scalars: dict[str, float] = {}
        nonfinite_layers: list[str] = []
        blocks = meta.layout.unpack(data)
        L = len(meta.layers)
        # fired (the firing counts) is already folded into the streaks; interval is applied at the flush
        sums, mins, hist, dead = blocks["sums"], blocks["mins"], blocks["hist"], blocks["dead"]
        counts = blocks["counts"][:L]
        extra = blocks["extra"]
        if L:  # one numpy pass over all layers, tags made once per layer (the writer's Python holds the GIL)
            live = np.flatnonzero(counts > 0)
            names = [meta.layers[i].name for i in live]
            if cfg.activations and live.size:
                c = counts[live]
                s1, s2, zeros, nonfinite = sums[live].T
                with np.errstate(all="ignore"):
                    mean = s1 / c
                    std = np.where(np.isfinite(mean), np.sqrt(np.maximum(s2 / c - mean * mean, 0.0)), np.nan)
                    values = np.stack([mean, std, mins[live, 0], -mins[live, 1], zeros / c, nonfinite], 1)
                tags = [t for n in names for t in self._tags(n, _ACTIVATION_TAGS)]
                scalars.update(zip(tags, values.ravel().tolist()))
                bad = (nonfinite > 0) | ~np.isfinite(values[:, [0, 2, 3]]).all(1)
                nonfinite_layers = [n for n, b in zip(names, bad.tolist()) if b]
            if cfg.dead_units:
                for i, name in zip(live.tolist(), names):
                    units, windows = meta.layers[i].units, meta.layers[i].judged_windows
                    group = meta.dead_layers.get(name)
                    if windows >= cfg.dead_window and units and group is not None:
                        dead_count, dead_windows = dead[i].tolist()
                        t_frac, t_count, t_windows = self._tags(name, _UNIT_TAGS[group])
                        scalars[t_frac] = dead_count / units
                        scalars[t_count] = dead_count
                        scalars[t_windows] = dead_windows
        if meta.grad_observed:
            g2, w2, u2 = blocks["grad_sq"], blocks["weight_sq"], blocks["update_sq"]
            clipped_sq = blocks["clipped_sq"][0]
            sel = np.asarray(meta.grad_layers, dtype=np.int64)
            names = [self.grad.layer_names[i] for i in sel.tolist()]
            gtags = [self._tags(n, _GRAD_TAGS) for n in names]
            g2s, w2s, u2s = g2[sel], w2[sel], u2[sel]
            scalars["grad_norm/global"] = math.sqrt(float(g2s.sum()))
            if meta.grad_clipped:
                scalars["grad_norm/global_clipped"] = math.sqrt(float(clipped_sq))
            scalars.update(zip([t[0] for t in gtags], np.sqrt(g2s).tolist()))
            has_w = np.flatnonzero(w2s > 0)
            w = w2s[has_w]
            scalars.update(zip([gtags[j][1] for j in has_w.tolist()], np.sqrt(g2s[has_w] / w).tolist()))
            if meta.grad_updated and cfg.update_ratios:
                scalars.update(zip([gtags[j][2] for j in has_w.tolist()], np.sqrt(u2s[has_w] / w).tolist()))
                if w2s.sum() > 0:
                    scalars["update_to_weight/global"] = math.sqrt(float(u2s.sum() / w2s.sum()))
            if cfg.param_grad_norms:
                pg = blocks["param_grad"]
                positions = meta.param_positions
                names = [self.grad.param_names[i] for i in positions]
                scalars.update(zip([self._tags(n, _PARAM_TAGS)[0] for n in names], np.sqrt(pg[positions]).tolist()))
        self.writer.on_main_thread(self.alerts.warn_if_budget_unreachable)
        store = self.dynamics.store
        num_examples = store.num_examples if store is not None else self.dynamics.num_examples
        if meta.counters_only:  # an epoch end or close with no sampled step pending: alerts only
            self.alerts.for_flush(step, meta.order, extra, nonfinite_layers, scalars, self.sinks, num_examples)
            return
        scalars["introspect/interval"] = float(meta.interval)
        if meta.overhead is not None:
            scalars["introspect/overhead"] = meta.overhead
        self.alerts.for_flush(step, meta.order, extra, nonfinite_layers, scalars, self.sinks, num_examples)
        histograms = None
        if meta.histogram and cfg.histograms and self.sinks:
            tags = [self._tags(layer.name, _HIST_TAGS)[0] for layer in meta.layers]
            histograms = LayerHistograms(tags, hist, mins, sums, counts, _EDGES)
        for sink in self.sinks:
            if not self._layout_written:
                sink.add_layout(cfg)
            sink.add_scalars(scalars, step)
            if histograms is not None:
                sink.add_layer_histograms(histograms, step)
            sink.flush()
        self._layout_written = True
        if self.on_scalars is not None:
            cb = self.on_scalars
            self.writer.on_main_thread(lambda: cb(scalars, step))

    def _tags(self, name: str, kinds: tuple[str, ...]) -> tuple[str, ...]:
        """The tags ``kind/name`` of one layer or parameter, made once (a step writes hundreds)."""
        key = (name, kinds)
        tags = self._tag_cache.get(key)
        if tags is None:
            if len(self._tag_cache) > 100_000:  # names are a bounded set; a pathological model gets no leak
                self._tag_cache.clear()
            tags = self._tag_cache[key] = tuple(f"{kind}/{name}" for kind in kinds)
        return tags
