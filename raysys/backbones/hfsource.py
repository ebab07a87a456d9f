"""Where a Hugging Face model lives: a local folder, a folder on S3 (`s3://bucket/prefix`,
what `save_pretrained` wrote), or a hub id (optionally `@revision`).

An S3 folder is copied once per node (`raysys.backbones.fetch`): the small files wherever the
model is checked or its inputs prepared, the weights only where it is loaded. A hub id comes
from the Hub where the environment allows it (a cluster node: `HF_HUB_OFFLINE` unset); offline
(raysys's own local Ray) it must already be in the local Hugging Face cache, because an actor
that fails mid-extraction is worse than a clear error up front.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from raysys import storage
from raysys.backbones.fetch import RemoteFolder, hub_download, hub_files, hub_offline
from raysys.errors import BackboneError

WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", ".", "~"))


class HFSource:
    """`spec` is `<hub id>[@revision]`, a folder path or an `s3://` folder. A path that exists
    is always a folder (as in `from_pretrained`); anything else that is not path-like is a hub
    id."""

    def __init__(self, spec: str) -> None:
        if not spec.strip():
            raise BackboneError("empty Hugging Face model: write hf:<hub id or folder>[@revision]")
        self.spec = spec
        self.revision: str | None = None
        self.commit: str | None = None  # a hub id's resolved commit, pinned for the actors
        self._repo_files: set[str] | None = None
        self.remote: RemoteFolder | None = None
        if storage.is_remote(spec):
            self.remote = RemoteFolder(spec, f"hf:{spec}")
            self.local = False
            self.location = self.remote.uri
            return
        path = Path(spec).expanduser()
        if not path.is_dir() and "@" in spec and not _looks_like_path(spec):
            spec, self.revision = spec.rsplit("@", 1)
            path = Path(spec).expanduser()
        if "://" in spec:
            raise BackboneError(
                f"hf:{self.spec}: only s3:// URIs are supported for model folders (or a local "
                "folder, or a hub id)"
            )
        self.local = path.is_dir() or _looks_like_path(spec)
        if self.local and self.revision:
            raise BackboneError(f"hf:{self.spec}: @revision applies to hub ids, not folders")
        # Absolute, because Ray workers run in their own working directories.
        self.location = str(path.resolve()) if self.local else spec

    @property
    def hub(self) -> bool:
        return not self.local and self.remote is None

    def kwargs(self) -> dict[str, Any]:
        """Extra `from_pretrained` arguments: hub ids resolve from the cache only when offline,
        and at the commit the driver resolved when online (every actor loads the same model)."""
        if not self.hub:
            return {}
        if hub_offline():  # a node offline still loads the driver's commit, if it pinned one
            return {"revision": self.commit or self.revision, "local_files_only": True}
        return {"revision": self.commit or self.revision}

    def files_dir(self) -> str:
        """What `from_pretrained` of a config, tokenizer or processor reads: for an S3 folder,
        a node-local copy of its small files (never the weights)."""
        if self.remote is not None:
            return str(self.remote.local_copy(self.remote.small_files()))
        return self.location

    def weights_dir(self) -> str:
        """What the model's `from_pretrained` reads: for an S3 folder, a node-local copy of
        the small files and of the weight files transformers loads."""
        if self.remote is not None:
            return str(self.remote.local_copy(self.remote.small_files() + self._weight_files()))
        return self.location

    def _weight_files(self) -> list[str]:
        """The weight files transformers reads from this S3 folder (safetensors first, as it
        does; a sharded checkpoint's shards from its index), so other formats and stray
        checkpoints beside them are never copied."""
        assert self.remote is not None
        for index, single in (WEIGHTS[1], WEIGHTS[0]), (WEIGHTS[3], WEIGHTS[2]):
            if self.remote.has(index):
                shards = sorted(set(self.remote.read_json(index).get("weight_map", {}).values()))
                absent = [s for s in shards if not self.remote.has(s)]
                if absent or not shards:
                    raise BackboneError(
                        f"hf:{self.spec}: {index} lists shards that are not in the folder "
                        f"({', '.join(absent[:3]) or 'none listed'}); upload the whole folder "
                        "save_pretrained wrote"
                    )
                return shards
            if self.remote.has(single):
                return [single]
        self.require(WEIGHTS)  # raises, naming the folder and what to upload
        return []

    def _cached(self, filename: str) -> str | None:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(self.location, filename, revision=self.revision)
        return found if isinstance(found, str) else None

    def _how_to_fix(self) -> str:
        rev = f" --revision {self.revision}" if self.revision else ""
        return (
            f"download it first with `hf download {self.location}{rev}` (on every "
            "node, or with a shared HF_HOME), give a local folder saved with save_pretrained "
            "as hf:/path/to/folder, or on a cluster an S3 copy of that folder as "
            "hf:s3://bucket/prefix (or leave HF_HUB_OFFLINE unset where nodes reach the Hub)"
        )

    def _on_hub(self, name: str) -> bool:
        if self._repo_files is None:
            self._repo_files = hub_files(f"hf:{self.spec}", self.location, self._revision())
        return name in self._repo_files

    def _revision(self) -> str | None:
        return self.commit or self.revision

    def require(self, *groups: tuple[str, ...], what: str = "model") -> None:
        """Each group of alternative file names must have one present (config, weights,
        processor…); checks file existence only (listings, never downloads of weights)."""
        for names in groups:
            if self.local:
                found = any((Path(self.location) / n).is_file() for n in names)
            elif self.remote is not None:
                found = any(self.remote.has(n) for n in names)
            else:
                found = any(self._cached(n) for n in names)
                if not found and not hub_offline():
                    found = any(self._on_hub(n) for n in names)
            if found:
                continue
            wanted = " or ".join(names)
            if self.remote is not None:
                raise BackboneError(
                    f"{what}: the folder {self.location} has no {wanted}; upload the whole "
                    "folder that save_pretrained wrote for the model and its tokenizer or "
                    f"image processor (e.g. `aws s3 sync ./my-model {self.location}`)"
                )
            if self.local:
                if not Path(self.location).is_dir():
                    raise BackboneError(
                        f"{what} folder {self.location!r} does not exist; give a folder saved "
                        "with save_pretrained, or a hub id that is in the local cache"
                    )
                raise BackboneError(
                    f"{what} folder {self.location!r} has no {wanted}; save the model (and its "
                    "tokenizer or image processor) there with save_pretrained"
                )
            at = f"@{self.revision}" if self.revision else ""
            if not hub_offline():
                raise BackboneError(
                    f"{what} {self.location}{at}: the repo has no {wanted} on the Hugging Face "
                    "Hub; is it the right model?"
                )
            raise BackboneError(
                f"{what} {self.location}{at}: {wanted} is not in the local Hugging Face cache "
                f"and raysys runs offline (HF_HUB_OFFLINE is set); {self._how_to_fix()}"
            )

    def config(self):
        """The model's `AutoConfig` (config.json only). Online, a hub id's config comes from
        this machine's HF cache if there, else from the Hub; either way its commit is pinned,
        so every actor loads the model the cache key names."""
        from transformers import AutoConfig

        if self.hub and not hub_offline():
            if not self._cached("config.json"):
                hub_download(f"hf:{self.spec}", self.location, "config.json", self.revision)
            self.commit = self.commit or self._snapshot()
        self.require(("config.json",))
        try:
            return AutoConfig.from_pretrained(self.files_dir(), **self.kwargs())
        except (OSError, ValueError, KeyError) as exc:
            raise BackboneError(f"cannot read the config of {self.location}: {exc}") from exc

    def source(self) -> str:
        """What names the model in a cache key: the hub id, the S3 URI, or the folder for
        local models."""
        return self.location

    def _snapshot(self) -> str | None:
        found = self._cached("config.json")
        return Path(found).parent.name if found else None  # .../snapshots/<commit>/config.json

    def revision_key(self) -> str:
        """The commit a hub id resolves to (so `@main` keys the cache by what was actually
        used), the sizes and ETags of an S3 folder's files, or a fingerprint of a local
        folder's files (names, sizes, mtimes and config text) so a re-saved model never reuses
        a stale cache."""
        if self.remote is not None:
            used = self.remote.small_files() + self._weight_files()
            return "s3:" + self.remote.version(used)
        if not self.local:
            return self.commit or self._snapshot() or self.revision or "main"
        folder = Path(self.location)
        files = sorted(f for f in folder.iterdir() if f.is_file()) if folder.is_dir() else []
        return "local:" + fingerprint(files, folder / "config.json")


def fingerprint(files: list[Path], *contents: Path) -> str:
    """A short hash of files' names, sizes and mtimes plus the text of `contents` (configs):
    cheap (no weights are read), and any re-save changes it."""
    digest = hashlib.sha256()
    for f in files:
        if f.is_file():
            stat = f.stat()
            digest.update(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    for f in contents:
        if f.is_file():
            digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


@contextmanager
def quiet_transformers():
    """Silence transformers' per-load reports (it lists, for example, every text-tower weight
    it skips when only a CLIP vision tower is loaded); real problems are checked from
    `output_loading_info` instead."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def dtype_kwargs(dtype, version: str = "") -> dict[str, Any]:
    """`from_pretrained`'s weight-dtype argument for transformers `version` (default: the
    installed one): `dtype` from 4.56 (5.x warns on the old name), `torch_dtype` before it
    (which pyproject still allows). Always given: left out, 4.x loads float32 and 5.x the
    checkpoint's own dtype, so one config would load a 7B LM in 28 GB on one version and
    14 GB on the other."""
    from packaging.version import Version

    if not version:
        import transformers

        version = transformers.__version__
    new = Version(version).release >= (4, 56)
    return {"dtype" if new else "torch_dtype": dtype}


def load_model(cls, source: HFSource, what: str, ignore: tuple[str, ...] = (), dtype=None):
    """`cls.from_pretrained` from the source, eval and frozen, with weights in `dtype`
    (default float32); weights that the model needs but the checkpoint lacks are an error
    (not a silent random init), except names containing one of `ignore` (heads we never
    read)."""
    import torch

    with quiet_transformers():
        model, info = cls.from_pretrained(
            source.weights_dir(),
            output_loading_info=True,
            **dtype_kwargs(dtype or torch.float32),
            **source.kwargs(),
        )
    missing = [k for k in info.get("missing_keys", ()) if not any(s in k for s in ignore)]
    if missing:
        raise BackboneError(
            f"{what}: {len(missing)} weights of {cls.__name__} are missing from "
            f"{source.location} (e.g. {sorted(missing)[:3]}); is it the right model?"
        )
    return model.eval().requires_grad_(False)


def meta_param_count(cls, config) -> int:
    """Parameters of `cls(config)` built on the meta device: no weights read, no memory
    taken, so a sweep driver can size a 7B model on a CPU head."""
    import torch

    with quiet_transformers(), torch.device("meta"):
        model = cls(config)
    return sum(p.numel() for p in model.parameters())
