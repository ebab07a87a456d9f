"""Real `ray job submit` runs against a real Ray head started here (`ray start --head`,
loopback only, its own temp dir, stopped by process id afterwards). Successful jobs on a
cluster shaped like cluster/gpu.yaml are tests/test_multinode_ray.py's."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from multinode import auth_env, head_args

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
AUTH = auth_env()


def _proc_table() -> list[tuple[int, int, str]]:
    """(pid, parent pid, command line) of every process, read from /proc."""
    table = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
            table.append((int(entry.name), ppid, cmdline))
    return table


def _processes_mentioning(text: str) -> list[int]:
    return [pid for pid, _, cmdline in _proc_table() if text in cmdline]


def _children(pid: int) -> list[int]:
    table = _proc_table()
    kids, todo = [], [pid]
    while todo:
        parent = todo.pop()
        found = [p for p, pp, _ in table if pp == parent]
        kids += found
        todo += found
    return kids


def _job_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every listener on 127.0.0.1
    env.update(AUTH)  # the head and each client, one token
    return env


def _stop_head(temp: str) -> None:
    """Kill exactly the processes of the head started in `temp`: its daemons (one process
    group, not pytest's) and the workers its raylet started (each in a session of its own)."""
    pids = _processes_mentioning(temp)
    groups = {os.getpgid(p) for p in pids if _alive(p)} - {os.getpgrp()}
    workers = [c for p in pids for c in _children(p)]
    for group in groups:
        os.killpg(group, signal.SIGKILL)
    for pid in workers:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head` in a temp dir of its own, on loopback ports of its own (the test
    session's Ray keeps running beside it); stopped by killing exactly its processes."""
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths are capped
    try:
        for attempt in (1, 2):
            args = head_args(temp, cpus=2)
            # A session of its own: Ray's daemons inherit `ray start`'s process group, and
            # the teardown kills that group, which must not be pytest's.
            started = subprocess.run(
                args,
                env=_job_env(),
                capture_output=True,
                text=True,
                timeout=180,
                start_new_session=True,
            )
            if started.returncode == 0:
                break
            # On a loaded 2-core box the raylet can give up waiting for the dashboard agent
            # (WaitForDashboardAgentPorts); clean up and try once more on fresh ports.
            _stop_head(temp)
            if attempt == 2:
                pytest.fail(f"ray start --head failed twice:\n{started.stderr[-3000:]}")
        dashboard = next(a for a in args if a.startswith("--dashboard-port="))
        yield f"http://127.0.0.1:{dashboard.split('=')[1]}", Path(temp)
    finally:
        _stop_head(temp)
        subprocess.run(["rm", "-rf", temp], check=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _submit(address: str, job_id: str, *command: str) -> None:
    subprocess.run(
        [RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT)]
        + ["--submission-id", job_id, "--no-wait", "--", sys.executable, "-m", "raysys.cli"]
        + list(command),
        env=_job_env(),
        check=True,
        capture_output=True,
        cwd=ROOT,
        timeout=120,
    )


def _job_cli(address: str, verb: str, job_id: str) -> str:
    """`ray job <verb> <id>`'s output (it logs to both streams)."""
    return subprocess.run(
        [RAY, "job", verb, "--address", address, job_id],
        env=_job_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=60,
    ).stdout


def _wait(address: str, job_id: str, timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = _job_cli(address, "status", job_id)
        # Running: "Status for job 'id': RUNNING"; finished: "Job 'id' succeeded|failed|...".
        found = re.search(rf"Job '{job_id}' (succeeded|failed|was stopped)", out)
        if found:
            return {"succeeded": "SUCCEEDED", "failed": "FAILED"}.get(found.group(1), "STOPPED")
        time.sleep(2)
    raise AssertionError(f"job {job_id} did not finish in {timeout:.0f} s")


def _logs(address: str, job_id: str) -> str:
    return _job_cli(address, "logs", job_id)


def test_a_bad_config_fails_the_job_with_a_clear_error(ray_head) -> None:
    """A job with a bad config fails at once with raysys's one-line error; its upload (what
    every job sends) honoured .gitignore. A `raysys run` job that succeeds, on a cluster whose
    head has no CPUs, is tests/test_multinode_ray.py's."""
    ray_head, temp = ray_head
    _submit(ray_head, "raysys-bad", "run", "corpus.name=coco")
    assert _wait(ray_head, "raysys-bad", timeout=300) == "FAILED"
    logs = _logs(ray_head, "raysys-bad")
    assert "raysys: error: unknown corpus 'coco'; available: synthetic, manifest, webdataset" in (
        logs
    )
    assert "Traceback" not in logs  # a user error is one line, not a stack
    # The upload honoured .gitignore: the code travelled, no virtualenv or run outputs.
    found = temp.glob("session_*/runtime_resources/working_dir_files/_ray_pkg_*")
    packages = [p for p in found if p.is_dir()]  # beside them: downloaded zips, locks
    assert any((p / "raysys" / "cli.py").is_file() and (p / "cluster").is_dir() for p in packages)
    for package in packages:
        # (A bad config fails before the job makes a run directory in its working dir.)
        assert not (package / ".venv").exists() and not (package / "runs").exists()
        size = sum(f.stat().st_size for f in package.rglob("*") if f.is_file())
        assert size < 20 * 2**20, f"{size / 2**20:.1f} MiB uploaded"
