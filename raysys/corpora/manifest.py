"""`manifest` corpora: a JSONL, CSV or Parquet table naming images and their captions.

Two shapes both work, and can be mixed: one row per (image, caption) pair — many rows may share
an image, as flattened COCO annotations do — or one row per image whose caption field is a list
(COCO style, five captions per image). Images are paths (relative to the manifest, absolute, or
`s3://`) that the image pass reads lazily, or inline bytes in a Parquet binary column.
Negatives are optional, one per caption (a string, or a list aligned with the captions);
captions without one get a rule-based edit later (`negatives.fill_negatives`).
With `corpus.label_key`, each image's class label (one value per image) becomes the pairs'
`labels` column, JSON `{"label": value}` (null for an image without one): the zero-shot task
`label` (`raysys.zeroshot`).

A row the extract stage cannot use (no image, no caption) is not an error here: it becomes a
pair the image or text pass rejects with its reason, so it is counted, not lost.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
from typing import Any

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

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

MANIFEST_VERSION = 1  # bump when how rows become pairs changes: it re-keys every cache
FORMATS = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".csv": "csv"}
FORMATS |= {".parquet": "parquet", ".pq": "parquet"}
# Beyond the shared fields: the columns that name a manifest's images and their ids.
IMAGE_KEY_FIELDS = ("image_key", "id_key")
LABEL_TASK = "label"  # the zero-shot task a manifest's `corpus.label_key` column gives


def read_records(uri: str) -> tuple[list[dict[str, Any]], str]:
    """The manifest's rows as dicts, plus a hash of its bytes (part of the corpus key).

    JSON is parsed line by line with Python's `json` (rows may mix a caption string and a
    caption list, which a columnar reader refuses); a `.json` file may also hold one array.
    CSV cells are read as strings, so ids like `007` stay `007`."""
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
    if kind == "json":
        return _json_records(data, uri), digest
    try:
        if kind == "csv":
            names = pcsv.read_csv(io.BytesIO(data)).column_names
            options = pcsv.ConvertOptions(column_types={n: pa.string() for n in names})
            table = pcsv.read_csv(io.BytesIO(data), convert_options=options)
        else:
            table = pq.read_table(io.BytesIO(data))
    except pa.ArrowInvalid as e:
        raise CorpusError(f"cannot parse manifest {uri!r} as {kind}: {e}") from e
    return table.to_pylist(), digest


def _json_records(data: bytes, uri: str) -> list[dict[str, Any]]:
    text = data.decode("utf-8")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except ValueError as e:
            raise CorpusError(f"cannot parse manifest {uri!r} as a JSON array: {e}") from e
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as e:
                    raise CorpusError(
                        f"manifest {uri!r} line {n} is not JSON ({e}); JSON Lines holds one "
                        "object per line"
                    ) from e
    if not all(isinstance(r, dict) for r in rows):
        raise CorpusError(f"manifest {uri!r}: every row must be a JSON object")
    return rows


def _image_uri(value: str, base: str) -> str:
    """Relative paths are relative to the manifest's directory (local or s3://); `..` is
    resolved, since S3 would read it as part of a literal key (COCO keeps `annotations/`
    beside `train2017/`)."""
    if storage.is_remote(value) or posixpath.isabs(value) or value.startswith("file://"):
        return value
    if storage.is_remote(base):
        return storage.S3_SCHEME + posixpath.normpath(posixpath.join(base[5:], value))
    return os.path.normpath(os.path.join(base, value))


def _image_value(value: Any) -> str | bytes | None:
    """A path, inline bytes, or None; Hugging Face datasets store `{bytes, path}` structs."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (str, bytes)) and value:
        return value
    if value is None or value == "":
        return None
    raise CorpusError(
        f"image values must be paths or bytes (or {{bytes, path}} structs), not "
        f"{type(value).__name__}: {value!r:.80}"
    )


def load(cfg: CorpusConfig) -> Corpus:
    """The manifest's pairs and image table, keyed by its bytes, settings and location."""
    if not cfg.path:
        raise ConfigError("corpus.name=manifest needs corpus.path (a .jsonl, .csv or .parquet)")
    records, digest = _read_table(cfg)
    base = _base_dir(cfg.path)
    images, captions, splits = _parse_rows(cfg, records, base)
    _check_buckets(images)
    pairs = _pairs(cfg, captions, splits)
    if cfg.label_key:
        pairs = pairs.append_column("labels", _labels(cfg, records, pairs))
    image_table = _image_table(cfg, images)
    # The resolved location too: the same manifest elsewhere names other image files. The
    # label column only when set, so a manifest read without labels keeps its old key.
    fields = IMAGE_KEY_FIELDS + (("label_key",) if cfg.label_key else ())
    key = content_key("manifest", MANIFEST_VERSION, digest, settings(cfg, fields), base)
    info = {"kind": "manifest", "source": cfg.path, "sha256": digest, "images": len(images)}
    return Corpus(key=key, pairs=pairs, images=image_table, info=info)


def _read_table(cfg: CorpusConfig) -> tuple[list[dict[str, Any]], str]:
    """`read_records`, then a check that the image and caption columns exist (among the
    first 1,000 rows), so a wrong `corpus.*_key` fails with the columns there are."""
    records, digest = read_records(cfg.path)
    columns = sorted({k for r in records[:1000] for k in r})
    for key in ("image_key", "caption_key"):
        if records and not any(getattr(cfg, key) in r for r in records[:1000]):
            raise ConfigError(
                f"manifest {cfg.path!r} has no column {getattr(cfg, key)!r} (corpus.{key}); "
                f"its columns: {', '.join(columns)}"
            )
    # Labels may be sparse (a few labelled images first listed late): every row is looked at.
    if records and cfg.label_key and not any(cfg.label_key in r for r in records):
        raise ConfigError(
            f"manifest {cfg.path!r} has no column {cfg.label_key!r} (corpus.label_key, the "
            f"zero-shot labels); its columns: {', '.join(columns)}; set corpus.label_key= to "
            "read none"
        )
    return records, digest


def _base_dir(path: str) -> str:
    """The manifest's directory, which relative image paths are relative to."""
    if storage.is_remote(path):
        return posixpath.dirname(path.rstrip("/"))
    return os.path.dirname(os.path.abspath(path))


def _parse_rows(
    cfg: CorpusConfig, records: list[dict[str, Any]], base: str
) -> tuple[dict[str, Any], dict[str, list[tuple[Any, Any]]], dict[str, str]]:
    """Images (id -> bytes or uri, the first `corpus.limit` of them), their (caption,
    negative) pairs and given splits. A row without an image or caption still gives a pair,
    which the image or text pass rejects with its reason."""
    images: dict[str, Any] = {}  # image id -> bytes or uri
    captions: dict[str, list[tuple[Any, Any]]] = {}  # image id -> [(caption, negative)]
    splits: dict[str, str] = {}
    for n, record in enumerate(records):
        image = _image_value(record.get(cfg.image_key))
        image_id = _image_id(record.get(cfg.id_key) if cfg.id_key else None, image, n)
        value = _image_uri(image, base) if isinstance(image, str) else image
        if image_id not in images:
            if cfg.limit and len(images) >= cfg.limit:
                continue
            images[image_id] = value
        elif images[image_id] != value:
            raise CorpusError(
                f"manifest {cfg.path!r} row {n}: id {image_id!r} names two different images; "
                "give each image its own id (corpus.id_key), or drop the id column"
            )
        split = record.get(cfg.split_key) if cfg.split_key else None
        if split not in (None, "") and image_id not in splits:
            splits[image_id] = normalise_split(split, f"manifest {cfg.path!r} row {n}")
        texts, negs = as_texts(record.get(cfg.caption_key)), as_texts(record.get(cfg.negative_key))
        if texts and negs and len(negs) != len(texts):
            raise CorpusError(
                f"manifest {cfg.path!r} row {n}: {len(texts)} captions but {len(negs)} "
                "negatives; give one negative per caption, or none"
            )
        if not texts:  # no caption: one pair the text pass rejects, its negative unused
            texts, negs = [None], []
        pairs = captions.setdefault(image_id, [])
        pairs.extend(zip(texts, negs or [None] * len(texts), strict=True))
    return images, captions, splits


def _labels(cfg: CorpusConfig, records: list[dict[str, Any]], pairs: pa.Table) -> pa.Array:
    """Each pair's `labels`: its image's label as JSON `{"label": value}`, or null. A label
    names the image, so every row of one image must agree (or give none); numbers become
    their text (`3` and `"3"` are one class)."""
    by_image: dict[str, str] = {}
    for n, record in enumerate(records):
        value = record.get(cfg.label_key)
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        if isinstance(value, (list, tuple, dict, bytes)):
            raise CorpusError(
                f"manifest {cfg.path!r} row {n}: label {value!r:.80} (corpus.label_key="
                f"{cfg.label_key!r}) must be one value (a class name), not "
                f"{type(value).__name__}"
            )
        label = str(value).strip()
        image = _image_value(record.get(cfg.image_key))
        image_id = _image_id(record.get(cfg.id_key) if cfg.id_key else None, image, n)
        if by_image.setdefault(image_id, label) != label:
            raise CorpusError(
                f"manifest {cfg.path!r} row {n}: image {image_id!r} has two labels, "
                f"{by_image[image_id]!r} and {label!r} (corpus.label_key={cfg.label_key!r}); "
                "an image has one class: fix the label column"
            )
    texts = {i: json.dumps({LABEL_TASK: label}) for i, label in by_image.items()}
    return pa.array([texts.get(i) for i in pairs["image_id"].to_pylist()], pa.string())


def _image_id(given: Any, image: str | bytes | None, n: int) -> str:
    """The id column's value if set, else the image path, else a hash of the inline bytes;
    a row with no image gets a placeholder id, unique per row."""
    if given is not None and str(given) != "":
        return str(given)
    if isinstance(image, str):
        return image
    if isinstance(image, bytes):
        return "sha256-" + hashlib.sha256(image).hexdigest()[:20]
    return f"row-{n:09d}"  # no image: the image pass rejects it


def _check_buckets(images: dict[str, Any]) -> None:
    """A wrong image bucket fails now, not after the pass has rejected every image."""
    buckets = {
        v[5:].split("/", 1)[0]
        for v in images.values()
        if isinstance(v, str) and storage.is_remote(v)
    }
    for bucket in sorted(buckets):
        storage.check_readable(f"s3://{bucket}", "image bucket")


def _pairs(
    cfg: CorpusConfig, captions: dict[str, list[tuple[Any, Any]]], splits: dict[str, str]
) -> pa.Table:
    """The pairs table: each image's captions, in the image's given split or a seeded one."""
    rows: list[dict[str, Any]] = []
    for image_id, pairs in captions.items():
        split = splits.get(image_id) or split_of(
            image_id, cfg.seed, cfg.val_fraction, cfg.test_fraction
        )
        rows += image_pairs(image_id, pairs, split)
    table = pairs_table(rows)
    check_unique(table, f"manifest {cfg.path!r}")
    return table


def _image_table(cfg: CorpusConfig, images: dict[str, Any]) -> pa.Table:
    """`id` plus inline `image` bytes or a `uri` the image pass reads; never both kinds."""
    values = list(images.values())
    inline = any(isinstance(v, bytes) for v in values)
    if inline and any(isinstance(v, str) for v in values):
        raise CorpusError(
            f"manifest {cfg.path!r} mixes inline image bytes and image paths; use one or the other"
        )
    column, kind = ("image", pa.binary()) if inline else ("uri", pa.string())
    return pa.table({"id": pa.array(list(images), pa.string()), column: pa.array(values, kind)})


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
