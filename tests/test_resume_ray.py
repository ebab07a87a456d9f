"""`resume=s3://…` from a fresh working directory, as from another machine: a train run and a
stopped sweep continue from what they left on S3 (moto on 127.0.0.1), nothing local; the
train run's checkpoints, model and curves round-trip through S3."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

from train_steps import steps_per_epoch

from raysys import config, rundir, storage
from raysys.cli import main
from raysys.jam import JAM
from raysys.sweep.tune import members_of, trial_status

SMALL = ["train.batch_size=16", "train.hidden=32", "train.latent=16"]


def _objects(uri: str) -> dict[str, tuple[str, object]]:
    """Every object under `uri`: its key below `uri` -> (ETag, LastModified)."""
    fs, path = storage.fsspec_fs(uri)
    if not fs.exists(path):
        return {}
    found = fs.find(path, detail=True)
    return {
        k.removeprefix(path + "/"): (v.get("ETag"), v.get("LastModified")) for k, v in found.items()
    }


def test_a_train_run_resumes_from_s3_in_a_fresh_directory(
    small_cache, s3_server, tmp_path, monkeypatch, capfd
) -> None:
    cfg, ext = small_cache
    uri = f"{s3_server.make_bucket('resume-train')}/run1"
    epoch = steps_per_epoch(config.load(None, SMALL), ext)
    first = [
        "train",
        "--out",
        uri,
        f"extract.cache_dir={cfg.extract.cache_dir}",
        f"corpus.size={cfg.corpus.size}",
        "train.epochs=1",  # one epoch, one checkpoint; the resume asks for a second epoch
        f"train.eval_every={epoch}",
        *SMALL,
    ]
    assert main(first) == 0
    events_before = [k for k in _objects(f"{uri}/tensorboard/con") if "tfevents" in k]
    # As if the driver had died before Ray Train wrote its snapshot: the worker then resumes
    # from the checkpoint URI the driver found itself (`resume_from`), read straight from S3.
    snapshot = f"{uri}/ray/con/checkpoint_manager_snapshot.json"
    fs, path = storage.fsspec_fs(snapshot)
    fs.rm_file(path)
    capfd.readouterr()

    monkeypatch.chdir(tmp_path)  # another machine: no staging dir, no config file here
    assert main(["train", f"resume={uri}", "train.epochs=2"]) == 0
    out, err = capfd.readouterr()
    resumed = re.search(r"resumed at step (\d+)", out + err)
    assert resumed and int(resumed.group(1)) == epoch, (out + err)[-3000:]
    history = json.loads(storage.read_text(f"{uri}/metrics.json"))["con"]["history"]
    assert [h["step"] for h in history] == [epoch, 2 * epoch]  # the first run's, then the new
    assert "resume=" not in storage.read_text(f"{uri}/config.yaml")  # the run's own config
    events = [k for k in _objects(f"{uri}/tensorboard/con") if "tfevents" in k]
    assert set(events_before) < set(events)  # the first run's curves are kept
    assert list(tmp_path.iterdir()) == []  # nothing was written locally
    # Everything else a run keeps round-trips through S3 too: Ray Train's checkpoints (the
    # last one loads as a JAM), the exported best model, the results and the projector.
    assert "i2t_r1" in storage.read_text(f"{uri}/results.csv")
    assert storage.exists(f"{uri}/tensorboard/con/projector_config.pbtxt")
    fs, path = storage.fsspec_fs(f"{uri}/ray/con")
    checkpoints = sorted(p for p in fs.ls(path) if p.rsplit("/", 1)[-1].startswith("checkpoint_2"))
    assert len(checkpoints) == 2, fs.ls(path)  # the first run's and the resumed run's
    storage.download_dir("s3://" + checkpoints[-1], tmp_path / "ckpt")
    storage.download_dir(f"{uri}/models/con", tmp_path / "exported")
    assert JAM.load(tmp_path / "ckpt" / "model").cfg == JAM.load(tmp_path / "exported").cfg
    assert main(first) == 2  # the same S3 prefix is not reused silently


def _first_sweep(args: list[str], uri: str, log, address: str) -> int:
    """Run `raysys sweep` in its own process, a job driver on the session's Ray (`address`),
    and press Ctrl-C once one population (of one trial) has finished and the next has a
    checkpoint on S3 (they run one at a time); returns its exit code."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "raysys.cli", *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "RAY_ADDRESS": address},
        start_new_session=True,  # a stray signal never reaches pytest
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            done = set(storage.list_names(f"{uri}/models"))
            started = {
                k.split("/")[0]
                for k in _objects(f"{uri}/ray")
                if k.endswith("/history.json") and "/checkpoint_" in k
            }
            if done and len(started) >= 2:  # one exported, the other has a checkpoint
                break
            time.sleep(0.5)
        assert proc.poll() is None, "the sweep ended before it could be interrupted"
        os.kill(proc.pid, signal.SIGINT)  # what Ctrl-C sends
        return proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_stopped_sweep_resumes_from_s3_and_runs_only_the_rest(
    ray_cluster, small_cache, s3_server, tmp_path, monkeypatch, capfd
) -> None:
    cfg, _ = small_cache
    uri = f"{s3_server.make_bucket('resume-sweep')}/sw1"
    args = [
        "sweep",
        "--out",
        uri,
        f"extract.cache_dir={cfg.extract.cache_dir}",
        f"corpus.size={cfg.corpus.size}",
        "objectives=con",
        "sweep.params.train.epochs=[1,200]",  # a short trial, then a long one to stop
        "sweep.max_concurrent=1",
        "train.eval_every=40",
        *SMALL,
    ]
    with (tmp_path / "first.log").open("w") as log:
        code = _first_sweep(args, uri, log, ray_cluster.get_runtime_context().gcs_address)
    first = (tmp_path / "first.log").read_text()
    assert code == 130, first[-3000:]
    assert f"resume={uri}" in first  # the message names the URI to resume
    status = trial_status(uri)  # per population: here each of one trial (epochs differ)
    finished = {name for name, s in status.items() if s == "TERMINATED"}
    assert len(finished) == 1, status
    [population] = finished
    [done] = members_of(uri)[population]
    kept = {p: _objects(f"{uri}/{p}/{done}") for p in ("models", "tensorboard")}
    kept["ray"] = _objects(f"{uri}/ray/{population}")
    assert all(kept.values()), kept

    fresh = tmp_path / "elsewhere"
    fresh.mkdir()
    monkeypatch.chdir(fresh)
    capfd.readouterr()
    assert main(["sweep", f"resume={uri}"]) == 0
    out, err = capfd.readouterr()
    status = trial_status(uri)
    assert set(status.values()) == {"TERMINATED"} and len(status) == 2, status
    [other] = set(status) - finished
    [rest] = members_of(uri)[other]
    # The unfinished trial continued from its checkpoint on S3; the finished one never ran.
    resumed = re.findall(rf"\[train\] population {other}: resumed at step (\d+)", out + err)
    assert resumed and int(resumed[0]) >= 40, (out + err)[-3000:]
    for part in ("models", "tensorboard"):
        assert _objects(f"{uri}/{part}/{done}") == kept[part], part
    assert _objects(f"{uri}/ray/{population}") == kept["ray"]
    assert storage.list_names(f"{uri}/models") == sorted([done, rest])
    results = storage.read_text(f"{uri}/results.csv")
    assert done in results and rest in results  # the report covers both trials
    assert storage.exists(f"{uri}/report.md")
    assert list(fresh.iterdir()) == []
    # Everything a sweep writes reached the URI: Tune's state, Train's checkpoints, each
    # trial's model and TensorBoard files (uploaded from wherever it ran), the report.
    fs, path = storage.fsspec_fs(uri)
    files = {p.removeprefix(path + "/") for p in fs.find(path)}
    for name in ("config.yaml", "results.csv", "report.md", "pareto_i2t_r1.png"):
        assert name in files, name
    for trial, pop in ((done, population), (rest, other)):
        assert f"models/{trial}/model.safetensors" in files
        board = [f for f in files if f.startswith(f"tensorboard/{trial}/events.out.tfevents")]
        assert len(board) >= 2  # the worker's training curves and the trial's HParams session
        assert any(f.startswith(f"ray/{pop}/checkpoint_") for f in files)
    assert any(f.startswith("tune/experiment_state") for f in files)
    assert main(args) == 2  # a new sweep never silently reuses a finished sweep's prefix


def test_a_local_out_on_one_node_with_cpus_is_accepted(ray_cluster, tmp_path) -> None:
    """`make run`'s case, read from a real Ray's node table: one node, this driver's, with
    CPUs (a cluster of several nodes or a CPU-less head is refused: test_rundir.py)."""
    assert rundir._cluster_shape() == (1, 2.0)
    rundir.check_local_out(config.load(None, []), tmp_path / "run", "run")
