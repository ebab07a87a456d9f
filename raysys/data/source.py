"""The pair source a training run reads: a corpus index and two caches, at one layer each.

Plain strings (absolute paths or `s3://` URIs), because a source crosses process boundaries
(driver -> Tune trial -> Ray Train worker, on any node) as a dict, and each process reads the
caches where they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from raysys.data import cache
from raysys.data.pairs import Pairs

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
    prompts_uri: str = ""  # the zero-shot prompts' embeddings at every text layer, if any

    def _args(self) -> tuple[str, str, str, str, str]:
        return (self.corpus_dir, self.image_dir, self.text_dir, self.image_layer, self.text_layer)

    def load(self, split: str, select: np.ndarray | None = None) -> Pairs:
        return cache.load_pairs(*self._args(), split, select=select)

    def load_index(self, rows: cache.PairIndex, select: np.ndarray | None = None) -> Pairs:
        """Embeddings of an index from `index()` (or of its `select` positions)."""
        return cache.load_index_rows(
            self.image_dir, self.text_dir, self.image_layer, self.text_layer, rows, select
        )

    def prompts(self) -> dict[str, tuple[list[str], np.ndarray]] | None:
        """The zero-shot tasks' class prompts, embedded at this source's text layer."""
        if not self.prompts_uri:
            return None
        from raysys.zeroshot import load_prompts

        return load_prompts(self.prompts_uri, self.text_layer)

    def count(self, split: str) -> int:
        """The split's usable pairs, counted without holding them (`cache.count_pairs`)."""
        return cache.count_pairs(self.corpus_dir, self.image_dir, self.text_dir, split)

    def index(self, split: str) -> cache.PairIndex:
        """The split's usable pairs, ids only (no embeddings read)."""
        return cache.pair_index(*self._args(), split)


def pair_source(ext: Extracted, image_layer: str, text_layer: str) -> PairSource:
    """The source of an extraction at two cached layers (column names such as `L08`)."""
    return PairSource(
        corpus_dir=ext.corpus_dir,
        image_dir=ext.image_dir,
        text_dir=ext.text_dir,
        image_layer=image_layer,
        text_layer=text_layer,
        prompts_uri=ext.prompts_uri,
    )
