"""Hugging Face vision transformers (ViT, DeiT, DINOv2, BEiT, I-JEPA, and the vision towers of
CLIP and SigLIP), through `transformers`; images are prepared by the model's own
`AutoImageProcessor` in the CPU stage.

Layers are `output_hidden_states`: 0 is the patch-embedding output (CLIP: after its pre-norm),
i is block i's output, without the final norm. Pooling: `cls` is the class token (the default
where the model has one); `mean` averages the patch tokens only, leaving out the class,
distillation and register tokens; SigLIP has no class token, so `mean` is its default and only
choice. For a full CLIP/SigLIP checkpoint only the vision tower is loaded.

`image_size` 0 keeps the processor's native size; otherwise images are resized so the short
side is the size and centre-cropped (processors that crop), or squashed to size × size (those
that do not), and position embeddings are interpolated.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch

from raysys.backbones.base import (
    REJECT,
    Backbone,
    layer_name,
    resolve_pooling,
    select_layers,
)
from raysys.backbones.hfsource import (
    WEIGHTS,
    HFSource,
    load_model,
    meta_param_count,
    quiet_transformers,
)
from raysys.backbones.images import device_pixels, prepare_images, to_uint8
from raysys.errors import BackboneError

# vision model type -> tokens before the patches (class, distillation, registers)
PREFIX_TOKENS = {
    "vit": lambda c: 1,
    "deit": lambda c: 2,
    "beit": lambda c: 1,
    "data2vec-vision": lambda c: 1,
    "dinov2": lambda c: 1,
    "dinov2_with_registers": lambda c: 1 + c.num_register_tokens,
    "clip_vision_model": lambda c: 1,
    "siglip_vision_model": lambda c: 0,
    "ijepa": lambda c: 0,
}


def _get(size: Any, key: str) -> Any:
    """A processor size field, whether a plain dict (older transformers) or a SizeDict."""
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


class HFVision(Backbone):
    """A Hugging Face vision model given by hub id (`@revision` optional) or local folder."""

    modality = "image"

    def __init__(
        self,
        name: str,
        spec: str,
        image_size: int = 0,
        layers: str = "all",
        pooling: str = "",
        precision: str = "float32",
    ) -> None:
        super().__init__(precision)
        self.name = name
        self.source = HFSource(spec)
        self.requested_size = image_size
        self.layers = layers
        if pooling.strip().lower() not in ("", "cls", "mean"):
            resolve_pooling(pooling, ("cls", "mean"), "cls", f"{name} (a vision model)")
        self.requested_pooling = pooling
        self.model: torch.nn.Module | None = None
        self._processor = None
        self._config = None
        self._normalise: tuple[float, list[float], list[float]] | None = None

    @property
    def config(self):
        """The vision (tower's) config."""
        if self._config is None:
            full = self.source.config()
            config = getattr(full, "vision_config", None) or full
            if config.model_type not in PREFIX_TOKENS:
                raise BackboneError(
                    f"{self.name}: vision model type {config.model_type!r} is not supported; "
                    f"supported: {', '.join(sorted(PREFIX_TOKENS))}"
                )
            self._config = config
        return self._config

    @property
    def n_prefix(self) -> int:
        return PREFIX_TOKENS[self.config.model_type](self.config)

    @property
    def pooling(self) -> str:
        allowed = ("cls", "mean") if self.n_prefix else ("mean",)
        what = (
            f"{self.name} ({self.config.model_type}{'' if self.n_prefix else ': no class token'})"
        )
        return resolve_pooling(self.requested_pooling, allowed, allowed[0], what)

    @property
    def layer_ids(self) -> list[int]:
        return select_layers(self.layers, self.config.num_hidden_layers + 1, self.name)

    @property
    def dims(self) -> list[int]:
        return [self.config.hidden_size] * len(self.layer_ids)

    @property
    def processor(self):
        if self._processor is None:
            from transformers import AutoImageProcessor

            with quiet_transformers():
                self._processor = AutoImageProcessor.from_pretrained(
                    self.source.files_dir(), **self.source.kwargs()
                )
        return self._processor

    def _plan(self) -> tuple[dict[str, Any], tuple[int, int]]:
        """Processor overrides and the resulting (height, width): always one fixed size, so
        every batch is one array."""
        p = self.processor
        size = getattr(p, "size", None) or {}
        crop = getattr(p, "crop_size", None) if getattr(p, "do_center_crop", False) else None
        s = self.requested_size
        if s:
            short = _get(size, "shortest_edge") is not None and crop is not None
            over: dict[str, Any] = {
                "size": {"shortest_edge": s} if short else {"height": s, "width": s}
            }
            if crop is not None:
                over["crop_size"] = {"height": s, "width": s}
            return over, (s, s)
        if crop is not None and _get(crop, "height"):
            return {}, (_get(crop, "height"), _get(crop, "width"))
        if _get(size, "height"):
            return {}, (_get(size, "height"), _get(size, "width"))
        if _get(size, "shortest_edge"):
            s = _get(size, "shortest_edge")
            return {"size": {"height": s, "width": s}}, (s, s)
        raise BackboneError(
            f"{self.name}: cannot tell the input size from its image processor ({size}); "
            "set extract.image_size"
        )

    @property
    def image_size(self) -> int:
        return self._plan()[1][0]

    def check(self) -> None:
        _ = self.config  # the model type first: the most useful error for a wrong model
        self.source.require(WEIGHTS, ("preprocessor_config.json",), what=self.name)
        _ = self.pooling, self._plan()
        super().check()

    @property
    def normalise(self) -> tuple[float, list[float], list[float]]:
        """(scale, mean, std) of the processor's rescale and normalise steps, which run on
        the device (`embed`); a step the processor skips is an identity here too. Plain
        floats, kept when the backbone is pickled into an actor."""
        if self._normalise is None:
            p = self.processor
            scale = float(p.rescale_factor) if getattr(p, "do_rescale", False) else 1.0
            mean, std = [0.0] * 3, [1.0] * 3
            if getattr(p, "do_normalize", False):
                mean = [float(v) for v in np.broadcast_to(p.image_mean, 3)]
                std = [float(v) for v in np.broadcast_to(p.image_std, 3)]
            self._normalise = (scale, mean, std)
        return self._normalise

    def preprocess(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """uint8 `[B, 3, H, W]`: the processor's resize and crop only; its rescale and
        normalise run on the device."""
        over, (height, width) = self._plan()
        over |= {"do_rescale": False, "do_normalize": False}
        _ = self.normalise  # read from the processor here, so a pickled copy carries it

        def run(images: list) -> np.ndarray:
            out = self.processor(images=images, return_tensors="np", **over)["pixel_values"]
            return to_uint8(out)

        pixels, reasons = prepare_images(
            batch["image"], (3, height, width), np.uint8, lambda img: run([img])[0], run
        )
        return {"id": batch["id"], "pixels": pixels, REJECT: reasons}

    def param_count(self) -> int:
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

        config = self.config
        return meta_param_count(
            getattr(transformers, MODEL_MAPPING_NAMES[config.model_type]), config
        )

    def load(self, device: torch.device) -> None:
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

        self.device = device
        cls = getattr(transformers, MODEL_MAPPING_NAMES[self.config.model_type])
        model = load_model(cls, self.source, self.name, ("pooler", "head"), self.dtype)
        self.model = model.to(device)

    def embed(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert self.model is not None, "call load() first"
        scale, mean, std = self.normalise
        x = self.cast_input(device_pixels(batch["pixels"], self.device, mean, std, scale))
        extra = {}
        native = getattr(self.config, "image_size", None)
        resized = x.shape[-1] != native or x.shape[-2] != native
        if (
            resized
            and "interpolate_pos_encoding" in inspect.signature(self.model.forward).parameters
        ):
            extra["interpolate_pos_encoding"] = True
        with torch.inference_mode(), self.autocast():
            out = self.model(pixel_values=x, output_hidden_states=True, **extra)
        pooling, skip = self.pooling, self.n_prefix
        pooled = {}
        for i in self.layer_ids:
            h = out.hidden_states[i].float()
            pooled[layer_name(i)] = (h[:, 0] if pooling == "cls" else h[:, skip:].mean(1)).cpu()
        return {k: v.numpy() for k, v in pooled.items()}

    def describe(self) -> dict[str, Any]:
        overrides, (height, width) = self._plan()
        # The resize too, where one is asked for: at DINOv2's own 224 (short side 256, crop
        # 224) and at image_size=224 (short side 224, crop 224) the size agrees, the pixels
        # do not. Without one the key is as before, so existing caches stay valid.
        resize = {"resize": overrides} if self.requested_size else {}
        return {
            "backbone": self.name,
            "source": self.source.source(),
            "revision": self.source.revision_key(),
            "model_type": self.config.model_type,
            "weights": self.precision,
            "compute": self.compute,
            "pooling": self.pooling,
            "layer_ids": self.layer_ids,
            "dims": self.dims,
            "input": {
                "size": [height, width],
                "processor": type(self.processor).__name__,
                **resize,
            },
        }
