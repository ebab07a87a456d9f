"""Ray Train behaviour on a real local Ray: DDP equivalence, worker failure, resume."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from train_steps import steps_per_epoch, validated_steps

from raysys import config
from raysys.checks import UNPLANNED_STREAM
from raysys.commands import trained_source as train_paths
from raysys.errors import ConfigError
from raysys.train.driver import stream_settings, train

SMALL = [
    "train.hidden=64",
    "train.latent=16",
    "train.dropout=0",
    "train.batch_size=16",
    "train.warmup_steps=1",
]


def _scalars(log_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_two_workers_with_half_batches_match_one_worker(small_cache, tmp_path) -> None:
    cfg, ext = small_cache
    losses = {}
    for workers in (1, 2):
        run_cfg = config.load(
            None,
            [
                *SMALL,
                "train.epochs=1",
                "train.eval_every=3",
                f"train.num_workers={workers}",
                "train.data_shards=2",  # the same batches, whatever the worker count
            ],
        )
        run_cfg = dataclasses.replace(run_cfg, corpus=cfg.corpus, extract=cfg.extract)
        train(run_cfg, train_paths(run_cfg, ext), tmp_path / f"w{workers}", "con")
        log_dir = tmp_path / f"w{workers}" / "tensorboard" / "con"
        losses[workers] = {t: _scalars(log_dir, t) for t in ("train/loss", "train/align")}
    # 48 train pairs in two shards by bucket (25 and 23 here): an epoch is the steps of 16
    # the smaller fills (2). Each worker holds one shard; the global batch, its gathered
    # contrastive loss, the input standardisation (moments all-reduced) and the averaged
    # gradients are the same; only float summation order differs: rel 1e-5 on the first
    # step, 1e-3 after two optimiser steps.
    steps = steps_per_epoch(run_cfg, ext)
    for tag in ("train/loss", "train/align"):
        one, two = losses[1][tag], losses[2][tag]
        assert sorted(one) == sorted(two) == list(range(1, steps + 1))
        assert two[1] == pytest.approx(one[1], rel=1e-5)
        for step in range(2, steps + 1):
            assert two[step] == pytest.approx(one[step], rel=1e-3)


def test_killed_worker_restarts_from_the_last_checkpoint(small_cache, tmp_path) -> None:
    from ray.util.state import list_actors

    cfg, ext = small_cache
    run_cfg = config.load(
        None,
        ["train.batch_size=16", "train.epochs=60", "train.eval_every=15", "train.max_failures=1"],
    )
    run_cfg = dataclasses.replace(run_cfg, corpus=cfg.corpus, extract=cfg.extract)
    out = tmp_path / "run"
    result = {}
    thread = threading.Thread(
        target=lambda: result.update(r=train(run_cfg, train_paths(run_cfg, ext), out, "con"))
    )
    thread.start()
    deadline = time.monotonic() + 180
    while not list((out / "ray" / "con").glob("checkpoint_*")):
        assert time.monotonic() < deadline and thread.is_alive(), "no checkpoint appeared"
        time.sleep(0.2)
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    assert len(workers) == 2
    os.kill(workers[1].pid, signal.SIGKILL)
    thread.join(timeout=300)
    assert not thread.is_alive() and "r" in result
    total = steps_per_epoch(run_cfg, ext) * 60
    history = result["r"].history
    assert [h["step"] for h in history] == list(range(15, total + 1, 15))  # no gap
    # The restarted attempt wrote a second event file; purge_step kept the steps single.
    assert len(list((out / "tensorboard" / "con").glob("events.out.tfevents.*"))) >= 2
    loss = _scalars(out / "tensorboard" / "con", "train/loss")
    assert sorted(loss) == list(range(1, total + 1))


def test_resume_continues_a_stopped_run(ray_cluster, small_cache, tmp_path) -> None:
    """Ctrl-C a `raysys train` after two checkpoints, then `raysys train resume=DIR`. Both
    commands join the session's Ray as jobs (a private Ray each cost the test 78 more
    CPU-seconds, measured on a slow day); a command's private Ray, and Ctrl-C under it,
    are tests/test_sweep_ray.py's."""
    cfg, ext = small_cache
    out = tmp_path / "stopped"
    args = [
        "train",
        "--out",
        str(out),
        f"extract.cache_dir={cfg.extract.cache_dir}",
        f"corpus.size={cfg.corpus.size}",
        "train.batch_size=16",
        "train.epochs=40",  # 120 steps: still 6 checkpoints to go when it is stopped after 2
        "train.eval_every=15",
        "train.hidden=128",  # small, so the 120 steps and 8 checkpoints take seconds
        "train.latent=32",
    ]
    address = ray_cluster.get_runtime_context().gcs_address
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": address}
    first = subprocess.Popen(
        [sys.executable, "-m", "raysys.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 240
    while len(list((out / "ray" / "con").glob("checkpoint_*"))) < 2:
        assert time.monotonic() < deadline and first.poll() is None, "no checkpoints appeared"
        time.sleep(0.2)
    first.send_signal(signal.SIGINT)  # a user's Ctrl-C
    first.communicate(timeout=120)
    assert not (out / "results.csv").exists()

    second = subprocess.run(
        [sys.executable, "-m", "raysys.cli", "train", f"resume={out}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    resumed = re.search(r"resumed at step (\d+)", second.stdout + second.stderr)
    # Resumed from a checkpoint of the first run (a half-written newest one is skipped).
    assert resumed and int(resumed.group(1)) >= 15, second.stdout[:3000]
    assert (out / "results.csv").is_file()
    import json

    history = json.loads((out / "metrics.json").read_text())["con"]["history"]
    total = steps_per_epoch(config.load(None, ["train.batch_size=16"]), ext) * 40
    assert [h["step"] for h in history] == validated_steps(total, 15)


def test_nan_rows_in_a_workers_shard_fail_with_their_ids(small_cache, tmp_path) -> None:
    import numpy as np
    import pyarrow.parquet as pq

    from raysys.data import cache
    from raysys.errors import CacheError

    cfg, ext = small_cache
    run_cfg = config.load(None, [*SMALL, "train.epochs=1", "train.eval_every=3"])
    run_cfg = dataclasses.replace(run_cfg, corpus=cfg.corpus, extract=cfg.extract)
    paths = train_paths(run_cfg, ext)
    # A copy of the image cache with one train pair's embedding poisoned.
    bad_id = str(paths.index("train").image_ids[5])
    table = pq.ParquetDataset(cache.data_files(ext.image_dir)).read()
    column = table.column(paths.image_layer).combine_chunks()
    values = cache.to_numpy(column).copy()
    values[table.column("id").to_pylist().index(bad_id), 0] = np.nan
    bad_dir = tmp_path / "image-cache"
    bad_dir.mkdir()
    column_index = table.schema.get_field_index(paths.image_layer)
    table = table.set_column(column_index, paths.image_layer, cache.list_array(values))
    written = cache.write_part(table, bad_dir / "part-0.parquet")
    manifest = cache.read_manifest(ext.image_dir)  # listing the copy's one part, as it is
    manifest["files"] = {written.name: cache.record(written, None)}
    cache.write_manifest(bad_dir, manifest)
    paths.image_dir = str(bad_dir)
    with pytest.raises(CacheError, match=r"pair\(s\) have NaN or inf") as err:
        train(run_cfg, paths, tmp_path / "run", "con")
    assert f"'{bad_id}-" in str(err.value)  # pair ids are <image id>-<caption index>


def test_streaming_trains_through_a_reused_pair_view_and_stops_early(
    small_cache, tmp_path, capfd, monkeypatch
) -> None:
    import numpy as np
    import pyarrow as pa

    from raysys.data import cache, stream

    cfg, ext = small_cache
    run_cfg = config.load(
        None,
        [
            *SMALL,
            # lr=0: the validation metric cannot improve, so patience 1 stops every rank
            # together at the 2nd validation (step 6), not after 20 epochs (60 steps).
            "train.epochs=20",
            "train.eval_every=3",
            "train.lr=0",
            "train.early_stop_patience=1",
            "train.num_workers=2",
            "train.data_on_device=stream",
        ],
    )
    run_cfg = dataclasses.replace(run_cfg, corpus=cfg.corpus, extract=cfg.extract)
    paths = train_paths(run_cfg, ext)
    result = train(run_cfg, paths, tmp_path / "run", "con")
    # A sweep's trial whose split the sweep planned in memory refuses one that would stream
    # there, before any view is built (Ray Data's tasks hang inside a Tune trial).
    with pytest.raises(ConfigError, match="planned it in memory.*it would stream: train.data_on"):
        stream_settings(run_cfg.train, paths, refuse=UNPLANNED_STREAM)
    # A node too small for a streamed worker's windows (this one, reported with 16 KiB of
    # memory) is a clear error, not a worker killed for memory later.
    monkeypatch.setattr(stream, "node_resources", lambda: [{"CPU": 2.0, "memory": 2.0**14}])
    with pytest.raises(ConfigError, match=r"a worker's stream windows .*lower train.batch_size"):
        stream_settings(run_cfg.train, paths)
    monkeypatch.undo()
    # 48 train pairs, global batch 16 (8 per worker): 3 steps an epoch, every step logged,
    # and early stopping ended both ranks' streams after step 6.
    assert [h["step"] for h in result.history] == [3, 6]
    # Each rank reads its own half of the view with pyarrow (`ViewShard`), as a sweep does.
    out = "".join(capfd.readouterr())
    assert "streaming 48 pairs from their pair view, 24 per worker per epoch" in out, out[-3000:]
    losses = _scalars(tmp_path / "run" / "tensorboard" / "con", "train/loss")
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(list(losses.values())))

    # The view joins every train pair with its own image and caption rows, once.
    view = stream.view_dir(paths, "train")
    assert stream.read_view(view)["rows"] == 48
    table = pa.concat_tables(cache.read_parquet(f) for f in stream.view_files(view))
    index = paths.index("train")
    assert sorted(table.column("pair_id").to_pylist()) == sorted(index.pair_ids.tolist())
    pairs = paths.load("train")
    at = {p: i for i, p in enumerate(table.column("pair_id").to_pylist())}
    for i in (0, 17, 47):
        row = at[str(pairs.pair_ids[i])]
        np.testing.assert_array_equal(cache.to_numpy(table.column("image"))[row], pairs.image[i])
        np.testing.assert_array_equal(cache.to_numpy(table.column("text"))[row], pairs.text[i])
        negative = cache.to_numpy(table.column("negative"))[row]
        np.testing.assert_array_equal(negative, pairs.negative[i])

    # Another run on the same layers (the next objective) reuses the view as it is.
    files = stream.view_files(view)
    before = {f: Path(f).stat().st_mtime_ns for f in files}
    assert stream.write_pair_view(paths, "train", 48) == view
    assert {f: Path(f).stat().st_mtime_ns for f in stream.view_files(view)} == before

    # A build never deletes another's files: with the marker gone and another trial's
    # half-built attempt beside it, a new build writes its own attempt and publishes that.
    Path(view, stream.DONE).unlink()
    half = Path(view, "another-attempt", "part-0.parquet")
    half.parent.mkdir()
    half.write_bytes(b"half a file")
    assert stream.write_pair_view(paths, "train", 48) == view
    assert half.exists() and all(Path(f).exists() for f in files)
    rebuilt = stream.view_files(view)
    assert not set(rebuilt) & set(files) and stream.read_view(view)["rows"] == 48


def test_auto_streams_only_a_shard_too_big_for_memory(ray_cluster) -> None:
    from raysys.data.stream import stream_reason

    assert stream_reason("auto", rows=48, width=2048, workers=2) is None
    assert stream_reason("false", rows=10**12, width=2048, workers=2) is None
    assert "exceeds" in stream_reason("auto", rows=10**12, width=2048, workers=2)
    assert stream_reason("stream", rows=48, width=2048, workers=2) == "train.data_on_device=stream"
