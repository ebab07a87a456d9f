"""Corpora: sources of (image, caption, hard negative) rows.

Row contract shared by every corpus (extra keys are allowed and passed through)::

    {
        "pair_id": str,          # unique per (image, caption) pair, e.g. "syn-000123-0"
        "image_id": str,         # several pairs may share one image, e.g. "syn-000123"
        "image": bytes,          # encoded image (PNG/JPEG), decodable by PIL
        "caption": str,
        "negative": str | None,  # a hard-negative caption, None when none could be made
    }

The built-in ``synthetic`` corpus also sets ``negative_source`` ("exact": built from the scene
itself) and ``split`` ("train" | "val" | "test", the same for all captions of an image). For
corpora without negatives, ``make_negative`` derives one by a single rule-based edit.
"""

from raysys.corpora.negatives import Negative, make_negative
from raysys.corpora.synthetic import SyntheticConfig, corpus_key, generate

__all__ = ["Negative", "SyntheticConfig", "corpus_key", "generate", "make_negative"]
