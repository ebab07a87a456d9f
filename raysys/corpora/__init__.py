"""Corpora: sources of (image, caption, hard negative) pairs.

Pair contract shared by every corpus (the `pairs` table of a `Corpus`)::

    pair_id          str   unique per (image, caption) pair, e.g. "syn-000123-0", "img.jpg#2"
    image_id         str   several pairs may share one image (COCO has five captions each)
    caption          str   None when the source had none (the text pass rejects it)
    negative         str   a hard-negative caption; None when none could be made
    negative_source  str   where the negative came from, with its kind after the colon:
                           "exact:<edit>" (synthetic: colour, shape, size, relation,
                           swap_colours), "corpus" (supplied), "generated:<rule>" (see
                           `negatives.RULES`), "none"
    split            str   "train" | "val" | "test", the same for all captions of an image
    labels           str   optional column: the pair's zero-shot classes as a JSON object
                           {task: class} for the tasks of `Corpus.zeroshot` (synthetic only)

Images travel separately (`Corpus.images` / `Corpus.read_images`): bytes never sit in the
pair index. Kinds: `synthetic` (built in), `manifest` (JSONL/CSV/Parquet), `webdataset`
(tar shards). Captions without a negative get one from `negatives.make_negative`, a single
rule-based edit.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from raysys.config import CorpusConfig
from raysys.corpora import manifest, webdataset
from raysys.corpora.base import Corpus, pairs_table, table_digest
from raysys.corpora.negatives import Negative, fill_negatives, make_negative
from raysys.corpora.synthetic import (
    SyntheticConfig,
    corpus_info,
    corpus_key,
    generate,
    split_overlap,
    zeroshot_tasks,
)
from raysys.data.cache import content_key
from raysys.errors import ConfigError

KINDS = ("synthetic", "manifest", "webdataset")
_LOADED: dict[str, Corpus] = {}  # this process's last corpus, by config


def load_corpus(cfg: CorpusConfig) -> Corpus:
    """The configured corpus, negatives filled in. A synthetic corpus is built once per
    process and config (rendering 2,000 scenes takes seconds and a run needs them twice:
    extraction and the projector's thumbnails); the others are read afresh, since their
    files may change. A `webdataset` corpus reads its shards with Ray Data, so the caller
    starts Ray first (`runtime.init_ray`) or Ray Data would start its own."""
    if cfg.name not in KINDS:
        raise ConfigError(f"unknown corpus {cfg.name!r}; available: {', '.join(KINDS)}")
    if cfg.name != "synthetic":
        return _load(cfg)
    memo = content_key(dataclasses.asdict(cfg))
    if memo not in _LOADED:
        _LOADED.clear()  # keep one corpus: it holds every image
        _LOADED[memo] = _load(cfg)
    return _LOADED[memo]


def _load(cfg: CorpusConfig) -> Corpus:
    if cfg.name == "synthetic":
        fields = {f.name for f in dataclasses.fields(SyntheticConfig)}
        syn = SyntheticConfig(**{k: v for k, v in dataclasses.asdict(cfg).items() if k in fields})
        rows = generate(syn)
        images: dict[str, bytes] = {}
        for r in rows:
            images.setdefault(r["image_id"], r.pop("image"))
        table = pa.table(
            {"id": list(images), "image": pa.array(list(images.values()), pa.binary())}
        )
        return Corpus(
            corpus_key(syn),
            pairs_table(fill_negatives(rows)),
            images=table,
            info={"kind": "synthetic", "images": len(images)} | corpus_info(syn, rows),
            zeroshot=zeroshot_tasks(),
        )
    source = manifest if cfg.name == "manifest" else webdataset
    corpus = source.load(cfg)
    corpus.pairs = pairs_table(fill_negatives(corpus.pairs.to_pylist()))
    # The final pairs, generated negatives included, key the cache: a change to the
    # negative rules must not reuse old negative embeddings.
    corpus.key = content_key(corpus.key, table_digest(corpus.pairs))
    return corpus


def negative_counts(pairs: pa.Table) -> dict[str, Any]:
    """How many negatives came from where (the corpus manifest records it)."""
    return {r["values"]: r["counts"] for r in pc.value_counts(pairs["negative_source"]).to_pylist()}


__all__ = [
    "Corpus",
    "KINDS",
    "Negative",
    "SyntheticConfig",
    "corpus_key",
    "fill_negatives",
    "generate",
    "load_corpus",
    "make_negative",
    "negative_counts",
    "split_overlap",
]
