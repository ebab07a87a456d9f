"""The embedding cache: Parquet per (corpus, modality, backbone), named by content hashes, on
a local path or an `s3://` URI alike.

Layout: `<cache>/<corpus-key>/pairs.parquet` (the corpus index: ids, captions, split) and
`<cache>/<corpus-key>/<modality>/<backbone-key>/` holding `part-*.parquet` files, each written
whole by one extraction actor (column `id` plus one fixed-size list column per layer, `L00`,
`L01`, …; text adds `neg_L00`, …), `manifest.json` and, when rows were bad,
`rejects.parquet`. The manifest is written last (one PUT on S3, a rename on disk), so a
directory without one is an unfinished extraction: never read as a cache, and resumed from its
finished parts.

Parts are laid out by bucket (`raysys.data.pairs.buckets`: a hash of the pair's image id,
BUCKETS of them): an int16 `bucket` column, rows sorted by it, one Parquet row group per
bucket present, with min/max statistics on `bucket` only. Training shard s of S holds the
buckets b with b % S == s, so a train worker picks its row groups from each part's footer and
reads only their column chunks (`read_rows(..., buckets=...)`): about 1/N of the layer
columns for N workers, ids included. Image rows are bucketed by their own id; text rows (pair
ids) by the bucket the corpus index gives them. A part without a `bucket` column (a text pass
given no buckets, a hand-built cache) is one unsorted row group and is read whole.

Layers are stored in the stage's `extract.cache_dtype` (the manifest's `dtype`, part of the
backbone key): float16 by default, half the bytes; float32 for the text layers of decoder-only
LMs, whose outlier dimensions reach 1e3–1e4 (a float16 step of 4–8) and can pass float16's
65,504. Readers return each column in its stored dtype, so a float16 image layer and a float32
text layer load side by side.

A cache proves itself: the manifest lists every file with its size, row count and SHA-256 (and
its S3 ETag), and every reader checks the listing against it before it opens a part (one LIST
per directory), then reads with Parquet page checksums on. A missing, truncated or altered part
is a `CacheError` that names it and the command that repairs it, never a pyarrow traceback.

Layer columns are written without Parquet's dictionary encoding (`dictionary_columns`), which
Parquet applies to every column by default: a float16 layer has at most 65,536 distinct values,
so its dictionary never fills (the point where Parquet would fall back to plain values) and
every value was decoded through it, 4-5x slower for files no smaller. Parts written before
read the same, only slower.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raysys import storage
from raysys.data.pairs import Pairs
from raysys.data.pairs import buckets as bucket_of
from raysys.errors import CacheError

MANIFEST = "manifest.json"
# Corpus-index columns only some corpora have: the zero-shot labels (JSON {task: class}).
OPTIONAL_PAIR_COLUMNS = ("labels",)
REJECTS = "rejects.parquet"
# Bump when the on-disk format changes (2: manifests list checked files; 3: parts by bucket).
CACHE_VERSION = 3
BUCKET = "bucket"  # a part's int16 bucket column: the row-group layout training reads by
TMP_SUFFIX = ".tmp"  # a local part being written; never read, removed when a pass restarts
# What every damage message ends with: the next extraction finds the damage and re-embeds.
REPAIR = (
    "rerun `raysys extract` (or this command) with the same config: it re-embeds the rows of "
    "damaged parts"
)

Location = str | os.PathLike[str]


def content_key(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts: same inputs, same cache directory."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def stage_dir(cache_dir: Location, corpus_key: str, modality: str, backbone_key: str) -> str:
    return storage.join(cache_dir, corpus_key, modality, backbone_key)


def location(where: Location) -> str:
    """A cache location as the one string every process understands: an absolute local path
    or an `s3://` URI (Ray workers run in their own working directories)."""
    text = os.fspath(where)
    return text if storage.is_remote(text) else os.path.abspath(os.path.expanduser(text))


# --- files on a path or a URI --------------------------------------------------------------


@dataclass
class Listed:
    """What one LIST says about a file: enough to tell a truncated or replaced part."""

    size: int
    mtime: float  # seconds since the epoch
    etag: str  # S3's content fingerprint; empty on local disk


def list_files(directory: Location) -> dict[str, Listed]:
    """The files directly under `directory` by name (none when it does not exist)."""
    fs, path = storage.fsspec_fs(directory)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return {}
    listed = {}
    for e in entries:
        if e.get("type") != "file":
            continue
        name = e["name"].rstrip("/").rsplit("/", 1)[-1]
        modified = e.get("mtime") or e.get("LastModified")
        mtime = modified.timestamp() if hasattr(modified, "timestamp") else float(modified or 0)
        listed[name] = Listed(int(e["size"]), mtime, str(e.get("ETag", "")).strip('"'))
    return listed


def put_bytes(uri: Location, data: bytes) -> None:
    """Write a whole file at once: a rename on disk, one PUT on S3, so no reader ever sees
    half of it."""
    fs, path = storage.fsspec_fs(uri)
    if storage.is_remote(uri):
        fs.pipe_file(path, data)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{os.path.dirname(path)}/.{os.path.basename(path)}.{uuid.uuid4().hex}{TMP_SUFFIX}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def get_bytes(uri: Location) -> bytes:
    fs, path = storage.fsspec_fs(uri)
    return fs.cat_file(path)


def read_manifest(directory: Location) -> dict[str, Any] | None:
    try:
        return json.loads(get_bytes(storage.join(directory, MANIFEST)))
    except FileNotFoundError:
        return None


def write_manifest(directory: Location, manifest: dict[str, Any]) -> None:
    """Written last and whole: readers see no manifest or a complete one."""
    data = json.dumps(manifest, indent=2, default=str).encode()
    put_bytes(storage.join(directory, MANIFEST), data)


@dataclass
class Written:
    """A part as its writer saw it: what the manifest records."""

    name: str
    rows: int
    bytes: int
    sha256: str


def write_part(table: pa.Table, uri: Location) -> Written:
    """Serialise a Parquet part in memory (with page checksums, so readers can verify it)
    and write it whole: a killed writer leaves nothing, or a `.tmp` on disk, never half a
    part, so every `*.parquet` in a cache directory is whole (what resuming relies on)."""
    sink = io.BytesIO()
    pq.write_table(
        table,
        sink,
        write_page_checksum=True,
        use_dictionary=dictionary_columns(table.schema),
    )
    return _put_part(sink.getvalue(), table.num_rows, uri)


def write_bucketed(table: pa.Table, uri: Location) -> Written:
    """`write_part` laid out by the table's `bucket` column: rows sorted by bucket (stably),
    one row group per bucket, statistics on `bucket` only (a small footer, which every train
    worker reads), so a reader selects a worker's buckets from the footer alone."""
    table = table.sort_by(BUCKET)
    values = table[BUCKET].to_numpy()
    bounds = [0, *(np.flatnonzero(np.diff(values)) + 1).tolist(), len(values)]
    sink = io.BytesIO()
    with pq.ParquetWriter(
        sink,
        table.schema,
        write_page_checksum=True,
        write_statistics=[BUCKET],
        use_dictionary=dictionary_columns(table.schema),
    ) as writer:
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            if hi > lo:
                writer.write_table(table.slice(lo, hi - lo), row_group_size=hi - lo)
    return _put_part(sink.getvalue(), table.num_rows, uri)


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """The columns a writer should dictionary-encode: every one but the layers (fixed-size
    lists). Measured on one core at 1024/4096-d float16 (18 KiB a row, pages checksummed):
    86 MiB/s read and decoded with a dictionary, 389 MiB/s without; 271 and 288 MiB of file."""
    return [f.name for f in schema if not pa.types.is_fixed_size_list(f.type)]


def _put_part(data: bytes, rows: int, uri: Location) -> Written:
    put_bytes(uri, data)
    name = os.fspath(uri).rstrip("/").rsplit("/", 1)[-1]
    return Written(name, rows, len(data), hashlib.sha256(data).hexdigest())


def remove_temporary(directory: Location) -> int:
    """Delete the `.tmp` files killed local writers left under `directory` (S3 has none: a PUT
    is whole or absent); returns how many."""
    if storage.is_remote(directory) or not Path(directory).is_dir():
        return 0
    stale = list(Path(directory).rglob(f"*{TMP_SUFFIX}"))
    for path in stale:
        path.unlink()
    return len(stale)


def parquet_file(uri: Location, metadata: pq.FileMetaData | None = None) -> pq.ParquetFile:
    """A Parquet file opened for reading, its page checksums verified as pages are read
    (with `metadata`, its footer as read before, which is not read again)."""
    fs, path = storage.pyarrow_fs(uri)
    source = fs.open_input_file(path)
    return pq.ParquetFile(source, metadata=metadata, page_checksum_verification=True)


@contextlib.contextmanager
def opened(uri: Location, metadata: pq.FileMetaData | None = None) -> Iterator[pq.ParquetFile]:
    """`parquet_file`, closed on leaving: the file it was handed, open, is released then, not
    whenever the garbage collector finds the reader (a worker opens hundreds of parts)."""
    reader = parquet_file(uri, metadata)
    try:
        yield reader
    finally:
        reader.close(force=True)


def footer(uri: Location) -> pq.FileMetaData:
    """A Parquet file's footer (row groups, statistics, `.schema.to_arrow_schema()`), the
    file closed after."""
    with opened(uri) as reader:
        return reader.metadata


def read_row_group(uri: Location, index: int, metadata: pq.FileMetaData) -> pa.Table:
    """Row group `index` of a Parquet file whose footer was read before (`metadata`), through
    a reader of its own: a `ParquetFile` is not safe to share between threads (its read
    cache failed, "ReadRangeCache did not find matching cache entry", when two streams read
    one at once)."""
    with opened(uri, metadata) as reader:
        return reader.read_row_group(index)


def read_parquet(uri: Location, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file (or a list of them, all on one filesystem) as a table; a damaged
    file is a CacheError naming it."""
    try:
        with opened(uri) as reader:
            return reader.read(columns=columns)
    except FileNotFoundError:
        raise
    except (OSError, pa.ArrowException) as e:
        raise CacheError(f"cannot read {os.fspath(uri)!r}: {e}; {REPAIR}") from e


def id_column(files: list[str]) -> pa.Array:
    """The ids of some Parquet parts (id column only) as one Arrow array: what bookkeeping
    over every id (resume, exactly-once) compares, without a Python object per id."""
    arrays = [read_parquet(f, ["id"])["id"] for f in files]
    return pa.chunked_array(arrays, pa.string()).combine_chunks()


def ids_in(files: list[str]) -> np.ndarray:
    """The ids of some Parquet parts (id column only), e.g. an unfinished cache's."""
    return id_column(files).to_numpy(zero_copy_only=False).astype(str)


def data_files(directory: Location) -> list[str]:
    """The embedding parts of a cache directory: the manifest's own list when it is finished
    (strays a concurrent or broken writer left are never read), else whatever is there."""
    manifest = read_manifest(directory)
    if manifest is not None and "files" in manifest:
        names = [n for n in manifest["files"] if n != REJECTS]
    else:
        names = [n for n in list_files(directory) if n.endswith(".parquet") and n != REJECTS]
    return [storage.join(directory, n) for n in sorted(names)]


def record(written: Written, listed: Listed | None) -> dict[str, Any]:
    """A file's manifest entry: the writer's size, rows and SHA-256, and S3's ETag."""
    entry = {"rows": written.rows, "bytes": written.bytes, "sha256": written.sha256}
    if listed is not None and listed.etag:
        entry["etag"] = listed.etag
    return entry


@dataclass
class Damage:
    name: str
    problem: str

    def __str__(self) -> str:
        return f"{self.name} ({self.problem})"


def check_files(directory: Location, manifest: dict[str, Any]) -> list[Damage]:
    """Every file the manifest lists, checked against one listing: present, the recorded
    size, the recorded ETag (S3) or, for a local file changed after the manifest was written,
    the recorded SHA-256. Cheap: nothing is read unless it looks changed."""
    listed = list_files(directory)
    written_at = listed[MANIFEST].mtime if MANIFEST in listed else float("inf")
    damaged = []
    for name, entry in sorted(manifest.get("files", {}).items()):
        got = listed.get(name)
        if got is None:
            damaged.append(Damage(name, "missing"))
        elif got.size != entry["bytes"]:
            damaged.append(Damage(name, f"{got.size} bytes, the manifest says {entry['bytes']}"))
        elif got.etag and entry.get("etag") and got.etag != entry["etag"]:
            damaged.append(Damage(name, "altered: its ETag is not the one recorded"))
        elif not got.etag and got.mtime > written_at:
            digest = hashlib.sha256(get_bytes(storage.join(directory, name))).hexdigest()
            if digest != entry["sha256"]:
                damaged.append(Damage(name, "altered: its SHA-256 is not the one recorded"))
    return damaged


def damage_error(directory: Location, damaged: list[Damage]) -> CacheError:
    return CacheError(
        f"cache {os.fspath(directory)!r} is damaged: {len(damaged)} file(s) "
        f"{', '.join(map(str, damaged))}; {REPAIR}"
    )


def write_pairs(corpus_dir: Location, rows: pa.Table | list[dict[str, Any]]) -> str:
    """A small corpus index (an in-memory table or rows) written as the bucketed index
    (`raysys.data.index`), unless a finished one is there; returns its directory."""
    from raysys.data import index  # the index layout builds on this module's files

    if index.read_marker(corpus_dir) is None:
        table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows)
        index.write_index(corpus_dir, table)
    return index.index_dir(corpus_dir)


def read_pairs(
    corpus_dir: Location, columns: list[str] | None = None, split: str | None = None
) -> pa.Table:
    """The corpus index (some columns, one split), read bucket file by bucket file."""
    from raysys.data import index

    return index.read_index(corpus_dir, columns, split)


def list_array(values: np.ndarray, dtype: str = "float16") -> pa.FixedSizeListArray:
    """`[rows, dim]` values as a fixed-size list column of `dtype` (a cached layer). Values
    past `dtype`'s range become inf: extraction checks them first (`embed.embed_batch`)."""
    values = np.ascontiguousarray(values, dtype=dtype)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def to_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed-size list column as a `[rows, dim]` array, in its stored dtype (float16 or
    float32): consumers cast where they compute, so a cache is never copied wider in memory."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    width = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)


def finished_parts(directory: Location, columns: list[str]) -> list[str]:
    """The data files of a finished, undamaged cache that holds `columns`, or a clear error."""
    manifest = read_manifest(directory)
    where = os.fspath(directory)
    if manifest is None:
        raise CacheError(f"no finished embedding cache at {where!r}; run `raysys extract` first")
    missing = [c for c in columns if c not in manifest["columns"]]
    if missing:
        raise CacheError(
            f"layer column(s) {missing} not in cache {where!r}; it holds "
            f"{', '.join(manifest['columns'])}"
        )
    damaged = check_files(directory, manifest)
    if damaged:
        raise damage_error(directory, damaged)
    files = data_files(directory)
    if not files:
        raise CacheError(f"cache {where!r} holds no rows (were they all rejected?)")
    return files


def read_ids(directory: Location, columns: list[str]) -> np.ndarray:
    """Every id in a cache (the id column only: cheap even for a huge cache), checked for
    duplicates; `columns` must exist in it."""
    ids = ids_in(finished_parts(directory, columns))
    if len(np.unique(ids)) != len(ids):
        raise CacheError(f"cache {os.fspath(directory)!r} holds duplicate ids; delete it and rerun")
    return ids


def read_layers(
    directory: Location, columns: list[str]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Ids and the requested layer columns only: Parquet column projection means a sweep over
    one layer never reads the others."""
    ids = read_ids(directory, columns)
    table = pa.concat_tables(read_parquet(f, columns) for f in data_files(directory))
    return ids, {c: to_numpy(table.column(c)) for c in columns}


def read_rows(
    directory: Location,
    columns: list[str],
    want: np.ndarray,
    batch_rows: int = 8192,
    buckets: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The requested layer columns for the ids in `want` (repeats allowed), in that order.

    Only the wanted rows are ever held: files are read a record batch at a time, two layer
    columns at most, so a training worker's memory is its shard, not the whole cache. Files
    are read where they are (local or S3), their page checksums verified. With `buckets`
    (every bucket the wanted rows lie in), only the row groups whose bucket statistics meet
    them are read, ids and layers alike: a train worker reads its shards' rows, not the cache.
    """
    unique, inverse = np.unique(want, return_inverse=True)
    files = finished_parts(directory, columns)
    out: dict[str, np.ndarray] = {}
    found = np.zeros(len(unique), dtype=bool)
    wanted = None if buckets is None else np.unique(np.asarray(buckets, dtype=np.int64))
    for path in files:
        try:
            with opened(path) as parquet:
                groups = bucket_groups(parquet, wanted)
                _read_wanted(parquet, columns, unique, out, found, batch_rows, groups)
        except (OSError, pa.ArrowException) as e:
            raise CacheError(f"cannot read cache part {path!r}: {e}; {REPAIR}") from e
    if not found.all():
        raise CacheError(
            f"{int((~found).sum())} id(s) missing from cache {os.fspath(directory)!r}, e.g. "
            f"{unique[~found][:5].tolist()}"
        )
    return {c: values[inverse] for c, values in out.items()}


def _read_wanted(
    parquet: pq.ParquetFile,
    columns: list[str],
    unique: np.ndarray,
    out: dict[str, np.ndarray],
    found: np.ndarray,
    batch_rows: int,
    groups: list[int],
) -> None:
    """Copy the rows of one part's row `groups` whose ids are in `unique` into `out`
    (allocated on first use)."""
    for c in columns:
        if c not in out:  # each column in its stored dtype: float16 and float32 layers mix
            kind = parquet.schema_arrow.field(c).type
            dtype = kind.value_type.to_pandas_dtype()
            out[c] = np.zeros((len(unique), kind.list_size), dtype=dtype)
    if not groups:
        return
    file_ids = parquet.read_row_groups(groups, columns=["id"]).column("id")
    slot = _positions(unique, file_ids.to_numpy().astype(str))
    if not (slot >= 0).any():
        return
    offset = 0
    for batch in parquet.iter_batches(batch_size=batch_rows, row_groups=groups, columns=columns):
        here = slot[offset : offset + batch.num_rows]
        offset += batch.num_rows
        hit = here >= 0
        if not hit.any():
            continue
        mask = pa.array(hit)
        for c in columns:
            out[c][here[hit]] = to_numpy(batch.column(c).filter(mask))
        found[here[hit]] = True


def bucket_groups(parquet: pq.ParquetFile, wanted: np.ndarray | None) -> list[int]:
    """The row groups of a part that may hold rows of the `wanted` buckets (sorted), by their
    `bucket` statistics; all of them without `wanted`, a `bucket` column or statistics."""
    meta = parquet.metadata
    everything = list(range(meta.num_row_groups))
    paths = [meta.schema.column(i).path for i in range(meta.num_columns)]
    if wanted is None or BUCKET not in paths:
        return everything
    column = paths.index(BUCKET)
    groups = []
    for g in everything:
        stats = meta.row_group(g).column(column).statistics
        if stats is None or not stats.has_min_max:
            groups.append(g)
            continue
        first = np.searchsorted(wanted, stats.min)
        if first < len(wanted) and wanted[first] <= stats.max:
            groups.append(g)
    return groups


def resolve_layer(manifest: dict[str, Any], layer: int) -> str:
    """A layer index (negative counts from the top, as in Python) to its column name."""
    layers = manifest["layers"]
    if not -len(layers) <= layer < len(layers):
        raise CacheError(
            f"layer {layer} out of range for {manifest['backbone']} "
            f"({len(layers)} layers: 0..{len(layers) - 1}, or -1 for the last)"
        )
    return layers[layer]


@dataclass
class PairIndex:
    """A split's pairs that both caches hold (ids and captions, no embeddings): what the
    driver checks and what training shards before any worker reads an embedding."""

    pair_ids: np.ndarray
    image_ids: np.ndarray
    captions: np.ndarray
    negative_sources: np.ndarray | None = None
    labels: np.ndarray | None = None
    # Each pair's bucket (`pairs.buckets` of its image id): the training shards, and the row
    # groups of the caches a selection of pairs lies in.
    buckets: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.pair_ids)

    def take(self, rows: np.ndarray) -> PairIndex:
        values = (getattr(self, f.name) for f in dataclasses.fields(self))
        return PairIndex(*(None if v is None else v[rows] for v in values))


def _strings(table: pa.Table, column: str) -> np.ndarray | None:
    """An optional string column of the corpus index as a numpy array, nulls as ""."""
    if column not in table.column_names:
        return None
    return pc.fill_null(table[column], "").to_numpy(zero_copy_only=False).astype(str)


def pair_index(
    corpus_dir: Location,
    image_dir: Location,
    text_dir: Location,
    image_layer: str,
    text_layer: str,
    split: str | None,
) -> PairIndex:
    """Join the corpus index with both caches' ids for one split: missing layers, foreign
    caches and all-rejected splits fail here, having read only id columns."""
    # Only the split's rows and the columns the join and the scores need, file by file.
    columns = ["pair_id", "image_id", "caption", "negative_source", "labels", BUCKET]
    index = read_pairs(corpus_dir, columns, split)
    if index.num_rows == 0:
        raise CacheError(f"split {split!r} of {os.fspath(corpus_dir)!r} is empty")
    image_ids = read_ids(image_dir, [image_layer])
    text_ids = read_ids(text_dir, [text_layer, "neg_" + text_layer])
    want_image = index["image_id"].to_numpy(zero_copy_only=False).astype(str)
    want_text = index["pair_id"].to_numpy(zero_copy_only=False).astype(str)
    image_pos, text_pos = _positions(image_ids, want_image), _positions(text_ids, want_text)
    # A row may be absent from a cache only because extraction rejected it (and said so).
    for name, directory, pos, want in (
        ("image", image_dir, image_pos, want_image),
        ("text", text_dir, text_pos, want_text),
    ):
        missing = np.setdiff1d(want[pos < 0], rejected_ids(directory))
        if len(missing):
            raise CacheError(
                f"{len(missing)} {name} id(s) of split {split!r} are neither in the cache "
                f"{os.fspath(directory)!r} nor among its rejects, e.g. {missing[:5].tolist()}; the "
                "cache does not belong to this corpus: delete it and rerun `raysys extract`"
            )
    keep = (image_pos >= 0) & (text_pos >= 0)
    if not keep.any():
        raise CacheError(f"every pair of split {split!r} was rejected during extraction")
    sources, labels = _strings(index, "negative_source"), _strings(index, "labels")
    if BUCKET in index.column_names:  # the corpus index's own (no hashing per pair here)
        bucket = index[BUCKET].to_numpy(zero_copy_only=False).astype(np.int16)[keep]
    else:
        bucket = bucket_of(want_image[keep])
    return PairIndex(
        pair_ids=want_text[keep],
        image_ids=want_image[keep],
        captions=index["caption"].to_numpy(zero_copy_only=False)[keep],
        negative_sources=None if sources is None else sources[keep],
        labels=None if labels is None else labels[keep],
        buckets=bucket,
    )


def count_pairs(corpus_dir: Location, image_dir: Location, text_dir: Location, split: str) -> int:
    """How many pairs of a split `pair_index` would keep: the split's pairs less those whose
    image or text extraction rejected. The driver's count (split sizes, the streaming
    decision) without holding the split: the index is read a bucket file at a time, two id
    columns, and only the rejects (few) are held whole. It trusts the caches to belong to
    the corpus; `pair_index` (the val and test loads, every worker) checks that."""
    from raysys.data import index  # the index layout builds on this module's files

    images, texts = (pa.array(rejected_ids(d), pa.string()) for d in (image_dir, text_dir))
    kept = 0
    for path in index.index_files(corpus_dir):
        table = read_parquet(path, ["pair_id", "image_id", "split"])
        table = table.filter(pc.equal(table["split"], split))
        gone = pc.or_(pc.is_in(table["image_id"], images), pc.is_in(table["pair_id"], texts))
        kept += table.num_rows - int(pc.sum(gone).as_py() or 0)
    return kept


def load_pairs(
    corpus_dir: Location,
    image_dir: Location,
    text_dir: Location,
    image_layer: str,
    text_layer: str,
    split: str | None,
    select: np.ndarray | None = None,
) -> Pairs:
    """One split's embeddings of the two layers; with `select` (positions in the split's
    `pair_index`), only those pairs' rows are read."""
    rows = pair_index(corpus_dir, image_dir, text_dir, image_layer, text_layer, split)
    return load_index_rows(image_dir, text_dir, image_layer, text_layer, rows, select)


def load_index_rows(
    image_dir: Location,
    text_dir: Location,
    image_layer: str,
    text_layer: str,
    rows: PairIndex,
    select: np.ndarray | None = None,
) -> Pairs:
    """The embeddings of an already joined `pair_index` (or of its `select` positions), so a
    caller that needed the index first does not join the caches twice. Only the cache row
    groups of the selected pairs' buckets are read (a train worker's shards)."""
    if select is not None:
        rows = rows.take(select)
    wanted = None if rows.buckets is None else np.unique(rows.buckets)
    image = read_rows(image_dir, [image_layer], rows.image_ids, buckets=wanted)
    text = read_rows(text_dir, [text_layer, "neg_" + text_layer], rows.pair_ids, buckets=wanted)
    pairs = Pairs(
        pair_ids=rows.pair_ids,
        image_ids=rows.image_ids,
        captions=rows.captions,
        image=image[image_layer],
        text=text[text_layer],
        negative=text["neg_" + text_layer],
        negative_sources=rows.negative_sources,
        labels=rows.labels,
    )
    check_finite(pairs, f"{image_layer}/{text_layer}")
    return pairs


def check_finite(pairs: Pairs, what: str) -> None:
    """NaN or inf embeddings (a model's own, or an old float16 cache's overflow) would
    silently poison training."""
    check_finite_rows(
        pairs.pair_ids, [pairs.image, pairs.text, pairs.negative], f"in layers {what}"
    )


def nonfinite_rows(matrix: np.ndarray) -> np.ndarray:
    """Which rows hold a NaN or inf. Float16 is checked on its bits (exponent all ones):
    numpy emulates float16 arithmetic, and its `isfinite` took twice as long (a streamed
    batch's check cost as much as reading the batch); float32 is faster as it is. A row's
    largest masked exponent is compared, not every value: one temporary, not two (3.2 -> 2.4
    µs for a 4096-d row)."""
    if matrix.dtype == np.float16:
        exponent = np.uint16(0x7C00)
        return (matrix.view(np.uint16) & exponent).max(1, initial=0) == exponent
    return ~np.isfinite(matrix).all(1)


def check_finite_rows(pair_ids: Any, matrices: list[np.ndarray], where: str) -> None:
    """`check_finite` on bare row-aligned matrices (e.g. one streamed batch): bad rows are
    reported by pair id (`pair_ids`: an array, or an Arrow column read only if a row is
    bad)."""
    bad = np.zeros(len(pair_ids), dtype=bool)
    for matrix in matrices:
        bad |= nonfinite_rows(matrix)
    if bad.any():
        ids = np.asarray(pair_ids)[bad]
        raise CacheError(
            f"{int(bad.sum())} pair(s) have NaN or inf embeddings {where}, e.g. "
            f"{ids[:10].tolist()}; re-extract them or choose another layer"
        )


def rejected_ids(directory: Location) -> np.ndarray:
    try:
        table = read_parquet(storage.join(directory, REJECTS), ["id"])
    except FileNotFoundError:
        return np.array([], dtype=str)
    return table["id"].to_numpy().astype(str)


def _positions(have: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Index of each wanted id in `have`, or -1 where it is missing."""
    if len(have) == 0:
        return np.full(len(want), -1)
    order = np.argsort(have)
    slot = np.searchsorted(have, want, sorter=order).clip(max=len(have) - 1)
    pos = order[slot]
    return np.where(have[pos] == want, pos, -1)
