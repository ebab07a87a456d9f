"""Streaming training data, for train splits a worker cannot hold in memory.

The caches are keyed differently (images by image id, captions by pair id), so streaming
first joins them once, with Ray Data's hash join, into a *pair view*: Parquet files of
(pair id, image layer, text layer, negative layer) for one split and one pair of layers,
kept beside the caches (a path or an `s3://` URI, like them) and reused by every run on the
same layers (the three objectives of `raysys run`, a sweep's trials). The driver builds the
view before training; the Train workers of a `raysys train` run or a sweep's population then
read it with pyarrow (`raysys.data.view_shard`), an equal share each, epoch after epoch: Ray
Data's tasks wait forever inside a Tune trial, and pyarrow's order is fixed by (seed, epoch),
so a resumed run reads the very batches it would have.

A view is published by a marker written last that names its files. Two trials that build the
same view at once each write their own attempt directory; whichever marker lands last is the
view, and nothing is ever deleted under a reader.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import ray
import ray.data
from ray.data.expressions import col

from raysys import storage
from raysys.data import cache, index
from raysys.data.batches import SHUFFLE_WINDOW
from raysys.data.view_shard import COLUMNS, MOST_READERS
from raysys.errors import CacheError
from raysys.runtime import node_resources

if TYPE_CHECKING:
    from raysys.data.source import PairSource

DONE = "_view.json"  # written last: a view without it is unfinished and rebuilt
IDS = ("pair_id", "image_id")
# 2: rows carry their image id (the step's same-image mask). 3: layers written without a
# dictionary (`cache.dictionary_columns`), 4-5x faster to decode; an older view is rebuilt once.
VIEW_VERSION = 3


def view_dir(source: PairSource, split: str) -> str:
    """Where a split's view lives, named by what it is built from: both caches' manifests,
    which list every file with its checksum, so a re-extracted or repaired cache never reuses
    a stale view."""
    manifests = [cache.read_manifest(d) for d in (source.image_dir, source.text_dir)]
    key = cache.content_key(manifests, source.image_layer, source.text_layer, split, VIEW_VERSION)
    return storage.join(source.corpus_dir, "views", f"{split}-{key}")


def read_view(directory: str) -> dict[str, Any] | None:
    try:
        return json.loads(cache.get_bytes(storage.join(directory, DONE)))
    except FileNotFoundError:
        return None


def write_pair_view(source: PairSource, split: str, rows: int) -> str:
    """Join the split's pairs with both caches into a pair view (once; then reused).

    `rows` is the split's usable pair count from `cache.pair_index`, which already checked
    that every pair is in both caches or among their rejects (and that their files are
    whole); the joined view must hold exactly that many rows.
    """
    out = view_dir(source, split)
    done = read_view(out)
    if done is not None and done["rows"] == rows:
        return out
    started = time.perf_counter()
    # The split's pairs, read from the index's files by Ray Data's tasks.
    pairs = index.dataset(source.corpus_dir, ["pair_id", "image_id", "split"])
    pairs = pairs.filter(expr=col("split") == split).select_columns(["pair_id", "image_id"])
    images = _read(source.image_dir, ["id", source.image_layer])
    texts = _read(source.text_dir, ["id", source.text_layer, "neg_" + source.text_layer])
    images = images.rename_columns({"id": "image_id", source.image_layer: "image"})
    texts = texts.rename_columns(
        {"id": "pair_id", source.text_layer: "text", "neg_" + source.text_layer: "negative"}
    )
    parts = join_partitions(rows, pair_row(source)[1])
    view = pairs.join(texts, "inner", num_partitions=parts, on=("pair_id",))
    view = view.join(images, "inner", num_partitions=parts, on=("image_id",))
    attempt = uuid.uuid4().hex  # this build's own directory: a concurrent build has another
    fs, path = storage.pyarrow_fs(storage.join(out, attempt))
    view.select_columns([*IDS, *COLUMNS]).write_parquet(
        path,
        filesystem=fs,
        use_dictionary=list(IDS),  # `cache.dictionary_columns`' rule
    )
    files = [f"{attempt}/{name}" for name in sorted(cache.list_files(storage.join(out, attempt)))]
    written = sum(cache.footer(storage.join(out, f)).num_rows for f in files)
    if written != rows:
        raise CacheError(
            f"the {split} pair view {out!r} holds {written} rows, not the {rows} pairs "
            "both caches hold; delete it and rerun"
        )
    marker = {"rows": rows, "split": split, "files": files}
    cache.put_bytes(storage.join(out, DONE), json.dumps(marker).encode())
    print(
        f"[train] pair view of {rows} {split} pairs ({parts} partitions) in "
        f"{time.perf_counter() - started:.0f}s -> {out}",
        flush=True,
    )
    return out


def _read(directory: str, columns: list[str]) -> ray.data.Dataset:
    """A cache's parts (its manifest's, checked) as a Dataset of some columns."""
    files = cache.finished_parts(directory, columns[1:])
    fs, _ = storage.pyarrow_fs(directory)
    paths = [storage.pyarrow_fs(f)[1] for f in files]
    return ray.data.read_parquet(paths, filesystem=fs).select_columns(columns)


def column_shape(directory: str, column: str) -> tuple[int, int]:
    """An embedding column's width and bytes per value (float16 2, float32 4), from one read
    of a cache's Parquet schema."""
    files = cache.data_files(directory)
    if not files:
        raise CacheError(f"cache {directory!r} holds no Parquet files")
    schema = cache.footer(files[0]).schema.to_arrow_schema()
    if column not in schema.names:
        raise CacheError(f"layer {column!r} is not in cache {directory!r}")
    kind = schema.field(column).type
    return kind.list_size, kind.value_type.bit_width // 8


def pair_row(source: PairSource) -> tuple[list[int], int]:
    """The image and text layers' widths, and the bytes of one pair's row (image, text,
    negative), each cache at its own value type (a float32 text cache may sit beside a
    float16 image one)."""
    d_image, b_image = column_shape(source.image_dir, source.image_layer)
    d_text, b_text = column_shape(source.text_dir, source.text_layer)
    return [d_image, d_text], d_image * b_image + 2 * d_text * b_text


def view_files(directory: str) -> list[str]:
    """A published view's files, as its marker names them."""
    marker = read_view(directory)
    if marker is None:
        raise CacheError(f"no finished pair view at {directory!r}")
    return [storage.join(directory, f) for f in marker["files"]]


HOST_SHARE = 4  # a shard may take 1/HOST_SHARE of its worker's share of a node's Ray memory


def shard_bytes(rows: int, width: int, workers: int, bytes_per_value: float = 2) -> float:
    """Host memory one worker's shard takes: its share of `rows` rows of `width` values."""
    return rows / workers * width * bytes_per_value


def workers_on_node(node: Mapping[str, float], worker: Mapping[str, float], running: int) -> int:
    """How many of the `running` Train workers (every concurrent trial's, each reserving
    `worker`) one node can hold at once. Ray Train packs a run's workers onto as few nodes as
    it can and Tune packs trials, so a node may be as full as its resources allow."""
    fits = [math.floor(node.get(k, 0.0) / v + 1e-9) for k, v in worker.items() if v > 0]
    return max(0, min([running, *fits]))


def host_memory_reason(
    node_memory: float, workers: int, shard: float, what: str = "shard"
) -> str | None:
    """Why `workers` shards of `shard` bytes do not fit in a node's host memory (None: they
    do). Each worker's shard gets 1/HOST_SHARE of its share of the node's Ray memory: the
    loader, the standardisation and the batches hold copies beside it. `what` names the
    bytes in the reason (a streamed worker's windows are checked the same way)."""
    budget = node_memory / HOST_SHARE / workers
    if shard <= budget:
        return None
    return (
        f"a worker's {what} ({_gib(shard)} GiB) × {workers} worker(s) on a node "
        f"({_gib(shard * workers)} GiB) exceeds a quarter of the node's "
        f"{_gib(node_memory)} GiB of Ray memory"
    )


def nodes_reason(
    nodes: list[Mapping[str, float]],
    worker: Mapping[str, float],
    running: int,
    shard: float,
    what: str = "shard",
) -> str | None:
    """`host_memory_reason` on the tightest node that can hold a worker (a node without room
    for one, such as a CPU-less head, holds no shard); None when every such node has room, or
    none reports its memory."""
    tightest: tuple[float, float, int] | None = None
    for node in nodes:
        workers, memory = workers_on_node(node, worker, running), node.get("memory", 0.0)
        if workers and memory and (tightest is None or memory / workers < tightest[0]):
            tightest = (memory / workers, memory, workers)
    return host_memory_reason(tightest[1], tightest[2], shard, what) if tightest else None


PARTITION_BYTES = 64e6  # of embeddings per join partition: bounds each join task's memory


def join_partitions(rows: int, row_bytes: float) -> int:
    """How many partitions the view's joins use; each written block, so each of the view's
    row groups, holds about one partition's rows."""
    return max(2, math.ceil(rows * row_bytes / PARTITION_BYTES))


def windows_bytes(batch: int, rows: int, workers: int, row_bytes: float) -> float:
    """The most host memory one of `workers` streaming workers' windows hold
    (`ViewShard.batches`) for a view of `rows` rows: `MOST_READERS` being made, each twice
    while it is reordered (the row groups read whole, then the reordered copy), and the one
    being trained on. A window is `SHUFFLE_WINDOW` batches of `batch` rows in whole row-group
    slices, so up to one row group more; and windows in flight never hold more than the
    worker's share of rows twice, plus a row group each."""
    group = rows * row_bytes / join_partitions(rows, row_bytes)
    window = SHUFFLE_WINDOW * batch * row_bytes + group
    share = rows // workers * row_bytes
    return min((2 * MOST_READERS + 1) * window, 2 * share + (MOST_READERS + 1) * group)


def stream_reason(
    setting: str,
    rows: int,
    width: int,
    workers: int,
    worker: Mapping[str, float] | None = None,
    running: int | None = None,
    bytes_per_value: float = 2,
) -> str | None:
    """Why the train split streams (None: workers load their shards into memory).

    `auto` streams when the shards of all Train workers that can run on one node at once
    would take more than a quarter of its Ray memory: `worker` is what each reserves, and
    `running` how many run in the cluster at once (a sweep's concurrent trials times their
    workers; default `workers`, one run). `bytes_per_value` is the cache's (float16: 2;
    a row mixing float16 and float32 columns passes its average).
    """
    if setting == "stream":
        return "train.data_on_device=stream"
    if setting != "auto":
        return None
    shard = shard_bytes(rows, width, workers, bytes_per_value)
    return nodes_reason(node_resources(), worker or {}, running or workers, shard)


def windows_reason(
    batch: int,
    rows: int,
    row_bytes: float,
    workers: int,
    worker: Mapping[str, float] | None = None,
    running: int | None = None,
) -> str | None:
    """Why a streaming worker's windows (`windows_bytes` of its `batch` rows, `rows` of
    `workers`' split) do not fit beside the others on a node, as `stream_reason` sizes
    shards (None: they fit)."""
    windows = windows_bytes(batch, rows, workers, row_bytes)
    short = nodes_reason(
        node_resources(), worker or {}, running or workers, windows, "stream windows"
    )
    if short is None:
        return None
    return (
        f"{short}: each streamed worker holds up to {2 * MOST_READERS + 1} windows of "
        f"{SHUFFLE_WINDOW} batches of {batch} rows"
    )


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f}"
