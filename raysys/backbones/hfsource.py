"""Where a Hugging Face model lives: a local folder, or a hub id (optionally `@revision`) that
must already be in the local Hugging Face cache, because raysys runs offline (HF_HUB_OFFLINE):
an actor that starts a multi-GB download mid-extraction is worse than a clear error up front.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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
    """`spec` is `<hub id>[@revision]` or a folder path. A path that exists is always a
    folder (as in `from_pretrained`); anything else that is not path-like is a hub id."""

    def __init__(self, spec: str) -> None:
        if not spec.strip():
            raise BackboneError("empty Hugging Face model: write hf:<hub id or folder>[@revision]")
        self.spec = spec
        self.revision: str | None = None
        path = Path(spec).expanduser()
        if not path.is_dir() and "@" in spec and not _looks_like_path(spec):
            spec, self.revision = spec.rsplit("@", 1)
            path = Path(spec).expanduser()
        self.local = path.is_dir() or _looks_like_path(spec)
        if self.local and self.revision:
            raise BackboneError(f"hf:{self.spec}: @revision applies to hub ids, not folders")
        # Absolute, because Ray workers run in their own working directories.
        self.location = str(path.resolve()) if self.local else spec

    def kwargs(self) -> dict[str, Any]:
        """Extra `from_pretrained` arguments: hub ids resolve from the cache only."""
        if self.local:
            return {}
        return {"revision": self.revision, "local_files_only": True}

    def _cached(self, filename: str) -> str | None:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(self.location, filename, revision=self.revision)
        return found if isinstance(found, str) else None

    def _how_to_fix(self) -> str:
        rev = f" --revision {self.revision}" if self.revision else ""
        return (
            f"download it first with `huggingface-cli download {self.location}{rev}` (on every "
            "node, or with a shared HF_HOME), or give a local folder saved with save_pretrained "
            "as hf:/path/to/folder"
        )

    def require(self, *groups: tuple[str, ...], what: str = "model") -> None:
        """Each group of alternative file names must have one present (config, weights,
        processor…); checks file existence only, never loads."""
        for names in groups:
            if self.local:
                found = any((Path(self.location) / n).is_file() for n in names)
            else:
                found = any(self._cached(n) for n in names)
            if found:
                continue
            wanted = " or ".join(names)
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
            raise BackboneError(
                f"{what} {self.location}{at}: {wanted} is not in the local Hugging Face cache "
                f"and raysys runs offline; {self._how_to_fix()}"
            )

    def config(self):
        """The model's `AutoConfig` (config.json only)."""
        from transformers import AutoConfig

        self.require(("config.json",))
        try:
            return AutoConfig.from_pretrained(self.location, **self.kwargs())
        except (OSError, ValueError, KeyError) as exc:
            raise BackboneError(f"cannot read the config of {self.location}: {exc}") from exc

    def source(self) -> str:
        """What names the model in a cache key: the hub id, or the folder for local models."""
        return self.location

    def revision_key(self) -> str:
        """The commit a hub id resolves to in the local cache (so `@main` keys the cache by
        what was actually used), or a fingerprint of a local folder's files (names, sizes,
        mtimes and config text) so a re-saved model never reuses a stale cache."""
        if not self.local:
            found = self._cached("config.json")
            if found:
                return Path(found).parent.name  # .../snapshots/<commit>/config.json
            return self.revision or "main"
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


def load_model(cls, source: HFSource, what: str, ignore: tuple[str, ...] = ()):
    """`cls.from_pretrained` from the source, eval and frozen; weights that the model needs
    but the checkpoint lacks are an error (not a silent random init), except names containing
    one of `ignore` (heads we never read)."""
    with quiet_transformers():
        model, info = cls.from_pretrained(
            source.location, output_loading_info=True, **source.kwargs()
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
