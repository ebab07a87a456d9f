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

import functools
import json
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from raysys import storage
from raysys.config import CorpusConfig
from raysys.corpora.base import (
    SOURCE_SCHEMA,
    Corpus,
    as_texts,
    check_unique,
    finish_pairs,
    gather_images,
    settings,
    source_row,
)
from raysys.data.cache import content_key
from raysys.errors import ConfigError

if TYPE_CHECKING:
    import ray.data

WEBDATASET_VERSION = 1
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
TEXT_SUFFIXES = ("txt", "json")
SHARDS_READ = "shards_read"  # info: how many shards (in name order) a `corpus.limit` read


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


def _sample_row(sample: dict[str, Any], cfg: CorpusConfig) -> dict[str, Any]:
    """One sample's text members as a source row (`SOURCE_SCHEMA`): its key is the image
    id; the `.txt` caption, else the `.json` field's (a string or a list)."""
    image_id = str(sample["__key__"])
    meta: dict[str, Any] = {}
    if _member(sample.get("json")):
        try:
            meta = json.loads(sample["json"])
        except ValueError:
            meta = {}
    if _member(sample.get("txt")) is not None:
        captions = [sample["txt"].decode("utf-8", errors="replace").strip()]
    else:
        captions = as_texts(meta.get(cfg.caption_key))
    return source_row(
        0,  # rows are ordered by key
        image_id,
        None,
        captions,
        as_texts(meta.get(cfg.negative_key)),
        meta.get(cfg.split_key),
        meta.get(cfg.label_key) if cfg.label_key else None,
        f"webdataset {cfg.path!r} sample {image_id!r}",
    )


class SampleRows:
    """Ray Data batches of text members -> source rows: the index job's read transform."""

    def __init__(self, cfg: CorpusConfig) -> None:
        self.cfg = cfg

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [_sample_row(sample, self.cfg) for sample in batch.to_pylist()]
        return pa.Table.from_pylist(rows, schema=SOURCE_SCHEMA)


def repeated_keys(cfg: CorpusConfig) -> str:
    """The error for a key on two samples (`gather_images(repeats=...)`)."""
    return (
        f"webdataset {cfg.path!r}: sample keys appear more than once ({{image_id!r}}); "
        "keys must be unique across shards (they name the cached images)"
    )


def fingerprint(cfg: CorpusConfig) -> tuple[str, dict[str, Any], list[str]]:
    """The corpus key from the shards' names, sizes and versions (ETag on S3, mtime
    locally) and the settings, without reading a shard; the info and the shard URIs."""
    if not cfg.path:
        raise ConfigError("corpus.name=webdataset needs corpus.path (shards: .tar, dir or glob)")
    shards = shard_files(cfg.path)
    # The label field only when set, so a corpus read without labels keeps its key.
    fields = ("label_key",) if cfg.label_key else ()
    key = content_key("webdataset", WEBDATASET_VERSION, shards, settings(cfg, fields))
    info = {"kind": "webdataset", "source": cfg.path, "shards": len(shards)}
    info["bytes"] = sum(size for _, size, _ in shards)
    return key, info, [u for u, _, _ in shards]


def texts(cfg: CorpusConfig, uris: list[str]) -> ray.data.Dataset:
    """The shards' text members (no images) as a Ray Dataset of samples."""
    import ray.data  # lazy: Ray Data takes seconds to import

    return ray.data.read_webdataset(
        uris, filesystem=_filesystem(cfg.path), decoder=None, suffixes=list(TEXT_SUFFIXES)
    )


def load(cfg: CorpusConfig) -> Corpus:
    """The caption index read here (by Ray Data: the caller has started Ray) and the image
    reader. With `corpus.limit`, shards are read in name order only until they hold that
    many samples, and the first `limit` keys of those are kept."""
    key, info, uris = fingerprint(cfg)
    rows: list[dict[str, Any]] = []
    read = 0  # shards read
    # With a limit, one shard at a time, stopping once enough are read; else all at once.
    for group in [[uri] for uri in uris] if cfg.limit else [uris]:
        rows += [_sample_row(sample, cfg) for sample in texts(cfg, group).iter_rows()]
        read += len(group)
        if cfg.limit and len(rows) >= cfg.limit:
            break
    table = pa.Table.from_pylist(rows, schema=SOURCE_SCHEMA)
    pairs = gather_images(
        table, cfg.seed, cfg.val_fraction, cfg.test_fraction, repeats=repeated_keys(cfg)
    )
    if cfg.limit:
        kept = pc.unique(pairs["image_id"])[: cfg.limit]  # pairs come sorted by key
        pairs = pairs.filter(pc.is_in(pairs["image_id"], kept))
    check_unique(pairs, f"webdataset {cfg.path!r}")
    keep = pc.unique(pairs["image_id"]) if cfg.limit else None
    info |= {"images": int(pc.sum(pairs["first"]).as_py() or 0)}
    if cfg.limit:  # the image pass reads only these; the index records it for the next one
        info[SHARDS_READ] = read
    return Corpus(
        key=key,
        pairs=finish_pairs(pairs, cfg.label_key, image=False),
        read_images=functools.partial(read_images, cfg, uris[:read], keep),
        info=info,
    )


def read_images(cfg: CorpusConfig, uris: list[str], keep: pa.Array | None) -> ray.data.Dataset:
    """The shards' images as `id, image` rows, streamed to the image pass; with `keep`
    (a limited corpus's image ids), only those."""
    import ray.data

    ds = ray.data.read_webdataset(
        uris, filesystem=_filesystem(cfg.path), decoder=None, suffixes=list(IMAGE_SUFFIXES)
    )
    return ds.map_batches(_ImageRows(keep), batch_format="pyarrow")


class _ImageRows:
    """Shard samples -> `id, image` rows: the first image member of each sample, only for
    samples in the index (so `corpus.limit` holds); a sample with no image keeps a null
    image, which the image pass rejects."""

    def __init__(self, keep: pa.Array | None) -> None:
        self.keep = keep  # None: every sample (an unlimited corpus; no set of every id)

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = [str(k) for k in batch["__key__"].to_pylist()]
        images: list[bytes | None] = [None] * len(ids)
        for suffix in IMAGE_SUFFIXES:
            if suffix in batch.column_names:
                for i, value in enumerate(batch[suffix].to_pylist()):
                    images[i] = images[i] or _member(value)
        if self.keep is None:
            keep = list(range(len(ids)))
        else:
            inside = pc.is_in(pa.array(ids, pa.string()), self.keep).to_pylist()
            keep = [i for i, k in enumerate(inside) if k]
        return pa.table(
            {
                "id": pa.array([ids[i] for i in keep], pa.string()),
                "image": pa.array([images[i] for i in keep], pa.binary()),
            }
        )
