"""raysys.storage against local disk and a real S3-compatible server (moto, on 127.0.0.1).

Every API test runs twice, on a tmp directory and on ``s3://bucket/<unique prefix>``, so the
local and the S3 code paths are held to the same behaviour. No Ray is started.
"""

from __future__ import annotations

import os
import pickle
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from s3server import S3Server, free_port, moto_server

from raysys import storage
from raysys.errors import ConfigError

BUCKET = "raysys-test"


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with moto_server() as server:
        server.make_bucket(BUCKET)
        yield server


@pytest.fixture
def s3_env(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    s3.patch_env(monkeypatch)
    return s3


@pytest.fixture(params=["local", "s3"])
def base(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty output location: a local directory or a unique S3 prefix."""
    if request.param == "local":
        return str(tmp_path / "out")
    request.getfixturevalue("s3_env")
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _make_tree(root: Path) -> dict[str, bytes]:
    files = {
        "config.json": b'{"a": 1}',
        "model/weights.bin": os.urandom(70_000),
        "model/deep/er/empty.txt": b"",
        "notes with space.txt": "ünïcode\n".encode(),
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def test_is_remote_and_join() -> None:
    assert storage.is_remote("s3://b/p")
    assert storage.is_remote("S3://b/p")
    assert not storage.is_remote("/tmp/x")
    assert not storage.is_remote(Path("runs/x"))
    assert storage.join("s3://b/p", "models", "con/") == "s3://b/p/models/con"
    assert storage.join("s3://b/p/", "/a/b", "c.json") == "s3://b/p/a/b/c.json"
    assert storage.join("s3://b", "x") == "s3://b/x"
    assert storage.join("runs/x", "metrics.json") == os.path.join("runs/x", "metrics.json")
    assert storage.join(Path("/r"), "a", "b") == "/r/a/b"


def test_bad_uris() -> None:
    with pytest.raises(ConfigError, match="bucket"):
        storage.fsspec_fs("s3://")
    with pytest.raises(ConfigError, match="pathlib"):
        storage.exists(Path("s3://bucket/x"))
    with pytest.raises(ConfigError, match="unsupported"):
        storage.pyarrow_fs("gs://bucket/x")


def test_text_round_trip_and_exists(base: str) -> None:
    uri = storage.join(base, "sub", "metrics.json")
    assert not storage.exists(uri)
    assert not storage.exists(base)
    storage.write_text(uri, '{"i2t_r1": 0.71, "note": "ü"}')
    assert storage.exists(uri)
    assert storage.exists(storage.join(base, "sub"))  # a prefix with files counts
    assert storage.read_text(uri) == '{"i2t_r1": 0.71, "note": "ü"}'
    storage.write_text(uri, "overwritten")
    assert storage.read_text(uri) == "overwritten"
    with pytest.raises(FileNotFoundError):
        storage.read_text(storage.join(base, "missing.txt"))


def test_fsspec_and_pyarrow_paths(base: str) -> None:
    fs, path = storage.fsspec_fs(base)
    afs, apath = storage.pyarrow_fs(base)
    assert path == apath
    if storage.is_remote(base):
        assert path == base[len("s3://") :]
        assert "s3" in fs.protocol
        assert isinstance(afs, pafs.S3FileSystem)
    else:
        assert os.path.isabs(path)
        assert isinstance(afs, pafs.LocalFileSystem)


def test_upload_download_dir_round_trip(base: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = _make_tree(src)
    storage.upload_dir(src, storage.join(base, "run"))
    # a sibling whose name extends the prefix must not leak into the download
    storage.write_text(storage.join(base, "run2", "other.txt"), "not mine")
    dest = tmp_path / "dest"
    storage.download_dir(storage.join(base, "run"), dest)
    assert _tree(dest) == files
    # again into the same directory: files are overwritten, not nested
    storage.download_dir(storage.join(base, "run"), dest)
    assert _tree(dest) == files
    with pytest.raises(FileNotFoundError):
        storage.download_dir(storage.join(base, "nothing-here"), tmp_path / "x")


def test_parquet_through_pyarrow_fs(base: str) -> None:
    table = pa.table(
        {
            "id": pa.array(["a", "b", "c"]),
            "L00": pa.array([[0.5, 1.0], [1.5, 2.0], [-1.0, 0.0]], type=pa.list_(pa.float16())),
        }
    )
    fs, path = storage.pyarrow_fs(storage.join(base, "cache", "image", "part-0.parquet"))
    fs.create_dir(path.rsplit("/", 1)[0])
    pq.write_table(table, path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).equals(table)
    # a dataset directory, as Ray Data reads the cache
    dfs, dpath = storage.pyarrow_fs(storage.join(base, "cache", "image"))
    assert pq.read_table(dpath, filesystem=dfs).equals(table)


def test_torch_state_dict_through_fsspec(base: str) -> None:
    state = {"w": torch.randn(8, 4), "b": torch.arange(4), "step": torch.tensor(7)}
    fs, path = storage.fsspec_fs(storage.join(base, "ckpt", "state.pt"))
    with fs.open(path, "wb") as f:
        torch.save(state, f)
    with fs.open(path, "rb") as f:
        loaded = torch.load(f, weights_only=True)
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded[key], value)


def test_pyarrow_copy_files_directory_round_trip(base: str, tmp_path: Path) -> None:
    """What Ray Train does with a checkpoint directory and `storage_filesystem=`."""
    src = tmp_path / "ckpt"
    files = _make_tree(src)
    fs, path = storage.pyarrow_fs(storage.join(base, "ray", "checkpoint_000001"))
    fs = pickle.loads(pickle.dumps(fs))  # Ray ships the filesystem to workers by pickling
    pafs.copy_files(str(src), path, destination_filesystem=fs)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    listed = {i.path[len(path) + 1 :] for i in infos if i.type == pafs.FileType.File}
    assert listed == set(files)
    back = tmp_path / "back"
    pafs.copy_files(path, str(back), source_filesystem=fs)
    assert _tree(back) == files
    # and the s3fs side reads what pyarrow wrote
    storage.download_dir(storage.join(base, "ray", "checkpoint_000001"), tmp_path / "back2")
    assert _tree(tmp_path / "back2") == files


def test_check_writable_ok(base: str) -> None:
    storage.check_writable(base)
    fs, path = storage.fsspec_fs(base)
    assert not fs.exists(path) or not [p for p in fs.find(path) if ".raysys-write-check" in p]


def test_check_writable_local_not_writable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cannot write"):
        storage.check_writable(blocker / "out")


def test_check_writable_missing_bucket(s3_env: S3Server) -> None:
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        storage.check_writable("s3://no-such-bucket-xyz/runs/a")
    assert time.monotonic() - start < 10
    msg = str(err.value)
    assert "no-such-bucket-xyz" in msg and "does not exist" in msg
    assert s3_env.endpoint_url in msg


def test_check_writable_unreachable_endpoint(
    s3_env: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", dead)
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        storage.check_writable(f"s3://{BUCKET}/runs/a")
    assert time.monotonic() - start < 10
    assert dead in str(err.value) and BUCKET in str(err.value)
    assert "AWS_ENDPOINT_URL_S3" in str(err.value)


def test_check_writable_silent_endpoint(s3_env: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that accepts connections and never answers must not hang the check."""
    monkeypatch.setattr(storage, "PROBE_CONNECT_TIMEOUT_S", 1.0)
    monkeypatch.setattr(storage, "PROBE_READ_TIMEOUT_S", 1.0)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)  # the kernel completes handshakes; nobody ever reads or replies
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{sock.getsockname()[1]}")
        start = time.monotonic()
        with pytest.raises(ConfigError, match=BUCKET):
            storage.check_writable(f"s3://{BUCKET}/runs/a")
        assert time.monotonic() - start < 10


def test_endpoint_and_region_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS"):
        monkeypatch.delenv(var, raising=False)
    assert storage.s3_endpoint() is None
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1/")
    assert storage.s3_endpoint() == "http://127.0.0.1:1"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:2")
    assert storage.s3_endpoint() == "http://127.0.0.1:2"
    monkeypatch.setenv("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "true")
    assert storage.s3_endpoint() is None
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    assert storage.s3_region() == "eu-west-1"


def test_moto_server_helper(s3: S3Server) -> None:
    with pytest.raises(ValueError):
        s3.make_bucket("ab")
    assert s3.make_bucket("helper-check") == "s3://helper-check"
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3.storage_options)
    assert "helper-check" in fs.ls("")


def test_moto_server_stops_its_process() -> None:
    with moto_server() as server:
        assert server.endpoint_url.startswith("http://127.0.0.1:")
        os.kill(server.pid, 0)  # running
    with pytest.raises(ProcessLookupError):
        os.kill(server.pid, 0)


def test_remove_never_reads_a_path_as_a_glob(base: str) -> None:
    """s3fs's `rm` expanded `exp[1]` as a pattern: it deleted `exp1` and kept `exp[1]`."""
    for name in ("exp[1]", "exp1", "expX"):
        storage.write_text(storage.join(base, name, "ray", "ck", "a.json"), name)
    storage.remove(storage.join(base, "exp[1]", "ray", "ck"))
    assert not storage.exists(storage.join(base, "exp[1]", "ray", "ck", "a.json"))
    for name in ("exp1", "expX"):
        assert storage.read_text(storage.join(base, name, "ray", "ck", "a.json")) == name
    storage.remove(storage.join(base, "exp1", "ray", "ck", "a.json"))  # a file
    assert not storage.exists(storage.join(base, "exp1", "ray", "ck", "a.json"))
    storage.remove(storage.join(base, "nothing", "here"))  # nothing there: no error
