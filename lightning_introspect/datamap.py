"""The data map of Swayamdipta et al. (2020), "Dataset Cartography", drawn from per-example records.

Each example is a point: x = *variability*, the standard deviation across epochs of the probability the
model gave its given label; y = *confidence*, the mean of that probability; colour = the share of epochs in
which it was predicted correctly. Easy-to-learn examples sit top left, hard-to-learn ones (often
mislabeled) bottom left, ambiguous ones to the right. Flagged suspects are circled in red.

Drawn with matplotlib's object API (``Figure`` + ``FigureCanvasAgg``), never ``pyplot``, so it is safe on a
background thread and touches no global matplotlib state.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from lightning_introspect.records import _atomic_write

if TYPE_CHECKING:
    import os

    from lightning_introspect.core.scoring import Suspects

__all__ = ["data_map_coordinates", "render_data_map", "save_data_map"]

_FLAG_COLOR = "#e4002b"
_MAX_FLAGGED_DRAWN = 3000
_REGION_STYLE: dict[str, Any] = dict(
    fontsize=11.5, color="0.3", style="italic", va="center", zorder=4,
    bbox=dict(boxstyle="round,pad=0.25", facecolor="white", edgecolor="none", alpha=0.75),
)
# Candidate places of each region's label, as (fraction of the x range, confidence, alignment); the one
# covering the fewest drawn points is used, so a label hides as little data as possible.
_REGION_PLACES: dict[str, tuple[tuple[float, float, str], ...]] = {
    "easy-to-learn": ((0.02, 0.97, "left"), (0.02, 0.90, "left"), (0.30, 0.97, "left")),
    "hard-to-learn": ((0.02, 0.03, "left"), (0.02, 0.10, "left"), (0.30, 0.03, "left")),
    "ambiguous": ((0.80, 0.50, "center"), (0.80, 0.42, "center"), (0.80, 0.58, "center"), (0.65, 0.5, "center")),
}
_LABEL_BOX = (0.17, 0.045)  # rough size of a region label: fraction of the x range, confidence units


def data_map_coordinates(records: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-example data-map coordinates from the records; NaN for examples never seen.

    Args:
        records: record arrays with ``seen_epochs``, ``confidence_sum``, ``confidence_sq_sum`` and
            ``correct_epochs``, each ``(N,)``.

    Returns:
        ``{"confidence", "variability", "correctness"}``, each ``(N,)`` float64: the mean and the standard
        deviation (over epochs) of the probability of the given label, and the share of epochs correct.

    Raises:
        ValueError: a needed field is missing.

    Example:
        >>> records = {"seen_epochs": np.array([2, 0]), "confidence_sum": np.array([1.0, 0.0]),
        ...            "confidence_sq_sum": np.array([0.5 ** 2 + 0.5 ** 2 + 0.08, 0.0]),
        ...            "correct_epochs": np.array([1, 0])}
        >>> coords = data_map_coordinates(records)
        >>> coords["confidence"], coords["variability"].round(2), coords["correctness"]
        (array([0.5, nan]), array([0.2, nan]), array([0.5, nan]))
    """
    needed = ("seen_epochs", "confidence_sum", "confidence_sq_sum", "correct_epochs")
    missing = [name for name in needed if name not in records]
    if missing:
        raise ValueError(
            f"`records` lack {missing}, which the data map needs; it is drawn only for classification "
            "and sequence records (those with a given-label probability)."
        )
    seen = np.asarray(records["seen_epochs"], dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        n = np.where(seen > 0, seen, np.nan)
        confidence = np.asarray(records["confidence_sum"], dtype=np.float64) / n
        second_moment = np.asarray(records["confidence_sq_sum"], dtype=np.float64) / n
        variability = np.sqrt(np.clip(second_moment - confidence**2, 0.0, None))
        correctness = np.asarray(records["correct_epochs"], dtype=np.float64) / n
    return {"confidence": confidence, "variability": variability, "correctness": correctness}


def _flagged_ids(suspects: Optional[Suspects], num: int) -> Optional[np.ndarray]:
    if suspects is None:
        return None
    ids = np.asarray(suspects.ids, dtype=np.int64)
    flagged = np.asarray(suspects.flagged, dtype=bool)
    if ids.shape != flagged.shape:
        raise ValueError(f"`suspects.ids` {ids.shape} and `suspects.flagged` {flagged.shape} differ in shape.")
    ids = ids[flagged]
    bad = (ids < 0) | (ids >= num)
    if bad.any():
        raise ValueError(
            f"`suspects` name ids outside the records' range [0, {num}), e.g. {ids[bad][:3].tolist()}; "
            "were they computed from other records?"
        )
    return ids


def _build_figure(
    records: Mapping[str, np.ndarray],
    *,
    suspects: Optional[Suspects],
    class_names: Optional[Sequence[str]],
    title: Optional[str],
    max_points: int,
    seed: int,
    size_px: tuple[int, int],
) -> Figure:
    if not isinstance(max_points, int) or max_points < 1:
        raise ValueError(f"`max_points` must be a positive int, got {max_points!r}.")
    coords = data_map_coordinates(records)
    x, y, c = coords["variability"], coords["confidence"], coords["correctness"]
    num = x.shape[0]
    seen = np.asarray(records["seen_epochs"]) > 0
    drawable = seen & np.isfinite(x) & np.isfinite(y) & np.isfinite(c)
    num_seen, num_drawable = int(seen.sum()), int(drawable.sum())
    epochs = int(np.asarray(records["seen_epochs"]).max()) if num else 0
    flagged_ids = _flagged_ids(suspects, num)

    ids = np.flatnonzero(drawable)
    rng = np.random.default_rng(seed)
    sampled = ids.size > max_points
    if sampled:
        ids = np.sort(rng.choice(ids, size=max_points, replace=False))
    order = rng.permutation(ids.size)  # random drawing order: no class or id paints over the others
    ids = ids[order]
    flag_draw = np.empty(0, np.int64)
    flag_sampled = False
    if flagged_ids is not None:
        flag_draw = flagged_ids[drawable[flagged_ids]]
        max_flagged = min(max_points, _MAX_FLAGGED_DRAWN)
        if flag_draw.size > max_flagged:  # past a few thousand, more circles only paint the region red
            flag_sampled = True
            flag_draw = rng.choice(flag_draw, size=max_flagged, replace=False)

    notes: list[str] = []
    if sampled:
        notes.append(f"Drawn: a random sample (seed {seed}) of {ids.size:,} of {num_drawable:,} examples"
                     + (f"; circled: a sample of {flag_draw.size:,} of the {flagged_ids.size:,} flagged."  # type: ignore[union-attr]
                        if flag_sampled else "; every flagged example is circled." if flagged_ids is not None
                        else "."))
    left_out = []
    if num - num_seen:
        left_out.append(f"{num - num_seen:,} of {num:,} ids never seen")
    if num_seen - num_drawable:
        left_out.append(f"{num_seen - num_drawable:,} with non-finite values")
    if left_out:
        notes.append("Not drawn: " + "; ".join(left_out) + ".")
    if flagged_ids is not None and flagged_ids.size:
        top = np.asarray(suspects.ids)[np.asarray(suspects.flagged, bool)][:5]  # type: ignore[union-attr]
        labels = np.asarray(records["label"]) if "label" in records else None
        notes.append("Most suspect: " + ", ".join(_describe(int(i), labels, class_names) for i in top)
                     + (", ..." if flagged_ids.size > top.size else "."))

    width, height = size_px
    fig = Figure(figsize=(width / 100, height / 100), dpi=100)
    FigureCanvasAgg(fig)
    line = 14.5 / height  # one caption line (9.5 pt) as a fraction of the figure height
    bottom = 0.02 + len(notes) * line + 62.0 / height  # caption, then tick labels and the x label
    top_edge = 1.0 - 98.0 / height  # two title lines and the legend row above the plot
    ax = fig.add_axes((0.085, bottom, 0.755, top_edge - bottom))
    cax = fig.add_axes((0.86, bottom, 0.022, top_edge - bottom))

    x_max = 0.5
    if ids.size:
        x_max = float(np.clip(np.quantile(x[ids], 0.999) * 1.15, 0.1, 0.5))
    ax.set_xlim(-0.015 * x_max, x_max)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("variability: std across epochs of p(given label)", fontsize=11)
    ax.set_ylabel("confidence: mean across epochs of p(given label)", fontsize=11)
    ax.tick_params(labelsize=10)
    ax.grid(True, color="0.92", linewidth=0.8, zorder=0)
    ax.set_axisbelow(True)

    # The largest std a [0, 1] quantity with mean m can have is sqrt(m (1 - m)): no point lies beyond it.
    m = np.linspace(0.0, 1.0, 401)
    ax.plot(np.sqrt(m * (1 - m)), m, color="0.6", linestyle=(0, (3, 3)), linewidth=1.0, zorder=1)
    if num_drawable:
        for region, places in _REGION_PLACES.items():
            px, py, align = min(places, key=lambda place: _points_under(x[ids], y[ids], place, x_max))
            ax.text(px * x_max, py, region, ha=align, **_REGION_STYLE)
    else:
        message = "no example has been seen yet" if num_seen == 0 else "no example has finite dynamics"
        ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center", fontsize=14, color="0.3")

    norm = Normalize(vmin=0.0, vmax=1.0)
    size = float(np.clip(400.0 / np.sqrt(max(ids.size, 1)), 0.6, 30.0))
    alpha = float(np.clip(0.9 * (1000.0 / max(ids.size, 1)) ** 0.25, 0.25, 0.9))
    mappable = ax.scatter(
        x[ids], y[ids], c=c[ids], cmap="viridis", norm=norm, s=size, alpha=alpha, linewidths=0,
        rasterized=True, zorder=2,
    )
    colorbar = fig.colorbar(mappable, cax=cax)
    colorbar.solids.set_alpha(1.0)  # type: ignore[union-attr]
    colorbar.set_label("share of epochs predicted correctly", fontsize=11)
    colorbar.ax.tick_params(labelsize=10)

    handles: list[Line2D] = [
        Line2D([], [], color="0.6", linestyle=(0, (3, 3)), label="largest possible variability"),
    ]
    if flagged_ids is not None:
        flag_size = float(np.clip(900.0 / np.sqrt(max(flag_draw.size, 1)), 10.0, 45.0))
        ax.scatter(
            x[flag_draw], y[flag_draw], s=flag_size, facecolors="none", edgecolors=_FLAG_COLOR,
            linewidths=0.7 if flag_draw.size > 500 else 1.1, alpha=0.8 if flag_draw.size > 500 else 1.0,
            zorder=3,
        )
        share = f" ({flagged_ids.size / num_seen:.1%} of seen)" if num_seen else ""
        handles.insert(0, Line2D([], [], linestyle="none", marker="o", markersize=7, markerfacecolor="none",
                                 markeredgecolor=_FLAG_COLOR, markeredgewidth=1.4,
                                 label=f"flagged as suspect: {flagged_ids.size:,}{share}"))
    # Above the plot, not in it: no corner of a data map is reliably empty.
    ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(handles), fontsize=10,
              frameon=False, borderaxespad=0.3, handletextpad=0.4, columnspacing=2.0)

    heading = title if title else "Data map"
    fig.text(
        0.4625, 0.975,
        f"{heading}\n{num_seen:,} examples seen over {epochs:,} epoch{'s' if epochs != 1 else ''}",
        fontsize=13, ha="center", va="top", linespacing=1.4,
    )

    if notes:
        fig.text(0.085, 0.015, "\n".join(notes), fontsize=9.5, color="0.3", ha="left", va="bottom",
                 linespacing=1.25)
    return fig


def _points_under(x: np.ndarray, y: np.ndarray, place: tuple[float, float, str], x_max: float) -> int:
    """How many of the points (x, y) a region label put at ``place`` would roughly cover."""
    px, py, align = place
    width, height = _LABEL_BOX[0] * x_max, _LABEL_BOX[1]
    left = px * x_max - (width / 2 if align == "center" else 0.0)
    inside = (x >= left) & (x <= left + width) & (np.abs(y - py) <= height / 2)
    return int(np.count_nonzero(inside))


def _describe(sample_id: int, labels: Optional[np.ndarray], class_names: Optional[Sequence[str]]) -> str:
    if labels is None:
        return f"#{sample_id}"
    label = int(labels[sample_id])
    if class_names is not None and 0 <= label < len(class_names):
        return f"#{sample_id} ({class_names[label]})"
    return f"#{sample_id} (label {label})"


def render_data_map(
    records: Mapping[str, np.ndarray],
    *,
    suspects: Optional[Suspects] = None,
    class_names: Optional[Sequence[str]] = None,
    title: Optional[str] = None,
    max_points: int = 200_000,
    seed: int = 0,
    size_px: tuple[int, int] = (900, 700),
) -> np.ndarray:
    """Draw the data map and return it as an ``(H, W, 3)`` uint8 image.

    Suitable for ``SummaryWriter.add_image(tag, image, step, dataformats="HWC")``.

    Args:
        records: record arrays (see :mod:`lightning_introspect.core.scoring`), each ``(N,)``.
        suspects: ranked suspects; the flagged ones are circled and counted in the legend.
        class_names: names of the labels, used when listing the most suspect examples.
        title: first line of the title; the second always gives the examples seen and the epochs.
        max_points: at most this many examples are drawn, a random sample seeded by ``seed``; the caption
            says so when it happens. Flagged examples are all circled, or a sample of 3,000 of them when there are more.
        seed: seed of that sample.
        size_px: ``(width, height)`` in pixels.

    Returns:
        ``(H, W, 3)`` uint8 RGB image, ``H, W = size_px[1], size_px[0]``.

    Raises:
        ValueError: the records lack the fields the map needs, or ``suspects`` do not fit them.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> p = rng.uniform(size=(5, 100))  # 5 epochs, 100 examples
        >>> records = {"seen_epochs": np.full(100, 5), "confidence_sum": p.sum(0),
        ...            "confidence_sq_sum": (p ** 2).sum(0), "correct_epochs": (p > 0.5).sum(0)}
        >>> image = render_data_map(records, title="toy")
        >>> image.shape, image.dtype
        ((700, 900, 3), dtype('uint8'))
    """
    fig = _build_figure(records, suspects=suspects, class_names=class_names, title=title,
                        max_points=max_points, seed=seed, size_px=size_px)
    canvas = fig.canvas
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()  # type: ignore[attr-defined]


def save_data_map(
    path: Union[str, os.PathLike[str]],
    records: Mapping[str, np.ndarray],
    *,
    suspects: Optional[Suspects] = None,
    class_names: Optional[Sequence[str]] = None,
    title: Optional[str] = None,
    max_points: int = 200_000,
    seed: int = 0,
    size_px: tuple[int, int] = (900, 700),
) -> Path:
    """Draw the data map (see :func:`render_data_map`) and write it as a PNG, atomically.

    Returns:
        The path written.

    Raises:
        ValueError: as :func:`render_data_map`.
        OSError: the file could not be written; the message names the path.
    """
    fig = _build_figure(records, suspects=suspects, class_names=class_names, title=title,
                        max_points=max_points, seed=seed, size_px=size_px)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return _atomic_write(path, lambda f: f.write(buffer.getvalue()))
