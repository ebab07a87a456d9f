"""Shared fixtures: one real local Ray for the whole test run, kept on 127.0.0.1.

Starting Ray costs seconds; every test that needs it shares this instance.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import raysys  # noqa: E402,F401  (sets Ray's loopback-only environment before ray is imported)


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

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
