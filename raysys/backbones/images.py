"""Image decoding shared by every vision family, so a bad row gets the same reason whichever
model reads it, and no family can raise on one bad image and lose its whole batch."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

MAX_IMAGE_PIXELS = 64_000_000  # larger images are rejected from their header, never decoded
DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError)


def decode_image(raw: bytes | None) -> tuple[Image.Image | None, str]:
    """An RGB image, or None and the reason the row is bad."""
    if raw is None or len(raw) == 0:
        return None, "missing image bytes"
    try:
        with Image.open(io.BytesIO(raw)) as img:  # lazy: reads the header only
            if img.width * img.height > MAX_IMAGE_PIXELS:
                return None, f"image too large ({img.width}x{img.height})"
            return img.convert("RGB"), ""  # decodes; a truncated file fails here
    except DECODE_ERRORS as exc:
        return None, f"corrupt image: {type(exc).__name__}"


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
            except DECODE_ERRORS + (RuntimeError,):
                pass
            else:
                out[[i for i, _ in pending]] = values  # a wrong shape is a bug, not a bad row
                pending.clear()
                return
        for i, img in pending:
            try:
                value = transform(img)
            except DECODE_ERRORS + (RuntimeError,) as exc:
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
