"""`raysys.bench`'s Ray benchmarks end to end on a real local Ray: `bench train` and
`bench extract`, `bench corpus`."""

from __future__ import annotations

import json
import math

import pytest

from raysys import config
from raysys.bench import BENCH_FILE
from raysys.bench.train import bench_train


def test_bench_train_writes_both_throughputs_and_the_settings(small_cache, tmp_path) -> None:
    import ray
    import torch

    cached, _ = small_cache  # the session's extraction: the bench times training only
    cfg = config.load(
        None,
        [
            f"corpus.size={cached.corpus.size}",
            f"extract.cache_dir={cached.extract.cache_dir}",
            "train.batch_size=16",
            "train.hidden=64",
            "train.latent=16",
            "train.epochs=8",
            "train.num_workers=2",  # the bench must still run Ray Train with one worker
            "train.early_stop_patience=1",  # and must not stop early
        ],
    )
    out = tmp_path / "bench"
    stale = out / "ray-run" / "tensorboard" / "bench" / "events.out.tfevents.stale"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"")  # a previous bench's run: replaced, never resumed or mixed in
    result = bench_train(cfg, out)

    written = json.loads((out / BENCH_FILE).read_text())
    assert written == result
    for key in ("pipeline_per_s", "bare_per_s", "ratio", "startup_s"):
        assert isinstance(written[key], float), key
        assert math.isfinite(written[key]) and written[key] > 0, key
    assert written["ratio"] == written["pipeline_per_s"] / written["bare_per_s"]

    # 48 train pairs / batch 16 = 3 steps per epoch, 8 epochs: 6 windows of ceil(24 / 6) steps.
    settings = written["settings"]
    assert settings["steps"] == 24 and settings["window_ends"] == [4, 8, 12, 16, 20, 24]
    assert settings["batch_size"] == 16 and settings["workers"] == 1
    assert settings["model"]["hidden"] == [64] and settings["model"]["latent"] == 16
    assert settings["torch_threads"] == 2  # both CPUs of the test cluster to the one worker
    assert settings["device"] == "cpu"
    assert settings["torch"] == torch.__version__ and settings["ray"] == ray.__version__
    assert len(written["ray_run"]["window_per_s"]) == len(written["bare"]["window_per_s"]) == 6
    assert written["startup"]["source"] == "tensorboard"
    run = written["ray_run"]
    parts = run["train_s"] + run["excess_train_s"] + run["validation_s"] + written["startup_s"]
    assert parts == pytest.approx(run["wall_s"])
    assert (out / "ray-run" / "models" / "bench" / "model.safetensors").is_file()
    assert not stale.exists()


def test_bench_extract_times_the_pass_and_the_bare_loop(ray_cluster, tmp_path) -> None:
    from raysys.bench.extract import bench_extract
    from raysys.errors import ConfigError

    cfg = config.load(None, ["corpus.size=60", "extract.batch_size=16"])
    out = tmp_path / "bench"
    result = bench_extract(cfg, out, images=40)
    assert json.loads((out / BENCH_FILE).read_text()) == result
    for key in ("pipeline_per_s", "bare_per_s", "ratio"):
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert result["ratio"] == pytest.approx(result["pipeline_per_s"] / result["bare_per_s"])
    assert result["pipeline_per_s"] == pytest.approx(40 / result["pipeline_s"])
    settings = result["settings"]
    assert settings["images"] == settings["cached_rows"] == 40  # the pass really embedded all
    assert settings["image_size"] == 128 and settings["batch_size"] == 16
    assert settings["actors"]["count"] >= 1
    with pytest.raises(ConfigError, match="the corpus has 60 images"):
        bench_extract(cfg, out, images=61)


def test_bench_corpus_indexes_every_caption(ray_cluster, tmp_path) -> None:
    """The index job on a small written manifest: every caption indexed once, its rate and
    the driver's memory recorded, most captions given a generated negative. (The job on
    shards is checked against the in-process loader in tests/test_corpora_ray.py.)"""
    from raysys.bench.corpus import bench_corpus

    kind = "manifest"
    result = bench_corpus(config.Config(), tmp_path / kind, 600, kind)
    assert json.loads((tmp_path / kind / BENCH_FILE).read_text()) == result
    assert result["rows"] == 600 and result["rows_per_s"] > 0
    assert result["driver_peak_rss_mb"] >= result["driver_rss_before_mb"] > 0
    generated = sum(n for k, n in result["negatives"].items() if k.startswith("generated:"))
    assert generated == 600 - result["negatives"].get("none", 0) > 500
