"""The corpus index on the cache URI: one Parquet file per bucket, and a marker written last.

Layout: `<cache>/<corpus-key>/index/bucket-NN.parquet` for each of the `pairs.BUCKETS`
buckets that holds pairs, and `_index.json`. Every pair lives in the bucket of its image id
(`pairs.buckets`), so all captions of an image share a file and a training worker reads only
its buckets' files. Columns: the pair contract (`pair_id, image_id, caption, negative,
negative_source, split`, optional `labels`), `bucket` (int16), `first` (the image's first
pair: the image pass embeds each image once) and, for corpora whose images are files,
`image` (the path or URI the image pass reads). Rows within a file are in source order.

The marker lists every file with its rows, bytes and SHA-256, and carries what later stages
ask of the whole corpus without reading it: pair, image and split counts, negatives by
source, the distinct zero-shot labels. A directory without one is unfinished and rebuilt.
Written by `raysys.corpora.index` (the Ray Data job) or, for small corpora, `write_index`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raysys import storage
from raysys.data import cache
from raysys.data.pairs import BUCKETS, buckets
from raysys.errors import CacheError

if TYPE_CHECKING:
    import ray.data

INDEX_DIR = "index"
DONE = "_index.json"
INDEX_VERSION = 1  # bump when the index's layout or columns change: it re-keys every cache
OPTIONAL_COLUMNS = ("labels", "image")  # only some corpora have them
PAIR_COLUMNS = ("pair_id", "image_id", "caption", "negative", "negative_source", "split")


def index_dir(corpus_dir: cache.Location) -> str:
    return storage.join(corpus_dir, INDEX_DIR)


def bucket_file(bucket: int) -> str:
    return f"bucket-{bucket:02d}.parquet"


def read_marker(corpus_dir: cache.Location) -> dict[str, Any] | None:
    """The finished index's marker, or None when there is no finished index."""
    try:
        return json.loads(cache.get_bytes(storage.join(index_dir(corpus_dir), DONE)))
    except FileNotFoundError:
        return None


def with_buckets(pairs: pa.Table) -> pa.Table:
    """The pairs with their `bucket` column (from the image id), if they lack one."""
    if "bucket" in pairs.column_names:
        return pairs
    ids = pairs["image_id"].to_numpy(zero_copy_only=False)
    return pairs.append_column("bucket", pa.array(buckets(ids), pa.int16()))


def with_first(pairs: pa.Table) -> pa.Table:
    """The pairs with a `first` column (each image's first pair), if they lack one."""
    if "first" in pairs.column_names:
        return pairs
    ids = pairs["image_id"].to_numpy(zero_copy_only=False).astype(str)
    _, first = np.unique(ids, return_index=True)
    mask = np.zeros(len(ids), dtype=bool)
    mask[first] = True
    return pairs.append_column("first", pa.array(mask))


def summary(pairs: pa.Table) -> dict[str, Any]:
    """What the marker adds up over buckets: pairs, images, pairs per split, negatives per
    source, distinct labels."""
    out: dict[str, Any] = {
        "rows": pairs.num_rows,
        "images": int(pc.sum(pairs["first"]).as_py() or 0),
        "splits": value_counts(pairs["split"]),
        "negatives": value_counts(pairs["negative_source"]),
    }
    if "labels" in pairs.column_names:
        out["labels"] = sorted(v for v in pc.unique(pairs["labels"]).to_pylist() if v)
    return out


def value_counts(column: pa.ChunkedArray | pa.Array) -> dict[str, int]:
    """How many rows hold each value of a string column (splits, negative sources)."""
    return {r["values"]: r["counts"] for r in pc.value_counts(column).to_pylist()}


def write_bucket(corpus_dir: cache.Location, bucket: int, pairs: pa.Table) -> dict[str, Any]:
    """One bucket's file, written whole; returns its marker entry and summary."""
    name = bucket_file(bucket)
    written = cache.write_part(pairs, storage.join(index_dir(corpus_dir), name))
    return {"name": name, "bytes": written.bytes, "sha256": written.sha256} | summary(pairs)


def write_marker(
    corpus_dir: cache.Location, parts: Iterable[dict[str, Any]], info: dict[str, Any]
) -> dict[str, Any]:
    """Add up the buckets' summaries and publish the index (the marker goes last)."""
    parts = sorted(parts, key=lambda p: p["name"])
    marker: dict[str, Any] = {
        "version": INDEX_VERSION,
        "rows": sum(p["rows"] for p in parts),
        "images": sum(p["images"] for p in parts),
        "splits": _add(p["splits"] for p in parts),
        "negatives": _add(p["negatives"] for p in parts),
        "files": {
            p["name"]: {"rows": p["rows"], "bytes": p["bytes"], "sha256": p["sha256"]}
            for p in parts
        },
        "info": info,
    }
    if any("labels" in p for p in parts):
        marker["labels"] = sorted({v for p in parts for v in p.get("labels", [])})
    data = json.dumps(marker, indent=1, default=str).encode()
    cache.put_bytes(storage.join(index_dir(corpus_dir), DONE), data)
    return marker


def _add(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            total[k] = total.get(k, 0) + v
    return dict(sorted(total.items()))


def write_index(
    corpus_dir: cache.Location, pairs: pa.Table, info: dict[str, Any] | None = None
) -> dict[str, Any]:
    """An in-memory pair table (a small corpus: synthetic, a limited or inline manifest, a
    test's) as the index: split by bucket, each file in the table's order."""
    started = time.perf_counter()
    pairs = with_first(with_buckets(pairs))
    if "negative_source" not in pairs.column_names:
        sources = pc.if_else(pc.is_null(pairs["negative"]), "none", "corpus")
        pairs = pairs.append_column("negative_source", sources)
    ordered = [c for c in PAIR_COLUMNS if c in pairs.column_names]
    pairs = pairs.select(ordered + [c for c in pairs.column_names if c not in ordered])
    column = pairs["bucket"].to_numpy()
    parts = [
        write_bucket(corpus_dir, int(b), pairs.filter(pa.array(column == b)))
        for b in np.unique(column)
    ]
    info = (info or {}) | {"seconds": round(time.perf_counter() - started, 2)}
    return write_marker(corpus_dir, parts, info)


def index_files(corpus_dir: cache.Location, wanted: Iterable[int] | None = None) -> list[str]:
    """The finished index's files (of the `wanted` buckets only, if given), checked against
    the marker's sizes."""
    marker = read_marker(corpus_dir)
    where = index_dir(corpus_dir)
    if marker is None:
        raise CacheError(f"no corpus index at {where!r}; run `raysys extract` first")
    names = sorted(marker["files"])
    if wanted is not None:
        keep = {bucket_file(int(b)) for b in wanted}
        names = [n for n in names if n in keep]
    listed = cache.list_files(where)
    for name in names:
        found = listed.get(name)
        if found is None or found.size != marker["files"][name]["bytes"]:
            raise CacheError(
                f"corpus index file {storage.join(where, name)!r} is missing or altered; "
                f"delete {where!r} and rerun `raysys extract`"
            )
    return [storage.join(where, n) for n in names]


def read_index(
    corpus_dir: cache.Location,
    columns: list[str] | None = None,
    split: str | None = None,
    wanted: Iterable[int] | None = None,
) -> pa.Table:
    """The index's pairs (some columns, one split, some buckets), bucket by bucket: a file
    is read, filtered and dropped before the next, so memory holds only what is kept.
    Optional columns (`labels`) a corpus lacks are left out rather than refused."""
    tables = []
    for path in index_files(corpus_dir, wanted):
        read = None
        if columns is not None:
            names = cache.footer(path).schema.to_arrow_schema().names
            missing = [c for c in columns if c not in names and c not in OPTIONAL_COLUMNS]
            if missing:
                raise CacheError(f"corpus index file {path!r} has no column(s) {missing}")
            read = [c for c in dict.fromkeys([*columns, "split"]) if c in names]
        table = cache.read_parquet(path, read)
        if split is not None:
            table = table.filter(pc.equal(table["split"], split))
        if columns is not None:
            table = table.select([c for c in columns if c in table.column_names])
        tables.append(table)
    if not tables:
        raise CacheError(f"the corpus index at {index_dir(corpus_dir)!r} holds no pairs")
    return pa.concat_tables(tables, promote_options="default")


def dataset(corpus_dir: cache.Location, columns: list[str]) -> ray.data.Dataset:
    """The index's files (some columns) as a Ray Dataset: read by Ray Data's tasks where
    they are, never pushed through the object store from the driver."""
    import ray.data  # lazy: this module is library code that starts no Ray

    fs, _ = storage.pyarrow_fs(corpus_dir)
    paths = [storage.pyarrow_fs(f)[1] for f in index_files(corpus_dir)]
    return ray.data.read_parquet(paths, filesystem=fs).select_columns(columns)


__all__ = ["BUCKETS", "dataset", "read_index", "write_index"]
