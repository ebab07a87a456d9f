"""Real `ray job submit` runs against a real Ray head started here (`ray start --head`,
loopback only, its own temp dir, stopped by process id afterwards)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


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
    env["RAY_AUTH_MODE"] = "token"  # the client sends the token `ray start` wrote
    return env


def _head_args(temp: str) -> list[str]:
    gcs, dash, agent, grpc, client, metrics, runtime = _free_ports(7)
    return [
        RAY,
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={grpc}",
        f"--ray-client-server-port={client}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={runtime}",
        "--num-cpus=2",
        f"--temp-dir={temp}",
        "--disable-usage-stats",
    ]


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
            args = _head_args(temp)
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


def test_raysys_run_submitted_as_a_job_writes_its_report(ray_head, small_cache, tmp_path) -> None:
    ray_head, temp = ray_head
    cfg, _ = small_cache  # the job reuses this cache: the test times submission, not extraction
    out = tmp_path / "job-run"
    _submit(
        ray_head,
        "raysys-run",
        "run",
        "--out",
        str(out),
        f"corpus.size={cfg.corpus.size}",
        f"extract.cache_dir={cfg.extract.cache_dir}",
        "objectives=con",
        "sweep.models=efficientnet-lite0+minilm-l6",  # `run` is a sweep: keep it to one trial
        "sweep.layers=-1:-1",
        "train.epochs=1",
        "train.batch_size=16",
        "train.eval_every=3",
        "train.hidden=64",
        "train.latent=16",
    )
    status = _wait(ray_head, "raysys-run")
    assert status == "SUCCEEDED", _logs(ray_head, "raysys-run")[-3000:]
    report = (out / "report.md").read_text()
    assert re.search(r"^\| con +\|", report, re.M) and re.search(r"^\| raw +\|", report, re.M)
    assert "i2t_r1" in (out / "results.csv").read_text()
    assert "elapsed:" in _logs(ray_head, "raysys-run")
    # The upload honoured .gitignore: the code travelled, no virtualenv or run outputs.
    found = temp.glob("session_*/runtime_resources/working_dir_files/_ray_pkg_*")
    packages = [p for p in found if p.is_dir()]  # beside them: downloaded zips, locks
    assert any((p / "raysys" / "cli.py").is_file() and (p / "cluster").is_dir() for p in packages)
    for package in packages:
        assert not (package / ".venv").exists() and not (package / "runs").exists()
        size = sum(f.stat().st_size for f in package.rglob("*") if f.is_file())
        assert size < 20 * 2**20, f"{size / 2**20:.1f} MiB uploaded"


def test_a_bad_config_fails_the_job_with_a_clear_error(ray_head) -> None:
    ray_head, _ = ray_head
    _submit(ray_head, "raysys-bad", "run", "corpus.name=coco")
    assert _wait(ray_head, "raysys-bad", timeout=300) == "FAILED"
    logs = _logs(ray_head, "raysys-bad")
    assert "raysys: error: unknown corpus 'coco'; available: synthetic, manifest, webdataset" in (
        logs
    )
    assert "Traceback" not in logs  # a user error is one line, not a stack
