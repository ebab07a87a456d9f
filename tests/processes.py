"""Watching a `raysys` command's processes: none may outlive it (issue 16: a
`ray::TrainController` of 830 MB, re-parented to init, was still alive minutes after a sweep
had ended).

The command runs from the command line, as a user runs it, in a session of its own and with
no RAY_ADDRESS, so it starts a private Ray. Every process seen among its descendants (or in
its session) while it runs is recorded by pid and start time; an orphan is re-parented to
init and no longer looks like ours, but its (pid, start time) still names it. None may be
alive shortly after the command has exited.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

SAMPLE_S = 0.5  # how often the sweep's processes are listed
GONE_WITHIN_S = 15.0  # how long after the sweep's exit its processes may take to be gone
SWEEP_TIMEOUT_S = 600.0

Key = tuple[int, float]  # (pid, create time): one process, even once its pid is reused


def cli() -> list[str]:
    """The `raysys` console script of this venv, as a user runs it."""
    script = Path(sys.executable).with_name("raysys")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "raysys.cli"]


def private_env() -> dict[str, str]:
    """Our environment (conftest imported raysys, which set the loopback-only variables)
    without anything that would make the sweep join a Ray instead of starting its own."""
    env = dict(os.environ)
    for name in ("RAY_ADDRESS", "RAY_RAYLET_PID", "RAY_JOB_ID"):
        env.pop(name, None)
    env["HF_HUB_OFFLINE"] = "1"
    return env


@dataclass
class Watched:
    """A `raysys` command in its own session and every process seen under it."""

    proc: subprocess.Popen[bytes]
    log: Path
    seen: dict[Key, str] = field(default_factory=dict)  # -> its latest command line
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while self.proc.poll() is None:
            self.sample()
            time.sleep(SAMPLE_S)

    def sample(self) -> None:
        try:
            found = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            found = []
        for p in psutil.process_iter():  # also those already orphaned, still in its session
            try:
                if p.pid != self.proc.pid and os.getsid(p.pid) == self.proc.pid:
                    found.append(p)
            except (OSError, psutil.Error):
                continue
        for p in found:
            try:
                key = (p.pid, p.create_time())
                # The latest command line: a child seen between its fork and its exec still
                # shows its parent's (on a busy box, `raysys sweep …` for the raylet).
                cmdline = " ".join(p.cmdline())[:200]
                with self._lock:
                    self.seen[key] = cmdline
            except psutil.Error:
                continue

    def names(self) -> list[str]:
        with self._lock:
            return list(self.seen.values())

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        if self._thread is not None:
            self._thread.join()
        return code

    def survivors(self) -> list[psutil.Process]:
        alive = []
        with self._lock:
            keys = list(self.seen)
        for pid, created in keys:
            try:
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.Error:
                continue
        return alive

    def survivors_after_exit(self) -> list[psutil.Process]:
        """The recorded processes still alive `GONE_WITHIN_S` after the exit (or none)."""
        deadline = time.monotonic() + GONE_WITHIN_S
        while (alive := self.survivors()) and time.monotonic() < deadline:
            time.sleep(0.5)
        return alive

    def kill_all(self) -> None:
        """Kill what is left of it: its session, then any recorded process still alive."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for p in self.survivors():
            try:
                p.kill()
            except psutil.Error:
                continue


def describe(procs: list[psutil.Process]) -> str:
    lines = []
    for p in procs:
        try:
            lines.append(
                f"pid {p.pid} ppid {p.ppid()} {p.name()} rss {p.memory_info().rss >> 20} MB: "
                + " ".join(p.cmdline())[:300]
            )
        except psutil.Error:
            lines.append(f"pid {p.pid} (gone while described)")
    return "\n".join(lines)


def start(args: list[str], log: Path, env: dict[str, str] | None = None) -> Watched:
    """`raysys ARGS` with its own private Ray, in its own session, output to `log`; `env`
    adds to its environment."""
    with log.open("wb") as f:
        proc = subprocess.Popen(
            [*cli(), *args],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=private_env() | (env or {}),
            start_new_session=True,  # its own process group, as a terminal gives a command
        )
    watched = Watched(proc, log)
    watched.start()
    return watched


def assert_nothing_left(watched: Watched) -> None:
    alive = watched.survivors_after_exit()
    output = watched.log.read_text(errors="replace")
    assert any("raylet" in n or "gcs_server" in n for n in watched.names()), (
        "the sweep's own Ray was never seen among its processes:\n" + "\n".join(watched.names())
    )
    assert not alive, (
        f"{len(alive)} of the sweep's {len(watched.seen)} processes outlived it by "
        f"{GONE_WITHIN_S:g} s:\n{describe(alive)}\n--- sweep output (end) ---\n" + output[-3000:]
    )
    # The stop at exit ran to its end: a crash there (once a NameError in `_is_ray`) leaves
    # the stragglers to Ray's own shutdown, which a busy Train controller can outlive.
    assert "Exception ignored in atexit callback" not in output, output[-3000:]
