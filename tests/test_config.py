from __future__ import annotations

import pytest

from raysys import config
from raysys.errors import ConfigError


def test_defaults_are_the_embedded_pipeline() -> None:
    cfg = config.load()
    assert cfg.corpus.name == "synthetic" and cfg.corpus.size == 2000
    assert cfg.extract.vision == "efficientnet-lite0" and cfg.extract.text == "minilm-l6"
    assert cfg.objectives == ["con", "negcon", "spread"]
    assert cfg.train.hidden == [512, 512, 512] and cfg.train.latent == 256


def test_overrides_are_typed() -> None:
    cfg = config.load(
        None,
        [
            "corpus.size=500",
            "train.epochs=3",
            "train.hidden=64,32",
            "train.lr=2e-3",
            "train.learn_logit_scale=true",
            "objectives=[con, spread]",
        ],
    )
    assert cfg.corpus.size == 500 and cfg.train.epochs == 3
    assert cfg.train.hidden == [64, 32] and cfg.train.lr == pytest.approx(2e-3)
    assert cfg.train.learn_logit_scale is True and cfg.objectives == ["con", "spread"]


def test_yaml_file_then_overrides(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("corpus:\n  size: 300\ntrain:\n  epochs: 7\n  objective: negcon\n")
    cfg = config.load(path, ["train.epochs=2"])
    assert (cfg.corpus.size, cfg.train.epochs, cfg.train.objective) == (300, 2, "negcon")


def test_unknown_key_names_the_valid_keys() -> None:
    with pytest.raises(ConfigError, match="unknown config key 'train.epoch'") as err:
        config.load(None, ["train.epoch=3"])
    assert "train.epochs" in str(err.value) and "corpus.size" in str(err.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochs=three", "expects a number"),
        ("train.epochs=2.5", "whole number"),
        ("train.use_gpu=maybe", "true or false"),
        ("train.objective=clip", "unknown objective 'clip'"),
        ("train.alpha=1.5", r"must lie in \[0, 1\]"),
        ("train.batch_size=255", "divide evenly"),
        ("corpus.size", "key=value"),
        ("train=3", "is a section"),
        ("objectives=", "objectives is empty"),
        ("extract.vision=null", "expects a string"),
        ("train.data_shards=3", "multiple of train.num_workers=2"),
        ("train.data_shards=-2", "train.data_shards=-2 must be"),
        ("train.data_on_device=gpu", "must be auto, true, false or stream"),
        ("train.data_shards=128", "more than the 64 buckets"),
        ("corpus.index_job=spark", "must be auto, ray or local"),
        ("train.dropout=1", r"train.dropout=1.0 must lie in \[0, 1\)"),
        ("sweep.population=-1", r"sweep.population=-1 must be >= 0 \(0: sized by cores[^)]*\)$"),
        ("sweep.gpu_memory_gib=0", "sweep.gpu_memory_gib=0.0 must be > 0"),
    ],
)
def test_bad_values_fail_clearly(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.load(None, [override])


def test_shard_and_device_choices() -> None:
    cfg = config.load(None, ["train.data_shards=4", "train.data_on_device=true"])
    assert (cfg.train.data_shards, cfg.train.data_on_device) == (4, "true")
    assert config.load(None, ["train.data_on_device=false"]).train.data_on_device == "false"


def test_missing_or_bad_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        config.load(bad)


def test_round_trip_through_dict_and_yaml(tmp_path) -> None:
    cfg = config.load(None, ["train.hidden=128,64", "ray.num_cpus=2", "train.k=3"])
    assert config.from_dict(config.to_dict(cfg)) == cfg
    config.dump(cfg, tmp_path / "config.yaml")
    assert config.load(tmp_path / "config.yaml") == cfg


def test_integral_floats_are_accepted_for_ints() -> None:
    assert config.load(None, ["train.epochs=1e1"]).train.epochs == 10


@pytest.mark.parametrize(
    ("extra", "pinned"),
    [({}, True), ({"RAY_ADDRESS": "127.0.0.1:6379"}, False), ({"RAY_RAYLET_PID": "1"}, False)],
)
def test_loopback_settings_only_for_a_private_ray(extra: dict[str, str], pinned: bool) -> None:
    """Only a process that starts its own Ray pins Ray and gloo to loopback: a job driver on
    a cluster (RAY_ADDRESS) and a Ray worker on any node (RAY_RAYLET_PID) keep their node's
    environment, or DDP across nodes would try to talk over `lo`."""
    import os
    import subprocess
    import sys

    keep = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "GLOO_"))}
    code = "import os, raysys; print(os.environ.get('GLOO_SOCKET_IFNAME', '-'))"
    out = subprocess.run(
        [sys.executable, "-c", code], env=keep | extra, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == ("lo" if pinned else "-")


def test_spread_defaults_are_the_authors_context_variant_everywhere() -> None:
    """α = 0.5 would make Spread a re-weighted NegCon; the config and the loss agree on 0.7/8."""
    import inspect

    from raysys.jam import losses

    train = config.load().train
    params = inspect.signature(losses.spread).parameters
    assert (train.alpha, train.k) == (0.7, 8)
    assert (params["alpha"].default, params["k"].default) == (train.alpha, train.k)


def test_paper_objectives_sweeps_spread_and_cross_reconstruction() -> None:
    from pathlib import Path

    from raysys.sweep.plan import param_grid

    cfg = config.load(str(Path(__file__).parents[1] / "jobs" / "paper-objectives.yaml"))
    grids = {objective: param_grid(cfg, objective) for objective in cfg.objectives}
    spread = {
        (p["train.alpha"], p["train.k"], p["train.cross_reconstruction"]) for p in grids["spread"]
    }
    assert spread == {(a, k, c) for a in (0.5, 0.7, 0.9) for k in (0, 8) for c in (False, True)}
    for objective in ("con", "negcon"):
        assert grids[objective] == [
            {"train.cross_reconstruction": False},
            {"train.cross_reconstruction": True},
        ]
