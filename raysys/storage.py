"""Where raysys writes: a local directory or ``s3://bucket/prefix``, behind one small API.

Run directories, Ray Train's run storage (``RunConfig(storage_path=..., storage_filesystem=...)``),
``metrics.json`` and the Parquet embedding cache all go through this module, so a user switches
from local disk to S3 by passing an ``s3://`` URI and nothing else.

The S3 endpoint is configured the way boto3/s3fs/the AWS CLI users already know, from the
environment, so on AWS nothing needs setting (instance profile, default endpoint):

- ``AWS_ENDPOINT_URL_S3`` (preferred) or ``AWS_ENDPOINT_URL``: a custom S3-compatible endpoint,
  e.g. ``http://127.0.0.1:9000`` for MinIO or moto; ignored when
  ``AWS_IGNORE_CONFIGURED_ENDPOINT_URLS=true``, as boto does.
- ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` / ``AWS_PROFILE``:
  read by each client's default credential chain (never copied into a filesystem object, so a
  pickled filesystem sent to Ray workers carries no secret).
- ``AWS_REGION`` or ``AWS_DEFAULT_REGION``.

Two clients, one configuration: :func:`fsspec_fs` (s3fs, for Python file objects: ``torch.save``,
JSON, text) and :func:`pyarrow_fs` (for Parquet, Ray Data ``filesystem=`` and Ray Train
``storage_filesystem=``). :func:`pyarrow_fs` returns pyarrow's native C++ ``S3FileSystem``
rather than ``PyFileSystem(FSSpecHandler(s3fs))``: it is what Ray itself builds for ``s3://``
URIs, uploads in parallel multipart without holding the GIL, and pickles to Ray workers as just
its options (endpoint, region, timeouts). Both were checked against moto's S3 server; the native
one needs the endpoint *and* region passed explicitly (without a region the AWS C++ SDK probes
EC2 instance metadata, which stalls off EC2) and addresses buckets path-style when
``endpoint_override`` is set, which S3-compatible servers on an IP address need.

Timeouts: normal I/O connects within 5 s and makes at most 3 attempts, and
:func:`check_writable` fails in seconds (connect 2 s, read 5 s, one attempt, plus a whole-call
deadline) with a :class:`~raysys.errors.ConfigError` naming the bucket and endpoint. Call it
before any work starts. A wrong endpoint or a missing bucket then shows up at once, not after
minutes of retries. One gap remains: botocore sends uploads with ``Expect: 100-continue``, and
aiohttp's wait for that interim reply has no timeout. An s3fs upload to a server that accepts
connections but never answers therefore blocks. pyarrow's uploads do not (curl's low-speed limit
ends them after about 3 s per attempt).
"""

from __future__ import annotations

import os
import shutil
import uuid
from typing import TYPE_CHECKING, Any

from raysys.errors import ConfigError

if TYPE_CHECKING:
    import fsspec
    import pyarrow.fs

S3_SCHEME = "s3://"

# Normal I/O: tolerate a transient failure, but never retry a dead endpoint for minutes.
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0
MAX_ATTEMPTS = 3
# check_writable: a probe that must answer in seconds.
PROBE_CONNECT_TIMEOUT_S = 2.0
PROBE_READ_TIMEOUT_S = 5.0

PathLike = str | os.PathLike[str]


def is_remote(uri: PathLike) -> bool:
    """True for ``s3://`` URIs; local paths (and ``file://``) are False."""
    return str(uri).lower().startswith(S3_SCHEME)


def s3_endpoint() -> str | None:
    """The custom S3 endpoint from the environment, or None for AWS's own endpoints.

    Same precedence as botocore: the S3-specific variable wins over the global one.
    """
    if os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() == "true":
        return None
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        value = os.environ.get(var, "").strip()
        if value:
            return value.rstrip("/")
    return None


def s3_region() -> str | None:
    """The region from the environment (``AWS_REGION`` first, as the AWS SDKs read it)."""
    for var in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        value = os.environ.get(var, "").strip()
        if value:
            return value
    return None


def _split(uri: PathLike) -> tuple[bool, str]:
    """(remote, path): ``bucket/key`` for S3, an absolute local path otherwise."""
    text = os.fspath(uri)
    if is_remote(text):
        path = text[len(S3_SCHEME) :].strip("/")
        if not path or path.startswith("/"):
            raise ConfigError(f"{text!r} names no bucket; use s3://BUCKET/PREFIX")
        return True, path
    if text.lower().startswith("s3:/"):
        raise ConfigError(
            f"{text!r} is not a valid S3 URI (pathlib.Path turns s3://b/p into s3:/b/p; "
            "keep URIs as str): use s3://BUCKET/PREFIX"
        )
    if text.lower().startswith("file://"):
        text = text[len("file://") :]
    elif "://" in text:
        raise ConfigError(
            f"unsupported storage URI {text!r}: use a local path or s3://BUCKET/PREFIX"
        )
    return False, os.path.abspath(os.path.expanduser(text))


def _bucket(path: str) -> str:
    return path.split("/", 1)[0]


def _where(bucket: str) -> str:
    endpoint = s3_endpoint()
    where = f"endpoint {endpoint}" if endpoint else "AWS S3 (default endpoint)"
    return f"bucket {bucket!r} at {where}"


def _s3fs(probe: bool = False) -> fsspec.AbstractFileSystem:
    """An s3fs filesystem for the environment's endpoint/region (instances are cached by s3fs).

    Listings are not cached: pyarrow, Ray workers and other processes write to the same
    prefixes, and a stale listing would make :func:`exists` lie.
    """
    import s3fs  # lazy, as fsspec and pyarrow.fs: the CLI imports this module for --help

    endpoint = s3_endpoint()
    client_kwargs: dict[str, Any] = {}
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    region = s3_region()
    if region:
        client_kwargs["region_name"] = region
    config_kwargs: dict[str, Any] = {
        "connect_timeout": PROBE_CONNECT_TIMEOUT_S if probe else CONNECT_TIMEOUT_S,
        "read_timeout": PROBE_READ_TIMEOUT_S if probe else READ_TIMEOUT_S,
        "retries": {"max_attempts": 1 if probe else MAX_ATTEMPTS, "mode": "standard"},
    }
    if endpoint:
        # botocore >= 1.36 adds CRC checksums to every upload by default; several
        # S3-compatible servers reject them. Only send them where the API requires them,
        # unless the user chose otherwise through botocore's own variables.
        if "AWS_REQUEST_CHECKSUM_CALCULATION" not in os.environ:
            config_kwargs["request_checksum_calculation"] = "when_required"
        if "AWS_RESPONSE_CHECKSUM_VALIDATION" not in os.environ:
            config_kwargs["response_checksum_validation"] = "when_required"
    fs = s3fs.S3FileSystem(
        client_kwargs=client_kwargs, config_kwargs=config_kwargs, use_listings_cache=False
    )
    if probe:
        fs.retries = 1  # s3fs's own retry loop, on top of botocore's
    return fs


def fsspec_fs(uri: PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) for Python file I/O: s3fs and ``bucket/key``, or local and abspath."""
    remote, path = _split(uri)
    if remote:
        return _s3fs(), path
    from fsspec.implementations.local import LocalFileSystem

    return LocalFileSystem(auto_mkdir=True), path


def pyarrow_fs(uri: PathLike) -> tuple[pyarrow.fs.FileSystem, str]:
    """(filesystem, path) for pyarrow, Ray Data ``filesystem=`` and Ray Train
    ``storage_filesystem=`` (pass the returned path, without scheme, as ``storage_path``).

    S3 uses pyarrow's native ``S3FileSystem`` (see the module docstring for why); credentials
    come from the AWS SDK's default chain on whichever process uses it.
    """
    import pyarrow.fs as pafs

    remote, path = _split(uri)
    if not remote:
        return pafs.LocalFileSystem(), path
    kwargs: dict[str, Any] = {
        "connect_timeout": CONNECT_TIMEOUT_S,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=MAX_ATTEMPTS),
    }
    endpoint = s3_endpoint()
    region = s3_region()
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        kwargs["scheme"] = "http" if endpoint.lower().startswith("http://") else "https"
        # Any region signs requests for a custom endpoint; naming one avoids the SDK's
        # EC2-metadata lookup.
        kwargs["region"] = region or "us-east-1"
    else:
        if region is None:
            try:  # AWS: the bucket's own region, as pyarrow.fs.FileSystem.from_uri does
                region = pafs.resolve_s3_region(_bucket(path))
            except OSError:
                region = None
        if region:
            kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs), path


def join(uri: PathLike, *parts: str) -> str:
    """Join path parts onto a local path or an ``s3://`` URI (keeping the scheme)."""
    text = os.fspath(uri)
    clean = [str(p).strip("/") for p in parts if str(p).strip("/")]
    if is_remote(text):
        return "/".join([text.rstrip("/"), *clean])
    return os.path.join(text, *clean)


def exists(uri: PathLike) -> bool:
    """Whether a file or a non-empty prefix/directory exists at ``uri``."""
    fs, path = fsspec_fs(uri)
    return bool(fs.exists(path))


def list_names(uri: PathLike) -> list[str]:
    """The names directly under a directory or prefix, sorted; none when nothing is there."""
    fs, path = fsspec_fs(uri)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    names = {e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != path}
    return sorted(names)


def write_text(uri: PathLike, text: str) -> None:
    """Write UTF-8 text, creating local parent directories (S3 has none to create)."""
    fs, path = fsspec_fs(uri)
    fs.pipe_file(path, text.encode("utf-8"))


def read_text(uri: PathLike) -> str:
    """Read UTF-8 text; FileNotFoundError when there is no such file."""
    fs, path = fsspec_fs(uri)
    return fs.cat_file(path).decode("utf-8")


def upload_dir(local_dir: PathLike, uri: PathLike, last: str | None = None) -> None:
    """Copy the files under ``local_dir`` to ``uri`` (``local_dir/a/b`` → ``uri/a/b``);
    ``last`` (a top-level file name) goes up after all the others, so its presence says the
    rest is there.

    Lists are handed to s3fs in one call so uploads run concurrently; S3 keeps no empty
    directories.
    """
    src = os.path.abspath(os.fspath(local_dir))
    if not os.path.isdir(src):
        raise NotADirectoryError(f"not a directory: {src}")
    remote, dest = _split(uri)
    if not remote:
        shutil.copytree(src, dest, dirs_exist_ok=True)
        return
    local_files, remote_files = [], []
    for root, _dirs, files in os.walk(src):
        for name in files:
            full = os.path.join(root, name)
            local_files.append(full)
            rel = os.path.relpath(full, src).replace(os.sep, "/")
            remote_files.append(f"{dest}/{rel}")
    held = os.path.join(src, last) if last else None
    if held in local_files:
        at = local_files.index(held)
        later = (local_files.pop(at), remote_files.pop(at))
    else:
        later = None
    if local_files:
        _s3fs().put(local_files, remote_files)
    if later:
        _s3fs().put_file(*later)


def upload_file(local_file: PathLike, uri: PathLike) -> None:
    """Copy one local file to ``uri`` (an object on S3, or a path)."""
    remote, dest = _split(uri)
    if not remote:
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copyfile(local_file, dest)
        return
    _s3fs().put_file(os.fspath(local_file), dest)


def remove(uri: PathLike) -> None:
    """Delete a file, or a directory or prefix and everything under it; nothing there is
    no error."""
    remote, path = _split(uri)
    if not remote:
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.exists(path):
            os.remove(path)
        return
    # Through pyarrow, not s3fs's `rm`, which expands `[`, `*` and `?` as a glob: deleting
    # `runs/exp[1]/…` removed `runs/exp1/…` and kept its own.
    from pyarrow.fs import FileType

    fs, key = pyarrow_fs(uri)
    kind = fs.get_file_info(key).type
    if kind == FileType.Directory:
        fs.delete_dir(key)
    elif kind == FileType.File:
        fs.delete_file(key)


def download_file(uri: PathLike, local_file: PathLike) -> None:
    """Copy one object (or file) at ``uri`` to a local path; FileNotFoundError if absent."""
    remote, src = _split(uri)
    os.makedirs(os.path.dirname(os.path.abspath(local_file)), exist_ok=True)
    if not remote:
        shutil.copyfile(src, local_file)
        return
    _s3fs().get_file(src, os.fspath(local_file))


def download_dir(uri: PathLike, local_dir: PathLike) -> None:
    """Copy the files under ``uri`` into ``local_dir`` (``uri/a/b`` → ``local_dir/a/b``).

    FileNotFoundError when nothing exists under ``uri``.
    """
    remote, src = _split(uri)
    dest = os.path.abspath(os.fspath(local_dir))
    if not remote:
        if not os.path.isdir(src):
            raise FileNotFoundError(f"no directory at {src}")
        shutil.copytree(src, dest, dirs_exist_ok=True)
        return
    fs = _s3fs()
    prefix = src + "/"
    # find() lists files only; skip zero-byte "dir/" markers that some writers create.
    keys = [k for k in fs.find(src) if k.startswith(prefix) and not k.endswith("/")]
    if not keys:
        raise FileNotFoundError(f"nothing under {os.fspath(uri)}")
    local_files = [os.path.join(dest, *k[len(prefix) :].split("/")) for k in keys]
    for path in local_files:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    fs.get(keys, local_files)


def check_writable(uri: PathLike) -> None:
    """Fail fast, with a ConfigError saying what to fix, unless ``uri`` can be written.

    Writes and deletes a small probe object (S3) or file (local). On S3 this uses one attempt
    with 2 s connect and 5 s read timeouts, so a wrong endpoint or missing bucket is reported
    in seconds, before any extraction or training starts.
    """
    remote, path = _split(uri)
    probe_name = f".raysys-write-check-{uuid.uuid4().hex}"
    if not remote:
        try:
            os.makedirs(path, exist_ok=True)
            probe = os.path.join(path, probe_name)
            with open(probe, "wb"):
                pass
            os.remove(probe)
        except OSError as e:
            raise ConfigError(
                f"cannot write to {path}: {e.strerror or e}; choose a writable output directory"
            ) from e
        return
    bucket = _bucket(path)
    where = _where(bucket)
    fs = _s3fs(probe=True)
    probe = f"{path}/{probe_name}"
    # A whole-call deadline on top of the socket timeouts: botocore sends PutObject with
    # "Expect: 100-continue", and aiohttp's wait for the interim reply has no timeout of its
    # own, so a server that accepts connections but never answers would hang the probe.
    deadline = PROBE_CONNECT_TIMEOUT_S + PROBE_READ_TIMEOUT_S
    try:
        fs.pipe_file(probe, b"", timeout=deadline)  # `timeout=` is fsspec's sync() deadline
        fs.rm_file(probe, timeout=deadline)
    except FileNotFoundError as e:
        raise ConfigError(
            f"S3 {where} does not exist; create it (e.g. `aws s3 mb s3://{bucket}`) "
            f"or fix the URI {os.fspath(uri)!r}"
        ) from e
    except PermissionError as e:
        raise ConfigError(
            f"access denied writing to {os.fspath(uri)!r} ({where}): {e}; check the "
            "credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the "
            "instance role) and the bucket policy"
        ) from e
    except Exception as e:  # connection refused, timeouts, no credentials, bad names
        from fsspec.exceptions import FSTimeoutError

        reason = (
            f"no answer within {deadline:.0f} s"
            if isinstance(e, FSTimeoutError)
            else f"{type(e).__name__}: {e}"
        )
        hint = (
            "check AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL and that the server is running"
            if s3_endpoint()
            else "check network access to S3, the credentials and AWS_DEFAULT_REGION"
        )
        raise ConfigError(f"cannot write to {os.fspath(uri)!r} ({where}): {reason}; {hint}") from e


def check_readable(uri: PathLike, what: str = "input") -> None:
    """Fail fast, with a ConfigError saying what to fix, unless something exists at ``uri``.

    For inputs (manifests, shards): a wrong bucket, endpoint or path is reported in seconds,
    before any Ray or GPU work, with the same probe timeouts as :func:`check_writable`.
    """
    remote, path = _split(uri)
    if not remote:
        if not os.path.exists(path):
            raise ConfigError(f"{what} {os.fspath(uri)!r} does not exist; fix the path")
        return
    where = _where(_bucket(path))
    fs = _s3fs(probe=True)
    deadline = PROBE_CONNECT_TIMEOUT_S + PROBE_READ_TIMEOUT_S
    try:
        found = fs.exists(path, timeout=deadline)
    except PermissionError as e:
        raise ConfigError(
            f"access denied reading {os.fspath(uri)!r} ({where}): {e}; check the credentials "
            "and the bucket policy"
        ) from e
    except Exception as e:  # connection refused, timeouts, no credentials, bad names
        raise ConfigError(
            f"cannot read {what} {os.fspath(uri)!r} ({where}): {type(e).__name__}: {e}; "
            "check AWS_ENDPOINT_URL_S3 / the network, the credentials and the bucket name"
        ) from e
    if not found:
        raise ConfigError(f"{what} {os.fspath(uri)!r} does not exist ({where}); fix the URI")
