"""A sweep's report over seeds and asked depths: the aggregation is pure (rows in, rows out),
checked on hand-made rows with known means and intervals against scipy's own definitions."""

from __future__ import annotations

import csv
import math

import pytest
from scipy import stats

import raysys.report.report as R
from raysys.report.plots import seed_means
from raysys.report.report import (
    describe_layer_pairs,
    difference,
    mean_over_seeds,
    objective_differences,
    read_results,
    side_label,
    summary_table,
    t_half_width,
    write_results,
    write_sweep_report,
)
from raysys.report.schema import RESULT_COLUMNS
from raysys.sweep.plan import SPREAD_ONLY

LITE1 = {"vision": "efficientnet-lite1", "text": "minilm-l6", "vision_layer": 11}
LITE1 |= {"text_layer": 3, "vision_depth": 0.5, "text_depth": 0.5}


def _seed_rows(objective: str, values: dict[str, list[float]], **extra) -> list[dict]:
    """One trial row per seed with the given per-seed metric values."""
    n = len(next(iter(values.values())))
    return [
        {"trial": f"{objective}-{i}", "objective": objective, **LITE1, "train.seed": i}
        | {m: v[i] for m, v in values.items()}
        | extra
        for i in range(n)
    ]


def test_t_interval_of_the_mean_has_n_minus_1_degrees_of_freedom() -> None:
    # 1, 2, 3: mean 2, sd 1; the 97.5% t quantile at 2 dof is 4.3027.
    assert t_half_width([1.0, 2.0, 3.0]) == pytest.approx(4.302653 / math.sqrt(3))
    assert t_half_width([1.0, 2.0, 3.0], 0.9) == pytest.approx(2.919986 / math.sqrt(3))
    assert math.isnan(t_half_width([1.0]))


def test_mean_over_seeds_groups_everything_but_the_seed() -> None:
    agree = {"mutual_knn_lo": 0.45, "mutual_knn_hi": 0.56}  # seeds that agree: their own bounds
    rows = _seed_rows("con", {"i2t_r1": [0.1, 0.2, 0.3], "mutual_knn": [0.5, 0.5, 0.5]}, **agree)
    rows += _seed_rows("spread", {"i2t_r1": [0.4, 0.6]}, **{"train.lr": 0.001})
    rows += _seed_rows("spread", {"i2t_r1": [0.7, 0.7]}, **{"train.lr": 0.0003})
    rows += [{"trial": "", "objective": "raw", **LITE1, "mutual_knn": 0.2}]
    con, fast, slow = mean_over_seeds(rows, ["i2t_r1", "mutual_knn", "hardneg_acc"])
    assert (con["objective"], con["seeds"], con["vision_layer"]) == ("con", 3, 11)
    assert con["i2t_r1"] == pytest.approx(0.2)
    half = 4.302653 * 0.1 / math.sqrt(3)
    assert (con["i2t_r1_lo"], con["i2t_r1_hi"]) == pytest.approx((0.2 - half, 0.2 + half))
    assert (con["mutual_knn_lo"], con["mutual_knn_hi"]) == pytest.approx((0.45, 0.56))
    assert "hardneg_acc" not in con and "train.seed" not in con
    assert (fast["train.lr"], fast["seeds"], fast["i2t_r1"]) == (0.001, 2, pytest.approx(0.5))
    # 0.4, 0.6: sd 0.1414, standard error 0.1; the t quantile at 1 dof is 12.706.
    assert fast["i2t_r1_hi"] - fast["i2t_r1"] == pytest.approx(12.7062 * 0.1, 1e-4)
    assert slow["i2t_r1"] == pytest.approx(0.7) and "i2t_r1_lo" not in slow  # no own bounds
    [one] = mean_over_seeds(_seed_rows("con", {"i2t_r1": [0.3]}), ["i2t_r1"])
    assert one["i2t_r1"] == 0.3 and "i2t_r1_lo" not in one  # one seed, no bounds: none
    bounded = _seed_rows("con", {"i2t_r1": [0.3]}, i2t_r1_lo=0.25, i2t_r1_hi=0.32)
    [one] = mean_over_seeds(bounded, ["i2t_r1"])
    assert (one["i2t_r1_lo"], one["i2t_r1_hi"]) == (0.25, 0.32)  # its own bootstrap bounds


def test_the_table_and_the_plots_group_seeds_and_bound_them_alike() -> None:
    # "0.5" / 0.5 depths and "1e-3" / 0.001 learning rates are one configuration; a model size
    # that differs is another. A score the seeds agree on keeps the rows' own bounds.
    rows = _seed_rows("con", {"i2t_r1": [0.3, 0.5]}, **{"train.lr": "1e-3", "vision_params": 5})
    rows[1] |= {"vision_depth": "0.5", "train.lr": 0.001}
    rows += _seed_rows("con", {"i2t_r1": [0.4, 0.4]}, vision_params=7, i2t_r1_lo=0.3, i2t_r1_hi=0.5)
    rows += _seed_rows("con", {"i2t_r1": [0.6]}, vision_params=9, i2t_r1_lo=0.5, i2t_r1_hi=0.7)
    rows[-1]["train.seed"] = 1
    table = mean_over_seeds(rows, ["i2t_r1"])
    plotted = seed_means(rows)
    assert [r["seeds"] for r in table] == [r["n_seeds"] for r in plotted] == [2, 2, 1]
    for mine, theirs in zip(table, plotted, strict=True):
        assert mine["i2t_r1"] == pytest.approx(theirs["i2t_r1"])
        bounds = (mine["i2t_r1_lo"], mine["i2t_r1_hi"])
        assert bounds == pytest.approx((float(theirs["i2t_r1_lo"]), float(theirs["i2t_r1_hi"])))
    assert (table[1]["i2t_r1_lo"], table[2]["i2t_r1_hi"]) == pytest.approx((0.3, 0.7))


def test_seed_differences_are_welch_intervals_and_flagged_only_within_noise() -> None:
    a, b = [0.30, 0.32, 0.31], [0.50, 0.47, 0.52]
    diff, half, basis = difference(
        _seed_rows("con", {"i2t_r1": a}), _seed_rows("spread", {"i2t_r1": b}), "i2t_r1"
    )
    welch = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert basis == "seeds" and diff == pytest.approx(sum(a) / 3 - sum(b) / 3)
    assert (diff - half, diff + half) == pytest.approx((welch.low, welch.high))
    rows = _seed_rows("con", {"i2t_r1": a, "t2i_r1": [0.40, 0.43, 0.41]})
    rows += _seed_rows("spread", {"i2t_r1": b, "t2i_r1": [0.41, 0.42, 0.43]})
    [d] = objective_differences(rows)
    assert (d["a"], d["b"], d["basis"], d["vision_layer"]) == ("con", "spread", "seeds", 11)
    assert d["i2t_r1_noise"] is False  # 0.19 apart with seed spread ~0.02: a real difference
    assert d["t2i_r1_noise"] is True  # 0.0033 apart: noise
    assert "hardneg_acc" not in d and "mutual_knn" not in d  # no row has them


def test_seeds_that_agree_compare_by_the_rows_own_intervals_not_a_zero_width_one() -> None:
    """Every seed of both sides alike: Welch's interval would be 0 wide and call any gap
    real; the rows' per-item half-widths (averaged per side) stand in."""
    con = _seed_rows("con", {"i2t_r1": [0.30, 0.30]})
    neg = _seed_rows("negcon", {"i2t_r1": [0.25, 0.25]})
    for row, half in zip([*con, *neg], [0.03, 0.05, 0.04, 0.04], strict=True):
        row |= {"i2t_r1_lo": row["i2t_r1"] - half, "i2t_r1_hi": row["i2t_r1"] + half}
    diff, half, basis = difference(con, neg, "i2t_r1")
    assert (diff, half, basis) == pytest.approx((0.05, math.hypot(0.04, 0.04), "bootstrap"))
    [d] = objective_differences([*con, *neg])
    assert d["i2t_r1_noise"] is True  # 0.05 apart, ±0.057
    # Without the rows' bounds there is no interval to give, rather than a zero-wide one.
    bare = _seed_rows("con", {"i2t_r1": [0.3, 0.3]}), _seed_rows("negcon", {"i2t_r1": [0.2, 0.2]})
    assert math.isnan(difference(*bare, "i2t_r1")[1])


def test_one_seed_compares_by_the_root_sum_of_squares_of_the_bootstrap_half_widths() -> None:
    con = {"trial": "c", "objective": "con", **LITE1, "i2t_r1": 0.40, "hardneg_acc": 0.70}
    con |= {"i2t_r1_lo": 0.37, "i2t_r1_hi": 0.43, "hardneg_acc_lo": 0.60, "hardneg_acc_hi": 0.80}
    con |= {"mutual_knn": 0.30}  # no interval: the difference without one
    neg = {"trial": "n", "objective": "negcon", **LITE1, "i2t_r1": 0.50, "hardneg_acc": 0.72}
    neg |= {"i2t_r1_lo": 0.46, "i2t_r1_hi": 0.54, "hardneg_acc_lo": 0.66, "hardneg_acc_hi": 0.78}
    neg |= {"mutual_knn": 0.35, "mutual_knn_lo": 0.3, "mutual_knn_hi": 0.4}
    [d] = objective_differences([con, neg])
    assert d["basis"] == "bootstrap"
    # half-widths 0.03 and 0.04 combine to 0.05: -0.10 ± 0.05 excludes 0.
    assert (d["i2t_r1"], d["i2t_r1_lo"], d["i2t_r1_hi"]) == pytest.approx((-0.1, -0.15, -0.05))
    assert d["i2t_r1_noise"] is False
    # 0.1 and 0.06 combine to 0.1166: -0.02 is within noise.
    assert d["hardneg_acc_hi"] - d["hardneg_acc"] == pytest.approx(math.hypot(0.1, 0.06))
    assert d["hardneg_acc_noise"] is True
    assert d["mutual_knn"] == pytest.approx(-0.05) and d["mutual_knn_noise"] is None
    assert "mutual_knn_lo" not in d


def test_each_model_pair_and_layer_pair_is_compared_apart_and_spread_variants_apart() -> None:
    assert SPREAD_ONLY == ("train.alpha", "train.k")  # the report's OBJECTIVE_PARAMS
    rows = []
    for vision, layer in (("efficientnet-lite0", 8), ("efficientnet-lite1", 11)):
        for objective, alpha in (("con", 0.7), ("spread", 0.5), ("spread", 0.9)):
            row = {"trial": f"{vision}{objective}{alpha}", "objective": objective, **LITE1}
            row |= {"vision": vision, "vision_layer": layer, "train.alpha": alpha, "i2t_r1": 0.5}
            rows.append(row)
    diffs = objective_differences(rows)
    assert len(diffs) == 2 * 3  # per model pair: con-spread(0.5), con-spread(0.9), the two spreads
    assert {(d["a"], d["b"]) for d in diffs} == {
        ("con", "spread alpha=0.5"),
        ("con", "spread alpha=0.9"),
        ("spread alpha=0.5", "spread alpha=0.9"),
    }
    assert {d["vision_layer"] for d in diffs} == {8, 11}


def test_layer_pairs_are_told_by_the_depth_asked_with_the_layer_beside_it() -> None:
    lite0 = LITE1 | {"vision": "efficientnet-lite0", "vision_layer": 8}
    full = LITE1 | {"vision_layer": 21, "text_layer": 6, "vision_depth": 1.0, "text_depth": 1.0}
    assert side_label(LITE1, "vision") == "0.50 (L11)"
    assert side_label({"vision_layer": "11", "vision_depth": "0.5"}, "vision") == "0.50 (L11)"
    assert side_label({"vision_layer": "11", "vision_depth": ""}, "vision") == "L11"
    assert describe_layer_pairs([LITE1, lite0, full]) == [
        "0.50:0.50 → L11:L3 on efficientnet-lite1, L8:L3 on efficientnet-lite0",
        "1.00:1.00 → L21:L6",
    ]


def test_results_keep_every_dynamic_column(tmp_path) -> None:
    [row] = _seed_rows("con", {"i2t_r1": [0.5]})
    row |= {"hardneg_acc_swap": 0.6, "zeroshot_colour": 0.4, "mutual_knn_lo": 0.1}
    write_results(tmp_path, [row, {"objective": "raw", **LITE1, "cka": 0.2}])
    with (tmp_path / "results.csv").open() as f:
        header = next(csv.reader(f))
    assert header[: len(RESULT_COLUMNS)] == RESULT_COLUMNS
    for column in ("hardneg_acc_swap", "zeroshot_colour", "mutual_knn_lo", "train.seed"):
        assert column in header, column
    assert read_results(tmp_path)[0]["train.seed"] == "0"


def test_a_three_seed_sweep_report_shows_means_intervals_and_noise(tmp_path) -> None:
    rows = [{"trial": "", "objective": "raw", **LITE1, "mutual_knn": 0.12}]
    rows += _seed_rows("con", {"i2t_r1": [0.30, 0.32, 0.31], "mutual_knn": [0.3, 0.31, 0.3]})
    rows += _seed_rows("spread", {"i2t_r1": [0.50, 0.47, 0.52], "mutual_knn": [0.3, 0.3, 0.31]})
    path = write_sweep_report(tmp_path, rows)
    report = path.read_text()
    assert "6 trials" in report and "1 layer pairs" in report and "3 seeds" in report
    assert "0.50 (L11)" in report and "0.50:0.50 → L11:L3" in report
    assert "mean over 3 seeds" in report and "t-interval" in report
    assert "only alignment metrics, with their half-sample intervals" in report
    assert "per-item bootstrap" not in report  # no row carries item counts: no bootstrap legend
    [con] = [line for line in report.splitlines() if line.startswith("| con  ")]
    assert "| 3 " in con and "0.310 ±0.025" in con  # 0.31 ± 4.30 · 0.01 / √3
    [compared] = [line for line in report.splitlines() if "con − spread" in line]
    assert "−0.187" in compared and compared.count("(within noise)") == 1  # mutual_knn only
    # Read back from results.csv (strings), the same table.
    assert summary_table(read_results(tmp_path)) == summary_table(rows)


def test_understanding_section_shows_tasks_kinds_and_chance(tmp_path) -> None:
    row = {
        "objective": "con",
        "vision": "lite0",
        "text": "minilm",
        "vision_layer": 8,
        "text_layer": 3,
        "vision_depth": 0.5,
        "text_depth": 0.5,
        "zeroshot_arrangement": 0.8,
        "zeroshot_arrangement_lo": 0.7,
        "zeroshot_arrangement_hi": 0.85,
        "zeroshot_arrangement_chance": 0.55,
        "zeroshot_large_colour": 0.4,
        "zeroshot_large_colour_chance": 0.25,
        "hardneg_acc_colour": 0.9,
        "hardneg_acc_colour_lo": 0.8,
        "hardneg_acc_colour_hi": 0.95,
    }
    raw = {"objective": "raw", "vision": "lite0", "text": "minilm", "mutual_knn": 0.3}
    lines = "\n".join(R.understanding_section([raw, row]))
    assert "zeroshot_arrangement" in lines and "hardneg_acc_colour" in lines
    assert "| zeroshot_large_colour " in lines and "0.250" in lines
    assert "0.800 ±0.1" in lines and "0.900 ±0.1" in lines
    assert "| chance" in lines and "0.550" in lines
    assert "0.50 (L8)" in lines
    header = next(line for line in lines.splitlines() if line.startswith("| objective"))
    assert [c.strip() for c in header.split("|")[1:6]] == [
        "objective",
        "vision",
        "text",
        "vision_layer",
        "text_layer",
    ]
    assert "| minilm " in lines
    assert R.understanding_section([raw]) == []  # nothing trained: no section
    report = R.write_report(tmp_path, [raw, row]).read_text()
    assert "## Understanding tasks" in report


def test_a_probed_run_reports_the_probe(tmp_path) -> None:
    row = {"objective": "raw", "vision": "v", "text": "t", "mutual_knn": 0.3}
    assert "passive metrics" not in R.write_report(tmp_path, [row]).read_text()
    (tmp_path / R.PROBE_MD).write_text("## Do passive metrics see hard negatives? (probe)\n")
    assert (
        "## Do passive metrics see hard negatives?" in R.write_report(tmp_path, [row]).read_text()
    )


def test_a_seeded_sweep_explains_both_its_seed_and_its_bootstrap_intervals(tmp_path) -> None:
    (tmp_path / "config.yaml").write_text("eval:\n  bootstrap: 30\n")
    scored = {"n_images": 100, "n_captions": 500, "hardneg_acc_swap": 0.7}
    rows = _seed_rows("con", {"i2t_r1": [0.30, 0.32]}, **scored)
    rows += _seed_rows("spread", {"i2t_r1": [0.50, 0.47]}, **scored)
    report = write_sweep_report(tmp_path, rows).read_text()
    assert "mean over 2 seeds" in report and "t-interval" in report
    assert "where it is not over seeds" in report and "bootstrap interval over the 100" in report
    assert "`hardneg_acc_<kind>`" in report  # the interval legend's explanation stays
    assert "30 seeded random halves" in report


def test_no_half_samples_below_two_resamples(tmp_path) -> None:
    rows = _seed_rows("con", {"i2t_r1": [0.3]}, n_images=100, n_captions=500)
    (tmp_path / "config.yaml").write_text("eval:\n  bootstrap: 1\n")
    legend = "\n".join(R.interval_legend(tmp_path, rows))
    assert "halves" in legend and "1 halves" not in legend and "no interval" in legend
    (tmp_path / "config.yaml").write_text("eval:\n  bootstrap: 500\n")
    assert "50 seeded random halves" in "\n".join(R.interval_legend(tmp_path, rows))


def test_reports_state_the_sample_sizes_and_alignment_by_size(tmp_path) -> None:
    """Retrieval over the whole split, alignment on the seeded sample, the val cap, and with
    `eval.metric_sizes` a table of each row's alignment at each size; the sized columns and
    `n_metric_images` follow the alignment intervals in results.csv."""
    (tmp_path / "config.yaml").write_text("eval:\n  metric_pairs: 1024\n  val_pairs: 2048\n")
    counts = {"n_images": 5000, "n_captions": 25000, "n_metric_images": 1024}
    sized = {"mutual_knn_n256": 0.41, "mutual_knn_n512": 0.37, "cka_n256": 0.6, "cka_n512": 0.58}
    raw = {"trial": "", "objective": "raw", **LITE1, "mutual_knn": 0.12, "cka": 0.5} | sized
    con = _seed_rows("con", {"i2t_r1": [0.3], "mutual_knn": [0.33], "cka": [0.55]}, **counts)
    rows = [raw | {"n_images": 5000, "n_metric_images": 1024}, con[0] | sized]
    report = R.write_report(tmp_path, rows).read_text()
    assert "5,000 images and 25,000 captions" in report
    assert "seeded sample of 1,024 test images (`eval.metric_pairs` = 1,024)" in report
    assert "at most 2,048 val pairs" in report
    assert "## Alignment by sample size" in report
    [line] = [x for x in report.splitlines() if x.startswith("| con-0") and "mutual_knn" in x]
    assert [c.strip() for c in line.split("|")[3:-1]] == ["0.410", "0.370", "0.330"]
    assert "n=256" in report and "n=1,024" in report
    sweep = write_sweep_report(tmp_path, rows).read_text()
    assert "## Alignment by sample size" in sweep and "1,024 test images" in sweep
    with (tmp_path / "results.csv").open() as f:
        header = next(csv.reader(f))
    at = header.index("n_metric_images")
    assert header[at + 1 : at + 5] == ["mutual_knn_n256", "mutual_knn_n512", "cka_n256", "cka_n512"]
    # Without the settings or the counts (an older run), no claim about samples.
    (tmp_path / "config.yaml").unlink()
    old = [{k: v for k, v in r.items() if not k.startswith("n_") and "_n" not in k} for r in rows]
    report = R.write_report(tmp_path, old).read_text()
    assert "seeded sample" not in report and "by sample size" not in report


def test_a_one_seed_sweep_table_shows_its_swept_params_and_exact_scores_intervals(
    tmp_path, capsys
) -> None:
    """Trials that differ only in a swept value are told apart in the main table, and a
    metric of exactly 0 keeps its interval when the table is rebuilt from results.csv."""
    exact = {"i2t_r1": 0.0, "i2t_r1_lo": 0.0, "i2t_r1_hi": 0.17, "cka": 1.0}
    rows = [{"trial": "", "objective": "raw", **LITE1, "mutual_knn": 0.12}]
    rows += _seed_rows("con", {"mutual_knn": [0.3]}, **{"train.lr": 0.001} | exact)
    rows[-1]["trial"] = "t000"
    rows += _seed_rows("con", {"mutual_knn": [0.4]}, **{"train.lr": 0.0003} | exact)
    rows[-1]["train.lr"] = 1e6  # a value the CSV writes as 1e+06: the table shows it alike
    notes = ["2 of 3 trials finished; wall time 9s.", "trial t002 was stopped early by ASHA"]
    write_sweep_report(tmp_path, rows, notes, location="s3://bucket/sweeps/s")
    before = (tmp_path / "report.md").read_text()
    table_lines = before.split("## ")[0].splitlines()
    [header] = [line for line in table_lines if line.startswith("| objective")]
    assert "train.lr" in header
    con = [line for line in table_lines if line.startswith("| con ")]
    assert any("| 0.001 " in c for c in con) and any("| 1e+06 " in c for c in con)
    assert "--logdir s3://bucket/sweeps/s/tensorboard" in before
    assert all("0.000 ±0.17" in c for c in con), con

    # `raysys report` again from the files alone: the same report, notes and intervals kept.
    R.rebuild(tmp_path)
    assert (tmp_path / "report.md").read_text() == before
    assert "0.000 ±0.17" in capsys.readouterr().out
    assert all("| 1.000 " in c for c in con)  # an exact 1.0 stays a metric, not an integer
    # A results.csv written before floats kept their point ("0") still prints its interval.
    assert R._cell("0", (0.0, 0.17)) == "0.000 ±0.17" and R._cell("8") == "8"


def test_an_s3_train_report_names_its_bucket_not_its_staging_folder(tmp_path, capsys) -> None:
    """A `raysys train --out s3://…` run writes its report in a temporary folder it then
    uploads and deletes: the title and the TensorBoard hint name the S3 run, and `raysys
    report` keeps them."""
    staging = tmp_path / "raysys-run-abc123"
    staging.mkdir()
    con = _seed_rows("con", {"i2t_r1": [0.3]})[0] | {"trial": ""}  # a train run has no trials
    rows = [{"trial": "", "objective": "raw", **LITE1}, con]
    write_results(staging, rows)
    before = R.write_report(staging, rows, ["Wall time 9s."], "s3://bucket/runs/t1").read_text()
    assert before.startswith("# raysys report — t1\n")
    assert "--logdir s3://bucket/runs/t1/tensorboard` (sync it" in before
    assert "raysys-run-abc123" not in before
    R.rebuild(staging)
    assert (staging / "report.md").read_text() == before
