"""Starting or joining Ray, and sizing work to what the cluster actually has.

A private local Ray binds to loopback only (a laptop or CI box must not expose Ray's ports); with
RAY_ADDRESS set (`ray job submit` sets it, or export `RAY_ADDRESS=auto` on a cluster node) raysys
joins that cluster instead. A joined cluster may be an autoscaling one whose worker nodes start
only on demand (`cluster/gpu.yaml`: a CPU-less head, GPU types with `min_workers: 0`), so work
is sized by `ensure_resources`, which asks the autoscaler for what is missing and waits for it.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from raysys.config import RayConfig
from raysys.errors import ConfigError

if TYPE_CHECKING:
    import psutil

LOOPBACK = "127.0.0.1"
POLL_S = 2.0  # how often the wait for the autoscaler looks at the cluster's nodes
PROGRESS_S = 30.0  # how often it says it is still waiting

Bundle = dict[str, float]  # one scheduling unit (an actor, a Train worker): it needs one node


# raysys's own progress lines: one per population member and pass, told apart by names
# that Ray's log deduplication ignores (it drops every word with a digit in it), so two
# populations' `[train] con t000-… step 300/1200 …` lines collapsed into one "[repeated 2x
# across cluster]" and a member's progress went missing. Ray's own lines stay deduplicated.
OWN_LINES = r"^\[(train|extract|model|probe|sweep|bench)\] "
# Ray Data starts this many FooterReader actors (0-CPU processes) for every Parquet read
# to read its files' footers; its default, 32, started up to 32 Python processes per read
# of a 39-file corpus index on a 2-core node (a read took 9-15 s; with 1, 3 s). Each reader
# already keeps 128 requests in flight, so a few cover a bucket's latency.
FOOTER_READERS = "2"


def driver_env() -> None:
    """Settings every raysys driver needs, a joined cluster's too (`ray job submit`): the
    driver is where worker output is deduplicated and printed, and where Ray Data plans a
    read (the plan carries the reader count to the nodes). Ray reads the first when first
    imported; a user's own values win."""
    os.environ.setdefault("RAY_DEDUP_LOGS_ALLOW_REGEX", OWN_LINES)
    os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", FOOTER_READERS)


def loopback_env() -> None:
    """Environment that keeps every Ray listener (and gloo, for DDP) on 127.0.0.1.

    Ray reads these when it is first imported, so `raysys/__init__.py` calls this before
    anything imports ray. Only a process that will start a private Ray sets them: with
    `RAY_ADDRESS` it joins a cluster, and a Ray worker process (`RAY_RAYLET_PID`, set by the
    raylet that started it) has its node's environment already: on a private Ray, the
    driver's, inherited; on a cluster node, one that must not pin gloo to loopback.
    """
    if os.environ.get("RAY_ADDRESS", "").strip().lower() == "local":
        del os.environ["RAY_ADDRESS"]  # Ray's "start a new local one": raysys's private Ray
    if os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_RAYLET_PID"):
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Ray Data / Train print a progress line per operator; keep them, but silence the
    # per-worker "accelerator env var override" warnings.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # The Train controller polls its workers every 2 s by default, so a finished fit waits
    # up to 2 s to notice; polling a local worker group is cheap (measured: shutdown 3.6 s ->
    # 1.7 s per fit on 2 cores).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    # A private local Ray has no spot instances to lose; the watcher is one more process per
    # Ray Train run, which a sweep of small trials pays for every trial.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def init_ray(cfg: RayConfig) -> None:
    """Join the configured cluster, or start a private loopback-only one."""
    import ray  # lazy: Ray reads `loopback_env`'s variables when it is first imported

    global _scale_timeout_s
    _scale_timeout_s = cfg.scale_timeout_s  # what `ensure_resources` waits by default
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        try:
            ray.init(logging_level=logging.WARNING)
        except ConnectionError as err:  # e.g. RAY_ADDRESS=auto with no Ray running here
            raise ConfigError(
                f"RAY_ADDRESS={os.environ['RAY_ADDRESS']!r} names no running Ray cluster "
                f"({err}); start one (`ray start --head`, `ray up`) or unset RAY_ADDRESS "
                "to run on a private local Ray"
            ) from None
        return
    try:
        ray.init(
            num_cpus=cfg.num_cpus,
            include_dashboard=cfg.dashboard,
            dashboard_host=LOOPBACK,
            _node_ip_address=LOOPBACK,
            logging_level=logging.WARNING,
            log_to_driver=True,
        )
    except BaseException:  # Ctrl-C while it starts: what did start must not outlive us
        for proc in ray_descendants():
            with contextlib.suppress(Exception):
                proc.kill()
        raise
    global _private
    if not _private:
        # After `ray.init` registered its own exit hook, so this one runs first (LIFO).
        atexit.register(stop_private_ray)
    _private = True


_private = False  # whether this process started its own Ray, which it must also stop
STOP_GRACE_S = 10.0  # how long Ray's processes get to exit by themselves before a SIGKILL


def stop_private_ray(grace_s: float = STOP_GRACE_S) -> int:
    """Stop the private Ray this process started, leaving no process behind; returns how
    many had to be killed. `ray.shutdown` stops the raylet and the GCS, but a worker still
    busy (a Train controller winding down a run) can outlive its raylet, re-parented to
    init and holding its memory. So Ray's processes among this process's descendants are
    listed first (once orphaned they are no longer ours to find), and those still alive
    `grace_s` after the shutdown are killed. Runs at exit, after a normal end or Ctrl-C."""
    global _private
    if not _private:
        return 0
    import ray

    _private = False
    ours = ray_descendants()
    ray.shutdown()
    return kill_stragglers(ours, grace_s)


def ray_descendants() -> list[psutil.Process]:
    """Ray's processes among this process's descendants (raylet, GCS, dashboard, workers)."""
    import psutil

    return [p for p in psutil.Process().children(recursive=True) if _is_ray(p)]


def kill_stragglers(procs: list[psutil.Process], grace_s: float) -> int:
    """Give `procs` `grace_s` seconds to exit by themselves, then SIGKILL the rest; returns
    how many had to be killed."""
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)
    return len(alive)


def _is_ray(proc: psutil.Process) -> bool:
    """One of Ray's processes (raylet, GCS, dashboard, workers: `ray::…`, `default_worker`).
    A child that exits while the list is read (or a zombie) is none of them."""
    import psutil  # the module-level name is for type checking only

    try:
        return "ray" in " ".join(proc.cmdline()).lower()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


@dataclass
class Resources:
    cpus: float
    gpus: float


def cluster_resources() -> Resources:
    """The cluster's total CPUs and GPUs now (a head started with no CPUs reports none)."""
    import ray

    res = ray.cluster_resources()
    return Resources(cpus=float(res.get("CPU", 0.0)), gpus=float(res.get("GPU", 0.0)))


# --- waiting for the autoscaler ---------------------------------------------------------------

_scale_timeout_s: float = RayConfig().scale_timeout_s  # set by `init_ray` from the config


def unplaced(
    bundles: Iterable[Mapping[str, float]], nodes: list[Mapping[str, float]]
) -> list[Bundle]:
    """The bundles that do not fit on the nodes (each node's total resources), placed largest
    first, each whole on one node: a 1-GPU actor needs a node with a GPU, and two half-empty
    nodes do not make one. A first-fit packing, so it may miss an exotic fit; for the few
    identical bundles raysys asks for it is exact. Zero amounts are no demand."""
    free = [dict(node) for node in nodes]
    wanted = [{k: float(v) for k, v in b.items() if v > 0} for b in bundles]
    left: list[Bundle] = []
    for bundle in sorted(wanted, key=lambda b: (b.get("GPU", 0.0), sum(b.values())), reverse=True):
        node = next((n for n in free if all(n.get(k, 0.0) >= v for k, v in bundle.items())), None)
        if node is None:
            left.append(bundle)
            continue
        for k, v in bundle.items():
            node[k] -= v
    return left


def describe_bundles(bundles: Iterable[Mapping[str, float]], zeros: bool = False) -> str:
    """`2 x {GPU: 1, CPU: 1} + 1 x {CPU: 0.5}`: identical bundles counted, GPU first; with
    `zeros`, zero amounts too (a node's `CPU: 0`)."""
    order = {"GPU": 0, "CPU": 1}
    shapes = Counter(
        tuple(
            sorted(
                ((k, float(v)) for k, v in b.items() if zeros or v > 0),
                key=lambda kv: (order.get(kv[0], 2), kv[0]),
            )
        )
        for b in bundles
    )
    parts = [
        f"{n} x {{{', '.join(f'{k}: {v:g}' for k, v in shape)}}}" for shape, n in shapes.items()
    ]
    return " + ".join(parts) or "nothing"


def joined_cluster() -> bool:
    """Whether raysys joined a running cluster (RAY_ADDRESS), the only kind with an autoscaler
    to ask; a private local Ray that raysys started has exactly the CPUs it was given."""
    import ray

    return bool(os.environ.get("RAY_ADDRESS")) and ray.is_initialized()


def node_resources() -> list[Bundle]:
    """Each alive node's total resources."""
    import ray

    return [
        {k: float(v) for k, v in node.get("Resources", {}).items()}
        for node in ray.nodes()
        if node.get("Alive")
    ]


def ensure_resources(
    bundles: list[Bundle], what: str, hint: str = "", timeout_s: float | None = None
) -> Resources:
    """The cluster's resources once it can hold `bundles` (each on one node), asking the
    autoscaler for them and waiting when it cannot yet.

    Capacity is what counts, not what is free now: work queued behind another job's waits in
    Ray's scheduler, not here. A private local Ray never waits: this returns what it has at once
    and the caller's own check says what does not fit. A joined cluster without an autoscaler
    (a fixed set of `ray start` nodes) looks the same from here; `ray.scale_timeout_s=0` makes
    it fail at once. On a joined cluster, missing bundles are requested with
    `ray.autoscaler.sdk.request_resources` and the wait (`timeout_s`, default
    `ray.scale_timeout_s`) ends when they fit; past it, a ConfigError names what was missing
    and `hint` (the setting that shrinks the demand).
    """
    if not joined_cluster():
        return cluster_resources()
    if unplaced(bundles, node_resources()):
        from ray.autoscaler.sdk import request_resources

        def ask(wanted: list[Bundle]) -> None:
            request_resources(bundles=wanted)

        timeout = _scale_timeout_s if timeout_s is None else timeout_s
        wait_for_nodes(bundles, what, hint, timeout, node_resources, ask)
    return cluster_resources()


def wait_for_nodes(
    bundles: list[Bundle],
    what: str,
    hint: str,
    timeout_s: float,
    nodes: Callable[[], list[Bundle]],
    ask: Callable[[list[Bundle]], None],
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[Bundle]:
    """Ask (`ask`) for `bundles` until `nodes()` can hold them; returns those nodes.

    Says once what it waits for, then every `PROGRESS_S` what is still missing; past
    `timeout_s` it raises a ConfigError. The request is re-sent on every look (it is one per
    cluster: another job's request replaces it) and withdrawn (`ask([])`) when the wait ends
    either way: the nodes are up and the work scheduled on them now keeps them, while a
    standing request would keep the cluster from ever scaling down.
    """
    started = said = clock()
    current = nodes()
    before = len(current)
    print(
        f"[ray] waiting up to {timeout_s:g} s for the autoscaler: "
        f"{describe_bundles(bundles)} ({what})",
        flush=True,
    )
    try:
        while True:
            ask([dict(b) for b in bundles])
            current = nodes()
            missing = unplaced(bundles, current)
            now = clock()
            if not missing:
                print(
                    f"[ray] {what} fit after {now - started:.0f} s: the cluster has "
                    f"{len(current)} node(s) ({_describe_nodes(current)}), "
                    f"{len(current) - before:+d}",
                    flush=True,
                )
                return current
            if now - started >= timeout_s:
                raise ConfigError(
                    f"{what} need {describe_bundles(bundles)}, each on one node; after "
                    f"{timeout_s:g} s (ray.scale_timeout_s) the cluster's {len(current)} "
                    f"node(s) ({_describe_nodes(current)}) still lack room for "
                    f"{describe_bundles(missing)}: "
                    + (f"{hint}, or " if hint else "")
                    + "check that a node type of the cluster can hold that and that its "
                    "max_workers allow it (`ray status`), or raise ray.scale_timeout_s if "
                    "nodes are slow to start"
                )
            if now - said >= PROGRESS_S:
                said = now
                print(
                    f"[ray] still waiting for the autoscaler ({now - started:.0f} of "
                    f"{timeout_s:g} s): {describe_bundles(missing)} to place; the cluster has "
                    f"{len(current)} node(s) ({_describe_nodes(current)})",
                    flush=True,
                )
            sleep(POLL_S)
    finally:
        # A failure to withdraw must not hide the error (or Ctrl-C) that ended the wait.
        with contextlib.suppress(Exception):
            ask([])


def _describe_nodes(nodes: list[Mapping[str, float]]) -> str:
    """The nodes' CPUs and GPUs, e.g. `1 x {CPU: 0} + 2 x {GPU: 1, CPU: 8}`."""
    shown = [
        {"CPU": n.get("CPU", 0.0)} | ({"GPU": n["GPU"]} if n.get("GPU") else {}) for n in nodes
    ]
    return describe_bundles(shown, zeros=True) if nodes else "no nodes"
