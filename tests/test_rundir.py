"""Run directories without Ray: a resumed run's config read from S3 (moto on 127.0.0.1), a
resumed s3:// run opened from a fresh directory, and the refusal of a local --out on a cluster
whose work runs on other nodes."""

from __future__ import annotations

import pytest

from raysys import config, storage
from raysys.errors import ConfigError, RaysysError
from raysys.rundir import CONFIG_FILE, local_out_refusal, open_run, resumed_config


@pytest.fixture
def s3(s3_server, monkeypatch):
    s3_server.patch_env(monkeypatch)
    return s3_server


def _saved_run(tmp_path, uri: str) -> None:
    saved = config.load(None, ["train.epochs=3", "train.hidden=64", "corpus.size=80"])
    config.dump(saved, tmp_path / CONFIG_FILE)
    storage.upload_file(tmp_path / CONFIG_FILE, storage.join(uri, CONFIG_FILE))


def test_resumed_config_is_read_from_the_uri(s3, tmp_path) -> None:
    uri = f"{s3.make_bucket('resume-cfg')}/run1"
    _saved_run(tmp_path, uri)
    overrides = [f"resume={uri}", "train.epochs=5"]
    cfg, out = resumed_config(config.load(None, overrides), overrides)
    assert out == uri  # a URI stays a str (pathlib would turn s3:// into s3:/)
    assert (cfg.train.epochs, cfg.train.hidden, cfg.corpus.size) == (5, [64], 80)


def test_resuming_a_uri_without_a_run_names_it(s3) -> None:
    uri = f"{s3.make_bucket('resume-none')}/nothing"
    storage.write_text(f"{uri}/other.txt", "x")
    overrides = [f"resume={uri}"]
    with pytest.raises(ConfigError, match=f"{uri}.*no {CONFIG_FILE}"):
        resumed_config(config.load(None, overrides), overrides)


def test_a_resumed_uri_run_is_staged_in_a_fresh_directory(s3, tmp_path, monkeypatch) -> None:
    """From another machine: nothing local is needed, the finished files on S3 are kept and
    the marker that refuses a new run to the same URI does not refuse its resume."""
    uri = f"{s3.make_bucket('resume-open')}/run1"
    _saved_run(tmp_path, uri)
    storage.write_text(f"{uri}/results.csv", "old")
    monkeypatch.chdir(tmp_path)
    cfg = config.load(None, [])
    with pytest.raises(ConfigError, match="already holds a run"):
        open_run(cfg, uri, resume=False)
    run = open_run(cfg, uri, resume=True)
    assert (run.uri, run.root) == (uri, uri)
    assert run.local.is_dir() and not any(run.local.iterdir())  # the config stays as saved
    (run.local / "report.md").write_text("new")
    run.finish()
    assert storage.read_text(f"{uri}/results.csv") == "old"
    assert storage.read_text(f"{uri}/report.md") == "new"
    assert "train:" in storage.read_text(f"{uri}/{CONFIG_FILE}")


def test_a_new_uri_run_holds_its_config_before_any_work(s3) -> None:
    """A driver lost mid-run (a killed job, a lost head) leaves a run that `resume=` finds."""
    uri = f"{s3.make_bucket('resume-early')}/run1"
    run = open_run(config.load(None, ["train.epochs=7"]), uri, resume=False)
    cfg, out = resumed_config(config.load(None, [f"resume={uri}"]), [f"resume={uri}"])
    assert (out, cfg.train.epochs) == (uri, 7)
    run.finish()


def test_local_out_is_refused_where_the_work_runs_on_other_nodes() -> None:
    assert local_out_refusal("runs/x", "run", nodes=1, driver_cpus=2.0) is None  # make run
    several = local_out_refusal("runs/x", "sweep", nodes=2, driver_cpus=4.0)
    assert "'runs/x'" in several and "2 nodes" in several and "this sweep" in several
    headless = local_out_refusal("runs/x", "run", nodes=1, driver_cpus=0.0)  # gpu.yaml's head
    assert "no CPUs" in headless
    for refusal in (several, headless):
        assert refusal.endswith("--out s3://BUCKET/PREFIX")


def test_a_local_run_without_a_cluster_asks_no_ray(monkeypatch, tmp_path) -> None:
    """No RAY_ADDRESS: the private Ray raysys starts is this machine, nothing to ask (this
    file's conftest guard fails the test if Ray were started here; a Ray the session already
    runs is one node with CPUs, also accepted)."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    run = open_run(config.load(None, []), tmp_path / "run", resume=False)
    assert (run.local / CONFIG_FILE).is_file() and run.uri is None


def test_a_stopped_uri_run_is_not_reused_by_a_new_one(s3, tmp_path, monkeypatch) -> None:
    """A run stopped with Ctrl-C leaves its config and checkpoints but no results.csv: a new
    run to that URI overwrote its config and Ray Train resumed the old checkpoints."""
    uri = f"{s3.make_bucket('stopped-run')}/run1"
    _saved_run(tmp_path, uri)
    monkeypatch.chdir(tmp_path)
    # Stopped before training (while extracting): only its config; a rerun starts afresh.
    assert open_run(config.load(None, ["train.epochs=4"]), uri, resume=False).uri == uri
    assert "epochs: 4" in storage.read_text(f"{uri}/{CONFIG_FILE}")
    storage.write_text(f"{uri}/ray/con/checkpoint_000001/state.pt", "x")
    with pytest.raises(ConfigError, match=r"already holds a run \(ray\).*resume="):
        open_run(config.load(None, []), uri, resume=False)
    assert "epochs: 4" in storage.read_text(f"{uri}/{CONFIG_FILE}")  # not overwritten
    assert open_run(config.load(None, []), uri, resume=True).uri == uri


def test_a_failed_upload_never_looks_finished(s3, tmp_path, monkeypatch) -> None:
    """results.csv, the mark of a finished run, goes up last: when another file fails, the
    URI holds no results.csv, and the staged copy is kept and named."""
    uri = f"{s3.make_bucket('half-upload')}/run1"
    monkeypatch.chdir(tmp_path)
    run = open_run(config.load(None, []), uri, resume=False)
    (run.local / "results.csv").write_text("objective\ncon\n")
    (run.local / "models" / "con").mkdir(parents=True)
    (run.local / "models" / "con" / "model.safetensors").symlink_to(tmp_path / "gone")
    with pytest.raises(RaysysError, match=f"files are kept in '{run.local}'"):
        run.finish()
    assert not storage.exists(f"{uri}/results.csv") and (run.local / "results.csv").is_file()
    (run.local / "models" / "con" / "model.safetensors").unlink()
    run.finish()
    assert storage.read_text(f"{uri}/results.csv") == "objective\ncon\n"
