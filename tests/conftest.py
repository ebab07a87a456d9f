"""Shared fixtures, and the one rule of the suite's layout.

Tests that start Ray live in ``tests/test_<module>_ray.py``; every other test lives in
``tests/test_<module>.py`` and starts no Ray. The ``slow`` marker follows the file: every test
collected from a ``*_ray.py`` file is marked here, so ``pytest -m "not slow"`` runs exactly
the fast files. The rule is enforced, not just documented: a test outside a ``_ray.py`` file
that asks for ``ray_cluster`` (itself, or through ``small_cache`` or any fixture built on it)
errors before anything starts, and in those files ``ray.init`` and raysys's ``init_ray`` fail
the test that calls them.

Ray, for the tests that need it, is one real local instance for the whole run, kept on
127.0.0.1: starting Ray costs seconds, so they all share it. The S3 server (moto) starts only
for tests that use S3, on a port reserved before Ray starts, so that Ray's workers inherit its
endpoint and credentials whether or not it ever runs. Ray's workers run at the suite's own
priority (`RAY_worker_niceness=0`, below), not Ray's lower default.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Ray starts its workers at niceness 15, so on a shared box any normal-priority load starves
# them (2026-12-01, two busy loops on the 2 cores: the autoscaler test's setup went from 50 s
# to over 3.5 min and had not finished; with 0, 120 s). Every Ray the suite starts (the
# session's, each command's private one, the harnesses' clusters) inherits this.
os.environ.setdefault("RAY_worker_niceness", "0")
import raysys  # noqa: E402,F401  (sets Ray's loopback-only environment before ray is imported)

RULE = (
    "tests that start Ray (ray_cluster, small_cache, extract/run_pass, Ray Data, the run/"
    "train/sweep/extract/bench commands, `ray start`) live in tests/test_<module>_ray.py; "
    "tests/test_<module>.py files start no Ray (see tests/conftest.py)"
)


def may_start_ray(path: Path) -> bool:
    """Whether the tests in the file at `path` may start Ray: its name ends in `_ray.py`."""
    return path.name.endswith("_ray.py")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The `slow` marker follows the file: every test in a `*_ray.py` file, and no other."""
    for item in items:
        if may_start_ray(item.path):
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's: `pytest -n 2` (`make test-fast`)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under pytest-xdist, one process runs every `_ray.py` test, in order, on the session's
    one Ray, and the others the tests that start no Ray. (A session Ray in each process
    would share nothing and starve the others.) xdist's own `--dist loadgroup` cannot say
    this under pytest 9.2: it renames `item._nodeid`, which pytest no longer reads, so its
    groups are silently ignored (both processes started a Ray when tried)."""
    from xdist.scheduler import LoadScopeScheduling

    class RayTestsTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "ray" if may_start_ray(Path(nodeid.split("::", 1)[0])) else nodeid

    return RayTestsTogether(config, log)


@pytest.hookimpl(tryfirst=True)  # before any fixture is set up: a refused test starts nothing
def pytest_runtest_setup(item: pytest.Item) -> None:
    """`ray_cluster` refuses a test outside a `_ray.py` file.

    Checked here rather than in the fixture's body: the fixture is session-scoped, so its body
    runs once, for whichever test asks first, and sees no test at all. `fixturenames` is the
    test's whole fixture closure, so `small_cache` and module fixtures built on `ray_cluster`
    are refused too.
    """
    if "ray_cluster" in getattr(item, "fixturenames", ()) and not may_start_ray(item.path):
        pytest.fail(
            f"{item.nodeid} uses the ray_cluster fixture (it starts Ray) outside a _ray.py "
            f"file: {RULE}",
            pytrace=False,
        )


def _raysys_modules() -> list[ModuleType]:
    return [m for n, m in list(sys.modules.items()) if n.partition(".")[0] == "raysys"]


@pytest.fixture(autouse=True)
def _fast_files_start_no_ray(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """In a file not named `*_ray.py`, starting Ray fails the test.

    `ray.init` is replaced (Ray's auto-init, as in Ray Data or `ray.get`, calls it too), and so
    is `raysys.runtime.init_ray` wherever a raysys module holds it by name
    (`raysys.commands.init_ray`, `raysys.train.driver.init_ray`; `raysys.extract` and the bench
    modules look it up on `raysys.runtime` when called). Importing Ray's package is fine; only
    starting it is refused.
    """
    if may_start_ray(request.node.path):
        yield
        return
    import ray

    from raysys import runtime

    where = request.node.nodeid

    def refusing(what: str) -> Callable[..., Any]:
        def refuse(*_args: Any, **_kwargs: Any) -> Any:
            pytest.fail(f"{where} reached {what}, which starts Ray: {RULE}")

        return refuse

    real = {"ray.init": ray.init, "init_ray": runtime.init_ray}
    stubs = {name: refusing(name) for name in real}
    monkeypatch.setattr(ray, "init", stubs["ray.init"])
    for module in _raysys_modules():
        for attr, value in list(vars(module).items()):
            if value is real["init_ray"]:
                monkeypatch.setattr(module, attr, stubs["init_ray"])
    yield
    # A raysys module first imported during the test bound a stub by name (`from
    # raysys.runtime import init_ray`); monkeypatch does not know it: give it the real one.
    for module in _raysys_modules():
        for attr, value in list(vars(module).items()):
            for name, stub in stubs.items():
                if value is stub:
                    setattr(module, attr, real[name])


@pytest.fixture(scope="session")
def s3_port() -> Iterator[Any]:
    """The 127.0.0.1 port the S3 server listens on if a test asks for it: reserved (bound, not
    listening) for the whole run, so its endpoint can be fixed before Ray starts."""
    from s3server import ReservedPort

    port = ReservedPort()
    yield port
    port.release()


@pytest.fixture(scope="session")
def s3_server(s3_port):
    """A real S3-compatible server (moto) on 127.0.0.1, started by the first test that asks
    for it and kept for the rest of the run, on the port whose endpoint Ray's workers got."""
    from s3server import moto_server

    with moto_server(port=s3_port) as server:
        yield server


@pytest.fixture(scope="session")
def ray_cluster(s3_port):
    """The run's local Ray (only for tests in `*_ray.py` files: see `pytest_runtest_setup`)."""
    import ray

    # Before Ray starts, so its workers inherit the test endpoint and credentials; the server
    # itself starts only if a test asks for `s3_server`.
    os.environ.update(s3_port.env)
    from raysys.config import RayConfig
    from raysys.runtime import init_ray

    init_ray(RayConfig(num_cpus=2))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def scenes() -> list[dict]:
    """The synthetic scenes the corpus tests write as manifests and shards, once per module."""
    from corpus_files import make_scenes

    return make_scenes()


@pytest.fixture(scope="session")
def small_cache(ray_cluster, tmp_path_factory):
    """A finished extraction of a small synthetic corpus, shared by the tests that read it."""
    from raysys import config
    from raysys.extract import extract

    cache_dir = tmp_path_factory.mktemp("cache")
    cfg = config.load(None, ["corpus.size=60", f"extract.cache_dir={cache_dir}"])
    return cfg, extract(cfg)
