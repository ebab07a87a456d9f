"""open_clip towers: the image tower (`encode_image` side) or the text tower, one per backbone.

Names (after `open_clip:`), all resolved without network access:

- `local-dir:<folder>` — open_clip's own folder format: `open_clip_config.json`
  (`{"model_cfg": {...}, "preprocess_cfg": {...}}`) plus a weights file
  (`open_clip_model.safetensors`, `open_clip_pytorch_model.bin`, …). This is how a custom
  architecture with its weights is usually given.
- `hf-hub:<org/repo>` — the same format on the Hugging Face hub; it must be in the local cache.
- `<arch>:<pretrained tag>` — a built-in architecture and one of its tags (its weights must be
  in the local cache), e.g. `ViT-B-32:laion2b_s34b_b79k`.
- `<arch>:<weights file>` — a built-in architecture with a local checkpoint, or a custom one:
  `<arch>` may be a path to a model-config JSON (`{"embed_dim", "vision_cfg", "text_cfg"}`)
  registered with `open_clip.add_model_config`; its file stem becomes the architecture name.
  Normalisation is open_clip's default (OpenAI mean/std) for a bare weights file.

Layers: 0 is the input to the first residual block (image: patch + class embeddings after
`ln_pre`; text: token + position embeddings), i is residual block i's output, caught with
forward hooks (no final norm). Pooling: image `cls` (the class token, default) or `mean` over
the patch tokens (class token left out); text `last` (the last real token, the EOT that CLIP
pools, default) or `mean` over the real tokens; `cls` only for a non-causal text tower (under a
causal mask the first token sees nothing of the caption). Only transformer towers are
supported (not timm, ResNet or Hugging Face text towers, nor CoCa's text tower).
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raysys.backbones.base import (
    COMPUTE,
    REJECT,
    Backbone,
    layer_name,
    pool_tokens,
    resolve_pooling,
    select_layers,
)
from raysys.backbones.hfsource import fingerprint
from raysys.backbones.images import prepare_images
from raysys.backbones.texts import PairedText
from raysys.errors import BackboneError

PREFIX = "open_clip:"
CONFIG_FILE = "open_clip_config.json"
HUB_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
FORMS = (
    "open_clip:local-dir:<folder>, open_clip:hf-hub:<org/repo>, "
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
        if spec.startswith("local-dir:"):
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
        """The name open_clip's own `create_model` / `get_tokenizer` take."""
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
            f"offline; download it first with `huggingface-cli download {repo}` (on every node, "
            "or with a shared HF_HOME), or give a local folder as open_clip:local-dir:<folder>"
        )

    def _folder_config(self) -> dict[str, Any]:
        if self.folder is not None:
            path = self.folder / CONFIG_FILE
            if not path.is_file():
                raise BackboneError(
                    f"{self.name}: no {CONFIG_FILE} in {str(self.folder)!r}; an open_clip folder "
                    'holds {"model_cfg": ..., "preprocess_cfg": ...} and a weights file'
                )
        else:
            found = self._hub_file(self.repo, CONFIG_FILE)
            if found is None:
                raise self._not_cached(CONFIG_FILE, self.repo)
            path = Path(found)
        config = json.loads(path.read_text())
        if "model_cfg" not in config:
            raise BackboneError(f"{self.name}: {path} has no 'model_cfg'")
        return config

    def model_cfg(self) -> dict[str, Any]:
        import open_clip

        if self.folder is not None or self.repo:
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
        if self.folder is not None or self.repo:
            return merge_preprocess_dict(base, self._folder_config().get("preprocess_cfg", {}))
        if self.tag:
            return merge_preprocess_dict(base, open_clip.get_pretrained_cfg(self.arch, self.tag))
        return base

    def check_weights(self) -> None:
        import open_clip

        if self.folder is not None:
            self._folder_config()
            weights = [f for p in ("*.safetensors", "*.bin", "*.pth") for f in self.folder.glob(p)]
            if not weights:
                raise BackboneError(
                    f"{self.name}: no weights (*.safetensors, *.bin, *.pth) in "
                    f"{str(self.folder)!r}; open_clip would build a random model"
                )
        elif self.repo:
            self._folder_config()
            if not any(self._hub_file(self.repo, f) for f in HUB_WEIGHTS):
                raise self._not_cached(" or ".join(HUB_WEIGHTS), self.repo)
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
                if not any(self._hub_file(repo, n) for n in names):
                    raise self._not_cached(f"the weights of {self.arch}:{self.tag}", repo)
            else:
                target = Path("~/.cache/clip").expanduser() / os.path.basename(cfg.get("url", ""))
                if not target.is_file():
                    raise BackboneError(
                        f"{self.name}: weights {cfg.get('url')} are not in {target.parent} and "
                        "raysys runs offline; download that file there first"
                    )

    def source_and_revision(self) -> tuple[str, str]:
        """Cache-key fields: no machine-specific path for hub models or tags."""
        import open_clip

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

    def create(self, device: torch.device, image_size: int) -> torch.nn.Module:
        import open_clip

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.register()
        pretrained = str(self.weights) if self.weights else (self.tag or None)
        try:
            model = open_clip.create_model(
                self.model_name,
                pretrained=pretrained,
                device=device,
                precision="fp32",
                force_image_size=image_size or None,
                require_pretrained=True,
            )
        except (RuntimeError, FileNotFoundError, ValueError) as exc:
            raise BackboneError(f"{self.name}: open_clip could not load it: {exc}") from exc
        return model.eval().requires_grad_(False)


@contextmanager
def hidden_states(transformer: torch.nn.Module, wanted: list[int]):
    """Collect `{layer: [B, T, d]}` from an open_clip `Transformer` during one forward: the
    input of its first block (layer 0) and each wanted block's output, batch first."""
    states: dict[int, torch.Tensor] = {}
    batch_first = getattr(transformer, "batch_first", True)

    def keep(i: int):
        def hook(_module, _args, out):
            states[i] = out if batch_first else out.transpose(0, 1)

        return hook

    handles = []
    if 0 in wanted:  # Transformer.forward takes N, L, D and transposes inside if needed
        handles.append(
            transformer.register_forward_pre_hook(lambda _m, args: states.__setitem__(0, args[0]))
        )
    for i in wanted:
        if i > 0:
            handles.append(transformer.resblocks[i - 1].register_forward_hook(keep(i)))
    try:
        yield states
    finally:
        for handle in handles:
            handle.remove()


class _OpenCLIPTower:
    """What both towers share: the source, the tower's config, layers and describe()."""

    cfg_key: str

    def _setup(self, name: str, layers: str, pooling: str) -> None:
        self.name = name
        self.source = OpenCLIPSource(name)
        self.layers = layers
        self.requested_pooling = pooling
        self.model: torch.nn.Module | None = None
        self._cfg: dict[str, Any] | None = None

    @property
    def model_cfg(self) -> dict[str, Any]:
        if self._cfg is None:
            self._cfg = self.source.model_cfg()
        return self._cfg

    def tower_cfg(self):
        """The tower's settings with open_clip's defaults filled in; a tower whose blocks are
        not open_clip's own transformer is refused here, wherever it is first touched."""
        from open_clip import CLIPTextCfg, CLIPVisionCfg

        cls = CLIPVisionCfg if self.cfg_key == "vision_cfg" else CLIPTextCfg
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in self.model_cfg.get(self.cfg_key, {}).items() if k in known})
        if self.cfg_key == "vision_cfg" and (
            cfg.timm_model_name or not isinstance(cfg.layers, int)
        ):
            raise BackboneError(
                f"{self.name}: only open_clip VisionTransformer image towers are supported "
                "(not timm or ResNet towers)"
            )
        if self.cfg_key == "text_cfg" and (cfg.hf_model_name or cfg.embed_cls):
            raise BackboneError(
                f"{self.name}: only open_clip's own text transformer is supported (not Hugging "
                "Face text towers or CoCa's)"
            )
        return cfg

    @property
    def layer_ids(self) -> list[int]:
        return select_layers(self.layers, self.tower_cfg().layers + 1, self.name)

    @property
    def dims(self) -> list[int]:
        return [self.tower_cfg().width] * len(self.layer_ids)

    def _describe(self, extra: dict[str, Any]) -> dict[str, Any]:
        import open_clip

        source, revision = self.source.source_and_revision()
        cfg = json.dumps(self.model_cfg, sort_keys=True).encode()
        return {
            "backbone": self.name,
            "source": source,
            "revision": revision,
            "model_cfg_sha": hashlib.sha256(cfg).hexdigest()[:16],
            "open_clip": open_clip.__version__,
            "compute": COMPUTE,
            "pooling": self.pooling,
            "layer_ids": self.layer_ids,
            "dims": self.dims,
            **extra,
        }


class OpenCLIPImage(_OpenCLIPTower, Backbone):
    """The image tower of an open_clip model (a `VisionTransformer`)."""

    modality = "image"
    cfg_key = "vision_cfg"

    def __init__(self, name: str, image_size: int = 0, layers: str = "all", pooling: str = ""):
        Backbone.__init__(self)
        if pooling.strip().lower() not in ("", "cls", "mean"):
            resolve_pooling(pooling, ("cls", "mean"), "cls", f"{name} (an image tower)")
        self._setup(name, layers, pooling)
        self.requested_size = image_size
        self._transform = None

    @property
    def pooling(self) -> str:
        return resolve_pooling(self.requested_pooling, ("cls", "mean"), "cls", self.name)

    @property
    def image_size(self) -> int:
        size = self.tower_cfg().image_size
        return self.requested_size or (size if isinstance(size, int) else size[0])

    def check(self) -> None:
        self.tower_cfg()
        self.source.check_weights()
        _ = self.pooling
        Backbone.check(self)

    @property
    def transform(self):
        if self._transform is None:
            from open_clip.transform import PreprocessCfg, image_transform_v2

            cfg = self.source.preprocess_cfg() | {"size": self.image_size}
            self._transform = image_transform_v2(PreprocessCfg(**cfg), is_train=False)
        return self._transform

    def preprocess(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        size = self.image_size
        pixels, reasons = prepare_images(
            batch["image"], (3, size, size), np.float32, lambda img: self.transform(img).numpy()
        )
        return {"id": batch["id"], "pixels": pixels, REJECT: reasons}

    def load(self, device: torch.device) -> None:
        self.device = device
        self.model = self.source.create(
            device, self.requested_size
        ).visual  # the text tower is dropped

    def embed(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert self.model is not None, "call load() first"
        x = torch.from_numpy(np.ascontiguousarray(batch["pixels"])).to(self.device)
        wanted = self.layer_ids
        with hidden_states(self.model.transformer, wanted) as states:
            with torch.inference_mode(), self.autocast():
                self.model(x)
        out = {}
        for i in wanted:
            h = states[i].float()
            pooled = h[:, 0] if self.pooling == "cls" else h[:, 1:].mean(1)
            out[layer_name(i)] = pooled.cpu().numpy()
        return out

    def describe(self) -> dict[str, Any]:
        return self._describe({"input": {"size": self.image_size}})


class OpenCLIPText(_OpenCLIPTower, PairedText):
    """The text tower of an open_clip model (CLIP's built-in text transformer)."""

    cfg_key = "text_cfg"

    def __init__(self, name: str, max_length: int = 64, layers: str = "all", pooling: str = ""):
        PairedText.__init__(self)
        if pooling.strip().lower() not in ("", "cls", "mean", "last"):
            resolve_pooling(pooling, ("last", "mean", "cls"), "last", f"{name} (a text tower)")
        self._setup(name, layers, pooling)
        self.max_length = max_length
        self._tokenizer = None

    @property
    def pooling(self) -> str:
        causal = not self.tower_cfg().no_causal_mask
        allowed = ("last", "mean") if causal else ("last", "mean", "cls")
        what = f"{self.name}{' (causal text tower)' if causal else ''}"
        return resolve_pooling(self.requested_pooling, allowed, "last", what)

    @property
    def context_length(self) -> int:
        return self.tower_cfg().context_length

    def check(self) -> None:
        self.tower_cfg()
        self.source.check_weights()
        _ = self.pooling
        PairedText.check(self)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            import open_clip

            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            self.source.register()
            self._tokenizer = open_clip.get_tokenizer(self.source.model_name)
        return self._tokenizer

    def tokenize(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Token ids truncated at `max_length` but padded to the model's full context (CLIP
        adds its position table whole); the mask marks everything up to the last real token."""
        ctx = self.context_length
        length = min(self.max_length, ctx)
        pad = int(self.tokenizer([""], context_length=ctx)[0, -1])
        ids = np.full((len(texts), ctx), pad, dtype=np.int32)
        ids[:, :length] = self.tokenizer(texts, context_length=length).numpy()
        real = ids != pad
        last = np.where(real.any(1), ctx - 1 - real[:, ::-1].argmax(1), 0)
        mask = (np.arange(ctx)[None, :] <= last[:, None]).astype(np.int8)
        return {"input_ids": ids, "attention_mask": mask}

    def load(self, device: torch.device) -> None:
        self.device = device
        model = self.source.create(device, 0)
        model.visual = torch.nn.Identity()  # the image tower is never used here
        self.model = model

    def encode(self, tokens: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        assert self.model is not None, "call load() first"
        text = getattr(self.model, "text", None)
        transformer = text.transformer if text is not None else self.model.transformer
        wanted = self.layer_ids
        with hidden_states(transformer, wanted) as states:
            with torch.inference_mode(), self.autocast():
                self.model.encode_text(tokens["input_ids"])
        mask, pooling = tokens["attention_mask"], self.pooling
        return [pool_tokens(states[i], mask, pooling) for i in wanted]

    def describe(self) -> dict[str, Any]:
        return self._describe({"max_length": min(self.max_length, self.context_length)})
