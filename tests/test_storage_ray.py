"""A training run asked to write to a bucket it cannot reach fails before it starts (a run
whose outputs and checkpoints round-trip through S3 is in test_resume_ray.py)."""

from __future__ import annotations

from raysys.cli import main


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
