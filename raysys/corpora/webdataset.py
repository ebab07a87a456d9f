"""`webdataset` corpora: tar shards as img2dataset writes them, local or on S3, read by Ray Data.

Each sample is the files sharing a key inside a shard: an image (`.jpg`, `.jpeg`, `.png` or
`.webp`) and a caption (`.txt`, or the `corpus.caption_key` field of `.json`, which may be a
list); a `.json` may also carry negatives (`corpus.negative_key`) and a split
(`corpus.split_key`). The sample key is the image id, so it must be unique across shards
(img2dataset's keys are: they start with the shard number).

Shards are read twice with `ray.data.read_webdataset`: once at load time without the image
members, for the small caption index, and once by the image pass, streaming the images to the
backbone actors. The driver never holds the images.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from raysys import storage
from raysys.config import CorpusConfig
from raysys.corpora.base import (
    Corpus,
    as_texts,
    check_unique,
    image_pairs,
    normalise_split,
    pairs_table,
    settings,
    split_of,
)
from raysys.data.cache import content_key
from raysys.errors import ConfigError, CorpusError

WEBDATASET_VERSION = 1
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
TEXT_SUFFIXES = ("txt", "json")


def shard_files(path: str) -> list[tuple[str, int, str]]:
    """(uri, size, version) of every shard: `path` is a .tar, a directory of them, or a glob."""
    if "{" in path:
        raise ConfigError(
            f"corpus.path {path!r}: brace ranges are not expanded; use a glob "
            "(shards/*.tar) or the directory"
        )
    globbed = any(c in path for c in "*?[")
    # A glob: check the directory it searches (fails fast on a wrong bucket or path).
    fixed = path[: min(path.find(c) for c in "*?[" if c in path)] if globbed else path
    storage.check_readable(fixed.rsplit("/", 1)[0] if globbed else path, "shards")
    fs, root = storage.fsspec_fs(path)
    if globbed:
        found = fs.glob(root)
    elif fs.isdir(root):
        found = [f for f in fs.find(root) if f.endswith(".tar")]
    else:
        found = [root]
    found = sorted(f for f in found if f.endswith(".tar"))
    if not found:
        raise ConfigError(f"corpus.path {path!r} holds no .tar shards")
    scheme = storage.S3_SCHEME if storage.is_remote(path) else ""
    out = []
    for f in found:
        info = fs.info(f)
        version = info.get("ETag") or info.get("mtime") or info.get("LastModified")
        out.append((scheme + f, int(info["size"]), str(version)))
    return out


def _filesystem(path: str):
    return storage.pyarrow_fs(path)[0] if storage.is_remote(path) else None


def _member(value: Any) -> bytes | None:
    """A member's bytes; a sample without that member reads back as None or NaN."""
    return value if isinstance(value, bytes) else None


def _sample_text(row: dict[str, Any], cfg: CorpusConfig) -> tuple[list, list, Any, Any]:
    meta: dict[str, Any] = {}
    if _member(row.get("json")):
        try:
            meta = json.loads(row["json"])
        except ValueError:
            meta = {}
    if _member(row.get("txt")) is not None:
        captions = [row["txt"].decode("utf-8", errors="replace").strip()]
    else:
        captions = as_texts(meta.get(cfg.caption_key))
    negatives = as_texts(meta.get(cfg.negative_key))
    label = meta.get(cfg.label_key) if cfg.label_key else None
    return captions, negatives, meta.get(cfg.split_key), label


def load(cfg: CorpusConfig) -> Corpus:
    """The caption index (read by Ray Data: the caller has started Ray) and the image reader."""
    import ray.data  # lazy: Ray Data takes seconds to import; only this corpus reads with it

    if not cfg.path:
        raise ConfigError("corpus.name=webdataset needs corpus.path (shards: .tar, dir or glob)")
    shards = shard_files(cfg.path)
    uris = [u for u, _, _ in shards]
    texts = ray.data.read_webdataset(
        uris,
        filesystem=_filesystem(cfg.path),
        decoder=None,
        suffixes=list(TEXT_SUFFIXES),
    )
    # Ray Data yields rows in completion order: sort, so `limit` and the key are stable.
    index = sorted(texts.iter_rows(), key=lambda r: str(r["__key__"]))
    keys = [str(r["__key__"]) for r in index]
    repeated = sorted({a for a, b in zip(keys, keys[1:], strict=False) if a == b})
    if repeated:
        raise CorpusError(
            f"webdataset {cfg.path!r}: sample keys appear more than once ({repeated[:5]}); "
            "keys must be unique across shards (they name the cached images)"
        )
    if cfg.limit:
        index = index[: cfg.limit]
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for sample in index:
        image_id = str(sample["__key__"])
        seen.add(image_id)
        captions, negatives, split, label = _sample_text(sample, cfg)
        if negatives and len(negatives) != len(captions):
            raise CorpusError(
                f"webdataset {cfg.path!r} sample {image_id!r}: {len(captions)} captions but "
                f"{len(negatives)} negatives"
            )
        split = (
            normalise_split(split, f"sample {image_id!r}")
            if split is not None
            else split_of(image_id, cfg.seed, cfg.val_fraction, cfg.test_fraction)
        )
        texts = captions or [None]
        negs = negatives or [None] * len(texts)
        new = image_pairs(image_id, list(zip(texts, negs, strict=True)), split)
        if cfg.label_key:  # the key on every row, so pairs_table keeps the column
            text = "" if label is None else str(label).strip()
            for r in new:
                r["labels"] = json.dumps({"label": text}) if text else None
        rows += new
    pairs = pairs_table(rows)
    check_unique(pairs, f"webdataset {cfg.path!r}")
    # Shard names, sizes and versions (ETag on S3, mtime locally) stand for the images; the
    # pairs (hashed with their negatives by `load_corpus`) for the text.
    key = content_key("webdataset", WEBDATASET_VERSION, shards, settings(cfg))
    keep = set(seen)

    def read_images() -> ray.data.Dataset:
        ds = ray.data.read_webdataset(
            uris,
            filesystem=_filesystem(cfg.path),
            decoder=None,
            suffixes=list(IMAGE_SUFFIXES),
        )
        return ds.map_batches(_ImageRows(keep), batch_format="pyarrow")

    info = {"kind": "webdataset", "source": cfg.path, "shards": len(shards), "images": len(seen)}
    return Corpus(key=key, pairs=pairs, read_images=read_images, info=info)


class _ImageRows:
    """Shard samples -> `id, image` rows: the first image member of each sample, only for
    samples in the index (so `corpus.limit` holds); a sample with no image keeps a null
    image, which the image pass rejects."""

    def __init__(self, keep: set[str]) -> None:
        self.keep = keep

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = [str(k) for k in batch["__key__"].to_pylist()]
        images: list[bytes | None] = [None] * len(ids)
        for suffix in IMAGE_SUFFIXES:
            if suffix in batch.column_names:
                for i, value in enumerate(batch[suffix].to_pylist()):
                    images[i] = images[i] or _member(value)
        keep = [i for i, k in enumerate(ids) if k in self.keep]
        return pa.table(
            {
                "id": pa.array([ids[i] for i in keep], pa.string()),
                "image": pa.array([images[i] for i in keep], pa.binary()),
            }
        )
