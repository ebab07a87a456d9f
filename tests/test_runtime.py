"""Sizing work to the cluster without Ray: the per-node fit, the wait for the autoscaler (on a
scripted list of nodes and a clock that the test advances), and that a private local Ray never
waits. The real autoscaler is in tests/test_autoscale_ray.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from raysys import config, runtime
from raysys.errors import ConfigError
from raysys.runtime import Resources, describe_bundles, unplaced, wait_for_nodes

HEAD = {"CPU": 0.0, "memory": 1e9}  # a cluster/gpu.yaml head: the driver only
GPU_NODE = {"CPU": 8.0, "GPU": 1.0, "memory": 3e10}


def test_a_bundle_must_fit_on_one_node_not_in_the_sum() -> None:
    assert unplaced([{"CPU": 2}], [{"CPU": 1}, {"CPU": 1}]) == [{"CPU": 2.0}]
    assert unplaced([{"CPU": 1}, {"CPU": 1}], [{"CPU": 1}, {"CPU": 1}]) == []
    assert unplaced([{"CPU": 1}] * 3, [HEAD, {"CPU": 2}]) == [{"CPU": 1.0}]


def test_gpu_bundles_need_a_gpu_node_and_share_it_by_fraction() -> None:
    actor = {"GPU": 1, "CPU": 1}
    assert unplaced([actor], [HEAD]) == [{"GPU": 1.0, "CPU": 1.0}]
    assert unplaced([actor], [HEAD, GPU_NODE]) == []
    assert unplaced([actor, actor], [HEAD, GPU_NODE]) == [{"GPU": 1.0, "CPU": 1.0}]
    quarter = {"CPU": 1, "GPU": 0.25}  # four packed trial workers share one GPU
    assert unplaced([quarter] * 4, [HEAD, GPU_NODE]) == []
    assert len(unplaced([quarter] * 5, [HEAD, GPU_NODE])) == 1


def test_zero_amounts_are_no_demand() -> None:
    assert unplaced([{"CPU": 1, "GPU": 0}], [{"CPU": 1}]) == []
    assert unplaced([], []) == []


def test_bundles_are_described_by_shape_and_count() -> None:
    actor = {"CPU": 1, "GPU": 1}
    assert describe_bundles([actor]) == "1 x {GPU: 1, CPU: 1}"
    assert describe_bundles([actor, actor, {"CPU": 0.5}]) == (
        "2 x {GPU: 1, CPU: 1} + 1 x {CPU: 0.5}"
    )
    assert describe_bundles([{"CPU": 0}], zeros=True) == "1 x {CPU: 0}"
    assert describe_bundles([]) == "nothing"


class Cluster:
    """Scripted nodes: `arrive_at` seconds into the wait, a GPU node joins the head."""

    def __init__(self, arrive_at: float | None) -> None:
        self.now = 0.0
        self.arrive_at = arrive_at
        self.asked: list[list[dict[str, float]]] = []

    def nodes(self) -> list[dict[str, float]]:
        if self.arrive_at is not None and self.now >= self.arrive_at:
            return [HEAD, GPU_NODE]
        return [HEAD]

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def wait(self, bundles: list[dict[str, float]], timeout_s: float = 900) -> list:
        return wait_for_nodes(
            bundles,
            "extraction actors",
            "set extract.num_gpus_per_actor=0 to run on CPU",
            timeout_s,
            self.nodes,
            self.asked.append,
            clock=lambda: self.now,
            sleep=self.sleep,
        )


def test_waits_for_the_node_then_withdraws_its_request(capsys) -> None:
    cluster = Cluster(arrive_at=75)
    actor = {"GPU": 1.0, "CPU": 1.0}
    assert cluster.wait([actor]) == [HEAD, GPU_NODE]
    assert cluster.asked[0] == [actor]  # asked for exactly the bundles
    assert cluster.asked[-1] == []  # and withdrawn, so the cluster can scale down again
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (
        "[ray] waiting up to 900 s for the autoscaler: 1 x {GPU: 1, CPU: 1} (extraction actors)"
    )
    progress = [line for line in out if line.startswith("[ray] still waiting")]
    assert len(progress) == 2  # at 30 s and 60 s, not on every 2 s look
    assert "1 x {GPU: 1, CPU: 1} to place" in progress[0]
    assert out[-1].startswith("[ray] extraction actors fit after 76 s: the cluster has 2 node(s)")
    assert out[-1].endswith("+1")


def test_past_the_timeout_it_says_what_was_missing_and_what_to_change() -> None:
    cluster = Cluster(arrive_at=None)
    with pytest.raises(ConfigError) as err:
        cluster.wait([{"GPU": 1.0, "CPU": 1.0}] * 2, timeout_s=60)
    message = str(err.value)
    assert "extraction actors need 2 x {GPU: 1, CPU: 1}, each on one node" in message
    assert "after 60 s (ray.scale_timeout_s)" in message
    assert "1 node(s) (1 x {CPU: 0})" in message
    assert "set extract.num_gpus_per_actor=0 to run on CPU" in message
    assert cluster.now == pytest.approx(60, abs=runtime.POLL_S)
    assert cluster.asked[-1] == []


def test_a_zero_timeout_fails_at_the_first_look() -> None:
    cluster = Cluster(arrive_at=10)
    with pytest.raises(ConfigError, match="after 0 s"):
        cluster.wait([{"GPU": 1.0}], timeout_s=0)
    assert cluster.now == 0 and cluster.asked == [[{"GPU": 1.0}], []]


def test_ctrl_c_during_the_wait_withdraws_the_request() -> None:
    cluster = Cluster(arrive_at=None)

    def interrupt(_seconds: float) -> None:
        raise KeyboardInterrupt

    cluster.sleep = interrupt  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        cluster.wait([{"GPU": 1.0}])
    assert cluster.asked[-1] == []


def test_a_private_local_ray_never_waits(monkeypatch, capsys) -> None:
    """No RAY_ADDRESS (raysys starts its own Ray): what it has is what it gets, at once; the
    caller's own check then fails with its usual message."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(runtime, "cluster_resources", lambda: Resources(cpus=2, gpus=0))
    got = runtime.ensure_resources([{"GPU": 1.0, "CPU": 1.0}], "extraction actors")
    assert got == Resources(cpus=2, gpus=0)
    assert capsys.readouterr().out == ""


def test_train_scaling_on_a_private_ray_fails_at_once_with_its_message(monkeypatch) -> None:
    from raysys.train.driver import scaling

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(runtime, "cluster_resources", lambda: Resources(cpus=2, gpus=0))
    cfg = config.load(None, ["train.use_gpu=true", "train.num_workers=2"])
    with pytest.raises(ConfigError, match="needs that many GPUs; the cluster has 0"):
        scaling(cfg.train)
    plan, threads = scaling(config.load(None, ["train.num_workers=2"]).train)
    assert plan.resources_per_worker == {"CPU": 0.5} and threads == 1


def test_train_scaling_gives_each_gpu_worker_a_whole_gpu(monkeypatch) -> None:
    """`raysys train` with train.use_gpu: Ray Train reserves a whole GPU per worker, so its
    ranks never share one (what NCCL requires)."""
    from raysys.checks import check_whole_gpus
    from raysys.train.driver import scaling, worker_bundle

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(runtime, "cluster_resources", lambda: Resources(cpus=32, gpus=8))
    plan, _ = scaling(config.load(None, ["train.use_gpu=true", "train.num_workers=4"]).train)
    worker = worker_bundle(plan)
    assert worker["GPU"] == 1.0 and plan.num_workers == 4
    check_whole_gpus(plan.num_workers, worker["GPU"], "raysys train", "-")


def test_the_timeout_is_a_ray_setting() -> None:
    assert config.load(None, []).ray.scale_timeout_s == 900
    assert config.load(None, ["ray.scale_timeout_s=60"]).ray.scale_timeout_s == 60


def test_a_private_rays_stragglers_are_killed_at_exit() -> None:
    """What `stop_private_ray` does after `ray.shutdown`: Ray's processes among our
    descendants are found, and one that ignores SIGTERM and outlives the grace period (as a
    Train controller busy winding down once did, re-parented to init, 830 MB resident) is
    killed; a child that is not Ray's is not among them. No Ray is started or stopped here
    (the session's Ray, if any, is left alone): the straggler is a stand-in named like
    Ray's workers."""
    import subprocess
    import sys

    import psutil

    from raysys import runtime

    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    ray_like = subprocess.Popen([sys.executable, "-c", code, "ray::TrainController"])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        found = {p.pid for p in runtime.ray_descendants()}
        assert ray_like.pid in found and other.pid not in found
        assert runtime.kill_stragglers([psutil.Process(ray_like.pid)], grace_s=0.5) == 1
        ray_like.wait(timeout=10)  # already reaped by the stop (psutil waits for its children)
        assert not psutil.pid_exists(ray_like.pid)  # it ignored SIGTERM: killed
        assert runtime.kill_stragglers([psutil.Process(other.pid)], grace_s=0.2) == 1
    finally:
        for proc in (ray_like, other):
            proc.kill()
            proc.wait()


def test_a_child_that_exited_is_not_ray() -> None:
    """Listing Ray's processes must survive one that exits meanwhile (it raised NameError,
    which broke the exit-time stop of every sweep)."""
    import subprocess
    import sys

    import psutil

    from raysys import runtime

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    proc = psutil.Process(child.pid)
    child.wait()
    assert runtime._is_ray(proc) is False


def test_ray_keeps_every_members_progress_line_and_still_folds_its_own() -> None:
    """Two populations' lines differ only in words with digits, which Ray's deduplication
    ignores: without `driver_env` the second member's progress was folded into "[repeated 2x]"."""
    from ray._private import ray_constants
    from ray._private.ray_logging import LogDeduplicator

    # conftest imports raysys before ray, as the CLI does: Ray read raysys's setting.
    assert ray_constants.RAY_DEDUP_LOGS_ALLOW_REGEX == runtime.OWN_LINES
    dedup = LogDeduplicator(5, ray_constants.RAY_DEDUP_LOGS_ALLOW_REGEX, None)

    def printed(pid: int, line: str) -> list[str]:
        batch = {"ip": "127.0.0.1", "pid": pid, "job": "01", "is_err": False, "lines": [line]}
        return [x for b in dedup.deduplicate(batch) for x in b["lines"]]

    members = [
        "[train] con t000-con-efficientnet-lite0-minilm-l6-v16-t6 step 300/1200 val i2t_r1 0.1",
        "[train] con t002-con-efficientnet-lite1-minilm-l6-v8-t3 step 300/1200 val i2t_r1 0.2",
    ]
    assert printed(11, members[0]) == [members[0]]
    assert printed(12, members[1]) == [members[1]]
    warning = "Loaded pretrained weights for efficientnet-lite0"  # each actor prints it
    assert printed(11, warning) == [warning]
    assert printed(12, warning) == []  # folded, as Ray does for everything not raysys's


def test_a_job_driver_keeps_the_setting_too() -> None:
    """A `ray job submit` driver has RAY_ADDRESS, so loopback_env sets nothing; the
    deduplication setting still applies, and a user's own wins."""
    code = "import raysys, ray._private.ray_constants as c; print(c.RAY_DEDUP_LOGS_ALLOW_REGEX)"
    env = {k: v for k, v in os.environ.items() if k != "RAY_DEDUP_LOGS_ALLOW_REGEX"}
    env["RAY_ADDRESS"] = "127.0.0.1:1"  # never contacted: nothing here starts or joins Ray

    def regex(**extra: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", code], env=env | extra, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.rstrip("\n")

    assert regex() == runtime.OWN_LINES
    assert regex(RAY_DEDUP_LOGS_ALLOW_REGEX="mine") == "mine"
