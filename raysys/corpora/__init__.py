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
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from raysys import storage
from raysys.config import CorpusConfig
from raysys.corpora import index, manifest, webdataset
from raysys.corpora.base import Corpus, pairs_table
from raysys.corpora.negatives import (
    RULES_VERSION,
    Negative,
    fill_negatives,
    make_negative,
    negatives_table,
)
from raysys.corpora.synthetic import (
    SyntheticConfig,
    corpus_info,
    corpus_key,
    generate,
    split_overlap,
    zeroshot_tasks,
)
from raysys.data.cache import content_key
from raysys.data.index import INDEX_VERSION, read_marker, value_counts, write_index
from raysys.errors import ConfigError

if TYPE_CHECKING:
    import ray.data

KINDS = ("synthetic", "manifest", "webdataset")
_LOADED: dict[str, Corpus] = {}  # this process's last corpus, by config


def load_corpus(
    cfg: CorpusConfig,
    cache_dir: str | None = None,
    before_job: Callable[[], Any] | None = None,
) -> Corpus:
    """The configured corpus, negatives filled in.

    With a `cache_dir` (extraction), the corpus's index lives on it: a finished index is
    found by the corpus key (from the source's fingerprints, without reading its rows) and
    reused as it is (a manifest with inline images is still read here: only it holds their
    bytes); otherwise a whole manifest or set of shards is indexed by the Ray Data
    job (`corpora.index`) and the driver never holds its pairs, while a small corpus
    (synthetic, a `corpus.limit`, inline images) is built here and written as the index.
    Without a `cache_dir`, the pairs are built here and kept in memory. `before_job` runs
    before the Ray Data job (it starts Ray).

    A synthetic corpus is built once per process and config (rendering 2,000 scenes takes
    seconds and a run needs them twice). Tar shards are read by Ray Data, so the caller
    starts Ray first (`runtime.init_ray`) or Ray Data would start its own."""
    if cfg.name not in KINDS:
        raise ConfigError(f"unknown corpus {cfg.name!r}; available: {', '.join(KINDS)}")
    if cfg.name == "synthetic":
        memo = content_key(dataclasses.asdict(cfg))
        if memo not in _LOADED:
            _LOADED.clear()  # keep one corpus: it holds every image
            _LOADED[memo] = _synthetic(cfg)
        corpus = _LOADED[memo]
        return _indexed(corpus, cache_dir) if cache_dir else corpus
    uris: list[str] = []  # a webdataset's shards, listed once by its fingerprint
    if cfg.name == "manifest":
        key, info = manifest.fingerprint(cfg)
    else:
        key, info, uris = webdataset.fingerprint(cfg)
    key = content_key(key, INDEX_VERSION, RULES_VERSION)
    if cache_dir:
        corpus_dir = storage.join(cache_dir, key)
        marker = read_marker(corpus_dir)
        if marker is None and index.streamed(cfg, info["bytes"]):
            if before_job is not None:
                before_job()
            marker = index.build(cfg, corpus_dir, info, uris)
        # Inline image bytes live only in the manifest (the index keeps their digests), so
        # such a corpus (small by construction) is read here again, not from its index.
        if marker is not None and not _inline(cfg):
            return _from_index(cfg, key, corpus_dir, marker, info, uris)
    corpus = (manifest if cfg.name == "manifest" else webdataset).load(cfg)
    corpus.key = key
    corpus.pairs = negatives_table(corpus.pairs)
    return _indexed(corpus, cache_dir) if cache_dir else corpus


def _inline(cfg: CorpusConfig) -> bool:
    return cfg.name == "manifest" and manifest.inline_images(cfg)


def _synthetic(cfg: CorpusConfig) -> Corpus:
    fields = {f.name for f in dataclasses.fields(SyntheticConfig)}
    syn = SyntheticConfig(**{k: v for k, v in dataclasses.asdict(cfg).items() if k in fields})
    rows = generate(syn)
    images: dict[str, bytes] = {}
    for r in rows:
        images.setdefault(r["image_id"], r.pop("image"))
    table = pa.table({"id": list(images), "image": pa.array(list(images.values()), pa.binary())})
    return Corpus(
        corpus_key(syn),
        pairs_table(fill_negatives(rows)),
        images=table,
        info={"kind": "synthetic", "images": len(images)} | corpus_info(syn, rows),
        zeroshot=zeroshot_tasks(),
    )


def _indexed(corpus: Corpus, cache_dir: str) -> Corpus:
    """An in-memory corpus with its index written on the cache (once)."""
    corpus_dir = storage.join(cache_dir, corpus.key)
    if read_marker(corpus_dir) is None:
        write_index(corpus_dir, corpus.pairs, corpus.info)
    corpus.index = corpus_dir
    return corpus


def _from_index(
    cfg: CorpusConfig,
    key: str,
    corpus_dir: str,
    marker: dict[str, Any],
    info: dict[str, Any],
    uris: list[str],
) -> Corpus:
    """A corpus whose pairs stay in its index (read by the stages that need them)."""
    info = info | {"images": marker["images"]}
    limited = cfg.name == "webdataset" and bool(cfg.limit)
    if limited:  # the limit's images, from the shards it read (all, in an older index)
        read = marker.get("info", {}).get(webdataset.SHARDS_READ, len(uris))
        uris, info = uris[:read], info | {webdataset.SHARDS_READ: read}
    corpus = Corpus(key, None, info=info, index=corpus_dir, labels=marker.get("labels"))
    if cfg.name == "webdataset":
        reader = functools.partial(_shard_images, cfg, uris, corpus if limited else None)
        corpus.read_images = reader
    return corpus


def _shard_images(cfg: CorpusConfig, uris: list[str], limited: Corpus | None) -> ray.data.Dataset:
    """An indexed webdataset's image rows; of a `limited` corpus, only its indexed images
    (read from its index when the pass opens them), as `webdataset.load` gives them."""
    keep = limited.image_ids if limited is not None else None
    return webdataset.read_images(cfg, uris, keep)


def negative_counts(pairs: pa.Table) -> dict[str, Any]:
    """How many negatives came from where (the corpus manifest records it)."""
    return value_counts(pairs["negative_source"])


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
