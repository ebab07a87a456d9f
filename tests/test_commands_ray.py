"""`raysys train` end to end on a real local Ray: extract, Ray Train DDP (2 gloo workers),
evaluation, report, TensorBoard event files read back with TensorBoard's own reader. (`raysys
run` is a sweep now: tests/test_sweep_ray.py.)"""

from __future__ import annotations

import csv
import json
import math
import os

import pytest
import torch

from raysys import config
from raysys.cli import main
from raysys.data import cache
from raysys.jam import JAM
from raysys.report.schema import RESULT_COLUMNS

OVERRIDES = [
    "corpus.size=300",
    "train.epochs=4",
    "train.eval_every=6",
    "train.batch_size=64",
    "train.objective=spread",
]


@pytest.fixture(scope="module")
def finished_run(ray_cluster, tmp_path_factory):
    """One run with relative paths, as a user types them: Ray workers do not share the
    driver's working directory, so this catches paths that are not made absolute."""
    work = tmp_path_factory.mktemp("work")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        args = ["train", "--out", "runs/e2e", *OVERRIDES, "extract.cache_dir=runs/cache"]
        assert main(args) == 0
    finally:
        os.chdir(cwd)
    return work / "runs/e2e", work / "runs/cache"


def test_results_table_has_the_raw_and_the_trained_row(finished_run, capsys) -> None:
    out, _ = finished_run
    with (out / "results.csv").open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames[: len(RESULT_COLUMNS)] == RESULT_COLUMNS
        rows = {r["objective"]: r for r in reader}
    assert list(rows) == ["raw", "spread"]
    assert rows["raw"]["i2t_r1"] == "" and rows["raw"]["recon_mse"] == ""
    row = rows["spread"]
    assert row["vision"] == "efficientnet-lite0" and row["vision_layer"] == "16"
    assert row["text"] == "minilm-l6" and row["text_layer"] == "6"
    for name in ("spread",):
        for column in RESULT_COLUMNS[5:-1]:
            value = float(rows[name][column])
            assert 0.0 <= value <= 1.0 + 1e-6, (name, column, value)
        assert math.isfinite(float(rows[name]["recon_mse"]))
    # 30 test images: R@5 by chance is 1/6. Four short epochs already do much better.
    assert float(rows["spread"]["i2t_r5"]) > 2 / 6
    report = (out / "report.md").read_text()
    assert "| spread" in report and "tensorboard --logdir" in report
    # Per-item metrics carry their bootstrap interval; the raw row has none.
    assert float(row["i2t_r5_lo"]) <= float(row["i2t_r5"]) <= float(row["i2t_r5_hi"])
    assert rows["raw"]["i2t_r1_lo"] == "" and "percentile bootstrap" in report


def test_config_yaml_is_the_resolved_config(finished_run) -> None:
    out, cache_dir = finished_run
    saved = config.load(out / "config.yaml")
    assert saved == config.load(None, [*OVERRIDES, "extract.cache_dir=runs/cache"])


def test_tensorboard_scalars_read_back(finished_run) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = finished_run
    acc = EventAccumulator(str(out / "tensorboard" / "spread"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in (
        "train/loss",
        "train/align",
        "train/rec",
        "train/lambda",
        "train/lr",
        "val/i2t_r1",
        "val/mutual_knn",
        "val/hardneg_acc",
    ):
        assert tag in tags, tag
    steps = 4 * (240 // 64)  # 4 epochs of 3 global batches
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, steps + 1))
    assert [e.step for e in acc.Scalars("val/i2t_r1")] == [6, 12]
    lam = [e.value for e in acc.Scalars("train/lambda")]
    assert lam[0] == pytest.approx(1.0) and lam == sorted(lam, reverse=True)


def test_exported_model_encodes_the_cached_embeddings(finished_run) -> None:
    out, cache_dir = finished_run
    model = JAM.load(out / "models" / "spread").eval()
    corpus_dir = next(p for p in cache_dir.iterdir() if p.is_dir())
    image_dir = next((corpus_dir / "image").iterdir())
    text_dir = next((corpus_dir / "text").iterdir())
    test = cache.load_pairs(corpus_dir, image_dir, text_dir, "L16", "L06", "test")
    with torch.no_grad():
        zi = model.encode_image(torch.as_tensor(test.image))
        zt = model.encode_text(torch.as_tensor(test.text))
    assert zi.shape == (len(test), 256) and zt.shape == (len(test), 256)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"spread"}
    history = metrics["spread"]["history"]  # one entry per validation (every 6 steps)
    assert [h["step"] for h in history] == [6, 12]
    assert all("val/i2t_r1" in h and "train/loss" in h for h in history)
    # The exported model is the best checkpoint by train.best_metric (val/i2t_r1): scoring it
    # here on the val split reproduces that validation's metrics exactly.
    from raysys.evaluate import score_model

    val = cache.load_pairs(corpus_dir, image_dir, text_dir, "L16", "L06", "val")
    again = score_model(model, val, config.EvalConfig())
    assert again["i2t_r1"] == pytest.approx(max(h["val/i2t_r1"] for h in history))
    keys = ("i2t_r1", "t2i_r5", "mutual_knn", "recon_mse")
    matching = [
        h
        for h in history
        if all(again[k] == pytest.approx(h[f"val/{k}"], rel=1e-5, abs=1e-6) for k in keys)
    ]
    assert matching, (again, history)


def test_rerun_into_a_finished_run_directory_is_refused(finished_run, capsys) -> None:
    out, cache_dir = finished_run
    args = ["train", "--out", str(out), *OVERRIDES, f"extract.cache_dir={cache_dir}"]
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_evaluate_scores_an_exported_model(finished_run) -> None:
    out, cache_dir = finished_run
    model = out / "models" / "spread"
    assert json.loads((model / "provenance.json").read_text())["image_layer"] == "L16"
    args = [
        "evaluate",
        str(model),
        "corpus.size=300",
        f"extract.cache_dir={cache_dir}",
        "--out",
        str(out / "eval"),
    ]
    assert main(args) == 0
    with (out / "eval" / "results.csv").open() as f:
        rows = {r["objective"]: r for r in csv.DictReader(f)}
    with (out / "results.csv").open() as f:
        trained = {r["objective"]: r for r in csv.DictReader(f)}
    # Same model, same test split: the standalone score matches the run's.
    assert rows["spread"]["i2t_r1"] == trained["spread"]["i2t_r1"]
    assert rows["raw"]["mutual_knn"] == trained["raw"]["mutual_knn"]


def test_tensorboard_hparams_and_projector_read_back(finished_run) -> None:
    from google.protobuf import text_format
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2
    from tensorboard.plugins.projector import projector_config_pb2

    out, _ = finished_run
    log_dir = out / "tensorboard" / "spread"
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    starts = []
    for content in acc.PluginTagToContent("hparams").values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        if data.HasField("session_start_info"):
            starts.append(data.session_start_info.hparams)
    assert len(starts) == 1
    assert starts[0]["objective"].string_value == "spread"
    assert starts[0]["train.batch_size"].number_value == 64
    with (out / "results.csv").open() as f:
        row = next(r for r in csv.DictReader(f) if r["objective"] == "spread")
    tb_r1 = acc.Scalars("hparam/test/i2t_r1")[-1].value
    assert tb_r1 == pytest.approx(float(row["i2t_r1"]), abs=1e-5)

    config_pb = projector_config_pb2.ProjectorConfig()
    text_format.Parse((log_dir / "projector_config.pbtxt").read_text(), config_pb)
    tags = {e.tensor_name.split(":")[0]: e for e in config_pb.embeddings}
    assert set(tags) == {"image", "text"}
    entry = tags["image"]
    tensor = (log_dir / entry.tensor_path).read_text().strip().splitlines()
    labels = (log_dir / entry.metadata_path).read_text().strip().splitlines()
    assert len(tensor) == len(labels) == 30 and len(tensor[0].split("\t")) == 256
    out_cache = finished_run[1]
    corpus_dir = next(p for p in out_cache.iterdir() if p.is_dir())
    image_dir, text_dir = (
        next((corpus_dir / "image").iterdir()),
        next((corpus_dir / "text").iterdir()),
    )
    test = cache.load_pairs(corpus_dir, image_dir, text_dir, "L16", "L06", "test")
    assert labels == [str(c) for c in test.captions]
    from PIL import Image

    with Image.open(log_dir / entry.sprite.image_path) as sprite:
        assert sprite.size[0] == sprite.size[1] >= 6 * entry.sprite.single_image_dim[0]
