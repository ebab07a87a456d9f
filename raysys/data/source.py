"""The pair source a training run reads: a corpus index and two caches, at one layer each.

Plain strings, because a source crosses process boundaries (driver -> Tune trial -> Ray
Train worker) as a dict.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from raysys.data import cache

if TYPE_CHECKING:
    from raysys.extract import Extracted


@dataclass
class PairSource:
    """The corpus index and the image and text caches of one extraction, at one layer each."""

    corpus_dir: str
    image_dir: str
    text_dir: str
    image_layer: str
    text_layer: str

    def _args(self) -> tuple[Path, Path, Path, str, str]:
        dirs = (Path(self.corpus_dir), Path(self.image_dir), Path(self.text_dir))
        return (*dirs, self.image_layer, self.text_layer)

    def load(self, split: str, select: np.ndarray | None = None) -> cache.Pairs:
        return cache.load_pairs(*self._args(), split, select=select)

    def load_index(self, rows: cache.PairIndex, select: np.ndarray | None = None) -> cache.Pairs:
        """Embeddings of an index from `index()` (or of its `select` positions)."""
        dirs = (Path(self.image_dir), Path(self.text_dir))
        return cache.load_index_rows(*dirs, self.image_layer, self.text_layer, rows, select)

    def index(self, split: str) -> cache.PairIndex:
        """The split's usable pairs, ids only (no embeddings read)."""
        return cache.pair_index(*self._args(), split)


def pair_source(ext: Extracted, image_layer: str, text_layer: str) -> PairSource:
    """The source of an extraction at two cached layers (column names such as `L08`)."""
    return PairSource(
        corpus_dir=str(ext.corpus_dir),
        image_dir=str(ext.image_dir),
        text_dir=str(ext.text_dir),
        image_layer=image_layer,
        text_layer=text_layer,
    )
