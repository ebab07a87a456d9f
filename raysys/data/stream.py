"""Streaming training data through Ray Data, for train splits a worker cannot hold in memory.

The caches are keyed differently (images by image id, captions by pair id), so streaming
first joins them once, with Ray Data's hash join, into a *pair view*: Parquet files of
(pair id, image layer, text layer, negative layer) for one split and one pair of layers,
kept beside the caches and reused by every run on the same layers (the three objectives of
`raysys run`, a sweep's trials). Training workers then read the view through
`ray.train.get_dataset_shard`, an equal share each, epoch after epoch.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import ray.data

from raysys.data import cache
from raysys.errors import CacheError

if TYPE_CHECKING:
    from raysys.data.source import PairSource

DONE = "_view.json"  # written last: a view without it is unfinished and rebuilt
COLUMNS = ("image", "text", "negative")


def view_dir(source: PairSource, split: str) -> Path:
    """Where a split's view lives, named by what it is built from: both caches' manifests
    and data files, so a re-extracted or edited cache never reuses a stale view."""
    sources = []
    for directory in (Path(source.image_dir), Path(source.text_dir)):
        files = [(Path(f).name, Path(f).stat().st_size) for f in cache.data_files(directory)]
        sources.append({"manifest": cache.read_manifest(directory), "files": files})
    key = cache.content_key(sources, source.image_layer, source.text_layer, split)
    return Path(source.corpus_dir) / "views" / f"{split}-{key}"


def read_view(directory: Path) -> dict[str, Any] | None:
    done = Path(directory) / DONE
    return json.loads(done.read_text()) if done.is_file() else None


def write_pair_view(source: PairSource, split: str, rows: int) -> Path:
    """Join the split's pairs with both caches into a pair view (once; then reused).

    `rows` is the split's usable pair count from `cache.pair_index`, which already checked
    that every pair is in both caches or among their rejects; the joined view must hold
    exactly that many rows.
    """
    out = view_dir(source, split)
    done = read_view(out)
    if done is not None and done["rows"] == rows:
        return out
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    index = cache.read_pairs(Path(source.corpus_dir))
    index = index.filter(pc.equal(index["split"], split)).select(["pair_id", "image_id"])
    image_files = cache.data_files(Path(source.image_dir))
    text_files = cache.data_files(Path(source.text_dir))
    pairs = ray.data.from_arrow(index)
    images = ray.data.read_parquet(image_files).select_columns(["id", source.image_layer])
    texts = ray.data.read_parquet(text_files).select_columns(
        ["id", source.text_layer, "neg_" + source.text_layer]
    )
    images = images.rename_columns({"id": "image_id", source.image_layer: "image"})
    texts = texts.rename_columns(
        {"id": "pair_id", source.text_layer: "text", "neg_" + source.text_layer: "negative"}
    )
    # Partitions bound each join task's memory; ~64 MB of embeddings per partition.
    image_dir, text_dir = Path(source.image_dir), Path(source.text_dir)
    width = 2 * (
        column_width(image_dir, source.image_layer) + 2 * column_width(text_dir, source.text_layer)
    )
    parts = max(2, math.ceil(rows * width / 64e6))
    view = pairs.join(texts, "inner", num_partitions=parts, on=("pair_id",))
    view = view.join(images, "inner", num_partitions=parts, on=("image_id",))
    view.select_columns(["pair_id", *COLUMNS]).write_parquet(str(out))
    written = sum(pq.ParquetFile(f).metadata.num_rows for f in cache.data_files(out))
    if written != rows:
        raise CacheError(
            f"the {split} pair view {str(out)!r} holds {written} rows, not the {rows} pairs "
            "both caches hold; delete it and rerun"
        )
    (out / DONE).write_text(json.dumps({"rows": rows, "split": split}))
    print(
        f"[train] pair view of {rows} {split} pairs ({parts} partitions) in "
        f"{time.perf_counter() - started:.0f}s -> {out}",
        flush=True,
    )
    return out


def column_width(directory: Path, column: str) -> int:
    """An embedding column's dimension, from a cache's Parquet schema."""
    files = cache.data_files(directory)
    if not files:
        raise CacheError(f"cache {str(directory)!r} holds no Parquet files")
    schema = pq.read_schema(files[0])
    if column not in schema.names:
        raise CacheError(f"layer {column!r} is not in cache {str(directory)!r}")
    return schema.field(column).type.list_size


def open_view(directory: Path) -> ray.data.Dataset:
    """The view as a Dataset whose file order is reshuffled every epoch."""
    return ray.data.read_parquet(cache.data_files(directory), shuffle="files")


def stream_reason(setting: str, rows: int, width: int, workers: int) -> str | None:
    """Why the train split streams (None: workers load their shards into memory).

    `auto` streams when a worker's shard would take more than a quarter of the memory Ray
    gives the smallest node per worker (float16 rows, counted as in memory).
    """
    if setting == "stream":
        return "train.data_on_device=stream"
    if setting != "auto":
        return None
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    memory = min(n["Resources"].get("memory", 0.0) for n in nodes) if nodes else 0.0
    per_node = math.ceil(workers / max(1, len(nodes)))
    shard = rows / workers * width * 2
    budget = memory / per_node / 4
    if memory and shard > budget:
        return f"a worker's shard ({shard / 2**30:.1f} GiB) exceeds {budget / 2**30:.1f} GiB"
    return None


def arrays(batch: Any) -> dict[str, np.ndarray]:
    """A pyarrow batch of the view as `[rows, dim]` float16 matrices, with NaN or inf rows
    reported by pair id (`cache.check_finite_rows`)."""
    out = {c: cache.to_numpy(batch.column(c)) for c in COLUMNS}
    pair_ids = np.asarray(batch.column("pair_id").to_pylist())
    cache.check_finite_rows(pair_ids, list(out.values()), "in the streamed pair view")
    return out
