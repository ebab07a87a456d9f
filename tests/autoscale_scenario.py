"""Scale-up on Ray's own autoscaler harness: a `raysys run` job on a cluster with no worker node.

`ray.cluster_utils.AutoscalingCluster` (the `fake_multinode` provider) runs a head with no CPUs
(like `cluster/gpu.yaml`'s) whose autoscaler starts worker nodes, as processes on this machine,
when work asks for them; a worker type with `min_workers: 0` starts none until then. The job
must make it start one (raysys asks with `request_resources`) and complete.

The harness stops Ray with `ray stop --force`, which kills every Ray process it can see, and
several nodes need Ray's loopback switch (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`) unset; so it all
runs in private namespaces: a network namespace whose only interface is loopback (nothing can
listen anywhere else), and a PID namespace (`ray stop` sees only this scenario's processes; when
its first process exits, the kernel kills whatever is left). Ray's files live in a temp dir of
its own (RAY_TMPDIR). The run's outputs go to a moto S3 server on 127.0.0.1 inside the
namespace, and so does the embedding cache (a local --out or extract.cache_dir is refused on a
head without CPUs: the work runs on nodes that may not share its disk). By hand::

    .venv/bin/python tests/autoscale_scenario.py      # prints the facts as JSON
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from multinode import auth_env
from small_job import SMALL_RUN

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
BIN = Path(sys.executable).parent
BUCKET = "scaleup"
WORKER_TYPE = "cpu_worker"

JOB_ARGS = SMALL_RUN  # tests/small_job.py: one model pair, one layer pair, one epoch


def run(timeout: float = 420) -> dict[str, Any]:
    """Run the scenario in fresh namespaces and return its facts (see `scenario`), plus the
    processes still mentioning its temp dir afterwards (there must be none)."""
    scratch = Path(tempfile.mkdtemp(prefix="ras", dir="/tmp"))  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # several nodes; the namespace isolates
    cmd = ["unshare", "--net", "--pid", "--fork", "--mount-proc", "--kill-child", "--"]
    cmd += [sys.executable, __file__, "--init", str(scratch)]
    try:
        try:
            done = subprocess.run(
                cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False
            )
            tail = (done.stdout + done.stderr)[-4000:]
        except subprocess.TimeoutExpired as err:  # --kill-child: the namespace dies with it
            tail = f"timed out after {timeout:.0f} s: {str(err.stdout)[-2000:]}"
        facts_file = scratch / "facts.json"
        facts = json.loads(facts_file.read_text()) if facts_file.exists() else {}
        facts["output_tail"] = tail
        facts["leftover_pids"] = _processes_mentioning(str(scratch))
        return facts
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


# --- PID 1 of the namespace -----------------------------------------------------------------


def init(scratch: Path) -> int:
    """Bring loopback up, run the scenario as a child and reap every orphan meanwhile (Ray's
    daemons are reparented here; unreaped, they would stay zombies that `ray stop` waits for)."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    child = subprocess.Popen([sys.executable, __file__, "--scenario", str(scratch)])
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == child.pid:
            return os.waitstatus_to_exitcode(status)


# --- the scenario ---------------------------------------------------------------------------


def scenario(scratch: Path, facts: dict[str, Any]) -> None:
    """Start the S3 server and the autoscaling cluster, submit the job, watch the worker nodes
    come, stop everything; `facts` receives what happened, as it happens."""
    sys.path.insert(0, str(TESTS))
    from s3server import moto_server

    os.environ["RAY_TMPDIR"] = str(scratch)  # Ray's session dirs and `ray_current_cluster`
    os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ['PATH']}"  # the harness runs `ray`
    os.environ.update(auth_env())  # the nodes `ray start` brings up and the job clients
    os.environ["HF_HUB_OFFLINE"] = "1"  # the offline backbones; no network here anyway
    with moto_server() as s3:
        os.environ.update(s3.env)  # before Ray starts: its nodes and the job inherit it
        out = s3.make_bucket(BUCKET) + "/run"
        cluster = _cluster()
        started = time.monotonic()
        try:
            cluster.start()
            facts["cluster_start_s"] = round(time.monotonic() - started, 1)
            _submit_and_watch(scratch, out, facts)
            facts["results_csv"] = _get(s3, "run/results.csv")
            facts["report_md"] = _get(s3, "run/report.md")
        finally:
            import ray

            ray.shutdown()
            cluster.shutdown()
            facts["autoscaler_log"] = _autoscaler_lines(scratch)
        facts["wall_s"] = round(time.monotonic() - started, 1)
    time.sleep(1)
    facts["namespace_processes_after"] = _namespace_processes()


def _cluster() -> Any:
    """Ray's harness with a config of our own: its template (`fake_multi_node/example.yaml`)
    is not in Ray's wheel. A head with no CPUs; one worker type, none running until asked."""
    from ray.cluster_utils import AutoscalingCluster

    class Harness(AutoscalingCluster):
        def shutdown(self) -> None:
            """`ray stop --force`, as the harness does, without its 16 s wait for killed
            processes that this namespace's init has not reaped yet."""
            subprocess.run(["ray", "stop", "--force", "--grace-period=3"], check=True)

        def _generate_config(self, head_resources, worker_node_types, **kwargs):  # noqa: ANN001
            return {
                "cluster_name": "raysys-scaleup",
                "max_workers": 1,
                "provider": {
                    "type": "fake_multinode",
                    "use_node_id_as_ip": True,
                    "disable_node_updaters": True,
                    "disable_launch_config_check": True,
                },
                "available_node_types": {
                    **worker_node_types,
                    "ray.head.default": {
                        "resources": dict(head_resources),
                        "node_config": {},
                        "max_workers": 0,
                    },
                },
                "head_node_type": "ray.head.default",
                "auth": {},
                "upscaling_speed": 1.0,
                "idle_timeout_minutes": 5,
                "docker": {},
                "file_mounts": {},
                "cluster_synced_files": [],
                "initialization_commands": [],
                "setup_commands": [],
                "head_setup_commands": [],
                "worker_setup_commands": [],
                "head_start_ray_commands": [],
                "worker_start_ray_commands": [],
            }

    worker = {
        "resources": {"CPU": 2, "object_store_memory": 512 * 2**20},
        "node_config": {},
        "min_workers": 0,
        "max_workers": 1,
    }
    return Harness(head_resources={"CPU": 0}, worker_node_types={WORKER_TYPE: worker})


def _workers(ray: Any) -> int:
    """Alive nodes besides the head (the one this driver's GCS address names)."""
    return sum(1 for n in ray.nodes() if n.get("Alive")) - 1


def _submit_and_watch(scratch: Path, out: str, facts: dict[str, Any]) -> None:
    import ray
    from ray.job_submission import JobStatus, JobSubmissionClient

    ray.init(address="auto", logging_level="ERROR")
    facts["workers_before"] = _workers(ray)
    client = JobSubmissionClient("http://127.0.0.1:8265")
    cache = out.rsplit("/", 1)[0] + "/cache"  # beside the run, in the scenario's bucket
    entrypoint = [sys.executable, "-m", "raysys.cli", "run", "--out", out]
    entrypoint += [f"extract.cache_dir={cache}", *JOB_ARGS]
    submitted = time.monotonic()
    job = client.submit_job(entrypoint=" ".join(entrypoint))
    most, first_worker_s = 0, None
    status = client.get_job_status(job)
    while not status.is_terminal() and time.monotonic() - submitted < 330:
        workers = _workers(ray)
        if workers > 0 and first_worker_s is None:
            first_worker_s = round(time.monotonic() - submitted, 1)
        most = max(most, workers)
        time.sleep(1)
        status = client.get_job_status(job)
    logs = client.get_job_logs(job)
    facts.update(
        status=str(status.value if isinstance(status, JobStatus) else status),
        job_s=round(time.monotonic() - submitted, 1),
        most_workers=most,
        first_worker_s=first_worker_s,
        ray_lines=[line for line in logs.splitlines() if line.startswith("[ray]")],
        logs=logs[-20000:],
    )
    if not status.is_terminal():
        client.stop_job(job)
    facts["request_after_job"] = _standing_request()
    _probe_timeout(facts)


def _standing_request() -> Any:
    """The cluster's standing `request_resources` (the v1 autoscaler reads it from Ray's KV)."""
    from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
    return json.loads(raw) if raw else None


def _probe_timeout(facts: dict[str, Any]) -> None:
    """From this driver, as a joined cluster: ask for a GPU no node type has; the wait must
    end past its timeout with raysys's message, and withdraw the request."""
    os.environ["RAY_ADDRESS"] = "auto"  # before raysys is imported: a joined cluster
    from raysys import runtime
    from raysys.errors import ConfigError

    said = io.StringIO()
    started = time.monotonic()
    try:
        with contextlib.redirect_stdout(said):
            runtime.ensure_resources(
                [{"GPU": 1.0, "CPU": 1.0}], "a GPU probe", hint="use a GPU type", timeout_s=4
            )
    except ConfigError as err:
        facts["probe_error"] = str(err)
    facts["probe_s"] = round(time.monotonic() - started, 1)
    facts["probe_said"] = said.getvalue().splitlines()
    facts["request_after_probe"] = _standing_request()


def _get(s3: Any, key: str) -> str | None:
    """An object's text from the S3 server, or None when it is not there."""
    import s3fs

    try:
        return s3fs.S3FileSystem(**s3.storage_options).cat_file(f"{BUCKET}/{key}").decode()
    except FileNotFoundError:
        return None


def _autoscaler_lines(scratch: Path) -> list[str]:
    """What the autoscaler (the head's monitor) logged about launching and ending nodes."""
    lines = []
    for log in sorted(scratch.glob("ray/session_*/logs/monitor.log")):
        for line in log.read_text(errors="replace").splitlines():
            if re.search(r"Adding \d+ node|Launching|Removing \d+ node|Terminating|Resized", line):
                lines.append(line.strip()[-240:])
    return list(dict.fromkeys(lines))  # the monitor logs each event line twice


def _namespace_processes() -> list[str]:
    """Every process left in this PID namespace but this one and its init."""
    left = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) not in (1, os.getpid()):
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z":
                left.append(f"{entry.name} {cmdline[:120]}")
    return left


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--scenario", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.init:
        return init(args.init)
    if args.scenario:
        facts: dict[str, Any] = {}
        try:
            scenario(args.scenario, facts)
        except BaseException:
            facts["error"] = traceback.format_exc()[-3000:]
            raise
        finally:
            (args.scenario / "facts.json").write_text(json.dumps(facts, indent=1))
        return 0
    print(json.dumps(run(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
