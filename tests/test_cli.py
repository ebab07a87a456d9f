from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

from raysys import config
from raysys.cli import main
from raysys.report.report import read_results, write_results
from raysys.report.schema import RESULT_COLUMNS


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "raysys.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_help_explains_commands_and_overrides() -> None:
    top = _run("--help")
    assert top.returncode == 0
    for command in ("run", "extract", "train", "report"):
        assert command in top.stdout
    run = _run("run", "--help")
    assert run.returncode == 0
    assert "--out" in run.stdout and "key=value" in run.stdout
    assert "corpus.size=500" in run.stdout


def test_bad_key_exits_2_with_the_valid_keys(capsys) -> None:
    assert main(["run", "corpus.sise=500"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'corpus.sise'" in err and "corpus.size" in err


def test_show_config_resolves_overrides(capsys) -> None:
    assert main(["run", "--show-config", "corpus.size=500", "train.epochs=3"]) == 0
    out = capsys.readouterr().out
    assert "size: 500" in out and "epochs: 3" in out
    # `run` is a small sweep: two Lite scales against MiniLM, half and full depth.
    assert "- efficientnet-lite1+minilm-l6" in out and "- 0.5:0.5" in out


def test_run_sweep_defaults_yield_to_the_users_choice(tmp_path) -> None:
    from raysys.config import run_defaults

    def run(*overrides: str, path=None) -> config.Config:
        return run_defaults(config.load(path, overrides), config.given_keys(path, overrides))

    cfg = run()
    assert len(cfg.sweep.models) == 2 and cfg.sweep.layers == ["0.5:0.5", "1.0:1.0"]
    assert cfg.train.hidden == [512, 512, 512]  # the default JAM: populations make it fit
    mine = run("extract.vision=efficientnet-lite2", "train.hidden=256,256")
    assert mine.sweep.models == [] and mine.sweep.layers == ["0.5:0.5", "1.0:1.0"]
    assert mine.train.hidden == [256, 256]
    layer = run("train.vision_layer=3")
    assert layer.sweep.layers == [] and len(layer.sweep.models) == 2
    path = tmp_path / "run.yaml"
    path.write_text("sweep:\n  vision_depths: [0.5]\n  text_depths: [1.0]\n")
    assert run(path=path).sweep.layers == []


def test_overrides_may_follow_options_but_stray_words_fail(capsys) -> None:
    args = ["bench", "train", "train.epochs=4", "--show-config", "--out", "x", "corpus.size=300"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "size: 300" in out and "epochs: 4" in out
    with pytest.raises(SystemExit):
        main(["bench", "train", "--show-config", "oops"])
    assert "unrecognized arguments: oops" in capsys.readouterr().err


def test_report_rebuilds_from_results_csv(tmp_path, capsys) -> None:
    rows = [
        {
            "objective": "raw",
            "vision": "v",
            "text": "t",
            "vision_layer": 3,
            "text_layer": 2,
            "mutual_knn": 0.25,
        },
        {
            "objective": "con",
            "vision": "v",
            "text": "t",
            "vision_layer": 3,
            "text_layer": 2,
            "mutual_knn": 0.5,
            "i2t_r1": 0.75,
            "recon_mse": 0.1,
            "train_s": 12.0,
        },
    ]
    write_results(tmp_path, rows)
    with (tmp_path / "results.csv").open() as f:
        header = next(csv.reader(f))
    assert header[: len(RESULT_COLUMNS)] == RESULT_COLUMNS and "train_s" in header
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| con" in out and "0.750" in out
    report = (tmp_path / "report.md").read_text()
    assert "0.500" in report and "tensorboard --logdir" in report
    assert read_results(tmp_path)[0]["i2t_r1"] == ""  # raw row: no shared space, left blank


def test_report_on_a_directory_without_results(tmp_path, capsys) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "no results.csv" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["run", "train", "extract"])
def test_every_pipeline_command_takes_out_and_config(command: str) -> None:
    out = _run(command, "--help").stdout
    assert "--config" in out and "--out" in out


def test_too_small_splits_fail_before_training() -> None:
    from raysys import config
    from raysys.checks import check_split_sizes
    from raysys.errors import ConfigError

    cfg = config.load(None, ["train.batch_size=64"])
    check_split_sizes(cfg, {"train": 64, "val": 4, "test": 4})
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        check_split_sizes(cfg, {"train": 63, "val": 10, "test": 10})
    with pytest.raises(ConfigError, match="the test split has 3 pairs"):
        check_split_sizes(cfg, {"train": 100, "val": 10, "test": 3})
    # A sweep's swept batch sizes replace the base one (64 here, which no trial trains with).
    check_split_sizes(cfg, {"train": 32, "val": 4, "test": 4}, [16, 32])
    key = r"global batch of 128 \(sweep.params.train.batch_size=\[16, 128\]\); lower sweep"
    with pytest.raises(ConfigError, match=key):
        check_split_sizes(cfg, {"train": 100, "val": 10, "test": 10}, [16, 128])


def test_best_metric_must_be_a_reported_validation_metric() -> None:
    from raysys import config
    from raysys.checks import check_best_metric
    from raysys.errors import ConfigError

    check_best_metric(config.load(None, ["train.best_metric=val/recon_mse"]))
    check_best_metric(config.load(None, ["eval.retrieval_ks=1,3", "train.best_metric=val/t2i_r3"]))
    with pytest.raises(ConfigError, match="not a validation metric.*val/mutual_knn"):
        check_best_metric(config.load(None, ["train.best_metric=val/accuracy"]))


def test_a_sweep_names_its_objectives_not_train_objective(capsys) -> None:
    assert main(["sweep", "train.objective=spread"]) == 2
    assert "set objectives=spread instead" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["run", "sweep"])
def test_a_written_config_repeats_the_run(command, tmp_path, capsys) -> None:
    """A run's config.yaml holds every key, train.objective at its default among them; given
    back with --config it resolves to the same config. A file that sets another objective
    is still refused: run and sweep would ignore it."""
    assert main([command, "--show-config", "corpus.size=500", "objectives=con,spread"]) == 0
    written = capsys.readouterr().out
    path = tmp_path / "config.yaml"
    path.write_text(written)  # what `config.dump` writes into every run directory
    assert main([command, "--show-config", "--config", str(path)]) == 0
    assert capsys.readouterr().out == written
    path.write_text(written.replace("objective: con", "objective: spread"))
    assert main([command, "--show-config", "--config", str(path)]) == 2
    assert "set objectives=spread instead" in capsys.readouterr().err


def test_a_resumed_sweep_takes_only_ray_overrides(tmp_path, capsys) -> None:
    """Its finished trials were trained and scored with its config and the report compares
    them: a changed corpus, objective or train setting is refused before any work (it used
    to pass silently, the unfinished trials then training on another cache), as is a
    --config file, which a resume would not apply."""
    run = tmp_path / "sweep"
    run.mkdir()
    config.dump(config.load(None, ["corpus.size=80"]), run / "config.yaml")
    for command in ("sweep", "run"):
        for change in ("corpus.limit=50", "objectives=con,negcon", "train.epochs=9"):
            assert main([command, f"resume={run}", change, "--show-config"]) == 2
            err = capsys.readouterr().err
            assert "a resumed sweep keeps the config it started with" in err and change in err
    assert main(["sweep", f"resume={run}", "ray.scale_timeout_s=5", "--show-config"]) == 0
    assert "size: 80" in capsys.readouterr().out
    # How a split is read may be given (a resumed population must read it as it did).
    assert main(["sweep", f"resume={run}", "train.data_on_device=stream", "--show-config"]) == 0
    assert "data_on_device: stream" in capsys.readouterr().out
    assert main(["train", f"resume={run}", "train.epochs=9", "--show-config"]) == 0  # more epochs
    assert "epochs: 9" in capsys.readouterr().out
    path = tmp_path / "mine.yaml"
    path.write_text("train:\n  epochs: 3\n")
    assert main(["train", f"resume={run}", "--config", str(path), "--show-config"]) == 2
    assert "would not be applied" in capsys.readouterr().err


def test_a_malformed_override_is_an_error_not_a_traceback(capsys) -> None:
    for item in ("train.lr=[1,", 'name="x'):
        assert main(["run", "--show-config", item]) == 2
        err = capsys.readouterr().err
        assert f"override {item!r}: its value is not valid YAML" in err, err


def test_ctrl_c_outside_a_sweep_exits_130_without_a_traceback(monkeypatch, capsys) -> None:
    """A process killed by a re-raised SIGINT returns -2 to its caller, not 130."""
    import raysys.cli as cli

    def interrupted(inv) -> None:
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.DISPATCH, "extract", interrupted)
    assert main(["extract", "corpus.size=50"]) == 130
    assert capsys.readouterr().err == "raysys: interrupted\n"


def test_ray_address_local_is_the_private_loopback_ray(monkeypatch) -> None:
    """Ray reads RAY_ADDRESS=local as "start a new local Ray": raysys's own, kept on
    loopback and stopped at exit, not a cluster it joined."""
    from raysys import runtime

    monkeypatch.setenv("RAY_ADDRESS", "local")
    runtime.loopback_env()
    assert "RAY_ADDRESS" not in os.environ
    assert os.environ["GLOO_SOCKET_IFNAME"] == "lo"
