"""Model files that live elsewhere (an `s3://` folder, the Hugging Face Hub), made local on the
node that needs them.

A cluster's driver runs on a CPU head that never loads a model, and an autoscaled GPU node
starts with an empty disk, so no step may rely on files someone put on a machine by hand:

- An `s3://` folder (what `save_pretrained` wrote, or an open_clip folder) is copied once per
  node into `$RAYSYS_MODEL_CACHE` (default `~/.cache/raysys/models`), in a directory named by
  the URI and the objects' sizes and ETags. The copy is made in a temporary directory and
  renamed into place under a file lock, so two actors on one node copy it once and neither
  ever reads half a copy. Only what is needed travels: the small files (configs, tokenizer,
  processor) wherever a model is checked or inputs are prepared, the weights only where the
  model is loaded, and of the weights only the files the loader reads.
- The Hub is used when the environment allows it (`HF_HUB_OFFLINE` unset, as on a cluster
  node); raysys's own private local Ray runs offline (`raysys.runtime.loopback_env`).

A folder on S3 is treated as immutable: publish a new version under a new prefix. Its cache
key is the URI plus the objects' ETags, never a path on this machine.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from raysys import storage
from raysys.errors import BackboneError

CACHE_ENV = "RAYSYS_MODEL_CACHE"
# Files that hold weights (in any framework): copied only where the model is loaded.
WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".ot",
    ".onnx",
    ".gguf",
    ".npz",
    ".tflite",
)
RECORD = ".raysys-source.json"  # what a node-local copy was copied from, for people


def cache_root() -> Path:
    """Where node-local copies of remote models go: `$RAYSYS_MODEL_CACHE`, else
    `~/.cache/raysys/models` (a GPU node's own disk)."""
    root = os.environ.get(CACHE_ENV, "").strip()
    return Path(root).expanduser() if root else Path("~/.cache/raysys/models").expanduser()


def is_weights(name: str) -> bool:
    return name.lower().endswith(WEIGHT_SUFFIXES)


def _where() -> str:
    endpoint = storage.s3_endpoint()
    return f"endpoint {endpoint}" if endpoint else "AWS S3"


@dataclass(frozen=True)
class RemoteFile:
    name: str  # relative to the folder: top-level files only
    size: int
    etag: str


class RemoteFolder:
    """A folder of model files at an `s3://` URI, listed once per process (or once in the
    driver, when the owning backbone is pickled to tasks and actors after its check)."""

    def __init__(self, uri: str, what: str) -> None:
        self.uri = uri.rstrip("/")
        self.what = what  # how the user named it, for messages (`hf:s3://…`)
        self._files: dict[str, RemoteFile] | None = None

    def files(self) -> dict[str, RemoteFile]:
        """The folder's top-level objects; a missing or empty folder is a BackboneError."""
        if self._files is None:
            self._files = self._list()
        return self._files

    def _list(self) -> dict[str, RemoteFile]:
        fs, path = storage.fsspec_fs(self.uri)
        try:
            entries = fs.ls(path, detail=True)
        except FileNotFoundError:
            entries = []
        except PermissionError as exc:
            raise BackboneError(
                f"{self.what}: access denied listing {self.uri} ({_where()}): {exc}; check the "
                "node's credentials (instance role, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) "
                "and the bucket policy"
            ) from exc
        except Exception as exc:  # connection refused, timeouts, bad bucket names
            raise BackboneError(
                f"{self.what}: cannot list {self.uri} ({_where()}): {type(exc).__name__}: "
                f"{exc}; check AWS_ENDPOINT_URL_S3 / the network and the credentials"
            ) from exc
        found = {}
        for entry in entries:
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if entry.get("type") != "file" or not name or entry["name"].endswith("/"):
                continue  # sub-folders: loaders read a model folder's top level only
            tag = str(entry.get("ETag") or entry.get("LastModified") or "").strip('"')
            found[name] = RemoteFile(name, int(entry.get("size") or 0), tag)
        if not found:
            raise BackboneError(
                f"{self.what}: there is no model folder at {self.uri} ({_where()}): nothing is "
                "stored under that prefix. Upload the folder save_pretrained wrote (e.g. `aws "
                f"s3 sync ./my-model {self.uri}`), or fix the URI"
            )
        return found

    def has(self, name: str) -> bool:
        return name in self.files()

    def small_files(self) -> list[str]:
        """Everything but weights: configs, tokenizer, processor (what checks and the CPU
        stage read)."""
        return sorted(n for n in self.files() if not is_weights(n))

    def read_json(self, name: str) -> dict:
        """One small JSON file of the folder, read from the node-local copy of the small files."""
        path = self.local_copy(self.small_files()) / name
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise BackboneError(f"{self.what}: cannot read {self.uri}/{name}: {exc}") from exc

    def version(self, names: Iterable[str]) -> str:
        """A short hash of the URI and the named objects' sizes and ETags: what keys both the
        node-local copy and the embedding cache."""
        files = self.files()
        digest = hashlib.sha256(self.uri.encode())
        for name in sorted(set(names)):
            f = files[name]
            digest.update(f"\0{f.name}:{f.size}:{f.etag}".encode())
        return digest.hexdigest()[:16]

    def local_copy(self, names: Iterable[str]) -> Path:
        """A complete node-local copy of the named files (copied on first use on this node)."""
        wanted = sorted(set(names))
        missing = [n for n in wanted if not self.has(n)]
        if missing:
            raise BackboneError(f"{self.what}: {self.uri} has no {', '.join(missing)}")
        slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.uri.rsplit("/")[-1])
        return node_copy(self, wanted, f"{slug[:60]}-{self.version(wanted)}")


@contextlib.contextmanager
def _locked(path: Path, waiting: str) -> Iterator[None]:
    """An exclusive lock on `path` across processes and threads (each open is its own lock
    holder); released by the kernel if the holder dies, so no lock is ever left stale. Where
    the filesystem has no locks the rename in `node_copy` still keeps copies whole."""
    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(waiting, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:
            pass  # no locks on this filesystem
        yield


def node_copy(folder: RemoteFolder, names: list[str], key: str) -> Path:
    """`<cache root>/<key>/` holding `names` from `folder`: if it exists it is complete (it is
    only ever created by a rename), otherwise one process per node copies it."""
    root = cache_root()
    final = root / key
    if final.is_dir():
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BackboneError(
            f"{folder.what}: cannot create the model cache {root}: {exc}; set {CACHE_ENV} to a "
            "writable directory on the node's local disk"
        ) from exc
    waiting = f"[model] {folder.what}: another process on this node is copying it; waiting"
    with _locked(root / f".{key}.lock", waiting):
        if final.is_dir():  # another process copied it while this one waited
            return final
        for stale in root.glob(f".tmp-{key}-*"):  # left by a process that died mid-copy
            shutil.rmtree(stale, ignore_errors=True)
        files = [folder.files()[n] for n in names]
        total = sum(f.size for f in files)
        free = shutil.disk_usage(root).free
        if total > free:
            raise BackboneError(
                f"{folder.what}: copying {folder.uri} needs {total / 1e9:.2f} GB but {root} has "
                f"{free / 1e9:.2f} GB free; set {CACHE_ENV} to a larger local disk"
            )
        tmp = root / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        print(
            f"[model] {folder.what}: copying {len(files)} files ({total / 1e6:.1f} MB) from "
            f"{folder.uri} into {final}",
            flush=True,
        )
        start = time.monotonic()
        try:
            _download(folder, files, tmp)
            (tmp / RECORD).write_text(
                json.dumps({"uri": folder.uri, "files": [vars(f) for f in files]}, indent=1)
            )
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.is_dir():  # not a lost race: a real failure
                    raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # only left when a racer without locks won
        print(f"[model] {folder.what}: copied in {time.monotonic() - start:.1f} s", flush=True)
    return final


def _download(folder: RemoteFolder, files: list[RemoteFile], into: Path) -> None:
    fs, path = storage.fsspec_fs(folder.uri)
    sources = [f"{path}/{f.name}" for f in files]
    targets = [str(into / f.name) for f in files]
    try:
        fs.get(sources, targets)
    except Exception as exc:
        raise BackboneError(
            f"{folder.what}: copying {folder.uri} failed ({_where()}): {type(exc).__name__}: "
            f"{exc}; check the node's access to the bucket"
        ) from exc
    for f, target in zip(files, targets, strict=True):
        size = os.path.getsize(target) if os.path.exists(target) else -1
        if size != f.size:
            raise BackboneError(
                f"{folder.what}: {folder.uri}/{f.name} is {size} bytes on arrival, not the "
                f"{f.size} listed: the folder changed while it was copied. A model folder on "
                "S3 must not change once published; upload a new version to a new prefix"
            )


# --- the Hugging Face Hub -------------------------------------------------------------------


def hub_offline() -> bool:
    """Whether the Hub may be contacted: huggingface_hub's own setting (`HF_HUB_OFFLINE` or
    `TRANSFORMERS_OFFLINE` when it was imported), so raysys decides exactly as the loaders it
    calls will behave."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_error(what: str, repo: str, wanted: str, exc: Exception) -> BackboneError:
    """A Hub failure as a BackboneError that says which case it is and what to do."""
    from huggingface_hub import errors

    if isinstance(exc, errors.LocalEntryNotFoundError):  # no answer, and not in the cache
        cause = exc.__cause__ or exc
        first = (str(cause).strip().splitlines() or [""])[0]
        why = f"the Hub could not be reached ({type(cause).__name__}: {first})"
    elif isinstance(exc, errors.GatedRepoError):
        why = "the repo is gated: accept its terms on the Hub and set HF_TOKEN on every node"
    elif isinstance(exc, errors.RepositoryNotFoundError):
        why = "no such repo (or it is private: set HF_TOKEN on every node)"
    elif isinstance(exc, errors.RevisionNotFoundError):
        why = "no such revision"
    elif isinstance(exc, errors.EntryNotFoundError):
        why = f"the repo has no {wanted}"
    elif isinstance(exc, errors.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        why = f"the Hub answered HTTP {status}"
    else:
        first = (str(exc).strip().splitlines() or [""])[0]
        why = f"the Hub could not be reached ({type(exc).__name__}: {first})"
    return BackboneError(
        f"{what}: cannot get {wanted} of {repo} from the Hugging Face Hub: {why}. Where the "
        "cluster cannot reach the Hub, save the model (save_pretrained) to an S3 folder and "
        "name it hf:s3://bucket/prefix, or pre-download it and set HF_HUB_OFFLINE=1"
    )


def hub_download(what: str, repo: str, filename: str, revision: str | None = None) -> str:
    """One small file of a Hub repo (a config), downloaded into this node's HF cache."""
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo, filename, revision=revision)
    except Exception as exc:
        raise hub_error(what, repo, filename, exc) from exc


def hub_files(what: str, repo: str, revision: str | None = None) -> set[str]:
    """The file names of a Hub repo at a revision: what a check needs to know that the weights
    exist, without downloading them."""
    from huggingface_hub import HfApi

    try:
        return set(HfApi().list_repo_files(repo, revision=revision))
    except Exception as exc:
        raise hub_error(what, repo, "the file list", exc) from exc
