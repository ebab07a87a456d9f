"""What an `open_clip:` backbone name refers to: its model config, preprocessing settings and
weights, found without network access, and the source/revision fields of its cache key.

Kept apart from the towers (`raysys.backbones.openclip`), which only hook and pool a loaded
model; everything that reads files, the Hugging Face cache or open_clip's registries is here.
open_clip is imported inside the functions that need it: the import costs seconds and most
runs never touch an open_clip backbone.

Names (after `open_clip:`):

- `local-dir:<folder>` — open_clip's own folder format: `open_clip_config.json`
  (`{"model_cfg": {...}, "preprocess_cfg": {...}}`) plus a weights file
  (`open_clip_model.safetensors`, `open_clip_pytorch_model.bin`, …). This is how a custom
  architecture with its weights is usually given.
- `s3://bucket/prefix` (or `local-dir:s3://bucket/prefix`) — the same folder on S3, copied once
  per node into a local cache (`raysys.backbones.fetch`): its small files where the model is
  checked or captions are tokenized, its weights file only where the model is loaded.
- `hf-hub:<org/repo>` — the same format on the Hugging Face hub; fetched from the Hub where the
  environment allows it (`HF_HUB_OFFLINE` unset), else it must be in the local cache.
- `<arch>:<pretrained tag>` — a built-in architecture and one of its tags (offline, its
  weights must be in the local cache), e.g. `ViT-B-32:laion2b_s34b_b79k`.
- `<arch>:<weights file>` — a built-in architecture with a local checkpoint, or a custom one:
  `<arch>` may be a path to a model-config JSON (`{"embed_dim", "vision_cfg", "text_cfg"}`)
  registered with `open_clip.add_model_config`; its file stem becomes the architecture name.
  Normalisation is open_clip's default (OpenAI mean/std) for a bare weights file.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from raysys import storage
from raysys.backbones.fetch import RemoteFolder, hub_download, hub_files, hub_offline, is_weights
from raysys.backbones.hfsource import fingerprint
from raysys.errors import BackboneError

PREFIX = "open_clip:"
CONFIG_FILE = "open_clip_config.json"
HUB_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# The weights file open_clip takes from a folder when there are several (its own preference).
FOLDER_WEIGHTS = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.pth",
    "model.pth",
)
OPEN_CLIP_PRECISION = {
    torch.float32: "fp32",
    torch.bfloat16: "pure_bf16",
    torch.float16: "pure_fp16",
}
FORMS = (
    "open_clip:local-dir:<folder>, open_clip:s3://bucket/<folder>, open_clip:hf-hub:<org/repo>, "
    "open_clip:<arch>:<pretrained tag or weights file>, open_clip:<config.json>:<weights file>"
)


class OpenCLIPSource:
    """Parses an `open_clip:` name and answers, from configs only, what it refers to."""

    def __init__(self, name: str) -> None:
        spec = name[len(PREFIX) :] if name.startswith(PREFIX) else name
        self.name = name
        self.folder: Path | None = None
        self.repo = ""
        self.arch = ""
        self.arch_file: Path | None = None
        self.tag = ""
        self.weights: Path | None = None
        self.remote: RemoteFolder | None = None
        if storage.is_remote(spec.removeprefix("local-dir:")):
            self.remote = RemoteFolder(spec.removeprefix("local-dir:"), name)
        elif spec.startswith("local-dir:"):
            self.folder = Path(spec[len("local-dir:") :]).expanduser().resolve()
        elif spec.startswith("hf-hub:"):
            self.repo = spec[len("hf-hub:") :]
        else:
            arch, _, pretrained = spec.partition(":")
            if not arch or not pretrained:
                raise BackboneError(
                    f"backbone {name!r} names no weights (a random tower is useless here); "
                    f"write one of {FORMS}"
                )
            if "://" in pretrained or "://" in arch:
                raise BackboneError(
                    f"backbone {name!r}: a URI is accepted only as a whole open_clip folder, "
                    "open_clip:s3://bucket/<folder> (open_clip_config.json and a weights file)"
                )
            if arch.endswith(".json"):
                self.arch_file = Path(arch).expanduser().resolve()
                arch = self.arch_file.stem
            self.arch = arch
            path = Path(pretrained).expanduser()
            if path.suffix in (".safetensors", ".bin", ".pt", ".pth", ".npz") or path.exists():
                self.weights = path.resolve()
            else:
                self.tag = pretrained

    @property
    def model_name(self) -> str:
        """The name open_clip's own `create_model` / `get_tokenizer` take (for an S3 folder:
        the node-local copy of its small files, enough for the tokenizer)."""
        if self.remote is not None:
            return f"local-dir:{self.remote.local_copy(self.remote.small_files())}"
        if self.folder is not None:
            return f"local-dir:{self.folder}"
        if self.repo:
            return f"hf-hub:{self.repo}"
        return self.arch

    def register(self) -> None:
        """Make a custom architecture JSON known to open_clip in this process (its registry is
        per process, so the driver, CPU tasks and actors each do it)."""
        import open_clip

        if self.arch_file is None:
            return
        if not self.arch_file.is_file():
            raise BackboneError(f"{self.name}: model config {str(self.arch_file)!r} not found")
        wanted = json.loads(self.arch_file.read_text())
        if open_clip.get_model_config(self.arch) == wanted:
            return  # registered already (a later file of the same name wins, as here)
        open_clip.add_model_config(self.arch_file)
        if open_clip.get_model_config(self.arch) != wanted:
            raise BackboneError(
                f"{self.name}: {str(self.arch_file)!r} is not an open_clip model config; it "
                "needs top-level embed_dim, vision_cfg and text_cfg"
            )

    def _hub_file(self, repo: str, filename: str) -> str | None:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo, filename)
        return found if isinstance(found, str) else None

    def _not_cached(self, what: str, repo: str) -> BackboneError:
        return BackboneError(
            f"{self.name}: {what} is not in the local Hugging Face cache and raysys runs "
            f"offline (HF_HUB_OFFLINE is set); download it first with `hf download "
            f"{repo}` (on every node, or with a shared HF_HOME), give a local folder as "
            "open_clip:local-dir:<folder>, or on a cluster an S3 copy of that folder as "
            "open_clip:s3://bucket/<folder>"
        )

    def _folder_config(self) -> dict[str, Any]:
        if self.remote is not None:
            if not self.remote.has(CONFIG_FILE):
                raise BackboneError(
                    f"{self.name}: no {CONFIG_FILE} in {self.remote.uri}; upload an open_clip "
                    'folder there: {"model_cfg": ..., "preprocess_cfg": ...} in '
                    f"{CONFIG_FILE} and a weights file"
                )
            path = self.remote.local_copy(self.remote.small_files()) / CONFIG_FILE
        elif self.folder is not None:
            path = self.folder / CONFIG_FILE
            if not path.is_file():
                raise BackboneError(
                    f"{self.name}: no {CONFIG_FILE} in {str(self.folder)!r}; an open_clip folder "
                    'holds {"model_cfg": ..., "preprocess_cfg": ...} and a weights file'
                )
        else:
            found = self._hub_file(self.repo, CONFIG_FILE)
            if found is None and not hub_offline():
                found = hub_download(self.name, self.repo, CONFIG_FILE)
            if found is None:
                raise self._not_cached(CONFIG_FILE, self.repo)
            path = Path(found)
        config = json.loads(path.read_text())
        if "model_cfg" not in config:
            raise BackboneError(f"{self.name}: {path} has no 'model_cfg'")
        return config

    def model_cfg(self) -> dict[str, Any]:
        import open_clip

        if self.folder is not None or self.repo or self.remote is not None:
            return self._folder_config()["model_cfg"]
        self.register()
        cfg = open_clip.get_model_config(self.arch)
        if cfg is None:
            raise BackboneError(
                f"{self.name}: unknown open_clip architecture {self.arch!r} (see "
                "open_clip.list_models()); give a built-in name or a path to a model-config JSON"
            )
        return cfg

    def preprocess_cfg(self) -> dict[str, Any]:
        """Normalisation and resize settings, as `create_model` would derive them."""
        import open_clip
        from open_clip.transform import PreprocessCfg, merge_preprocess_dict

        base = asdict(PreprocessCfg())
        if self.folder is not None or self.repo or self.remote is not None:
            return merge_preprocess_dict(base, self._folder_config().get("preprocess_cfg", {}))
        if self.tag:
            return merge_preprocess_dict(base, open_clip.get_pretrained_cfg(self.arch, self.tag))
        return base

    def remote_weights(self) -> str:
        """The one weights file of an S3 folder that open_clip would load from it."""
        assert self.remote is not None
        names = [n for n in self.remote.files() if is_weights(n)]
        usable = [n for n in names if n.endswith((".safetensors", ".bin", ".pth"))]
        if not usable:
            raise BackboneError(
                f"{self.name}: no weights (*.safetensors, *.bin, *.pth) in {self.remote.uri}; "
                "upload the weights file beside open_clip_config.json (open_clip would build "
                "a random model)"
            )
        preferred = [n for n in FOLDER_WEIGHTS if n in usable]
        if preferred:
            return preferred[0]
        return sorted(usable, key=lambda n: (not n.endswith(".safetensors"), n))[0]

    def check_weights(self) -> None:
        import open_clip

        if self.remote is not None:
            self._folder_config()
            self.remote_weights()
        elif self.folder is not None:
            self._folder_config()
            weights = [f for p in ("*.safetensors", "*.bin", "*.pth") for f in self.folder.glob(p)]
            if not weights:
                raise BackboneError(
                    f"{self.name}: no weights (*.safetensors, *.bin, *.pth) in "
                    f"{str(self.folder)!r}; open_clip would build a random model"
                )
        elif self.repo:
            self._folder_config()
            if any(self._hub_file(self.repo, f) for f in HUB_WEIGHTS):
                return
            if hub_offline():
                raise self._not_cached(" or ".join(HUB_WEIGHTS), self.repo)
            if not set(HUB_WEIGHTS) & hub_files(self.name, self.repo):
                raise BackboneError(
                    f"{self.name}: the Hub repo {self.repo} has no {' or '.join(HUB_WEIGHTS)}"
                )
        elif self.weights is not None:
            if not self.weights.is_file():
                raise BackboneError(f"{self.name}: weights file {str(self.weights)!r} not found")
        else:
            cfg = open_clip.get_pretrained_cfg(self.arch, self.tag)
            if not cfg:
                tags = open_clip.list_pretrained_tags_by_model(self.arch)
                raise BackboneError(
                    f"{self.name}: {self.tag!r} is neither a weights file nor a pretrained tag of "
                    f"{self.arch}; tags: {', '.join(tags) or 'none'}"
                )
            if cfg.get("hf_hub"):
                repo, filename = os.path.split(cfg["hf_hub"])
                names = [filename] if filename else list(HUB_WEIGHTS)
                names += [n.rsplit(".", 1)[0] + ".safetensors" for n in names]
                if any(self._hub_file(repo, n) for n in names):
                    return
                if hub_offline():
                    raise self._not_cached(f"the weights of {self.arch}:{self.tag}", repo)
                if not set(names) & hub_files(self.name, repo):
                    raise BackboneError(f"{self.name}: the Hub repo {repo} has no {names[0]}")
            elif hub_offline():
                target = Path("~/.cache/clip").expanduser() / os.path.basename(cfg.get("url", ""))
                if not target.is_file():
                    raise BackboneError(
                        f"{self.name}: weights {cfg.get('url')} are not in {target.parent} and "
                        "raysys runs offline; download that file there first"
                    )

    def source_and_revision(self) -> tuple[str, str]:
        """Cache-key fields: no machine-specific path for hub models or tags."""
        import open_clip

        if self.remote is not None:
            used = self.remote.small_files() + [self.remote_weights()]
            return self.remote.uri, "s3:" + self.remote.version(used)
        if self.folder is not None:
            files = sorted(f for f in self.folder.iterdir() if f.is_file())
            return str(self.folder), "local:" + fingerprint(files, self.folder / CONFIG_FILE)
        if self.repo:
            found = self._hub_file(self.repo, CONFIG_FILE)
            return f"hf-hub:{self.repo}", Path(found).parent.name if found else "main"
        arch = str(self.arch_file) if self.arch_file else self.arch
        if self.weights is not None:
            extra = [self.arch_file] if self.arch_file else []
            return f"{arch}:{self.weights}", "local:" + fingerprint([self.weights], *extra)
        cfg = open_clip.get_pretrained_cfg(self.arch, self.tag) or {}
        return f"{arch}:{self.tag}", cfg.get("hf_hub") or cfg.get("url") or self.tag

    def create(
        self, device: torch.device, image_size: int, dtype: torch.dtype = torch.float32
    ) -> torch.nn.Module:
        """The model on `device` with every weight in `dtype`: open_clip's `pure_*`
        precisions cast the whole model (its plain `bf16`/`fp16` keep LayerNorms in float32,
        a mixed model whose CPU forward needs autocast)."""
        import open_clip

        self.register()
        pretrained = str(self.weights) if self.weights else (self.tag or None)
        model_name = self.model_name
        if self.remote is not None:  # the small files and the one weights file open_clip reads
            used = self.remote.small_files() + [self.remote_weights()]
            model_name = f"local-dir:{self.remote.local_copy(used)}"
        try:
            model = open_clip.create_model(
                model_name,
                pretrained=pretrained,
                device=device,
                precision=OPEN_CLIP_PRECISION[dtype],
                force_image_size=image_size or None,
                require_pretrained=True,
            )
        except (RuntimeError, FileNotFoundError, ValueError) as exc:
            raise BackboneError(f"{self.name}: open_clip could not load it: {exc}") from exc
        return model.eval().requires_grad_(False)
