"""`manifest` corpora: a JSONL, CSV or Parquet table naming images and their captions.

Two shapes both work, and can be mixed: one row per (image, caption) pair — many rows may share
an image, as flattened COCO annotations do — or one row per image whose caption field is a list
(COCO style, five captions per image). Images are paths (relative to the manifest, absolute, or
`s3://`) that the image pass reads lazily, or inline bytes in a Parquet binary column.
Negatives are optional, one per caption (a string, or a list aligned with the captions);
captions without one get a rule-based edit later (`negatives.fill_negatives`).

A row the extract stage cannot use (no image, no caption) is not an error here: it becomes a
pair the image or text pass rejects with its reason, so it is counted, not lost.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
from typing import Any

import pyarrow as pa

from raysys import storage
from raysys.cache import content_key
from raysys.config import CorpusConfig
from raysys.corpora.base import (
    Corpus,
    as_texts,
    check_unique,
    image_pairs,
    normalise_split,
    pairs_table,
    split_of,
)
from raysys.errors import ConfigError, CorpusError

MANIFEST_VERSION = 1  # bump when how rows become pairs changes: it re-keys every cache
FORMATS = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".csv": "csv"}
FORMATS |= {".parquet": "parquet", ".pq": "parquet"}


def read_table(uri: str) -> tuple[pa.Table, str]:
    """The manifest as an Arrow table, plus a hash of its bytes (part of the corpus key)."""
    suffix = posixpath.splitext(uri.lower())[1]
    kind = FORMATS.get(suffix)
    if kind is None:
        raise ConfigError(
            f"corpus.path {uri!r}: unknown manifest format {suffix or '(no suffix)'!r}; use "
            f"one of {', '.join(sorted(FORMATS))}"
        )
    storage.check_readable(uri, "manifest")
    fs, path = storage.fsspec_fs(uri)
    data = fs.cat_file(path)
    digest = hashlib.sha256(data).hexdigest()
    try:
        if kind == "json":
            import pyarrow.json as pj

            table = pj.read_json(io.BytesIO(data))
        elif kind == "csv":
            import pyarrow.csv as pcsv

            table = pcsv.read_csv(io.BytesIO(data))
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(io.BytesIO(data))
    except pa.ArrowInvalid as e:
        raise CorpusError(f"cannot parse manifest {uri!r} as {kind}: {e}") from e
    return table, digest


def _image_uri(value: str, base: str) -> str:
    """Relative paths are relative to the manifest's directory (local or s3://)."""
    if storage.is_remote(value) or posixpath.isabs(value) or value.startswith("file://"):
        return value
    return storage.join(base, value)


def load(cfg: CorpusConfig) -> Corpus:
    if not cfg.path:
        raise ConfigError("corpus.name=manifest needs corpus.path (a .jsonl, .csv or .parquet)")
    table, digest = read_table(cfg.path)
    columns = table.column_names
    for key in ("image_key", "caption_key"):
        if getattr(cfg, key) not in columns:
            raise ConfigError(
                f"manifest {cfg.path!r} has no column {getattr(cfg, key)!r} (corpus.{key}); "
                f"its columns: {', '.join(columns)}"
            )
    base = posixpath.dirname(cfg.path.rstrip("/")) if storage.is_remote(cfg.path) else None
    if base is None:
        import os

        base = os.path.dirname(os.path.abspath(cfg.path))

    def column(name: str) -> list[Any]:
        return table[name].to_pylist() if name and name in columns else [None] * table.num_rows

    images: dict[str, Any] = {}  # image id -> bytes or uri (first row wins)
    captions: dict[str, list[tuple[Any, Any]]] = {}  # image id -> [(caption, negative)]
    splits: dict[str, str] = {}
    rows = zip(
        column(cfg.image_key),
        column(cfg.caption_key),
        column(cfg.negative_key),
        column(cfg.id_key),
        column(cfg.split_key),
        strict=True,
    )
    for n, (image, caption, negative, given_id, split) in enumerate(rows):
        if given_id is not None:
            image_id = str(given_id)
        elif isinstance(image, str) and image:
            image_id = image
        elif isinstance(image, bytes) and image:
            image_id = "sha256-" + hashlib.sha256(image).hexdigest()[:20]
        else:
            image_id = f"row-{n:09d}"  # no image: the image pass rejects it ("null image")
        if image_id not in images:
            if cfg.limit and len(images) >= cfg.limit:
                continue
            images[image_id] = image if isinstance(image, bytes) else image or None
            if isinstance(image, str) and image:
                images[image_id] = _image_uri(image, base)
        if split is not None and image_id not in splits:
            splits[image_id] = normalise_split(split, f"manifest {cfg.path!r} row {n}")
        texts, negs = as_texts(caption), as_texts(negative)
        if negs and len(negs) != len(texts):
            raise CorpusError(
                f"manifest {cfg.path!r} row {n}: {len(texts)} captions but {len(negs)} "
                "negatives; give one negative per caption, or none"
            )
        pairs = captions.setdefault(image_id, [])
        pairs.extend(zip(texts or [None], negs or [None] * max(1, len(texts)), strict=True))

    rows_out: list[dict[str, Any]] = []
    for image_id, pairs in captions.items():
        split = splits.get(image_id) or split_of(
            image_id, cfg.seed, cfg.val_fraction, cfg.test_fraction
        )
        rows_out += image_pairs(image_id, pairs, split)
    pairs = pairs_table(rows_out)
    check_unique(pairs, f"manifest {cfg.path!r}")
    ids = list(images)
    values = list(images.values())
    inline = any(isinstance(v, bytes) for v in values)
    image_table = pa.table(
        {"id": pa.array(ids, pa.string())}
        | (
            {"image": pa.array([v if isinstance(v, bytes) else None for v in values], pa.binary())}
            if inline
            else {"uri": pa.array(values, pa.string())}
        )
    )
    if inline and any(isinstance(v, str) for v in values):
        raise CorpusError(
            f"manifest {cfg.path!r} mixes inline image bytes and image paths; use one or the other"
        )
    settings = {k: getattr(cfg, k) for k in _KEY_FIELDS}
    key = content_key("manifest", MANIFEST_VERSION, digest, settings)
    info = {"kind": "manifest", "source": cfg.path, "sha256": digest, "images": len(ids)}
    return Corpus(key=key, pairs=pairs, images=image_table, info=info)


# Config fields that change which pairs a manifest yields (and so the corpus key).
_KEY_FIELDS = (
    "image_key",
    "caption_key",
    "negative_key",
    "id_key",
    "split_key",
    "limit",
    "seed",
    "val_fraction",
    "test_fraction",
)


def coco_rows(annotations: dict[str, Any], image_dir: str = "") -> list[dict[str, Any]]:
    """A COCO captions file (`captions_train2017.json`, already parsed) as manifest rows: one
    per image, its captions as a list, ordered by image id so the manifest (and its corpus
    key) is the same whichever way the JSON was written."""
    captions: dict[int, list[str]] = {}
    for ann in sorted(annotations["annotations"], key=lambda a: (a["image_id"], a["id"])):
        captions.setdefault(ann["image_id"], []).append(ann["caption"].strip())
    rows = []
    for image in sorted(annotations["images"], key=lambda i: i["id"]):
        if image["id"] in captions:
            name = (
                posixpath.join(image_dir, image["file_name"]) if image_dir else image["file_name"]
            )
            rows.append({"image": name, "caption": captions[image["id"]], "id": str(image["id"])})
    return rows
