"""Image decoding shared by every vision family, so a bad row gets the same reason whichever
model reads it, and no family can raise on one bad image and lose its whole batch; and the
device half of every family's pixels (`device_pixels`).

The CPU stage hands uint8 pixels to the actors (a quarter of float32's bytes through Ray's
object store and host-to-device copies); rescaling and normalising happen on the device.
Pillow is imported where images are decoded, not here: the device half (`raysys bench embed`
on a machine with torch only) never decodes an image.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from PIL import Image

MAX_IMAGE_PIXELS = 64_000_000  # larger images are rejected from their header, never decoded


def decode_errors() -> tuple[type[BaseException], ...]:
    """What decoding or transforming one bad image raises (Pillow imported here, lazily)."""
    from PIL import Image, UnidentifiedImageError

    return (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError)


def decode_image(raw: bytes | None) -> tuple[Image.Image | None, str]:
    """An RGB image, or None and the reason the row is bad."""
    from PIL import Image

    if raw is None or len(raw) == 0:
        return None, "missing image bytes"
    try:
        with Image.open(io.BytesIO(raw)) as img:  # lazy: reads the header only
            if img.width * img.height > MAX_IMAGE_PIXELS:
                return None, f"image too large ({img.width}x{img.height})"
            return img.convert("RGB"), ""  # decodes; a truncated file fails here
    except decode_errors() as exc:
        return None, f"corrupt image: {type(exc).__name__}"


def to_uint8(values: np.ndarray) -> np.ndarray:
    """Resized pixels as uint8: rounded, not truncated (a processor that resizes in float
    returns 254.99999 for 255), and clipped to the byte range."""
    values = np.asarray(values)
    if values.dtype == np.uint8:
        return values
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def device_pixels(
    pixels: np.ndarray,
    device: torch.device,
    mean: Sequence[float],
    std: Sequence[float],
    scale: float = 1 / 255,
    channels_last: bool = False,
) -> torch.Tensor:
    """uint8 pixels `[B, 3, H, W]` (`[B, H, W, 3]` with `channels_last`) to the normalised
    float32 `[B, 3, H, W]` the model takes, `(x * scale - mean) / std`, computed on `device`
    after a copy of the bytes only; a channels-last input stays channels-last in memory."""
    x = torch.from_numpy(np.ascontiguousarray(pixels)).to(device, non_blocking=True)
    if channels_last:
        x = x.permute(0, 3, 1, 2)  # NHWC memory, NCHW view
    shape = (1, -1, 1, 1)
    m = torch.tensor(mean, dtype=torch.float32, device=device).reshape(shape)
    s = torch.tensor(std, dtype=torch.float32, device=device).reshape(shape)
    return (x.float() * scale - m) / s


def prepare_images(
    images: Sequence[bytes | None],
    shape: tuple[int, ...],
    dtype: type,
    transform: Callable[[Image.Image], np.ndarray],
    batch_transform: Callable[[list[Image.Image]], np.ndarray] | None = None,
    chunk: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
    """One fixed-shape array for the batch (zeros in bad rows) and a reason per row ("" when
    good). Images are decoded and transformed `chunk` at a time, so a batch of large photos
    never sits decoded in memory all at once. `batch_transform` (one call per chunk, e.g. a
    Hugging Face processor) is tried first; if it raises, each image of the chunk goes through
    `transform` alone so only the image that fails is rejected."""
    out = np.zeros((len(images), *shape), dtype=dtype)
    reasons = np.full(len(images), "", dtype=object)
    pending: list[tuple[int, Image.Image]] = []

    def flush() -> None:
        if batch_transform is not None:
            try:
                values = batch_transform([img for _, img in pending])
            except decode_errors() + (RuntimeError,):
                pass
            else:
                out[[i for i, _ in pending]] = values  # a wrong shape is a bug, not a bad row
                pending.clear()
                return
        for i, img in pending:
            try:
                value = transform(img)
            except decode_errors() + (RuntimeError,) as exc:
                reasons[i] = f"corrupt image: {type(exc).__name__}"
                continue
            out[i] = value
        pending.clear()

    for i, raw in enumerate(images):
        img, reasons[i] = decode_image(raw)
        if img is not None:
            pending.append((i, img))
        if len(pending) >= chunk:
            flush()
    if pending:
        flush()
    return out, reasons
