"""The results schema: columns follow eval.retrieval_ks; trials survive Tune's round trip."""

from __future__ import annotations

import csv

from raysys.report.report import read_results, write_results
from raysys.report.schema import RESULT_COLUMNS, ks_of, metric_names
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
