"""Plots of the passive-metric probe (`raysys probe`): probe.png and alignment.png.

probe.png answers the paper's Figure 1 question at a glance: one panel per metric and
reduction, bars for matching / easy / hard pairs with their intervals, the raw embeddings'
group beside each JAM model's. alignment.png is platonic-rep's layer-pair matrix of the raw
backbones (mutual kNN), one heat map per model pair, its best pair marked.

Rows come as `raysys.probe` makes them or as its CSVs give them back (strings). Figures are
drawn on an Agg canvas, never through pyplot, as in `raysys.report.plots`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

PROBE_PNG = "probe.png"
ALIGNMENT_PNG = "alignment.png"
PAIR_TYPES = ("matching", "easy", "hard")
PAIR_COLORS = {"matching": "#2b8cbe", "easy": "#bdbdbd", "hard": "#e34a33"}
MAX_GROUPS = 6  # more JAM models than this are pooled into one "jam" group
DPI = 100


def _num(row: dict[str, Any], key: str) -> float:
    try:
        v = float(row.get(key, ""))
    except (TypeError, ValueError):
        return math.nan
    return v if math.isfinite(v) else math.nan


def _text(row: dict[str, Any], key: str) -> str:
    v = row.get(key)
    return "" if v is None else str(v)


def _ordered(values: Sequence[str], order: Sequence[str]) -> list[str]:
    present = list(dict.fromkeys(values))
    return [v for v in order if v in present] + sorted(v for v in present if v not in order)


def _group(row: dict[str, Any], pooled: bool) -> str:
    """A bar group: `raw`, or the JAM model's objective (the label before any `#trial`), all
    JAM rows as one `jam` group when `pooled`."""
    if _text(row, "stage") != "jam":
        return "raw"
    return "jam" if pooled else (_text(row, "model").split("#")[0] or "jam")


def probe_plot(path: Path, rows: list[dict[str, Any]]) -> Path | None:
    """Grouped bars per (metric, reduction) panel; a group's bar is the mean over its
    configurations (layer pairs, or one model's layer pairs) of value, lo and hi."""
    rows = [r for r in rows if not math.isnan(_num(r, "value"))]
    if not rows:
        return None
    from raysys.probe import METRICS, REDUCTIONS

    metrics = _ordered([_text(r, "metric") for r in rows], METRICS)
    reductions = _ordered([_text(r, "reduction") for r in rows], REDUCTIONS)
    models = {_text(r, "model").split("#")[0] for r in rows if _text(r, "stage") == "jam"}
    pooled = len(models) > MAX_GROUPS
    groups = _ordered([_group(r, pooled) for r in rows], ["raw", "con", "negcon", "spread"])
    fig = Figure(figsize=(max(6.0, 2.2 + 1.1 * len(groups) * len(reductions)), 2.3 * len(metrics)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(metrics), len(reductions), squeeze=False)
    width = 0.8 / len(PAIR_TYPES)
    for i, metric in enumerate(metrics):
        for j, reduction in enumerate(reductions):
            ax = axes[i][j]
            for k, pair_type in enumerate(PAIR_TYPES):
                means, errs = [], [[], []]
                for g in groups:
                    sel = [
                        r
                        for r in rows
                        if _text(r, "metric") == metric
                        and _text(r, "reduction") == reduction
                        and _text(r, "pair_type") == pair_type
                        and _group(r, pooled) == g
                    ]
                    v = _mean([_num(r, "value") for r in sel])
                    lo, hi = (
                        _mean([_num(r, "lo") for r in sel]),
                        _mean([_num(r, "hi") for r in sel]),
                    )
                    means.append(v)
                    errs[0].append(max(0.0, v - lo) if not math.isnan(lo) else 0.0)
                    errs[1].append(max(0.0, hi - v) if not math.isnan(hi) else 0.0)
                x = np.arange(len(groups)) + (k - 1) * width
                ax.bar(
                    x,
                    means,
                    width,
                    yerr=np.nan_to_num(np.array(errs)),
                    capsize=2,
                    color=PAIR_COLORS[pair_type],
                    label=pair_type,
                )
            ax.set_xticks(np.arange(len(groups)), groups, fontsize=8)
            ax.set_title(f"{metric} ({reduction})", fontsize=9)
            ax.tick_params(axis="y", labelsize=7)
            ax.grid(axis="y", alpha=0.3)
    n = sorted({int(_num(r, "n")) for r in rows if not math.isnan(_num(r, "n"))})
    top = 1 - 0.7 / fig.get_figheight()  # the title and legend take about 0.7 inch
    fig.suptitle(
        "Passive metrics on matching / easy / hard pairs\n"
        f"({'/'.join(map(str, n))} images per draw; bars: mean over configurations)",
        fontsize=10,
        y=1 - 0.1 / fig.get_figheight(),
        va="top",
    )
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="upper center",
        ncol=3,
        fontsize=8,
        frameon=False,
        bbox_to_anchor=(0.5, 1 - 0.5 / fig.get_figheight()),
    )
    fig.tight_layout(rect=(0, 0, 1, top))
    fig.savefig(path, dpi=DPI)
    return path


def alignment_plot(path: Path, rows: list[dict[str, Any]]) -> Path | None:
    """One heat map (vision layer x text layer) of raw mutual kNN per model pair, its best
    layer pair outlined and annotated."""
    rows = [r for r in rows if not math.isnan(_num(r, "value"))]
    if not rows:
        return None
    pairs = list(dict.fromkeys((_text(r, "vision"), _text(r, "text")) for r in rows))
    fig = Figure(figsize=(4.6 * len(pairs), 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(pairs), squeeze=False)[0]
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.92")
    for ax, (vision, text) in zip(axes, pairs, strict=True):
        mine = [r for r in rows if (_text(r, "vision"), _text(r, "text")) == (vision, text)]
        vl = sorted({int(_num(r, "vision_layer")) for r in mine})
        tl = sorted({int(_num(r, "text_layer")) for r in mine})
        grid = np.full((len(vl), len(tl)), np.nan)
        for r in mine:
            grid[vl.index(int(_num(r, "vision_layer"))), tl.index(int(_num(r, "text_layer")))] = (
                _num(r, "value")
            )
        image = ax.imshow(np.ma.masked_invalid(grid), origin="lower", aspect="auto", cmap=cmap)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        bi, bj = np.unravel_index(np.nanargmax(grid), grid.shape)
        ax.add_patch(
            Rectangle((bj - 0.5, bi - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2)
        )
        ax.set_xticks(range(len(tl)), [str(t) for t in tl], fontsize=7)
        ax.set_yticks(range(len(vl)), [str(v) for v in vl], fontsize=7)
        ax.set_xlabel(f"{text} layer")
        ax.set_ylabel(f"{vision} layer")
        ax.set_title(
            f"{vision} + {text}\nbest L{vl[bi]}:L{tl[bj]} = {grid[bi, bj]:.3f}", fontsize=9
        )
    fig.suptitle("Raw mutual kNN over layer pairs (matching pairs)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def write_probe_plots(
    out_dir: Path, rows: list[dict[str, Any]], alignment: list[dict[str, Any]]
) -> list[Path]:
    """probe.png and alignment.png in `out_dir` (each only when it has rows)."""
    out_dir = Path(out_dir)
    drawn = [
        probe_plot(out_dir / PROBE_PNG, rows),
        alignment_plot(out_dir / ALIGNMENT_PNG, alignment),
    ]
    return [p for p in drawn if p is not None]
