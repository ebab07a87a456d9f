"""Cluster configs checked by Ray's own validator, and the job configs resolved (no Ray is
started; real `ray job submit` runs against a real Ray head: tests/test_cluster_ray.py)."""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_CONFIGS = sorted((ROOT / "cluster").glob("*.yaml"))


def test_there_are_cluster_configs_for_aws_gcp_and_on_premises() -> None:
    names = {p.name for p in CLUSTER_CONFIGS}
    assert {"gpu.yaml", "gcp-gpu.yaml", "local.yaml"} <= names


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=lambda p: p.name)
def test_cluster_config_passes_rays_validator(path: Path) -> None:
    """What `ray up` runs first: fill in the provider's defaults, then the JSON schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(path.read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    broken = copy.deepcopy(config)  # the validator is live: a misspelt key fails
    broken["max_worker"] = broken.pop("max_workers", 2)
    with pytest.raises(Exception, match="'max_worker' was unexpected"):
        validate_config(prepare_config(broken))


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=lambda p: p.name)
def test_cluster_config_keeps_the_dashboard_private(path: Path) -> None:
    config = yaml.safe_load(path.read_text())
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head  # reached through `ray dashboard` (SSH)
    text = path.read_text()
    assert "RAY_AUTH_MODE=disabled" not in text  # token authentication stays on
    assert "--env=RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    assert "0.0.0.0" not in text
    image = config["docker"]["image"]
    assert re.fullmatch(r"ghcr\.io/raysys/raysys:\d+\.\d+\.\d+-ray\d+\.\d+\.\d+-gpu", image)


def test_aws_opens_only_ssh_to_one_range_and_uses_an_instance_profile() -> None:
    config = yaml.safe_load((ROOT / "cluster" / "gpu.yaml").read_text())
    (rule,) = config["provider"]["security_group"]["IpPermissions"]
    assert (rule["FromPort"], rule["ToPort"], rule["IpProtocol"]) == (22, 22, "tcp")
    assert [r["CidrIp"] for r in rule["IpRanges"]] != ["0.0.0.0/0"]
    types = config["available_node_types"]
    for name, node in types.items():
        assert node["node_config"]["IamInstanceProfile"]["Name"], name  # S3 without keys
    assert any(n["node_config"].get("InstanceMarketOptions") for n in types.values())  # spot
    assert any(  # an on-demand type of the same shape as each spot one: the fallback
        not n["node_config"].get("InstanceMarketOptions")
        and n["node_config"]["InstanceType"] == s["node_config"]["InstanceType"]
        for s in types.values()
        if s["node_config"].get("InstanceMarketOptions")
        for n in types.values()
    )
    text = (ROOT / "cluster" / "gpu.yaml").read_text()
    assert "aws_secret_access_key" not in text.lower() and "AKIA" not in text


def test_gcp_gpu_nodes_terminate_on_host_maintenance() -> None:
    config = yaml.safe_load((ROOT / "cluster" / "gcp-gpu.yaml").read_text())
    gpu_nodes = [
        n["node_config"]
        for n in config["available_node_types"].values()
        if n["node_config"].get("guestAccelerators")
    ]
    assert gpu_nodes
    for node in gpu_nodes:
        scheduling = {k: v for item in node["scheduling"] for k, v in item.items()}
        assert scheduling["onHostMaintenance"] == "TERMINATE"


AXES = ("objectives", "depth", "scale")


@pytest.mark.parametrize("path", sorted((ROOT / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_job_configs_resolve(path: Path) -> None:
    """Every key is a real config key with a valid value, and the backbone names parse
    (models and corpus are not downloaded)."""
    from raysys import config
    from raysys.backbones import configured_backbone
    from raysys.sweep.plan import layer_pairs, model_pairs, param_grid

    cfg = config.load(path)
    assert cfg.corpus.path.startswith("s3://") and cfg.extract.cache_dir.startswith("s3://")
    for vision, text in model_pairs(cfg):  # the extract pair when the job names no models
        pair = dataclasses.replace(cfg.extract, vision=vision, text=text)
        for modality in ("image", "text"):
            assert configured_backbone(pair, modality).modality == modality
    assert layer_pairs(cfg)
    for objective in cfg.objectives:
        assert param_grid(cfg, objective)


def test_the_paper_jobs_sweep_the_three_axes() -> None:
    from raysys import config
    from raysys.sweep.plan import layer_pairs, model_pairs, param_grid

    jobs = {name: config.load(ROOT / "jobs" / f"paper-{name}.yaml") for name in AXES}
    assert set(jobs["objectives"].objectives) == {"con", "negcon", "spread"}
    assert len(param_grid(jobs["objectives"], "spread")) > len(
        param_grid(jobs["objectives"], "con")
    )
    assert len(layer_pairs(jobs["depth"])) == 16
    scale = model_pairs(jobs["scale"])
    assert len({v for v, _ in scale}) == 4 and len({t for _, t in scale}) == 3
    assert all(v.startswith("hf:facebook/dinov2-") for v, _ in scale)
    for cfg in jobs.values():  # trials pack onto GPUs
        assert cfg.train.use_gpu
