"""A training run whose outputs and Ray Train checkpoints live on S3 (moto on 127.0.0.1)."""

from __future__ import annotations

import json

from train_steps import steps_per_epoch, validated_steps

from raysys import config, storage
from raysys.cli import main
from raysys.jam import JAM


def test_checkpoints_and_metrics_round_trip_through_s3(small_cache, s3_server, tmp_path) -> None:
    cfg, ext = small_cache
    bucket = s3_server.make_bucket("raysys-runs")
    uri = f"{bucket}/exp1"
    args = [
        "train",
        "--out",
        uri,
        f"extract.cache_dir={cfg.extract.cache_dir}",
        f"corpus.size={cfg.corpus.size}",
        "train.batch_size=16",
        "train.epochs=2",
        "train.eval_every=3",
        "train.hidden=64",
        "train.latent=16",
    ]
    assert main(args) == 0

    metrics = json.loads(storage.read_text(f"{uri}/metrics.json"))
    total = 2 * steps_per_epoch(config.load(None, ["train.batch_size=16"]), ext)
    assert [h["step"] for h in metrics["con"]["history"]] == validated_steps(total, 3)
    assert "i2t_r1" in storage.read_text(f"{uri}/results.csv")
    fs, path = storage.fsspec_fs(f"{uri}/ray/con")
    checkpoints = sorted(p for p in fs.ls(path) if p.rsplit("/", 1)[-1].startswith("checkpoint_2"))
    assert len(checkpoints) == 2
    local = tmp_path / "ckpt"
    storage.download_dir("s3://" + checkpoints[-1], local)
    from_s3 = JAM.load(local / "model")
    storage.download_dir(f"{uri}/models/con", tmp_path / "exported")
    exported = JAM.load(tmp_path / "exported")
    # The last checkpoint (step 6) scored best or not, both are real trained models of the
    # same shape; the exported best one is among the kept checkpoints.
    assert from_s3.cfg == exported.cfg
    assert storage.exists(f"{uri}/tensorboard/con/projector_config.pbtxt")
    fs, path = storage.fsspec_fs(f"{uri}/tensorboard/con")
    assert any(p.rsplit("/", 1)[-1].startswith("events.out.tfevents") for p in fs.ls(path))
    assert main(args) == 2  # the same S3 prefix is not reused silently


def test_unwritable_bucket_fails_fast(small_cache, s3_server, capsys) -> None:
    cfg, _ = small_cache
    args = [
        "train",
        "--out",
        "s3://no-such-bucket/x",
        f"extract.cache_dir={cfg.extract.cache_dir}",
        f"corpus.size={cfg.corpus.size}",
        "train.batch_size=16",
    ]
    assert main(args) == 2
    assert "no-such-bucket" in capsys.readouterr().err
