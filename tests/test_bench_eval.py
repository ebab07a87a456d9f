"""`raysys bench eval`: the real score_model on random pairs, timed, with the peak RSS."""

from __future__ import annotations

import json

from raysys.cli import main


def test_bench_eval_writes_seconds_and_peak_rss(tmp_path, capsys) -> None:
    args = ["bench", "eval", "--pairs", "300", "--device", "cpu", "--out", str(tmp_path)]
    assert main([*args, "eval.bootstrap=20", "eval.metric_pairs=100"]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["pairs"] == 300 and result["seconds"] > 0
    assert result["peak_rss_mb"] >= result["setup_peak_rss_mb"] > 0
    assert (result["n_images"], result["n_metric_images"]) == (300, 100)
    scores = result["scores"]
    assert {"i2t_r10", "t2i_r1", "hardneg_acc", "cknna", "hardneg_acc_swap"} <= set(scores)
    assert "peak RSS" in capsys.readouterr().out
    assert main(["bench", "eval", "--pairs", "5", "--out", str(tmp_path)]) == 2
    assert "--pairs (5)" in capsys.readouterr().err
