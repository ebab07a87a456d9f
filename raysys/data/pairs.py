"""One split's embeddings as aligned arrays: what training, validation and the metrics read.

Plain numpy (no pyarrow), so the training loop and its GPU self-check run where only torch
is installed; `raysys.data.cache` builds it from the cache.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields

import numpy as np


def image_keys(image_ids: np.ndarray) -> np.ndarray:
    """A stable int64 per image id, equal on every worker and machine (unlike indices into one
    worker's unique ids), so the training step can tell which rows of a gathered global batch
    show the same image: another caption of one's own image is no negative. 64-bit hashes
    collide with odds of about n²/2⁶⁵ (1e-7 for a million images)."""
    return np.fromiter(
        (
            int.from_bytes(
                hashlib.blake2b(str(i).encode(), digest_size=8).digest(), "little", signed=True
            )
            for i in image_ids
        ),
        dtype=np.int64,
        count=len(image_ids),
    )


# Every pair belongs to one of BUCKETS fixed buckets, by a hash of its image id (so all
# captions of an image share one): the corpus index and the embedding caches are laid out by
# bucket, and training shard s of S holds the buckets b with b % S == s, so a worker reads
# only its buckets' rows.
BUCKETS = 64


def buckets(image_ids: np.ndarray) -> np.ndarray:
    """Each image id's bucket in [0, BUCKETS), as int16; the same on every machine."""
    return (image_keys(image_ids) % BUCKETS).astype(np.int16)


@dataclass
class Pairs:
    """One split's aligned arrays: row i of `image`, `text` and `negative` belong to pair i."""

    pair_ids: np.ndarray
    image_ids: np.ndarray
    captions: np.ndarray
    # Each in its cache's dtype (float16, or float32 for e.g. a decoder LM's text layers).
    image: np.ndarray  # [N, d_image], repeated when captions share an image
    text: np.ndarray  # [N, d_text]
    negative: np.ndarray  # [N, d_text] hard-negative captions' embeddings
    # The corpus index's annotations, for the per-kind and zero-shot scores (None: unknown).
    negative_sources: np.ndarray | None = None  # e.g. "exact:colour", "generated:swap", "none"
    labels: np.ndarray | None = None  # JSON {task: class} per pair, or "" where it has none

    def __len__(self) -> int:
        return len(self.pair_ids)

    def take(self, rows: np.ndarray) -> Pairs:
        """These rows of every array (e.g. one worker's shards)."""
        values = (getattr(self, f.name) for f in fields(self))
        return Pairs(*(None if v is None else v[rows] for v in values))

    def image_keys(self) -> np.ndarray:
        return image_keys(self.image_ids)

    def image_index(self) -> tuple[np.ndarray, np.ndarray]:
        """Row of each unique image, and per caption the index of its image among those:
        retrieval ranks unique images, while several captions may share one."""
        _, first, inverse = np.unique(self.image_ids, return_index=True, return_inverse=True)
        return first, inverse
