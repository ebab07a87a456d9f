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

Where the environment must be fixed before the server is wanted (Ray's workers inherit the
environment Ray starts with), hold a port first and start the server on it later, if at all::

    port = ReservedPort()            # bound on 127.0.0.1, not listening; nothing started
    os.environ.update(port.env)      # the endpoint and credentials the server will answer to
    ...
    with moto_server(port=port) as server:   # releases the port and listens on it
        ...
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


def s3_env(endpoint_url: str) -> dict[str, str]:
    """The environment that points boto3, s3fs, pyarrow and raysys at `endpoint_url`."""
    return {
        "AWS_ENDPOINT_URL_S3": endpoint_url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        # no EC2 instance-metadata probes (they stall for seconds off EC2)
        "AWS_EC2_METADATA_DISABLED": "true",
        # botocore and aiohttp honour HTTP(S)_PROXY: keep 127.0.0.1 direct
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }


class ReservedPort:
    """A port on 127.0.0.1 held for a server that may start later.

    The socket stays bound (not listening) until :meth:`release`, so no other socket (another
    process's, or any ``bind`` to port 0) is given the port meanwhile; ``moto_server(port=...)``
    releases it just before the server binds it.
    """

    def __init__(self) -> None:
        self._sock: socket.socket | None = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind((HOST, 0))
        self.port: int = self._sock.getsockname()[1]

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """What ``S3Server.env`` will hold once a server runs on this port."""
        return s3_env(self.endpoint_url)

    def release(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


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
def moto_server(
    start_timeout_s: float = START_TIMEOUT_S, port: ReservedPort | None = None
) -> Iterator[S3Server]:
    """Start ``moto_server -H 127.0.0.1 -p <free port>`` (the one beside ``sys.executable``),
    wait until it answers HTTP, yield an :class:`S3Server`, and stop it on exit.

    With `port`, the server listens on that reserved port (released here) and nowhere else:
    whoever was given ``port.env`` expects it there.

    Nothing global is changed here; apply ``server.env`` where needed.
    """
    exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
    if not os.path.exists(exe):
        raise RuntimeError(f"{exe} not found; install the dev extras (moto[server])")
    if port is not None:
        port.release()
    # Another process may grab a free port first: try others, unless the port was promised.
    attempts = 3 if port is None else 1
    with tempfile.TemporaryFile() as log:
        for _attempt in range(attempts):
            port_number = free_port() if port is None else port.port
            proc = subprocess.Popen(
                [exe, "-H", HOST, "-p", str(port_number)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            url = f"http://{HOST}:{port_number}"
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
                f"moto_server exited before answering (last tried {url}):\n"
                + log.read().decode(errors="replace")[-2000:]
            )
        try:
            yield S3Server(endpoint_url=url, pid=proc.pid, env=s3_env(url))
        finally:
            _stop(proc)
