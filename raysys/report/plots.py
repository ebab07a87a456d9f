"""Plots of a sweep's `results.csv`: how a reader sees the paper's three questions answered.

Each question gets its own figure. Which objective gives the best trade-off between
reconstruction and alignment (Pareto fronts)? Which layer depths align best (heat maps)?
Does alignment improve with model scale (scale curves, against the unaligned baseline)?

Rows come as `results.csv` gives them (strings, "" for missing) or as Python numbers. A row
missing a value a plot needs is left out of that plot; a plot that cannot be drawn is returned
as `Skipped` with the reason, so the report can say so instead of silently dropping it.
Figures are drawn with `matplotlib.figure.Figure` on an Agg canvas and never touch pyplot.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Colormap, Normalize
from matplotlib.figure import Figure

from raysys.report.schema import RAW

METRIC_LABELS: dict[str, str] = {
    "i2t_r1": "image→text R@1 (test)",
    "i2t_r5": "image→text R@5 (test)",
    "i2t_r10": "image→text R@10 (test)",
    "t2i_r1": "text→image R@1 (test)",
    "t2i_r5": "text→image R@5 (test)",
    "t2i_r10": "text→image R@10 (test)",
    "hardneg_acc": "hard-negative accuracy (test)",
    "mutual_knn": "mutual kNN (test)",
    "cka": "CKA (test)",
    "unbiased_cka": "unbiased CKA (test)",
    "cknna": "CKNNA (test)",
    "svcca": "SVCCA (test)",
    "recon_mse": "reconstruction MSE (test, lower is better)",
    "raw_mutual_knn": "mutual kNN before alignment (test)",
}

OBJECTIVE_ORDER = ("con", "negcon", "spread")
PARETO_METRICS = ("mutual_knn", "i2t_r1")
PANEL_METRICS = ("i2t_r1", "mutual_knn")  # the rows of the layer heat maps, the scale panels
DPI = 100
DEPTH_XLABEL = "text layer depth (relative)"
DEPTH_YLABEL = "vision layer depth (relative)"
_CMAP = matplotlib.colormaps["viridis"].with_extremes(bad="0.92")
_PALETTE = matplotlib.colormaps["tab10"].colors


@dataclass
class Plot:
    path: Path
    title: str
    xlabel: str
    ylabel: str


@dataclass
class Skipped:
    name: str
    reason: str


def pareto_front(
    x: Sequence[float],
    y: Sequence[float],
    minimize_x: bool = True,
    maximize_y: bool = True,
) -> np.ndarray:
    """Boolean mask of the non-dominated points.

    A point is dominated when another is at least as good on both axes and strictly better on
    one; exact duplicates therefore both stay. NaN points are never on the front and never
    dominate.
    """
    xs = np.asarray(x, dtype=float).reshape(-1)
    ys = np.asarray(y, dtype=float).reshape(-1)
    if xs.shape != ys.shape:
        raise ValueError(f"x and y differ in length: {xs.size} != {ys.size}")
    # Turn both axes into "smaller is better".
    a = xs if minimize_x else -xs
    b = -ys if maximize_y else ys
    valid = ~(np.isnan(a) | np.isnan(b))
    a, b = a[valid], b[valid]
    no_worse = (a[:, None] <= a[None, :]) & (b[:, None] <= b[None, :])  # [j, i]: j vs i
    better = (a[:, None] < a[None, :]) | (b[:, None] < b[None, :])
    dominated = (no_worse & better).any(axis=0)
    mask = np.zeros(xs.size, dtype=bool)
    mask[np.flatnonzero(valid)] = ~dominated
    return mask


def write_plots(out_dir: Path, rows: list[dict[str, Any]]) -> tuple[list[Plot], list[Skipped]]:
    """Draw every plot the rows allow into `out_dir`; say why each other one was skipped."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trained = [r for r in rows if _text(r, "objective") not in ("", RAW)]
    objectives = _objectives(trained)
    colors = {o: _PALETTE[i % len(_PALETTE)] for i, o in enumerate(objectives)}
    results: list[Plot | Skipped] = [
        _pareto_plot(out_dir, trained, metric, objectives, colors) for metric in PARETO_METRICS
    ]
    if not objectives:
        reason = "no trained rows (only unaligned baselines, or none at all)"
        results += [Skipped("layers", reason), Skipped("scale", reason)]
    by_objective = {o: [r for r in trained if _text(r, "objective") == o] for o in objectives}
    results += [_layers_plot(out_dir, by_objective[o], o) for o in objectives]
    results += [_scale_plot(out_dir, by_objective[o], o) for o in objectives]
    plots = [r for r in results if isinstance(r, Plot)]
    skipped = [r for r in results if isinstance(r, Skipped)]
    return plots, skipped


# --- values -------------------------------------------------------------------------------


def _num(row: dict[str, Any], key: str) -> float:
    """The cell as a float; "", None, unparsable and non-finite cells become NaN (missing)."""
    value = row.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        return math.nan
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out if math.isfinite(out) else math.nan


def _text(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    return "" if value is None else str(value).strip()


def _has(row: dict[str, Any], *keys: str) -> bool:
    return all(not math.isnan(_num(row, k)) for k in keys)


def _has_any(row: dict[str, Any], keys: Sequence[str]) -> bool:
    return any(_has(row, k) for k in keys)


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _objectives(rows: list[dict[str, Any]]) -> list[str]:
    present = {_text(r, "objective") for r in rows}
    known = [o for o in OBJECTIVE_ORDER if o in present]
    return known + sorted(present - set(OBJECTIVE_ORDER))


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _short(model: str) -> str:
    """The name without its hub prefix: `hf:facebook/dinov2-small` -> `dinov2-small`."""
    return model.removeprefix("hf:").rsplit("/", 1)[-1]


def _short_label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric).removesuffix(" (test)")


@contextmanager
def _figure(path: Path, width: float, height: float) -> Iterator[Figure]:
    """A pyplot-free Agg figure, saved to `path` on success and released either way."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    try:
        yield fig
        fig.savefig(path, dpi=DPI)
    finally:
        fig.clear()


# --- Pareto fronts: reconstruction vs alignment, per objective -----------------------------


def _pareto_plot(
    out_dir: Path,
    rows: list[dict[str, Any]],
    metric: str,
    objectives: list[str],
    colors: dict[str, Any],
) -> Plot | Skipped:
    name = f"pareto_{metric}"
    points = {
        o: np.array(
            [
                (_num(r, "recon_mse"), _num(r, metric))
                for r in rows
                if _text(r, "objective") == o and _has(r, "recon_mse", metric)
            ],
            dtype=float,
        ).reshape(-1, 2)
        for o in objectives
    }
    if not any(len(p) for p in points.values()):
        return Skipped(name, f"no trained row has both recon_mse and {metric}")
    path = out_dir / f"{name}.png"
    title = f"Pareto front: reconstruction vs {_short_label(metric)}"
    xlabel, ylabel = METRIC_LABELS["recon_mse"], METRIC_LABELS[metric]
    with _figure(path, 6.0, 4.5) as fig:
        ax = fig.add_subplot()
        for objective, xy in points.items():
            if len(xy):
                _draw_front(ax, xy[:, 0], xy[:, 1], objective, colors[objective])
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(title="objective (front / trials)", fontsize=8, title_fontsize=8)
    return Plot(path, title, xlabel, ylabel)


def _draw_front(ax: Axes, x: np.ndarray, y: np.ndarray, label: str, color: Any) -> None:
    front = pareto_front(x, y)
    ax.scatter(x[~front], y[~front], s=16, color=color, alpha=0.3, linewidths=0)
    order = np.argsort(x[front], kind="stable")
    ax.step(x[front][order], y[front][order], where="post", color=color, lw=1.2, alpha=0.8)
    ax.scatter(
        x[front],
        y[front],
        s=46,
        color=color,
        edgecolors="black",
        linewidths=0.8,
        zorder=3,
        label=f"{label} ({int(front.sum())} / {len(x)})",
    )


# --- layer depth: heat maps per model pair -------------------------------------------------


def _layers_plot(out_dir: Path, rows: list[dict[str, Any]], objective: str) -> Plot | Skipped:
    name = f"layers_{_slug(objective)}"
    usable = [
        r for r in rows if _has(r, "vision_depth", "text_depth") and _has_any(r, PANEL_METRICS)
    ]
    pairs = {_depths(r) for r in usable}
    if not pairs:
        return Skipped(name, f"no {objective} row has layer depths and {_either(PANEL_METRICS)}")
    if len(pairs) == 1:
        only = _pair_text(*pairs.pop())
        return Skipped(name, f"only one layer pair ({only}) for {objective}; nothing to compare")
    models = sorted({(_text(r, "vision"), _text(r, "text")) for r in usable})
    path = out_dir / f"{name}.png"
    title = f"Layer depth: {objective}"
    with _figure(path, 1.4 + 3.0 * len(models), 6.0) as fig:
        fig.suptitle(title)
        axes = fig.subplots(len(PANEL_METRICS), len(models), squeeze=False)
        for i, metric in enumerate(PANEL_METRICS):
            grids = [_depth_grid(_rows_of(usable, m), metric) for m in models]
            norm = _norm([g for _, _, g in grids])
            for j, ((vision, text), (vds, tds, grid)) in enumerate(zip(models, grids, strict=True)):
                ax = axes[i, j]
                _heatmap(ax, vds, tds, grid, norm, _CMAP)
                ax.set_title(f"{_short(vision)} × {_short(text)}", fontsize=9)
                ax.set_xlabel(DEPTH_XLABEL if i == len(PANEL_METRICS) - 1 else "", fontsize=8)
                ax.set_ylabel(DEPTH_YLABEL if j == 0 else "", fontsize=8)
            bar = fig.colorbar(ScalarMappable(norm=norm, cmap=_CMAP), ax=list(axes[i, :]))
            bar.set_label(_short_label(metric), fontsize=8)
    return Plot(path, title, DEPTH_XLABEL, DEPTH_YLABEL)


def _either(metrics: Sequence[str]) -> str:
    return " or ".join(metrics)


def _depths(row: dict[str, Any]) -> tuple[float, float]:
    # Rounded so that depths parsed from different rows compare equal.
    return round(_num(row, "vision_depth"), 6), round(_num(row, "text_depth"), 6)


def _pair_text(vision_depth: float, text_depth: float) -> str:
    return f"vision depth {vision_depth:g}, text depth {text_depth:g}"


def _rows_of(rows: list[dict[str, Any]], model: tuple[str, str]) -> list[dict[str, Any]]:
    return [r for r in rows if (_text(r, "vision"), _text(r, "text")) == model]


def _depth_grid(
    rows: list[dict[str, Any]], metric: str
) -> tuple[list[float], list[float], np.ndarray]:
    """Vision depths, text depths, and the mean metric per (vision depth, text depth) cell."""
    vds = sorted({_depths(r)[0] for r in rows})
    tds = sorted({_depths(r)[1] for r in rows})
    grid = np.full((len(vds), len(tds)), np.nan)
    for i, vd in enumerate(vds):
        for j, td in enumerate(tds):
            grid[i, j] = _mean([_num(r, metric) for r in rows if _depths(r) == (vd, td)])
    return vds, tds, grid


def _norm(grids: list[np.ndarray]) -> Normalize:
    values = np.concatenate([g.ravel() for g in grids])
    values = values[np.isfinite(values)]
    if not values.size:
        return Normalize(0.0, 1.0)
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < 1e-9:
        lo, hi = lo - 0.05, hi + 0.05
    return Normalize(lo, hi)


def _heatmap(
    ax: Axes,
    vds: list[float],
    tds: list[float],
    grid: np.ndarray,
    norm: Normalize,
    cmap: Colormap,
) -> None:
    ax.imshow(np.ma.masked_invalid(grid), origin="lower", cmap=cmap, norm=norm, aspect="auto")
    ax.set_xticks(range(len(tds)), [f"{d:.2f}" for d in tds], fontsize=8)
    ax.set_yticks(range(len(vds)), [f"{d:.2f}" for d in vds], fontsize=8)
    for (i, j), value in np.ndenumerate(grid):
        if np.isfinite(value):
            color = "white" if norm(value) < 0.5 else "black"
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8, color=color)


# --- model scale: metric vs backbone size -----------------------------------------------------


def _scale_plot(out_dir: Path, rows: list[dict[str, Any]], objective: str) -> Plot | Skipped:
    name = f"scale_{_slug(objective)}"
    usable = [r for r in rows if _has_any(r, PANEL_METRICS)]
    axis = _scale_axis(usable)
    if axis is None:
        return Skipped(name, _no_scale_reason(usable, objective))
    other = "text" if axis == "vision" else "vision"
    usable = [r for r in usable if _has(r, f"{axis}_params")]
    others = sorted({_text(r, other) for r in usable})
    path = out_dir / f"{name}.png"
    title = f"Model scale: {objective}"
    xlabel = f"{axis} model parameters (M)"
    with _figure(path, 10.0, 4.2) as fig:
        fig.suptitle(title)
        axes = fig.subplots(1, len(PANEL_METRICS), squeeze=False)[0]
        for ax, metric in zip(axes, PANEL_METRICS, strict=True):
            for k, model in enumerate(others):
                sub = [r for r in usable if _text(r, other) == model]
                color = _PALETTE[k % len(_PALETTE)]
                label = f"{other}: {_short(model)}"
                _scale_line(ax, _scale_points(sub, axis, metric), color, label, annotate=True)
                if metric == "mutual_knn":
                    raw = _scale_points(sub, axis, "raw_mutual_knn")
                    _scale_line(ax, raw, color, f"before alignment ({_short(model)})", dashed=True)
            _scale_axes(ax, usable, axis, xlabel, metric)
    ylabel = " / ".join(METRIC_LABELS[m] for m in PANEL_METRICS)
    return Plot(path, title, xlabel, ylabel)


def _distinct(rows: list[dict[str, Any]], key: str) -> set[float]:
    return {_num(r, key) for r in rows if _has(r, key)}


def _scale_axis(rows: list[dict[str, Any]]) -> str | None:
    for axis in ("vision", "text"):
        if len(_distinct(rows, f"{axis}_params")) >= 2:
            return axis
    return None


def _no_scale_reason(rows: list[dict[str, Any]], objective: str) -> str:
    sizes = {a: _distinct(rows, f"{a}_params") for a in ("vision", "text")}
    if not any(sizes.values()):
        return f"no {objective} row has {_either(PANEL_METRICS)} and vision_params or text_params"
    known = ", ".join(f"{a} {next(iter(s)) / 1e6:.3g}M" for a, s in sizes.items() if s)
    return f"one model size per side for {objective} ({known}); nothing to compare across scale"


def _scale_points(
    rows: list[dict[str, Any]], axis: str, metric: str
) -> list[tuple[float, str, float]]:
    """(parameters in millions, model, metric mean over layers and hyper-parameters), by size."""
    models = sorted({_text(r, axis) for r in rows})
    points = []
    for model in models:
        sub = [r for r in rows if _text(r, axis) == model]
        size = _mean([_num(r, f"{axis}_params") for r in sub]) / 1e6
        value = _mean([_num(r, metric) for r in sub])
        if not math.isnan(value):
            points.append((size, model, value))
    return sorted(points)


def _scale_line(
    ax: Axes,
    points: list[tuple[float, str, float]],
    color: Any,
    label: str,
    annotate: bool = False,
    dashed: bool = False,
) -> None:
    if not points:
        return
    xs = [p[0] for p in points]
    ys = [p[2] for p in points]
    style = {"ls": "--", "marker": "x", "alpha": 0.7} if dashed else {"ls": "-", "marker": "o"}
    ax.plot(xs, ys, color=color, label=label, lw=1.4, ms=6, **style)
    if annotate:
        for x, model, y in points:
            ax.annotate(
                _short(model), (x, y), textcoords="offset points", xytext=(5, 5), fontsize=7
            )


def _scale_axes(ax: Axes, rows: list[dict[str, Any]], axis: str, xlabel: str, metric: str) -> None:
    ax.set_xscale("log")
    sizes = sorted(_distinct(rows, f"{axis}_params"))
    ax.set_xticks([s / 1e6 for s in sizes], [f"{s / 1e6:.3g}" for s in sizes])
    ax.minorticks_off()  # the ticks sit at the model sizes themselves
    ax.margins(x=0.15, y=0.12)
    ax.set(title=_short_label(metric), xlabel=xlabel, ylabel=METRIC_LABELS[metric])
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
