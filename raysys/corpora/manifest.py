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
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

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
from raysys.errors import ConfigError, CorpusError

MANIFEST_VERSION = 1  # bump when how rows become pairs changes: it re-keys every cache
FORMATS = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".csv": "csv"}
FORMATS |= {".parquet": "parquet", ".pq": "parquet"}
# Beyond the shared fields: the columns that name a manifest's images and their ids.
IMAGE_KEY_FIELDS = ("image_key", "id_key")


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


def fingerprint(cfg: CorpusConfig) -> tuple[str, dict[str, Any]]:
    """The corpus key, from the manifest's bytes streamed through a hash (never held whole),
    the settings that shape its pairs and its resolved location (the same manifest elsewhere
    names other image files); plus the info the cache manifest records. Remembered per
    process by the file's size and version (mtime, or ETag on S3), so a sweep hashes its
    manifest once, not once per model pair."""
    if not cfg.path:
        raise ConfigError("corpus.name=manifest needs corpus.path (a .jsonl, .csv or .parquet)")
    kind = _format(cfg.path)
    storage.check_readable(cfg.path, "manifest")
    fs, path = storage.fsspec_fs(cfg.path)
    stat = fs.info(path)
    version = stat.get("ETag") or stat.get("mtime") or stat.get("LastModified")
    seen = (cfg.path, int(stat["size"]), str(version))
    if seen not in _DIGESTS:
        digest, size = hashlib.sha256(), 0
        with fs.open(path, "rb") as f:
            while block := f.read(HASH_BLOCK):
                digest.update(block)
                size += len(block)
        _DIGESTS.clear()  # one manifest per process is the common case
        _DIGESTS[seen] = (digest.hexdigest(), size)
    digest, size = _DIGESTS[seen]
    base = _base_dir(cfg.path)
    # The label column only when set, so a manifest read without labels keeps its key.
    fields = IMAGE_KEY_FIELDS + (("label_key",) if cfg.label_key else ())
    key = content_key("manifest", MANIFEST_VERSION, digest, settings(cfg, fields), base)
    info = {"kind": "manifest", "source": cfg.path, "sha256": digest, "bytes": size}
    info["format"] = kind
    return key, info


_DIGESTS: dict[tuple[str, int, str], tuple[str, int]] = {}  # (path, size, version) -> hash


HASH_BLOCK = 8 << 20  # bytes per read while hashing or scanning a manifest


def _format(uri: str) -> str:
    suffix = posixpath.splitext(uri.lower())[1]
    kind = FORMATS.get(suffix)
    if kind is None:
        raise ConfigError(
            f"corpus.path {uri!r}: unknown manifest format {suffix or '(no suffix)'!r}; use "
            f"one of {', '.join(sorted(FORMATS))}"
        )
    return kind


def load(cfg: CorpusConfig) -> Corpus:
    """The manifest's pairs and image table, read here in one process: for inline images,
    a `corpus.limit` (only the rows up to the limit are read) and small manifests. Large
    ones go through the Ray Data index job (`raysys.corpora.index`), with the same rows."""
    key, info = fingerprint(cfg)
    records = list(_limited(cfg, _records(cfg)))
    _check_columns(cfg, records)
    base = _base_dir(cfg.path)
    inline: dict[str, bytes] = {}
    rows = [
        _source_row(cfg, record, n, base, f"manifest {cfg.path!r} row {n}", inline)
        for n, record in records
    ]
    pairs = gather_images(
        pa.Table.from_pylist(rows, schema=SOURCE_SCHEMA),
        cfg.seed,
        cfg.val_fraction,
        cfg.test_fraction,
    )
    check_unique(pairs, f"manifest {cfg.path!r}")
    firsts = pairs.filter(pairs["first"])
    _check_buckets(firsts["image"].to_pylist())
    if inline and any(
        v is not None and not v.startswith(INLINE) for v in firsts["image"].to_pylist()
    ):
        raise CorpusError(
            f"manifest {cfg.path!r} mixes inline image bytes and image paths; use one or the other"
        )
    if inline:
        ids = firsts["image_id"]
        images = pa.table(
            {"id": ids, "image": pa.array([inline.get(i) for i in ids.to_pylist()], pa.binary())}
        )
    else:
        images = pa.table({"id": firsts["image_id"], "uri": firsts["image"]})
    info |= {"images": firsts.num_rows}
    return Corpus(key=key, pairs=finish_pairs(pairs, cfg.label_key), images=images, info=info)


INLINE = "sha256:"  # an inline image's `image` value: its digest (the bytes travel apart)


def _records(cfg: CorpusConfig) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row number, row) in file order, streamed: JSON Lines line by line, CSV and Parquet
    batch by batch (a JSON array is parsed whole)."""
    kind = _format(cfg.path)
    fs, path = storage.fsspec_fs(cfg.path)
    with fs.open(path, "rb") as f:
        if kind == "json":
            if _starts_array(f):
                yield from enumerate(_json_array(f.read(), cfg.path))
                return
            for n, line in enumerate(io.TextIOWrapper(f, encoding="utf-8")):
                if line.strip():
                    yield n, _json_line(line, f"manifest {cfg.path!r} line {n + 1}")
            return
        try:
            if kind == "csv":
                reader = pcsv.open_csv(f, convert_options=_csv_strings(f))
                batches = iter(reader)
            else:
                batches = pq.ParquetFile(f).iter_batches(batch_size=4096)
            n = 0
            for batch in batches:
                for row in batch.to_pylist():
                    yield n, row
                    n += 1
        except pa.ArrowInvalid as e:
            raise CorpusError(f"cannot parse manifest {cfg.path!r} as {kind}: {e}") from e


def _csv_strings(f: Any) -> pcsv.ConvertOptions:
    """Every CSV column as text (so ids like `007` stay `007`): the header is read first."""
    start = f.tell()
    header = pcsv.open_csv(f).schema.names
    f.seek(start)
    return pcsv.ConvertOptions(column_types={n: pa.string() for n in header})


def _limited(
    cfg: CorpusConfig, records: Iterator[tuple[int, dict[str, Any]]]
) -> Iterator[tuple[int, dict[str, Any]]]:
    """The rows up to the first row of image `corpus.limit + 1` (all rows without a limit):
    reading stops there, so a quick try on a huge manifest reads only its head."""
    seen: set[str] = set()
    for n, record in records:
        if cfg.limit:
            image = _image_value(record.get(cfg.image_key))
            image_id = _image_id(record.get(cfg.id_key) if cfg.id_key else None, image, n)
            if image_id not in seen and len(seen) >= cfg.limit:
                return
            seen.add(image_id)
        yield n, record


def _json_line(line: str, where: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except ValueError as e:
        raise CorpusError(f"{where} is not JSON ({e}); JSON Lines holds one object per line") from e
    if not isinstance(row, dict):
        raise CorpusError(f"{where}: every row must be a JSON object")
    return row


def _json_array(data: bytes, uri: str) -> list[dict[str, Any]]:
    try:
        rows = json.loads(data.decode("utf-8"))
    except ValueError as e:
        raise CorpusError(f"cannot parse manifest {uri!r} as a JSON array: {e}") from e
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise CorpusError(f"manifest {uri!r}: every row must be a JSON object")
    return rows


def _check_columns(
    cfg: CorpusConfig, records: list[tuple[int, dict[str, Any]]], labels: bool = True
) -> None:
    """A wrong `corpus.*_key` fails with the columns there are (among the first 1,000 rows;
    labels may be sparse, so every row given is looked at for them)."""
    head = [r for _, r in records[:1000]]
    columns = sorted({k for r in head for k in r})
    for key in ("image_key", "caption_key"):
        if head and not any(getattr(cfg, key) in r for r in head):
            raise ConfigError(
                f"manifest {cfg.path!r} has no column {getattr(cfg, key)!r} (corpus.{key}); "
                f"its columns: {', '.join(columns)}"
            )
    if labels and records and cfg.label_key and not any(cfg.label_key in r for _, r in records):
        raise ConfigError(
            f"manifest {cfg.path!r} has no column {cfg.label_key!r} (corpus.label_key, the "
            f"zero-shot labels); its columns: {', '.join(columns)}; set corpus.label_key= to "
            "read none"
        )


def _source_row(
    cfg: CorpusConfig,
    record: dict[str, Any],
    order: int,
    base: str,
    where: str,
    inline: dict[str, bytes] | None = None,
) -> dict[str, Any]:
    """One manifest row as a source row: its image id and value (a resolved path or URI;
    inline bytes go to `inline` and the row keeps their digest), captions, negatives,
    split and label."""
    image = _image_value(record.get(cfg.image_key))
    image_id = _image_id(record.get(cfg.id_key) if cfg.id_key else None, image, order)
    if isinstance(image, bytes):
        if inline is None:
            raise CorpusError(f"{where}: inline image bytes are read by the in-process loader")
        inline.setdefault(image_id, image)
        value = INLINE + hashlib.sha256(image).hexdigest()
    else:
        value = _image_uri(image, base) if isinstance(image, str) else None
    label = record.get(cfg.label_key) if cfg.label_key else None
    return source_row(
        order,
        image_id,
        value,
        as_texts(record.get(cfg.caption_key)),
        as_texts(record.get(cfg.negative_key)),
        record.get(cfg.split_key) if cfg.split_key else None,
        label,
        where,
    )


# --- the Ray Data index job's side: the manifest in chunks ----------------------------------

CHUNK_BYTES = 16 << 20  # a JSON Lines chunk: one read task's byte range


def chunks(cfg: CorpusConfig, size: int) -> list[dict[str, Any]]:
    """The manifest as independent read tasks: byte ranges of a JSON Lines file (a task
    owns the lines that start in its range), row groups of a Parquet one, a CSV or JSON
    array whole."""
    kind = _format(cfg.path)
    if kind == "parquet":
        fs, path = storage.fsspec_fs(cfg.path)
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
        offsets = [0]
        for g in range(meta.num_row_groups):
            offsets.append(offsets[-1] + meta.row_group(g).num_rows)
        return [
            {"kind": "parquet", "group": g, "first": offsets[g]} for g in range(meta.num_row_groups)
        ]
    if kind == "json" and not _is_json_array(cfg):
        return [
            {"kind": "jsonl", "start": s, "end": min(size, s + CHUNK_BYTES)}
            for s in range(0, max(size, 1), CHUNK_BYTES)
        ]
    return [{"kind": "whole"}]


def _is_json_array(cfg: CorpusConfig) -> bool:
    fs, path = storage.fsspec_fs(cfg.path)
    with fs.open(path, "rb") as f:
        return _starts_array(f)


def _starts_array(f: Any) -> bool:
    """Whether an open `.json` manifest holds one JSON array (else JSON Lines); the file is
    left at its start."""
    head = f.read(1 << 16).lstrip()
    f.seek(0)
    return head.startswith(b"[")


def inline_images(cfg: CorpusConfig) -> bool:
    """Whether a Parquet manifest carries image bytes (then it is read in one process)."""
    if _format(cfg.path) != "parquet":
        return False
    fs, path = storage.fsspec_fs(cfg.path)
    with fs.open(path, "rb") as f:
        schema = pq.ParquetFile(f).schema_arrow
    if cfg.image_key not in schema.names:
        return False
    kind = schema.field(cfg.image_key).type
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_struct(kind)


def read_chunk(cfg: CorpusConfig, chunk: dict[str, Any]) -> pa.Table:
    """One read task: its rows as source rows (`SOURCE_SCHEMA`); `order` is the byte offset
    of a JSON line, else the row number, so rows keep their file order across tasks."""
    base = _base_dir(cfg.path)
    rows = [
        _source_row(cfg, record, order, base, where)
        for order, record, where in _chunk_records(cfg, chunk)
    ]
    return pa.Table.from_pylist(rows, schema=SOURCE_SCHEMA)


def _chunk_records(
    cfg: CorpusConfig, chunk: dict[str, Any]
) -> Iterator[tuple[int, dict[str, Any], str]]:
    fs, path = storage.fsspec_fs(cfg.path)
    if chunk["kind"] == "jsonl":
        with fs.open(path, "rb") as f:
            start = chunk["start"]
            if start:  # the line that began before this range belongs to the previous task
                f.seek(start - 1)
                f.readline()
            while (offset := f.tell()) < chunk["end"]:
                line = f.readline()
                if not line:
                    break
                if line.strip():
                    where = f"manifest {cfg.path!r} line at byte {offset}"
                    yield offset, _json_line(line.decode("utf-8"), where), where
        return
    if chunk["kind"] == "parquet":
        with fs.open(path, "rb") as f:
            table = pq.ParquetFile(f).read_row_group(chunk["group"])
        for i, record in enumerate(table.to_pylist()):
            n = chunk["first"] + i
            yield n, record, f"manifest {cfg.path!r} row {n}"
        return
    for n, record in _records(cfg):
        yield n, record, f"manifest {cfg.path!r} row {n}"


def check_head(cfg: CorpusConfig) -> None:
    """The column checks of `load` on the manifest's first rows, before the Ray Data job."""
    head = []
    for item in _records(cfg):
        head.append(item)
        if len(head) >= 1000:
            break
    _check_columns(cfg, head, labels=False)  # labels may be sparse: the job counts them


def _base_dir(path: str) -> str:
    """The manifest's directory, which relative image paths are relative to."""
    if storage.is_remote(path):
        return posixpath.dirname(path.rstrip("/"))
    return os.path.dirname(os.path.abspath(path))


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


def _check_buckets(images: list[Any]) -> None:
    """A wrong image bucket fails now, not after the pass has rejected every image."""
    buckets = {
        v[5:].split("/", 1)[0] for v in images if isinstance(v, str) and storage.is_remote(v)
    }
    for bucket in sorted(buckets):
        storage.check_readable(f"s3://{bucket}", "image bucket")


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
