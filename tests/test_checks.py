"""Checks that need no data run before Ray starts or anything is extracted."""

from __future__ import annotations

import re

import pytest

from raysys import commands, config
from raysys.checks import check_sweep_gpus, check_whole_gpus
from raysys.cli import main
from raysys.errors import ConfigError


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if a command gets as far as starting Ray or extracting."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("the command reached Ray or extraction before its checks")

    monkeypatch.setattr(commands, "init_ray", refuse)
    monkeypatch.setattr(commands, "extract", refuse)
    monkeypatch.setattr(commands, "prepare", refuse)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["train", "train.vision_layer=99"], "train.vision_layer=99 is out of range"),
        (["train", "train.text_layer=-8"], "train.text_layer=-8 is out of range"),
        (["train", "extract.vision_layers=0,8", "train.vision_layer=2"], "caches 2 layers"),
        (["train", "train.best_metric=val/nope"], "not a validation metric"),
        (["train", "extract.vision=hf:/no/such/model"], "no/such/model"),
        (["sweep", "sweep.layers=0.5:1.5"], "relative depth in \\(0, 1\\]"),
        (["sweep", "sweep.models=efficientnet-lite9+minilm-l6"], "efficientnet-lite9"),
        (["run", "sweep.layers=40:3"], "out of range"),
        (["run", "corpus.name=coco"], "unknown corpus 'coco'; available: synthetic"),
        (["train", "corpus.name=coco"], "unknown corpus 'coco'"),
        (
            ["sweep", "train.use_gpu=true", "sweep.workers_per_trial=2"],
            "Duplicate GPU detected.*sweep.trials_per_gpu=1",
        ),
        (
            ["run", "train.use_gpu=true", "sweep.workers_per_trial=2", "sweep.trials_per_gpu=2"],
            "0.5 of a GPU",
        ),
    ],
)
def test_data_free_checks_fail_before_ray_and_extraction(
    no_ray, tmp_path, capsys, args: list[str], match: str
) -> None:
    out = tmp_path / "run"
    cache = tmp_path / "cache"
    code = main([*args, "--out", str(out), f"extract.cache_dir={cache}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert re.search(match, err), err
    assert not cache.exists()  # nothing was extracted
    assert not (out / "config.yaml").exists()  # no run directory was made for a bad config


def test_ranks_of_one_run_never_share_a_gpu() -> None:
    """NCCL refuses two ranks on one device; Ray puts fractional-GPU workers on one GPU."""
    check_whole_gpus(1, 0.25, "one packed worker", "-")  # one rank may hold a fraction
    check_whole_gpus(4, 1.0, "whole GPUs", "-")
    check_whole_gpus(4, 2.0, "two GPUs each", "-")
    check_whole_gpus(4, 0.0, "CPU workers", "-")
    for gpus in (0.5, 0.25, 1.5):
        with pytest.raises(ConfigError, match="may put two ranks of one run on the same GPU"):
            check_whole_gpus(2, gpus, "a plan", "use whole GPUs")


@pytest.mark.parametrize(
    ("overrides", "refused"),
    [
        (["sweep.workers_per_trial=2"], True),  # trials_per_gpu=4 by default
        (["sweep.workers_per_trial=2", "sweep.trials_per_gpu=1"], False),
        (["sweep.workers_per_trial=1", "sweep.trials_per_gpu=8"], False),
    ],
)
def test_a_gpu_sweep_gives_a_multi_worker_trial_whole_gpus(
    overrides: list[str], refused: bool
) -> None:
    cfg = config.load(None, ["train.use_gpu=true", *overrides])
    if refused:
        with pytest.raises(ConfigError, match="sweep.workers_per_trial=1"):
            check_sweep_gpus(cfg)
    else:
        check_sweep_gpus(cfg)
    check_sweep_gpus(config.load(None, overrides))  # CPU trials share no GPU
