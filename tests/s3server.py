"""A real S3-compatible server for tests: moto's standalone server on 127.0.0.1.

MinIO is not installable here; moto's server speaks the S3 HTTP API, so s3fs, pyarrow's native
S3FileSystem and Ray read and write it as they would real S3. The server runs as a subprocess
(not in-process) so pyarrow's C++ client and s3fs's event loop talk to it over real sockets,
and so that stopping it cannot disturb the test process.

A fixture is five lines::

    @pytest.fixture(scope="session")
    def s3_server():
        with moto_server() as server:
            yield server

and a test sets the environment with ``server.patch_env(monkeypatch)`` (or ``server.env``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

HOST = "127.0.0.1"
START_TIMEOUT_S = 15.0

# Variables that would override or confuse the test endpoint/credentials if inherited.
CONFLICTING_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_REGION",
)


# Talk to 127.0.0.1 directly even when HTTP(S)_PROXY is set.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on at the moment of the call."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    """A running moto server: where it is and the environment that points raysys at it."""

    endpoint_url: str
    pid: int
    env: dict[str, str] = field(default_factory=dict)

    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs keyword arguments (``s3fs.S3FileSystem(**opts)``, pandas, Ray Data)."""
        return {
            "key": self.env["AWS_ACCESS_KEY_ID"],
            "secret": self.env["AWS_SECRET_ACCESS_KEY"],
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": "us-east-1"},
        }

    def patch_env(self, monkeypatch: Any) -> None:
        """Point the AWS environment at this server for one test (pytest's monkeypatch)."""
        for var in CONFLICTING_ENV:
            monkeypatch.delenv(var, raising=False)
        for var, value in self.env.items():
            monkeypatch.setenv(var, value)

    def make_bucket(self, name: str) -> str:
        """Create a bucket (name ≥ 3 characters) and return ``s3://name``.

        No CreateBucketConfiguration: moto rejects ``LocationConstraint=us-east-1``
        (InvalidLocationConstraint), as AWS does; us-east-1 is the default.
        """
        if len(name) < 3:
            raise ValueError(f"S3 bucket names need at least 3 characters: {name!r}")
        # moto does not check signatures, so a plain PUT is a CreateBucket.
        req = urllib.request.Request(f"{self.endpoint_url}/{name}", method="PUT")
        with _OPENER.open(req, timeout=5):
            pass
        return f"s3://{name}"

    def reset(self) -> None:
        """Delete every bucket and object (moto's reset API)."""
        req = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        with _OPENER.open(req, timeout=5):
            pass


def _answers(url: str) -> bool:
    try:
        with _OPENER.open(url, timeout=0.5):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP reply means the server is up
    except OSError:
        return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate the server we started (by its pid), then kill it if it lingers."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


@contextlib.contextmanager
def moto_server(start_timeout_s: float = START_TIMEOUT_S) -> Iterator[S3Server]:
    """Start ``moto_server -H 127.0.0.1 -p <free port>`` (the one beside ``sys.executable``),
    wait until it answers HTTP, yield an :class:`S3Server`, and stop it on exit.

    Nothing global is changed here; apply ``server.env`` where needed.
    """
    exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
    if not os.path.exists(exe):
        raise RuntimeError(f"{exe} not found; install the dev extras (moto[server])")
    with tempfile.TemporaryFile() as log:
        for _attempt in range(3):  # another process may grab the free port first
            port = free_port()
            proc = subprocess.Popen(
                [exe, "-H", HOST, "-p", str(port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            url = f"http://{HOST}:{port}"
            deadline = time.monotonic() + start_timeout_s
            while proc.poll() is None and time.monotonic() < deadline:
                if _answers(url + "/"):
                    break
                time.sleep(0.1)
            else:
                _stop(proc)
                if time.monotonic() < deadline:  # exited early (port taken?): try another
                    continue
                log.seek(0)
                raise RuntimeError(
                    f"moto_server did not answer on {url} within {start_timeout_s:.0f} s:\n"
                    + log.read().decode(errors="replace")[-2000:]
                )
            break
        else:
            log.seek(0)
            raise RuntimeError(
                "moto_server exited before answering:\n"
                + log.read().decode(errors="replace")[-2000:]
            )
        try:
            yield S3Server(
                endpoint_url=url,
                pid=proc.pid,
                env={
                    "AWS_ENDPOINT_URL_S3": url,
                    "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1",
                    # no EC2 instance-metadata probes (they stall for seconds off EC2)
                    "AWS_EC2_METADATA_DISABLED": "true",
                    # botocore and aiohttp honour HTTP(S)_PROXY: keep 127.0.0.1 direct
                    "NO_PROXY": "127.0.0.1,localhost",
                    "no_proxy": "127.0.0.1,localhost",
                },
            )
        finally:
            _stop(proc)
