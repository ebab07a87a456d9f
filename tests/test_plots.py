"""raysys.report.plots: the Pareto mask by hand, and the PNGs a small csv-like sweep produces."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raysys.report.plots import METRIC_LABELS, Plot, Skipped, pareto_front, write_plots

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
