"""Checks that need no data run before Ray starts or anything is extracted."""

from __future__ import annotations

import re

import pytest

from raysys import commands
from raysys.cli import main


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
