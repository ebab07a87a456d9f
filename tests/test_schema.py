"""The results schema: columns follow eval.retrieval_ks; trials survive Tune's round trip;
per-item metrics carry bootstrap intervals into results.csv, the tables and report.md."""

from __future__ import annotations

import csv
import math

import pytest
from scipy import stats

from raysys.report.report import read_results, table, write_report, write_results
from raysys.report.schema import (
    ALIGNMENT,
    MAX_HALF_SAMPLES,
    RESULT_COLUMNS,
    config_key,
    half_sample_count,
    interval_metrics,
    ks_of,
    metric_names,
    t_half_width,
    t_quantile,
)
from raysys.sweep.plan import LayerPair, Prepared, Trial, raw_sweep_rows, trial_row


def _layer() -> LayerPair:
    return LayerPair(8, 3, 0.5, 0.5, {"corpus_dir": "s3://b/c"}, {"mutual_knn": 0.25})


def test_columns_follow_the_configured_retrieval_ks(tmp_path) -> None:
    assert metric_names((1, 3))[:4] == ["i2t_r1", "i2t_r3", "t2i_r1", "t2i_r3"]
    row = {"objective": "con", "vision": "v", "text": "t", "vision_layer": 1, "text_layer": 2}
    row |= {"i2t_r1": 0.5, "i2t_r3": 0.75, "t2i_r1": 0.25, "t2i_r3": 0.5}
    write_results(tmp_path, [row], ks=(1, 3))
    with (tmp_path / "results.csv").open() as f:
        header = next(csv.reader(f))
    assert header[5:9] == ["i2t_r1", "i2t_r3", "t2i_r1", "t2i_r3"]
    assert "i2t_r10" not in header
    assert ks_of(read_results(tmp_path)) == [1, 3]
    write_results(tmp_path, [row])  # the default columns stay the contract
    with (tmp_path / "results.csv").open() as f:
        assert next(csv.reader(f))[: len(RESULT_COLUMNS)] == RESULT_COLUMNS


def test_trial_round_trips_through_plain_values() -> None:
    trial = Trial("t000-con", "con", "lite0", "minilm", 4, 22, _layer(), {"train.lr": 0.01})
    plain = trial.to_dict()
    assert plain["layer"]["source"] == {"corpus_dir": "s3://b/c"}  # plain values for Tune
    assert Trial.from_dict(plain) == trial


def test_trial_and_raw_rows_share_the_axes() -> None:
    trial = Trial("t000-con", "con", "lite0", "minilm", 4, 22, _layer(), {"train.lr": 0.01})
    row = trial_row(trial, {"i2t_r1": 0.5}, 12.34, {"train.lr": 0.01})
    assert row["trial"] == "t000-con" and row["vision_layer"] == 8 and row["text_depth"] == 0.5
    assert row["raw_mutual_knn"] == 0.25 and row["train_s"] == 12.3 and row["train.lr"] == 0.01
    [raw] = raw_sweep_rows([Prepared("lite0", "minilm", 4, 22, [_layer()])])
    assert raw["objective"] == "raw" and raw["trial"] == "" and raw["mutual_knn"] == 0.25
    shared = ["vision", "text", "vision_layer", "text_layer", "vision_depth", "vision_params"]
    assert {k: raw[k] for k in shared} == {k: row[k] for k in shared}


def test_a_trial_of_a_sweep_started_by_the_flat_format_still_loads() -> None:
    """Tune restores the trial configs a stopped sweep stored; before trials were records
    they were flat dicts naming their pair source `paths`."""
    trial = Trial("t000-con", "con", "lite0", "minilm", 4, 22, _layer(), {"train.lr": 0.01})
    flat = {k: v for k, v in trial.to_dict().items() if k != "layer"}
    layer = trial.to_dict()["layer"]
    flat |= {k: v for k, v in layer.items() if k != "source"} | {"paths": layer["source"]}
    assert Trial.from_dict(flat) == trial


def _scored_rows() -> list[dict]:
    """A raw row (no shared space, no intervals) and a trained row with intervals."""
    axes = {"vision": "v", "text": "t", "vision_layer": 1, "text_layer": 2}
    raw = {"objective": "raw", **axes, "mutual_knn": 0.2}
    con = {"objective": "con", **axes, "mutual_knn": 0.3, "i2t_r1": 0.54, "t2i_r1": 0.5}
    con |= {"i2t_r1_lo": 0.47, "i2t_r1_hi": 0.6, "t2i_r1_lo": 0.44, "t2i_r1_hi": 0.55}
    con |= {"recon_mse": 0.25, "recon_mse_lo": 0.2, "recon_mse_hi": 0.3}
    return [raw, con | {"n_images": 200, "n_captions": 1000}]


def test_results_carry_intervals_after_the_headline_columns(tmp_path) -> None:
    write_results(tmp_path, _scored_rows())
    with (tmp_path / "results.csv").open() as f:
        header = next(csv.reader(f))
    bounds = [f"{m}_{e}" for m in metric_names() if m in interval_metrics() for e in ("lo", "hi")]
    assert header[: len(RESULT_COLUMNS)] == RESULT_COLUMNS
    assert header[len(RESULT_COLUMNS) :] == [*bounds, "n_images", "n_captions"]
    assert not any(f"{m}_lo" in header for m in ALIGNMENT)  # set-level: no interval
    back = read_results(tmp_path)
    assert back[1]["i2t_r1_lo"] == "0.47" and back[0]["i2t_r1_lo"] == ""
    assert ks_of(back) == [1, 5, 10]  # the bounds are not recall columns


def test_tables_show_each_interval_as_its_larger_arm(tmp_path) -> None:
    rows = _scored_rows()
    for source in (rows, (write_results(tmp_path, rows), read_results(tmp_path))[1]):
        text = table(source, ["objective", "i2t_r1", "t2i_r1", "mutual_knn", "recon_mse"])
        raw, con = (line.split("|")[2:-1] for line in text.splitlines()[2:])
        # i2t_r1 0.54 in [0.47, 0.60]: arms 0.07 below and 0.06 above.
        assert [c.strip() for c in con] == ["0.540 ±0.07", "0.500 ±0.06", "0.300", "0.250 ±0.05"]
        assert [c.strip() for c in raw] == ["—", "—", "0.200", "—"]


def test_report_says_what_the_intervals_resample(tmp_path) -> None:
    (tmp_path / "config.yaml").write_text("eval:\n  bootstrap: 500\n  interval: 0.9\n")
    report = write_report(tmp_path, _scored_rows()).read_text()
    assert "0.540 ±0.07" in report
    assert "90% percentile bootstrap" in report and "500 resamples" in report
    assert "200 test images" in report and "1,000 captions" in report
    assert "overlap are not distinguished" in report
    rows = [
        {k: v for k, v in r.items() if "_lo" not in k and "_hi" not in k} for r in _scored_rows()
    ]
    rows = [{k: v for k, v in r.items() if not k.startswith("n_")} for r in rows]
    assert "bootstrap" not in write_report(tmp_path, rows).read_text()  # an older results.csv


def test_trial_rows_carry_the_intervals() -> None:
    trial = Trial("t000-con", "con", "lite0", "minilm", 4, 22, _layer(), {})
    row = trial_row(trial, {"i2t_r1": 0.5, "i2t_r1_lo": 0.4, "i2t_r1_hi": 0.6}, 1.0, {})
    assert (row["i2t_r1_lo"], row["i2t_r1_hi"]) == (0.4, 0.6)


def test_one_configuration_key_ignores_the_seed_and_spelling() -> None:
    row = {"objective": "con", "vision": "v", "text": "t", "vision_depth": 0.5, "train.lr": 0.001}
    same = row | {"vision_depth": "0.5", "train.lr": "1e-3", "train.seed": 3, "text_params": ""}
    assert config_key(row | {"train.seed": 0}) == config_key(same)
    assert config_key(row) != config_key(row | {"vision_params": 5})
    assert config_key(row) != config_key(row | {"train.alpha": 0.9})


def test_t_quantile_is_students_including_welchs_fractional_dof() -> None:
    for dof in (1, 2, 7.3):
        assert t_quantile(0.95, dof) == pytest.approx(stats.t.ppf(0.975, dof))
    assert t_half_width([1.0, 2.0, 3.0]) == pytest.approx(4.302653 / math.sqrt(3))
    assert math.isnan(t_half_width([1.0]))


def test_half_samples_are_capped_and_none_below_two() -> None:
    assert [half_sample_count(b) for b in (0, 1, 2, 30, 1000)] == [0, 0, 2, 30, MAX_HALF_SAMPLES]
