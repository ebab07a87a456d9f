"""Plots of a sweep's `results.csv`: how a reader sees the paper's three questions answered.

Each question gets its own figure. Which objective gives the best trade-off between
reconstruction and alignment (Pareto fronts)? Which layer depths align best (heat maps)?
Does alignment improve with model scale (scale curves, against the unaligned baseline)?

Every value comes with its uncertainty where the rows have one, so a reader does not read
noise as a finding: rows that differ only by `train.seed` are first averaged (`seed_means`),
with the t-interval over seeds as the error bar (one seed: the row's bootstrap interval,
`<metric>_lo` / `<metric>_hi`). A cell or point that pools several configurations (a heat-map
cell over learning rates, say) shows the mean of their arms, which bounds the pooled mean's arm
whatever the configurations' correlation. Rows without bounds plot as points without bars.

Depths are the ones the rows ask for (`vision_depth`, `text_depth`), so models whose half
depth lands on different layers share the 0.5 row of a heat map; the realised layers
(`vision_layer`, `text_layer`) label the ticks and points beside them.

Rows come as `results.csv` gives them (strings, "" for missing) or as Python numbers. A row
missing a value a plot needs is left out of that plot; a plot that cannot be drawn is returned
as `Skipped` with the reason, so the report can say so instead of silently dropping it.
Figures are drawn with `matplotlib.figure.Figure` on an Agg canvas and never touch pyplot.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
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
from matplotlib.lines import Line2D

from raysys.report.schema import RAW, SEED, config_key, t_half_width

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
DEPTH_XLABEL = "text layer depth (relative) as asked (realised layer)"
DEPTH_YLABEL = "vision layer depth (relative) as asked (realised layer)"
SEED_LEVEL = 0.95  # the t-interval over seeds, at the bootstrap's default level
# A heat map writes value ± arm in its cells up to this many rows and columns; a denser grid
# keeps only the colours (its intervals are in results.csv).
ANNOTATE_MAX = (8, 6)
_CMAP = matplotlib.colormaps["viridis"].with_extremes(bad="0.92")
_PALETTE = matplotlib.colormaps["tab10"].colors
# Averaged over seeds but given no interval: bookkeeping, item counts, chance levels.
_NO_INTERVAL = {"trial", "train_s", SEED}
_BAR = {"elinewidth": 0.9, "capsize": 2.5, "capthick": 0.9, "zorder": 2}


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


@dataclass
class Drawn:
    """A figure drawn but not yet written: `write_plots` saves it as `<name>.png`."""

    name: str
    figure: Figure
    title: str
    xlabel: str
    ylabel: str


@dataclass
class Points:
    """One objective's Pareto points: one per configuration (seeds averaged), with bounds
    (NaN where the row has none)."""

    x: np.ndarray
    y: np.ndarray
    x_lo: np.ndarray
    x_hi: np.ndarray
    y_lo: np.ndarray
    y_hi: np.ndarray


@dataclass
class DepthGrid:
    """A heat map's cells: the mean metric per (asked vision depth, asked text depth), the
    bounds of that mean (NaN where unknown), and tick labels naming the realised layers."""

    vision_depths: list[float]
    text_depths: list[float]
    value: np.ndarray  # [vision depth, text depth]
    lo: np.ndarray
    hi: np.ndarray
    vision_labels: list[str]
    text_labels: list[str]


@dataclass
class ScalePoint:
    size_m: float  # parameters, millions
    model: str
    value: float
    lo: float
    hi: float
    layers: tuple[int, ...]  # the realised layers of the scaled model behind the value


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


def draw_plots(rows: list[dict[str, Any]]) -> list[Drawn | Skipped]:
    """Every figure the rows allow, or why not, in report order (nothing written)."""
    trained = seed_means([r for r in rows if _text(r, "objective") not in ("", RAW)])
    objectives = _objectives(trained)
    colors = {o: _PALETTE[i % len(_PALETTE)] for i, o in enumerate(objectives)}
    results: list[Drawn | Skipped] = [
        _pareto_plot(trained, metric, objectives, colors) for metric in PARETO_METRICS
    ]
    if not objectives:
        reason = "no trained rows (only unaligned baselines, or none at all)"
        results += [Skipped("layers", reason), Skipped("scale", reason)]
    by_objective = {o: [r for r in trained if _text(r, "objective") == o] for o in objectives}
    results += [_layers_plot(by_objective[o], o) for o in objectives]
    results += [_scale_plot(by_objective[o], o) for o in objectives]
    return results


def write_plots(out_dir: Path, rows: list[dict[str, Any]]) -> tuple[list[Plot], list[Skipped]]:
    """Draw every plot the rows allow into `out_dir`; say why each other one was skipped."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots: list[Plot] = []
    skipped: list[Skipped] = []
    for result in draw_plots(rows):
        if isinstance(result, Skipped):
            skipped.append(result)
            continue
        path = out_dir / f"{result.name}.png"
        try:
            result.figure.savefig(path, dpi=DPI)
        finally:
            result.figure.clear()
        plots.append(Plot(path, result.title, result.xlabel, result.ylabel))
    return plots, skipped


# --- seeds: replicates of one configuration -------------------------------------------------


def seed_means(rows: list[dict[str, Any]], level: float = SEED_LEVEL) -> list[dict[str, Any]]:
    """One row per configuration (`schema.config_key`, as the report's tables group them): rows
    that differ only by `train.seed` (and their trial id, training time and scores) averaged,
    in first-seen order.

    Each numeric column becomes the mean over the seeds that have it. Its bounds
    (`<col>_lo`, `<col>_hi`) become the `level` t-interval over seeds when at least two seeds
    have a value, else the one seed's own (bootstrap) bounds; so do those of a column equal
    in every seed (a `raw_*` score of the frozen backbones: the seed never entered it, and a
    zero-width t-interval would hide the test sample's noise). Counts (`n_*`), chance levels
    and `train_s` get no bounds. `n_seeds` counts the rows merged and `train.seed` lists their
    seeds. A row alone is returned as it is, plus `n_seeds`.
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(config_key(row), []).append(row)
    return [_merge(group, level) for group in groups.values()]


def t_interval(values: Sequence[float], level: float = SEED_LEVEL) -> tuple[float, float]:
    """The two-sided Student-t interval of the mean of `values` (at least two), the report's
    `schema.t_half_width` around the mean."""
    if len(values) < 2:
        raise ValueError(f"a t-interval needs at least two values, got {len(values)}")
    mean = sum(values) / len(values)
    arm = t_half_width(values, level)
    return mean - arm, mean + arm


def _no_interval(column: str) -> bool:
    return column in _NO_INTERVAL or column.startswith("n_") or column.endswith("_chance")


def _merge(group: list[dict[str, Any]], level: float) -> dict[str, Any]:
    if len(group) == 1:
        return {**group[0], "n_seeds": 1}
    fixed = {k for k, _ in config_key(group[0])} | {SEED, "trial"}
    out = dict(group[0])
    columns = dict.fromkeys(k for r in group for k in r)
    for col in columns:
        if col in fixed or col.endswith(("_lo", "_hi")):
            continue
        have = [r for r in group if not math.isnan(_num(r, col))]
        if not have:
            continue  # text, or blank everywhere: the first row's cell stands
        values = [_num(r, col) for r in have]
        out[col] = sum(values) / len(values)
        if _no_interval(col):
            continue
        if len(values) >= 2 and max(values) > min(values):
            out[f"{col}_lo"], out[f"{col}_hi"] = t_interval(values, level)
        else:  # one seed, or a score the seed does not enter (raw_*): the rows' own bounds
            _, out[f"{col}_lo"], out[f"{col}_hi"] = pooled(have, col)
    out["n_seeds"] = len(group)
    out[SEED] = ",".join(_text(r, SEED) for r in group)
    out["trial"] = ",".join(t for r in group if (t := _text(r, "trial")))
    return out


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


def _bounds(row: dict[str, Any], metric: str) -> tuple[float, float]:
    """The row's interval of `metric`, (NaN, NaN) unless both ends are there."""
    lo, hi = _num(row, f"{metric}_lo"), _num(row, f"{metric}_hi")
    return (lo, hi) if not (math.isnan(lo) or math.isnan(hi)) else (math.nan, math.nan)


def pooled(rows: list[dict[str, Any]], metric: str) -> tuple[float, float, float]:
    """(mean, lo, hi) of `metric` over configurations: the bounds sit at the mean of the
    configurations' arms (a bound on the mean's arm for any correlation between them); NaN
    bounds unless every configuration with a value has bounds."""
    have = [r for r in rows if _has(r, metric)]
    if not have:
        return math.nan, math.nan, math.nan
    values = np.array([_num(r, metric) for r in have])
    ends = np.array([_bounds(r, metric) for r in have]).reshape(-1, 2)
    mean = float(values.mean())
    if np.isnan(ends).any():
        return mean, math.nan, math.nan
    below = np.clip(values - ends[:, 0], 0.0, None).mean()
    above = np.clip(ends[:, 1] - values, 0.0, None).mean()
    return mean, mean - float(below), mean + float(above)


def _arms(value: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Error-bar arms [2, n] (below, above), never negative."""
    return np.clip(np.stack([value - lo, hi - value]), 0.0, None)


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


def _figure(width: float, height: float) -> Figure:
    """A pyplot-free Agg figure (released by `write_plots` once saved)."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _error_bars(
    ax: Axes,
    x: np.ndarray,
    y: np.ndarray,
    color: Any,
    xerr: np.ndarray | None = None,
    yerr: np.ndarray | None = None,
    alpha: float = 0.55,
) -> None:
    """Bars on the points whose arms are known (one axis per call); none when no point has."""
    arms = xerr if xerr is not None else yerr
    ok = np.isfinite(arms).all(axis=0)
    if not ok.any():
        return
    ax.errorbar(
        x[ok],
        y[ok],
        xerr=None if xerr is None else xerr[:, ok],
        yerr=None if yerr is None else yerr[:, ok],
        fmt="none",
        ecolor=color,
        alpha=alpha,
        **_BAR,
    )


# --- Pareto fronts: reconstruction vs alignment, per objective -----------------------------


def pareto_points(rows: list[dict[str, Any]], metric: str) -> Points:
    """`recon_mse` (x) against `metric` (y) of the rows that have both, with their bounds."""
    usable = [r for r in rows if _has(r, "recon_mse", metric)]
    cols = [[_num(r, "recon_mse") for r in usable], [_num(r, metric) for r in usable]]
    x_ends = np.array([_bounds(r, "recon_mse") for r in usable], dtype=float).reshape(-1, 2)
    y_ends = np.array([_bounds(r, metric) for r in usable], dtype=float).reshape(-1, 2)
    x, y = (np.array(c, dtype=float) for c in cols)
    return Points(x, y, x_ends[:, 0], x_ends[:, 1], y_ends[:, 0], y_ends[:, 1])


def _pareto_plot(
    rows: list[dict[str, Any]],
    metric: str,
    objectives: list[str],
    colors: dict[str, Any],
) -> Drawn | Skipped:
    name = f"pareto_{metric}"
    points = {
        o: pareto_points([r for r in rows if _text(r, "objective") == o], metric)
        for o in objectives
    }
    if not any(len(p.x) for p in points.values()):
        return Skipped(name, f"no trained row has both recon_mse and {metric}")
    title = f"Pareto front: reconstruction vs {_short_label(metric)}"
    xlabel, ylabel = METRIC_LABELS["recon_mse"], METRIC_LABELS[metric]
    fig = _figure(6.0, 4.5)
    ax = fig.add_subplot()
    for objective, pts in points.items():
        if len(pts.x):
            draw_front(ax, pts, objective, colors[objective])
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(title="objective (front / configurations)", fontsize=8, title_fontsize=8)
    return Drawn(name, fig, title, xlabel, ylabel)


def draw_front(ax: Axes, pts: Points, label: str, color: Any) -> None:
    """One objective's points (the front bold, joined by a step line) with x and y bars."""
    x, y = pts.x, pts.y
    front = pareto_front(x, y)
    xerr, yerr = _arms(x, pts.x_lo, pts.x_hi), _arms(y, pts.y_lo, pts.y_hi)
    for on, alpha in ((~front, 0.2), (front, 0.6)):  # the front's bars stand out
        _error_bars(ax, x[on], y[on], color, xerr=xerr[:, on], alpha=alpha)
        _error_bars(ax, x[on], y[on], color, yerr=yerr[:, on], alpha=alpha)
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


def _layers_plot(rows: list[dict[str, Any]], objective: str) -> Drawn | Skipped:
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
    # One set of asked depths for every panel: a depth is the same row in each model pair's map.
    vds = sorted({d for d, _ in pairs})
    tds = sorted({d for _, d in pairs})
    title = f"Layer depth: {objective}"
    panel = max(3.0, 0.17 * len(vds) + 0.8)  # room for a tick label per asked depth
    fig = _figure(1.6 + 3.2 * len(models), 0.6 + panel * len(PANEL_METRICS))
    fig.suptitle(title)
    axes = fig.subplots(len(PANEL_METRICS), len(models), squeeze=False)
    for i, metric in enumerate(PANEL_METRICS):
        grids = [depth_grid(_rows_of(usable, m), metric, vds, tds) for m in models]
        norm = _norm([g.value for g in grids])
        for j, ((vision, text), grid) in enumerate(zip(models, grids, strict=True)):
            ax = axes[i, j]
            draw_heatmap(ax, grid, norm, _CMAP)
            ax.set_title(f"{_short(vision)} × {_short(text)}", fontsize=9)
            ax.set_xlabel(DEPTH_XLABEL if i == len(PANEL_METRICS) - 1 else "", fontsize=8)
            ax.set_ylabel(DEPTH_YLABEL if j == 0 else "", fontsize=8)
        bar = fig.colorbar(ScalarMappable(norm=norm, cmap=_CMAP), ax=list(axes[i, :]))
        bar.set_label(_short_label(metric), fontsize=8)
    return Drawn(name, fig, title, DEPTH_XLABEL, DEPTH_YLABEL)


def _either(metrics: Sequence[str]) -> str:
    return " or ".join(metrics)


def _depths(row: dict[str, Any]) -> tuple[float, float]:
    # Rounded so that depths parsed from different rows compare equal.
    return round(_num(row, "vision_depth"), 6), round(_num(row, "text_depth"), 6)


def _pair_text(vision_depth: float, text_depth: float) -> str:
    return f"vision depth {vision_depth:g}, text depth {text_depth:g}"


def _rows_of(rows: list[dict[str, Any]], model: tuple[str, str]) -> list[dict[str, Any]]:
    return [r for r in rows if (_text(r, "vision"), _text(r, "text")) == model]


def _layers(rows: list[dict[str, Any]], column: str) -> tuple[int, ...]:
    return tuple(sorted({int(_num(r, column)) for r in rows if _has(r, column)}))


def _depth_label(depth: float, layers: tuple[int, ...]) -> str:
    """`0.50 (L11)`; `0.50 (L8, L11)` when models realise one asked depth differently."""
    realised = f" ({', '.join(f'L{k}' for k in layers)})" if layers else ""
    return f"{depth:.2f}{realised}"


def depth_grid(
    rows: list[dict[str, Any]],
    metric: str,
    vision_depths: Sequence[float] | None = None,
    text_depths: Sequence[float] | None = None,
) -> DepthGrid:
    """The heat map of `metric` over the asked depths (those of the rows unless given): each
    cell pools the rows asked for that depth pair, whatever layer each model realised."""
    usable = [r for r in rows if _has(r, "vision_depth", "text_depth")]
    vds = sorted(vision_depths or {_depths(r)[0] for r in usable})
    tds = sorted(text_depths or {_depths(r)[1] for r in usable})
    cells = np.full((3, len(vds), len(tds)), np.nan)
    for i, vd in enumerate(vds):
        for j, td in enumerate(tds):
            cells[:, i, j] = pooled([r for r in usable if _depths(r) == (vd, td)], metric)
    v_labels = [
        _depth_label(d, _layers([r for r in usable if _depths(r)[0] == d], "vision_layer"))
        for d in vds
    ]
    t_labels = [
        _depth_label(d, _layers([r for r in usable if _depths(r)[1] == d], "text_layer"))
        for d in tds
    ]
    return DepthGrid(list(vds), list(tds), cells[0], cells[1], cells[2], v_labels, t_labels)


def _norm(grids: list[np.ndarray]) -> Normalize:
    values = np.concatenate([g.ravel() for g in grids])
    values = values[np.isfinite(values)]
    if not values.size:
        return Normalize(0.0, 1.0)
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < 1e-9:
        lo, hi = lo - 0.05, hi + 0.05
    return Normalize(lo, hi)


def cell_text(value: float, lo: float, hi: float) -> str:
    """`0.43` over `±0.02`: the value and its interval's larger arm (as the report's tables,
    so the printed range holds the whole interval); the value alone without bounds."""
    if math.isnan(lo) or math.isnan(hi):
        return f"{value:.2f}"
    arm = max(value - lo, hi - value, 0.0)
    return f"{value:.2f}\n±{arm:.2f}" if arm >= 0.005 else f"{value:.2f}\n±<0.01"


def draw_heatmap(ax: Axes, grid: DepthGrid, norm: Normalize, cmap: Colormap) -> None:
    value = grid.value
    ax.imshow(np.ma.masked_invalid(value), origin="lower", cmap=cmap, norm=norm, aspect="auto")
    ax.set_xticks(
        range(len(grid.text_depths)),
        [t.replace(" ", "\n", 1) for t in grid.text_labels],
        fontsize=7,
    )
    ax.set_yticks(range(len(grid.vision_depths)), grid.vision_labels, fontsize=7)
    if value.shape[0] > ANNOTATE_MAX[0] or value.shape[1] > ANNOTATE_MAX[1]:
        return
    for (i, j), v in np.ndenumerate(value):
        if np.isfinite(v):
            color = "white" if norm(v) < 0.5 else "black"
            text = cell_text(v, grid.lo[i, j], grid.hi[i, j])
            ax.text(
                j, i, text, ha="center", va="center", fontsize=7.5, color=color, linespacing=1.1
            )


# --- model scale: metric vs backbone size -----------------------------------------------------


def _scale_plot(rows: list[dict[str, Any]], objective: str) -> Drawn | Skipped:
    name = f"scale_{_slug(objective)}"
    usable = [r for r in rows if _has_any(r, PANEL_METRICS)]
    axis = _scale_axis(usable)
    if axis is None:
        return Skipped(name, _no_scale_reason(usable, objective))
    other = "text" if axis == "vision" else "vision"
    usable = [r for r in usable if _has(r, f"{axis}_params")]
    series = scale_series(usable, other)
    several_depths = len({depth for _, depth in series}) > 1
    title = f"Model scale: {objective}"
    xlabel = f"{axis} model parameters (M)"
    fig = _figure(10.0, 4.2)
    fig.suptitle(title)
    axes = fig.subplots(1, len(PANEL_METRICS), squeeze=False)[0]
    for ax, metric in zip(axes, PANEL_METRICS, strict=True):
        raw_drawn = False
        for k, ((model, depth), sub) in enumerate(series.items()):
            color = _PALETTE[k % len(_PALETTE)]
            at = f" @ {_depth_pair_text(depth)}" if several_depths else ""
            label = f"{other}: {_short(model)}{at}"
            draw_scale_line(ax, scale_points(sub, axis, metric), color, label, annotate=True)
            if metric == "mutual_knn":
                raw = scale_points(sub, axis, "raw_mutual_knn")
                draw_scale_line(ax, raw, color, "_nolegend_", dashed=True)
                raw_drawn = raw_drawn or bool(raw)
        _scale_axes(ax, usable, axis, xlabel, metric, raw_drawn)
    ylabel = " / ".join(METRIC_LABELS[m] for m in PANEL_METRICS)
    return Drawn(name, fig, title, xlabel, ylabel)


def _depth_key(row: dict[str, Any]) -> tuple[float, float] | None:
    return _depths(row) if _has(row, "vision_depth", "text_depth") else None


def _depth_pair_text(depth: tuple[float, float] | None) -> str:
    return "depth ?" if depth is None else f"{depth[0]:.2f}:{depth[1]:.2f}"


def scale_series(
    rows: list[dict[str, Any]], other: str
) -> dict[tuple[str, tuple[float, float] | None], list[dict[str, Any]]]:
    """The rows of each curve: one per model on the `other` side and asked depth pair, so a
    curve compares model sizes at one relative depth (None: rows without depths)."""
    keys = sorted(
        {(_text(r, other), _depth_key(r)) for r in rows},
        key=lambda k: (k[0], k[1] is None, k[1] or (0.0, 0.0)),
    )
    return {k: [r for r in rows if (_text(r, other), _depth_key(r)) == k] for k in keys}


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


def scale_points(rows: list[dict[str, Any]], axis: str, metric: str) -> list[ScalePoint]:
    """One point per `axis` model, by size: the metric pooled over its rows (hyper-parameters;
    one asked depth pair when the rows come from `scale_series`) with the realised layers."""
    models = sorted({_text(r, axis) for r in rows})
    points = []
    for model in models:
        sub = [r for r in rows if _text(r, axis) == model]
        size = _mean([_num(r, f"{axis}_params") for r in sub]) / 1e6
        value, lo, hi = pooled(sub, metric)
        if not math.isnan(value):
            layers = _layers([r for r in sub if _has(r, metric)], f"{axis}_layer")
            points.append(ScalePoint(size, model, value, lo, hi, layers))
    return sorted(points, key=lambda p: (p.size_m, p.model))


def draw_scale_line(
    ax: Axes,
    points: list[ScalePoint],
    color: Any,
    label: str,
    annotate: bool = False,
    dashed: bool = False,
) -> None:
    if not points:
        return
    xs = np.array([p.size_m for p in points])
    ys = np.array([p.value for p in points])
    style = {"ls": "--", "marker": "x", "alpha": 0.7} if dashed else {"ls": "-", "marker": "o"}
    ax.plot(xs, ys, color=color, label=label, lw=1.4, ms=6, **style)
    lo = np.array([p.lo for p in points])
    hi = np.array([p.hi for p in points])
    _error_bars(ax, xs, ys, color, yerr=_arms(ys, lo, hi))
    if annotate:  # the realised layer beside each point; the model names are on the ticks
        for p in points:
            if p.layers:
                text = ", ".join(f"L{k}" for k in p.layers)
                ax.annotate(
                    text, (p.size_m, p.value), textcoords="offset points", xytext=(5, 4), fontsize=7
                )


def _scale_axes(
    ax: Axes, rows: list[dict[str, Any]], axis: str, xlabel: str, metric: str, raw: bool
) -> None:
    ax.set_xscale("log")
    sizes = sorted(_distinct(rows, f"{axis}_params"))
    names = [
        ", ".join(sorted({_short(_text(r, axis)) for r in rows if _num(r, f"{axis}_params") == s}))
        for s in sizes
    ]
    ticks = [
        f"{s / 1e6:.3g}\n{n}" if n else f"{s / 1e6:.3g}" for s, n in zip(sizes, names, strict=True)
    ]
    ax.set_xticks([s / 1e6 for s in sizes], ticks, fontsize=8)
    ax.minorticks_off()  # the ticks sit at the model sizes themselves
    ax.margins(x=0.15, y=0.12)
    ax.set(title=_short_label(metric), xlabel=xlabel, ylabel=METRIC_LABELS[metric])
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if raw:
        handles.append(Line2D([], [], color="0.4", ls="--", marker="x", lw=1.4))
        labels.append("before alignment (dashed)")
    if handles:
        ax.legend(handles, labels, fontsize=7)
