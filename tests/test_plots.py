"""raysys.report.plots: the Pareto mask by hand, the PNGs a small csv-like sweep produces, and
what the figures carry: seed means with t-intervals, error bars from `<metric>_lo/_hi`, heat
maps and scale curves on the asked depths with the realised layers beside them."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from matplotlib.axes import Axes
from matplotlib.container import ErrorbarContainer
from PIL import Image

from raysys.report.plots import (
    METRIC_LABELS,
    Drawn,
    Plot,
    Skipped,
    cell_text,
    depth_grid,
    draw_plots,
    pareto_front,
    pareto_points,
    pooled,
    scale_points,
    scale_series,
    seed_means,
    t_interval,
    write_plots,
)

NAN = math.nan

# --- pareto_front ----------------------------------------------------------------------------

# idx:   0    1    2    3    4    5    6    7    8
X = [1.0, 2.0, 2.0, 3.0, 4.0, 1.0, NAN, 5.0, 0.0]
Y = [1.0, 3.0, 2.0, 3.0, 5.0, 1.0, 9.0, 4.0, NAN]
# 0 and 5 are exact duplicates; 2 ties 1 on x with a worse y; 3 ties 1 on y with a worse x;
# 6 and 8 are NaN on one axis (and would dominate everything if NaN were read as a number).


def test_pareto_min_x_max_y() -> None:
    expected = [True, True, False, False, True, True, False, False, False]
    assert pareto_front(X, Y).tolist() == expected


def test_pareto_max_x_min_y() -> None:
    # 4 (4, 5) loses to 7 (5, 4); 1 (2, 3) loses to 2 (2, 2); duplicates 0 and 5 stay.
    expected = [True, False, True, True, False, True, False, True, False]
    assert pareto_front(X, Y, minimize_x=False, maximize_y=False).tolist() == expected


def test_pareto_min_both_and_max_both() -> None:
    # Minimising both: only the duplicated (1, 1) survives.
    only_origin = [True, False, False, False, False, True, False, False, False]
    assert pareto_front(X, Y, maximize_y=False).tolist() == only_origin
    # Maximising both: (4, 5) and (5, 4) trade off; everything else is dominated.
    corners = [False, False, False, False, True, False, False, True, False]
    assert pareto_front(X, Y, minimize_x=False).tolist() == corners


def test_pareto_small_inputs() -> None:
    empty = pareto_front([], [])
    assert empty.shape == (0,) and empty.dtype == bool
    assert pareto_front([0.3], [0.7]).tolist() == [True]
    assert pareto_front([NAN], [0.7]).tolist() == [False]
    assert pareto_front(np.array([2.0, 2.0]), np.array([1.0, 1.0])).tolist() == [True, True]
    with pytest.raises(ValueError, match="differ in length"):
        pareto_front([1.0, 2.0], [1.0])


# --- write_plots ---------------------------------------------------------------------------

VISION = {"efficientnet-lite0": 4_652_008, "hf:facebook/dinov2-small": 22_056_576}
TEXT = {"minilm-l6": 22_713_216, "hf:sentence-transformers/all-mpnet-base-v2": 109_482_240}
LAYERS = [(4, 3, 0.5, 0.5), (8, 6, 1.0, 1.0)]  # vision_layer, text_layer, depths


def _row(objective: str, vision: str, text: str, layer: tuple, trial: int, lr: float) -> dict:
    """One results.csv row as csv.DictReader gives it: every cell a string."""
    vl, tl, vd, td = layer
    score = 0.2 + 0.1 * vd + 0.05 * (vision != "efficientnet-lite0") + 0.002 * trial
    common = {
        "objective": objective,
        "vision": vision,
        "text": text,
        "vision_layer": str(vl),
        "text_layer": str(tl),
        "vision_depth": str(vd),
        "text_depth": str(td),
        "vision_params": str(VISION[vision]),
        "text_params": str(TEXT[text]),
        "mutual_knn": f"{score / 2:.4f}",
        "cka": f"{score:.4f}",
        "train.lr": str(lr),
    }
    if objective == "raw":
        metrics = dict.fromkeys(["trial", "i2t_r1", "t2i_r1", "hardneg_acc", "recon_mse"], "")
        return {**common, **metrics, "raw_mutual_knn": "", "train_s": ""}
    return {
        **common,
        "trial": f"{objective}-{trial}",
        "i2t_r1": f"{score:.4f}",
        "t2i_r1": f"{score * 0.9:.4f}",
        "hardneg_acc": "0.8",
        "recon_mse": f"{0.5 - score / 2 + 0.03 * (objective == 'negcon'):.4f}",
        "raw_mutual_knn": f"{score / 4:.4f}",
        "train_s": "12.5",
    }


def _sweep(objectives: list[str], visions: list[str], texts: list[str], layers: list) -> list:
    rows, trial = [], 0
    for vision in visions:
        for text in texts:
            for layer in layers:
                rows.append(_row("raw", vision, text, layer, 0, 0.0))
                for objective in objectives:
                    for lr in (1e-3, 3e-4):  # a swept hyper-parameter, averaged over
                        trial += 1
                        rows.append(_row(objective, vision, text, layer, trial, lr))
    return rows


def _check_png(path: Path) -> None:
    assert path.is_file()
    assert 3_000 < path.stat().st_size < 250_000, path.stat().st_size
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        assert 300 <= width <= 2_000 and 300 <= height <= 1_000


def test_full_sweep(tmp_path: Path) -> None:
    rows = _sweep(["con", "negcon"], list(VISION), ["minilm-l6"], LAYERS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing glyph or an empty mean would warn
        plots, skipped = write_plots(tmp_path / "plots", rows)

    assert skipped == []
    names = [p.path.name for p in plots]
    assert names == [
        "pareto_mutual_knn.png",
        "pareto_i2t_r1.png",
        "layers_con.png",
        "layers_negcon.png",
        "scale_con.png",
        "scale_negcon.png",
    ]
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(names)
    for plot in plots:
        assert isinstance(plot, Plot)
        assert plot.path.parent == tmp_path / "plots"
        _check_png(plot.path)

    by_name = {p.path.name: p for p in plots}
    knn = by_name["pareto_mutual_knn.png"]
    assert knn.title == "Pareto front: reconstruction vs mutual kNN"
    assert knn.xlabel == "reconstruction MSE (test, lower is better)"
    assert knn.ylabel == METRIC_LABELS["mutual_knn"] == "mutual kNN (test)"
    r1 = by_name["pareto_i2t_r1.png"]
    assert r1.title == "Pareto front: reconstruction vs image→text R@1"
    assert r1.ylabel == "image→text R@1 (test)"
    layers = by_name["layers_con.png"]
    assert layers.title == "Layer depth: con"
    assert (layers.xlabel, layers.ylabel) == (
        "text layer depth (relative) as asked (realised layer)",
        "vision layer depth (relative) as asked (realised layer)",
    )
    scale = by_name["scale_negcon.png"]
    assert scale.title == "Model scale: negcon"
    assert scale.xlabel == "vision model parameters (M)"
    assert "mutual kNN" in scale.ylabel and "R@1" in scale.ylabel


def test_scale_falls_back_to_text_size(tmp_path: Path) -> None:
    rows = _sweep(["spread"], ["efficientnet-lite0"], list(TEXT), LAYERS[:1])
    for row in rows:
        row["recon_mse"] = ""  # no Pareto plots; the scale curve does not need it
    plots, skipped = write_plots(tmp_path, rows)
    assert [s.name for s in skipped] == ["pareto_mutual_knn", "pareto_i2t_r1", "layers_spread"]
    assert [p.path.name for p in plots] == ["scale_spread.png"]
    scale = plots[0]
    assert scale.xlabel == "text model parameters (M)"
    _check_png(scale.path)


def test_single_layer_pair_and_model_pair(tmp_path: Path) -> None:
    rows = _sweep(["con", "negcon"], ["efficientnet-lite0"], ["minilm-l6"], LAYERS[:1])
    plots, skipped = write_plots(tmp_path, rows)

    assert [p.path.name for p in plots] == ["pareto_mutual_knn.png", "pareto_i2t_r1.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.path.name for p in plots)
    for plot in plots:
        _check_png(plot.path)
    reasons = {s.name: s.reason for s in skipped}
    assert set(reasons) == {"layers_con", "layers_negcon", "scale_con", "scale_negcon"}
    assert reasons["layers_con"].startswith("only one layer pair")
    assert "0.5" in reasons["layers_con"]
    assert "one model size" in reasons["scale_negcon"]
    assert all(isinstance(s, Skipped) and s.reason for s in skipped)


def test_blank_and_bad_cells(tmp_path: Path) -> None:
    rows = _sweep(["con"], list(VISION), ["minilm-l6"], LAYERS)
    trials = [r for r in rows if r["trial"]]
    trials[0]["recon_mse"] = ""  # left out of both Pareto plots
    trials[1]["mutual_knn"] = "n/a"  # unparsable
    trials[2]["vision_depth"] = ""  # left out of the layer map
    trials[3]["vision_params"] = None  # left out of the scale curve
    trials[4]["raw_mutual_knn"] = "nan"
    trials[5]["recon_mse"] = "inf"
    del trials[6]["i2t_r1"]  # column missing altogether
    rows.append({"objective": "con", "trial": "con-x"})  # nothing but an objective
    rows.append({})  # an empty row
    plots, skipped = write_plots(tmp_path, rows)
    assert skipped == []
    assert len(plots) == 4
    for plot in plots:
        _check_png(plot.path)


def test_nothing_trained(tmp_path: Path) -> None:
    raw_only = [r for r in _sweep(["con"], list(VISION), ["minilm-l6"], LAYERS) if not r["trial"]]
    assert raw_only and all(r["objective"] == "raw" for r in raw_only)
    for rows in (raw_only, []):
        plots, skipped = write_plots(tmp_path, rows)
        assert plots == []
        assert [s.name for s in skipped] == [
            "pareto_mutual_knn",
            "pareto_i2t_r1",
            "layers",
            "scale",
        ]
        assert "recon_mse" in skipped[0].reason
    assert list(tmp_path.iterdir()) == []


def test_trained_rows_without_metrics(tmp_path: Path) -> None:
    rows = _sweep(["con"], list(VISION), ["minilm-l6"], LAYERS)
    for row in rows:
        for key in ("recon_mse", "i2t_r1", "mutual_knn"):
            row[key] = ""
    plots, skipped = write_plots(tmp_path, rows)
    assert plots == []
    assert {s.name for s in skipped} == {
        "pareto_mutual_knn",
        "pareto_i2t_r1",
        "layers_con",
        "scale_con",
    }
    assert all(s.reason.startswith("no ") for s in skipped)


# --- seeds ---------------------------------------------------------------------------------

T_975 = {1: 12.706, 2: 4.303, 4: 2.776}  # Student t, two-sided 95%, by degrees of freedom


def _trial(objective: str, seed: int | str, **cells: object) -> dict:
    """A trained row as csv.DictReader gives it, with `train.seed` and a swept `train.lr`."""
    base = {
        "objective": objective,
        "vision": "efficientnet-lite0",
        "text": "minilm-l6",
        "vision_layer": "8",
        "text_layer": "3",
        "vision_depth": "0.5",
        "text_depth": "0.5",
        "vision_params": "4652008",
        "text_params": "22713216",
        "trial": f"{objective}-s{seed}",
        "train.seed": str(seed),
        "train.lr": "0.001",
        "train_s": "10",
    }
    return base | {k: str(v) for k, v in cells.items()}


def test_t_interval_matches_the_table() -> None:
    for values in ([0.4, 0.5, 0.6], [1.0, 3.0], [2.0, 2.5, 3.0, 4.0, 1.5]):
        n = len(values)
        mean = sum(values) / n
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
        lo, hi = t_interval(values)
        assert (lo + hi) / 2 == pytest.approx(mean)
        assert (hi - lo) / 2 == pytest.approx(T_975[n - 1] * sd / math.sqrt(n), rel=1e-3)
    assert t_interval([0.3, 0.3]) == pytest.approx((0.3, 0.3))
    with pytest.raises(ValueError, match="at least two"):
        t_interval([0.5])


def test_seed_means_averages_replicates_only() -> None:
    # Equal in every seed: counts, a chance level, and a raw score with its bootstrap bounds.
    same = {"n_images": "100", "zeroshot_rel_chance": "0.25", "raw_mutual_knn": "0.1"}
    same |= {"raw_mutual_knn_lo": "0.08", "raw_mutual_knn_hi": "0.13"}
    rows = [
        _trial("con", 0, i2t_r1=0.4, i2t_r1_lo=0.35, i2t_r1_hi=0.45, recon_mse=0.2, train_s=10)
        | same,
        _trial("con", 1, i2t_r1=0.5, i2t_r1_lo=0.44, i2t_r1_hi=0.56, recon_mse="", train_s=12)
        | same,
        _trial("con", 2, i2t_r1=0.6, i2t_r1_lo=0.55, i2t_r1_hi=0.65, recon_mse="", train_s=14)
        | same,
        # Another learning rate, spelled differently from "0.001" in one row: one more group.
        _trial("con", 0, i2t_r1=0.9) | {"train.lr": "3e-4"},
        _trial("con", 1, i2t_r1=0.7) | {"train.lr": "0.0003"},
        # Alone: kept as it is, with its bootstrap bounds.
        _trial("negcon", 0, i2t_r1=0.3, i2t_r1_lo=0.25, i2t_r1_hi=0.33),
    ]
    merged = seed_means(rows)
    assert [(r["objective"], r["train.lr"], r["n_seeds"]) for r in merged] == [
        ("con", "0.001", 3),
        ("con", "3e-4", 2),
        ("negcon", "0.001", 1),
    ]
    three, two, alone = merged
    assert three["i2t_r1"] == pytest.approx(0.5)
    arm = T_975[2] * 0.1 / math.sqrt(3)  # the bootstrap bounds give way to the seeds' spread
    assert (three["i2t_r1_lo"], three["i2t_r1_hi"]) == pytest.approx(
        (0.5 - arm, 0.5 + arm), rel=1e-3
    )
    # One seed has recon_mse: its value, and its own bounds (none here).
    assert three["recon_mse"] == pytest.approx(0.2)
    assert math.isnan(three["recon_mse_lo"]) and math.isnan(three["recon_mse_hi"])
    assert three["train_s"] == pytest.approx(12.0) and "train_s_lo" not in three
    assert three["n_images"] == pytest.approx(100) and "n_images_lo" not in three
    assert "zeroshot_rel_chance_lo" not in three
    raw = (three["raw_mutual_knn"], three["raw_mutual_knn_lo"], three["raw_mutual_knn_hi"])
    assert raw == pytest.approx((0.1, 0.08, 0.13))
    assert three["train.seed"] == "0,1,2" and three["trial"] == "con-s0,con-s1,con-s2"
    assert (three["vision_layer"], three["vision_depth"]) == ("8", "0.5")  # axes kept as given
    assert two["i2t_r1"] == pytest.approx(0.8)
    arm = T_975[1] * math.sqrt(0.02) / math.sqrt(2)
    assert (two["i2t_r1_lo"], two["i2t_r1_hi"]) == pytest.approx((0.8 - arm, 0.8 + arm), rel=1e-3)
    assert alone == rows[-1] | {"n_seeds": 1}


def test_seed_means_uses_the_one_seed_s_bootstrap_bounds() -> None:
    rows = [
        _trial("con", 0, mutual_knn=0.3, mutual_knn_lo=0.28, mutual_knn_hi=0.33),
        _trial("con", 1, mutual_knn=""),
    ]
    [merged] = seed_means(rows)
    assert merged["n_seeds"] == 2
    assert (merged["mutual_knn"], merged["mutual_knn_lo"], merged["mutual_knn_hi"]) == (
        pytest.approx(0.3),
        pytest.approx(0.28),
        pytest.approx(0.33),
    )


# --- heat maps on the asked depths ---------------------------------------------------------


def _asked(vision: str, vl: int, vd: float, tl: int, td: float, value: float, arm: float) -> dict:
    """EfficientNet-Lite0 realises depth 0.5 as L8 of 16, Lite1 as L11 of 22."""
    return {
        "objective": "con",
        "vision": vision,
        "text": "minilm-l6",
        "vision_layer": vl,
        "text_layer": tl,
        "vision_depth": vd,
        "text_depth": td,
        "vision_params": VISION_SIZES[vision],
        "text_params": 22_713_216,
        "trial": f"{vision}-{vl}-{tl}",
        "i2t_r1": value,
        "i2t_r1_lo": value - arm,
        "i2t_r1_hi": value + 2 * arm,
        "mutual_knn": value / 2,
        "recon_mse": 0.5 - value / 2,
        "raw_mutual_knn": value / 4,
    }


VISION_SIZES = {"efficientnet-lite0": 4_652_008, "efficientnet-lite1": 5_416_680}
LITE = [
    _asked("efficientnet-lite0", 8, 0.5, 3, 0.5, 0.40, 0.02),
    _asked("efficientnet-lite0", 16, 1.0, 6, 1.0, 0.50, 0.01),
    _asked("efficientnet-lite1", 11, 0.5, 3, 0.5, 0.44, 0.04),
    _asked("efficientnet-lite1", 22, 1.0, 6, 1.0, 0.56, 0.03),
]


def test_depth_grid_pools_the_asked_depth() -> None:
    grid = depth_grid(LITE, "i2t_r1")
    assert grid.vision_depths == [0.5, 1.0] and grid.text_depths == [0.5, 1.0]
    assert grid.vision_labels == ["0.50 (L8, L11)", "1.00 (L16, L22)"]
    assert grid.text_labels == ["0.50 (L3)", "1.00 (L6)"]
    # Lite0's L8 and Lite1's L11 land in one cell: their mean, the mean of their arms.
    assert grid.value[0, 0] == pytest.approx(0.42)
    assert (grid.lo[0, 0], grid.hi[0, 0]) == pytest.approx((0.42 - 0.03, 0.42 + 0.06))
    assert grid.value[1, 1] == pytest.approx(0.53)
    assert np.isnan(grid.value[0, 1]) and np.isnan(grid.value[1, 0])
    assert np.isnan(grid.lo[0, 1])
    # Without bounds (mutual_knn here): values, NaN bounds.
    knn = depth_grid(LITE, "mutual_knn")
    assert knn.value[0, 0] == pytest.approx(0.21) and np.isnan(knn.lo[0, 0])
    # The axes of a panel can be given, so a model pair missing a depth keeps the shared rows.
    only = depth_grid(LITE[2:3], "i2t_r1", [0.5, 1.0], [0.5, 1.0])
    assert only.vision_labels == ["0.50 (L11)", "1.00"]
    assert only.value[0, 0] == pytest.approx(0.44) and np.isnan(only.value[1, 1])


def test_pooled_needs_every_configuration_s_bounds() -> None:
    rows = [LITE[0], dict(LITE[2], i2t_r1_lo="")]
    value, lo, hi = pooled(rows, "i2t_r1")
    assert value == pytest.approx(0.42) and math.isnan(lo) and math.isnan(hi)
    assert all(math.isnan(v) for v in pooled([], "i2t_r1"))


def test_cell_text() -> None:
    assert cell_text(0.4213, 0.40, 0.45) == "0.42\n±0.03"  # the larger arm
    assert cell_text(0.4213, NAN, NAN) == "0.42"
    assert cell_text(0.4213, 0.4212, 0.4214) == "0.42\n±<0.01"


def _drawn(rows: list[dict]) -> dict[str, Drawn]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return {d.name: d for d in draw_plots(rows) if isinstance(d, Drawn)}


def _bars(ax: Axes, axis: str) -> list[np.ndarray]:
    """Each error bar of the axes as its two end points along `axis` (sorted)."""
    containers = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    k = 0 if axis == "x" else 1
    found = [c for c in containers if (c.has_xerr if axis == "x" else c.has_yerr)]
    ends = [seg[:, k] for c in found for seg in c.lines[2][0].get_segments()]
    return sorted((np.sort(e) for e in ends), key=tuple)


def test_heat_map_shares_the_asked_depth_across_models() -> None:
    figure = _drawn(LITE)["layers_con"].figure
    r1_lite0, r1_lite1, knn_lite0, _ = figure.axes[:4]
    assert r1_lite0.get_title() == "efficientnet-lite0 × minilm-l6"
    assert r1_lite1.get_title() == "efficientnet-lite1 × minilm-l6"
    # One row index for depth 0.5 in both panels, each labelled with its own realised layer.
    assert [t.get_text() for t in r1_lite0.get_yticklabels()] == ["0.50 (L8)", "1.00 (L16)"]
    assert [t.get_text() for t in r1_lite1.get_yticklabels()] == ["0.50 (L11)", "1.00 (L22)"]
    assert list(r1_lite0.get_yticks()) == list(r1_lite1.get_yticks()) == [0, 1]
    assert [t.get_text() for t in r1_lite0.get_xticklabels()] == ["0.50\n(L3)", "1.00\n(L6)"]
    cells = {t.get_position(): t.get_text() for t in r1_lite1.texts}
    assert cells == {(0, 0): "0.44\n±0.08", (1, 1): "0.56\n±0.06"}
    assert {t.get_position(): t.get_text() for t in knn_lite0.texts} == {
        (0, 0): "0.20",
        (1, 1): "0.25",
    }


def test_pareto_bars_come_from_the_bounds_and_the_seeds() -> None:
    rows = [
        _trial("con", s, i2t_r1=v, recon_mse=m, recon_mse_lo=m - 0.01, recon_mse_hi=m + 0.02)
        for s, v, m in [(0, 0.4, 0.30), (1, 0.5, 0.30), (2, 0.6, 0.30)]
    ]
    rows.append(_trial("con", 0, i2t_r1=0.7, recon_mse=0.5) | {"train.lr": "1e-4"})
    points = pareto_points(seed_means(rows), "i2t_r1")
    assert points.x.tolist() == pytest.approx([0.30, 0.5])
    assert points.y.tolist() == pytest.approx([0.5, 0.7])
    arm = T_975[2] * 0.1 / math.sqrt(3)
    assert points.y_lo[0] == pytest.approx(0.5 - arm, rel=1e-3)
    # All three seeds had the same recon_mse: their bootstrap bounds, not a zero-width interval.
    assert (points.x_lo[0], points.x_hi[0]) == pytest.approx((0.29, 0.32))
    assert np.isnan(points.x_lo[1]) and np.isnan(points.y_hi[1])

    ax = _drawn(rows)["pareto_i2t_r1"].figure.axes[0]
    [y_bar] = _bars(ax, "y")  # the single-seed point has no bounds: no bar
    assert y_bar == pytest.approx([0.5 - arm, 0.5 + arm], rel=1e-3)
    [x_bar] = _bars(ax, "x")
    assert x_bar == pytest.approx([0.29, 0.32])
    assert ax.get_legend().get_texts()[0].get_text() == "con (2 / 2)"


def test_pareto_without_bounds_has_no_bars() -> None:
    rows = [r for r in _sweep(["con"], ["efficientnet-lite0"], ["minilm-l6"], LAYERS) if r["trial"]]
    ax = _drawn(rows)["pareto_mutual_knn"].figure.axes[0]
    assert not ax.containers
    assert sum(len(c.get_offsets()) for c in ax.collections) == len(rows)


def test_scale_curves_by_asked_depth_with_bars() -> None:
    series = scale_series(LITE, "text")
    assert list(series) == [("minilm-l6", (0.5, 0.5)), ("minilm-l6", (1.0, 1.0))]
    half = scale_points(series["minilm-l6", (0.5, 0.5)], "vision", "i2t_r1")
    assert [(p.model, p.layers) for p in half] == [
        ("efficientnet-lite0", (8,)),
        ("efficientnet-lite1", (11,)),
    ]
    assert [(p.value, p.lo, p.hi) for p in half] == [
        pytest.approx((0.40, 0.38, 0.44)),
        pytest.approx((0.44, 0.40, 0.52)),
    ]
    assert half[0].size_m == pytest.approx(4.652008)

    r1, knn = _drawn(LITE)["scale_con"].figure.axes
    labels = [t.get_text() for t in r1.get_legend().get_texts()]
    assert labels == ["text: minilm-l6 @ 0.50:0.50", "text: minilm-l6 @ 1.00:1.00"]
    assert sorted(a.get_text() for a in r1.texts) == ["L11", "L16", "L22", "L8"]
    ticks = [t.get_text() for t in r1.get_xticklabels()]
    assert ticks == ["4.65\nefficientnet-lite0", "5.42\nefficientnet-lite1"]
    bars = _bars(r1, "y")
    assert len(bars) == 4
    assert bars[0] == pytest.approx([0.38, 0.44])
    # mutual_knn has no bounds here: lines (aligned and raw), no bars.
    assert not knn.containers and len(knn.get_lines()) == 4
    assert "before alignment (dashed)" in [t.get_text() for t in knn.get_legend().get_texts()]
