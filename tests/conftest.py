"""Shared fixtures: one real local Ray for the whole test run, kept on 127.0.0.1.

Starting Ray costs seconds; every test that needs it shares this instance.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import raysys  # noqa: E402,F401  (sets Ray's loopback-only environment before ray is imported)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto) on 127.0.0.1 for the whole run."""
    from s3server import moto_server

    with moto_server() as server:
        yield server


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    import ray

    # Before Ray starts, so its workers inherit the test endpoint and credentials.
    os.environ.update(s3_server.env)
    from raysys.config import RayConfig
    from raysys.runtime import init_ray

    init_ray(RayConfig(num_cpus=2))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def small_cache(ray_cluster, tmp_path_factory):
    """A finished extraction of a small synthetic corpus, shared by the tests that read it."""
    from raysys import config
    from raysys.extract import extract

    cache_dir = tmp_path_factory.mktemp("cache")
    cfg = config.load(None, ["corpus.size=60", f"extract.cache_dir={cache_dir}"])
    return cfg, extract(cfg)
