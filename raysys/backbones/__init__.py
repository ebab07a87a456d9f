"""Registry of frozen backbones by name.

Names are what users write in configs (`extract.vision=efficientnet-lite1`); the registry maps
them to a `Backbone`, so adding a family means adding one entry here.
"""

from __future__ import annotations

from raysys.backbones.base import REJECT, Backbone, layer_name, pick_device
from raysys.backbones.efficientnet import VARIANTS as EFFICIENTNET_VARIANTS
from raysys.backbones.efficientnet import EfficientNetLite
from raysys.backbones.hf_text import HFTextEncoder, minilm_path
from raysys.errors import BackboneError

VISION = tuple(EFFICIENTNET_VARIANTS)
TEXT = ("minilm-l6",)


def get_backbone(
    name: str, modality: str, max_text_length: int = 64, image_size: int = 0
) -> Backbone:
    """A backbone by registry name, without loading its weights (that happens in the actor).

    `image_size` 0 keeps a vision model's native input resolution."""
    if modality == "image":
        if name in EFFICIENTNET_VARIANTS:
            return EfficientNetLite(name, image_size=image_size)
        raise BackboneError(f"unknown vision backbone {name!r}; available: {', '.join(VISION)}")
    if modality == "text":
        if name == "minilm-l6":
            return HFTextEncoder(name, minilm_path(), max_length=max_text_length)
        raise BackboneError(f"unknown text backbone {name!r}; available: {', '.join(TEXT)}")
    raise ValueError(f"modality must be 'image' or 'text', not {modality!r}")


__all__ = [
    "REJECT",
    "Backbone",
    "BackboneError",
    "get_backbone",
    "layer_name",
    "pick_device",
    "TEXT",
    "VISION",
]
