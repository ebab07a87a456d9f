"""Resume from S3 without Ray: the checkpoints a stopped run left on a URI (moto on
127.0.0.1) are found, read and exported by the driver on any machine, as on local disk."""

from __future__ import annotations

import json

import pytest
import torch

from raysys import config, storage
from raysys.jam import JAM
from raysys.train.driver import finished_before, latest_checkpoint, saved_checkpoints
from raysys.train.step import jam_config
from raysys.train.worker import HISTORY_FILE, MODEL_DIR, STATE_FILE


def _checkpoint(local, step: int, r1: float, seed: int) -> None:
    """A checkpoint directory as the worker writes it: model, optimiser state, history."""
    torch.manual_seed(seed)
    JAM(jam_config(config.load(None, ["train.hidden=8", "train.latent=4"]).train, 6, 6)).save(
        local / MODEL_DIR
    )
    (local / STATE_FILE).write_bytes(b"state")
    history = [{"step": s, "val/i2t_r1": 0.1} for s in range(10, step, 10)]
    (local / HISTORY_FILE).write_text(json.dumps([*history, {"step": step, "val/i2t_r1": r1}]))


def test_a_run_on_s3_finished_before_exports_its_best_checkpoint(
    s3_server, monkeypatch, tmp_path
) -> None:
    s3_server.patch_env(monkeypatch)
    run_dir = f"{s3_server.make_bucket('resume-ckpt')}/run/ray/con"
    for name, step, r1, seed in [("checkpoint_1", 20, 0.9, 1), ("checkpoint_2", 30, 0.2, 2)]:
        _checkpoint(tmp_path / name, step, r1, seed)
        storage.upload_dir(tmp_path / name, storage.join(run_dir, name))
    storage.write_text(f"{run_dir}/checkpoint_3/{MODEL_DIR}/config.json", "{}")  # half-written
    storage.write_text(f"{run_dir}/.validate_storage_marker", "")  # Ray's own files around
    assert sorted(c.path for c in saved_checkpoints(run_dir)) == [
        f"{run_dir}/checkpoint_1",
        f"{run_dir}/checkpoint_2",
    ]
    assert latest_checkpoint(run_dir) == f"{run_dir}/checkpoint_2"  # a URI the worker reads
    assert latest_checkpoint(f"{run_dir}-never-run") is None

    model_dir = tmp_path / "exported"
    result = finished_before(config.load(None, []).train, run_dir, model_dir, seconds=1.0)
    assert result.metrics == {"step": 30, "val/i2t_r1": 0.2}  # the latest report
    assert [r["step"] for r in result.history] == [10, 20, 30]
    got = JAM.load(model_dir).state_dict()
    want = JAM.load(tmp_path / "checkpoint_1" / MODEL_DIR).state_dict()  # the best (max r1)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_local_run_dir_is_read_the_same_way(tmp_path) -> None:
    run_dir = tmp_path / "ray" / "con"
    _checkpoint(run_dir / "checkpoint_5", 10, 0.5, 0)
    assert latest_checkpoint(run_dir) == str(run_dir / "checkpoint_5")
    assert latest_checkpoint(tmp_path / "missing") is None
    with pytest.raises(Exception, match="reported no checkpoint"):
        finished_before(config.load(None, []).train, tmp_path / "missing", tmp_path / "m", 1.0)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_own_checkpoints_are_read_as_ray_trains_and_keep_the_newest(
    where, s3_server, monkeypatch, tmp_path
) -> None:
    """A population trained in its Tune trial's process writes its checkpoints itself: laid
    out as Ray Train's (so `latest_checkpoint` and resume read them), the history last (a
    checkpoint cut short is skipped), and only the newest `keep` left."""
    from raysys.train.population_driver import OwnCheckpoints

    if where == "s3":
        s3_server.patch_env(monkeypatch)
        run_dir = f"{s3_server.make_bucket('own-ckpt')}/run/ray/p000"
    else:
        run_dir = str(tmp_path / "ray" / "p000")
    own = OwnCheckpoints(run_dir, keep=2)
    for step in (30, 60, 90):
        ckpt = tmp_path / f"tmp{step}"
        ckpt.mkdir()
        _checkpoint(ckpt, step, 0.1, step)
        own.save(ckpt, step)
    assert [c.report["step"] for c in saved_checkpoints(run_dir)] == [60, 90]
    assert latest_checkpoint(run_dir) == storage.join(run_dir, "checkpoint_000000090")
    kept = storage.join(run_dir, "checkpoint_000000090")
    assert storage.list_names(kept) == sorted([HISTORY_FILE, MODEL_DIR, STATE_FILE])

    # The history is written last: a save cut short before it leaves a checkpoint that
    # resume skips.
    half = storage.join(run_dir, "checkpoint_000000120")
    storage.upload_file(tmp_path / "tmp90" / STATE_FILE, storage.join(half, STATE_FILE))
    assert latest_checkpoint(run_dir) == kept
