"""open_clip towers: the image tower (`encode_image` side) or the text tower, one per backbone.

The name (`open_clip:local-dir:<folder>`, `open_clip:hf-hub:<org/repo>`,
`open_clip:<arch>:<tag or weights>`) is resolved to a config and weights by
`raysys.backbones.openclip_source`; this module hooks, pools and preprocesses. open_clip is
imported inside the functions that need it: the import costs seconds and most runs never need it.

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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from raysys.backbones.base import (
    REJECT,
    Backbone,
    layer_name,
    pool_tokens,
    resolve_pooling,
    select_layers,
)
from raysys.backbones.images import device_pixels, prepare_images, to_uint8
from raysys.backbones.openclip_source import OpenCLIPSource
from raysys.backbones.texts import PairedText
from raysys.errors import BackboneError

if TYPE_CHECKING:
    from open_clip import CLIPTextCfg, CLIPVisionCfg


@contextmanager
def hidden_states(
    transformer: torch.nn.Module, wanted: list[int]
) -> Iterator[dict[int, torch.Tensor]]:
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

    def tower_cfg(self) -> CLIPVisionCfg | CLIPTextCfg:
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

    def param_count(self) -> int:
        """The tower's parameters, counted on the meta device from the config: no weights
        read, so a sweep driver on a CPU head never copies or downloads them (the loaded
        tower: the image tower alone, or everything but it for text)."""
        import inspect

        import open_clip

        cfg = dict(self.model_cfg)
        if cfg.pop("custom_text", False) or "multimodal_cfg" in cfg:
            cls = open_clip.CustomTextCLIP
        else:
            cls = open_clip.CLIP
        known = inspect.signature(cls).parameters
        with torch.device("meta"):
            model = cls(**{k: v for k, v in cfg.items() if k in known})
        visual = sum(p.numel() for p in model.visual.parameters())
        if self.cfg_key == "vision_cfg":
            return visual
        return sum(p.numel() for p in model.parameters()) - visual

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
            "weights": self.precision,
            "compute": self.compute,
            "pooling": self.pooling,
            "layer_ids": self.layer_ids,
            "dims": self.dims,
            **extra,
        }


class OpenCLIPImage(_OpenCLIPTower, Backbone):
    """The image tower of an open_clip model (a `VisionTransformer`)."""

    modality = "image"
    cfg_key = "vision_cfg"

    def __init__(
        self,
        name: str,
        image_size: int = 0,
        layers: str = "all",
        pooling: str = "",
        precision: str = "float32",
    ) -> None:
        Backbone.__init__(self, precision)
        if pooling.strip().lower() not in ("", "cls", "mean"):
            resolve_pooling(pooling, ("cls", "mean"), "cls", f"{name} (an image tower)")
        self._setup(name, layers, pooling)
        self.requested_size = image_size
        self._transform = None
        self._normalise: tuple[list[float], list[float]] | None = None

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

    def _split_transform(self) -> None:
        """open_clip's own eval transform, cut where its images become tensors: the image
        steps before (resize, crop or pad, RGB) run in the CPU stage, and its `ToTensor`
        (/255) and `Normalize` on the device, with that `Normalize`'s mean and std."""
        from open_clip.transform import PreprocessCfg, image_transform_v2
        from torchvision import transforms

        cfg = self.source.preprocess_cfg() | {"size": self.image_size}
        steps = list(image_transform_v2(PreprocessCfg(**cfg), is_train=False).transforms)
        # The tail must be (Maybe)ToTensor then Normalize, with neither before it.
        tensor, norm = transforms.ToTensor, transforms.Normalize
        head = steps[:-2]
        if (
            len(steps) < 2
            or not isinstance(steps[-2], tensor)
            or not isinstance(steps[-1], norm)
            or any(isinstance(t, (tensor, norm)) for t in head)
        ):
            raise BackboneError(
                f"{self.name}: open_clip's eval transform is {steps}, not image steps then "
                "ToTensor and Normalize; this open_clip version is not supported"
            )
        self._transform = transforms.Compose(head)
        mean, std = steps[-1].mean, steps[-1].std
        self._normalise = ([float(v) for v in mean], [float(v) for v in std])

    @property
    def transform(self):
        """The CPU half of the eval transform: an RGB PIL image of the input size."""
        if self._transform is None:
            self._split_transform()
        return self._transform

    @property
    def normalise(self) -> tuple[list[float], list[float]]:
        """(mean, std) of the eval transform's `Normalize`; plain floats, kept when the
        backbone is pickled into an actor."""
        if self._normalise is None:
            self._split_transform()
        assert self._normalise is not None
        return self._normalise

    def preprocess(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """uint8 `[B, 3, H, W]`, resized and cropped; scaled and normalised on the device."""
        size = self.image_size
        _ = self.normalise  # read here, so a pickled copy carries it

        def run(img) -> np.ndarray:
            return to_uint8(np.asarray(self.transform(img))).transpose(2, 0, 1)

        pixels, reasons = prepare_images(batch["image"], (3, size, size), np.uint8, run)
        return {"id": batch["id"], "pixels": pixels, REJECT: reasons}

    def load(self, device: torch.device) -> None:
        self.device = device
        model = self.source.create(device, self.requested_size, self.dtype)
        self.model = model.visual  # the text tower is dropped

    def embed(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert self.model is not None, "call load() first"
        mean, std = self.normalise
        x = self.cast_input(device_pixels(batch["pixels"], self.device, mean, std))
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

    def __init__(
        self,
        name: str,
        max_length: int = 64,
        layers: str = "all",
        pooling: str = "",
        precision: str = "float32",
    ) -> None:
        PairedText.__init__(self, precision)
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
        model = self.source.create(device, 0, self.dtype)
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
