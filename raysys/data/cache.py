"""The embedding cache: Parquet per (corpus, modality, backbone), named by content hashes.

Layout: `<cache>/<corpus-key>/pairs.parquet` (the corpus index: ids, captions, split) and
`<cache>/<corpus-key>/<modality>/<backbone-key>/` holding `part-*.parquet` files, each written
whole by one extraction actor (column `id` plus one fixed-size float16 list column per layer,
`L00`, `L01`, …; text adds `neg_L00`, …), `manifest.json` and, when rows were bad,
`rejects.parquet`. The manifest is written last, so a directory without one is an unfinished
extraction: never read as a cache, and resumed from its finished parts.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raysys.errors import CacheError

MANIFEST = "manifest.json"
PAIRS = "pairs.parquet"
REJECTS = "rejects.parquet"
CACHE_VERSION = 1  # bump when the on-disk format changes


def content_key(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts: same inputs, same cache directory."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def stage_dir(cache_dir: str | Path, corpus_key: str, modality: str, backbone_key: str) -> Path:
    return Path(cache_dir) / corpus_key / modality / backbone_key


def read_manifest(directory: Path) -> dict[str, Any] | None:
    path = directory / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, default=str))
    tmp.replace(directory / MANIFEST)  # atomic: readers see no manifest or a whole one


TMP_SUFFIX = ".tmp"  # a part being written; never read, removed when a pass restarts


def write_part(table: pa.Table, path: Path) -> None:
    """Write a Parquet part atomically: a killed writer leaves a `.tmp`, never half a part,
    so every `*.parquet` in a cache directory is whole (what resuming relies on)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}{TMP_SUFFIX}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def remove_temporary(directory: Path) -> int:
    """Delete the `.tmp` files killed writers left under `directory`; returns how many."""
    stale = list(Path(directory).rglob(f"*{TMP_SUFFIX}")) if Path(directory).is_dir() else []
    for path in stale:
        path.unlink()
    return len(stale)


def ids_in(files: list[str]) -> np.ndarray:
    """The ids of some Parquet parts (id column only), e.g. an unfinished cache's."""
    if not files:
        return np.array([], dtype=str)
    ids = pq.ParquetDataset(files).read(columns=["id"]).column("id")
    return ids.to_numpy(zero_copy_only=False).astype(str)


def data_files(directory: Path) -> list[str]:
    """The embedding parts (Ray Data names them; the rejects file lives beside them)."""
    return sorted(str(p) for p in Path(directory).glob("*.parquet") if p.name != REJECTS)


def float16_list_array(values: np.ndarray) -> pa.FixedSizeListArray:
    values = np.ascontiguousarray(values, dtype=np.float16)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def to_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed-size list column as a `[rows, dim]` array (float16, as stored)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    width = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)


def write_pairs(corpus_dir: Path, rows: pa.Table | list[dict[str, Any]]) -> Path:
    """The corpus index every later stage joins on (no image bytes)."""
    corpus_dir.mkdir(parents=True, exist_ok=True)
    path = corpus_dir / PAIRS
    if not path.is_file():
        cols = ("pair_id", "image_id", "caption", "negative", "negative_source", "split")
        if isinstance(rows, pa.Table):
            table = rows.select(list(cols))
        else:
            table = pa.table({c: [r.get(c) for r in rows] for c in cols})
        pq.write_table(table, corpus_dir / (PAIRS + ".tmp"))
        (corpus_dir / (PAIRS + ".tmp")).replace(path)
    return path


def read_pairs(corpus_dir: Path) -> pa.Table:
    path = Path(corpus_dir) / PAIRS
    if not path.is_file():
        raise CacheError(f"no corpus index at {str(path)!r}; run `raysys extract` first")
    return pq.read_table(path)


def _finished(directory: Path, columns: list[str]) -> list[str]:
    """The data files of a finished cache that holds `columns`, or a clear error."""
    manifest = read_manifest(directory)
    if manifest is None:
        raise CacheError(
            f"no finished embedding cache at {str(directory)!r}; run `raysys extract` first"
        )
    missing = [c for c in columns if c not in manifest["columns"]]
    if missing:
        raise CacheError(
            f"layer column(s) {missing} not in cache {str(directory)!r}; it holds "
            f"{', '.join(manifest['columns'])}"
        )
    files = data_files(directory)
    if not files:
        raise CacheError(f"cache {str(directory)!r} holds no rows (were they all rejected?)")
    return files


def read_ids(directory: Path, columns: list[str]) -> np.ndarray:
    """Every id in a cache (the id column only: cheap even for a huge cache), checked for
    duplicates; `columns` must exist in it."""
    files = _finished(directory, columns)
    ids = pq.ParquetDataset(files).read(columns=["id"]).column("id")
    ids = ids.to_numpy(zero_copy_only=False).astype(str)
    if len(np.unique(ids)) != len(ids):
        raise CacheError(f"cache {str(directory)!r} holds duplicate ids; delete it and rerun")
    return ids


def read_layers(directory: Path, columns: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Ids and the requested layer columns only: Parquet column projection means a sweep over
    one layer never reads the others."""
    ids = read_ids(directory, columns)
    table = pq.ParquetDataset(data_files(directory)).read(columns=columns)
    return ids, {c: to_numpy(table.column(c)) for c in columns}


def read_rows(
    directory: Path, columns: list[str], want: np.ndarray, batch_rows: int = 8192
) -> dict[str, np.ndarray]:
    """The requested layer columns for the ids in `want` (repeats allowed), in that order.

    Only the wanted rows are ever held: files are read a record batch at a time, two layer
    columns at most, so a training worker's memory is its shard, not the whole cache.
    """
    unique, inverse = np.unique(want, return_inverse=True)
    files = _finished(directory, columns)
    schema = pq.read_schema(files[0])
    out = {
        c: np.zeros((len(unique), schema.field(c).type.list_size), dtype=np.float16)
        for c in columns
    }
    found = np.zeros(len(unique), dtype=bool)
    for path in files:
        parquet = pq.ParquetFile(path)
        file_ids = parquet.read(columns=["id"]).column("id")
        slot = _positions(unique, file_ids.to_numpy(zero_copy_only=False).astype(str))
        if not (slot >= 0).any():
            continue
        offset = 0
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=columns):
            here = slot[offset : offset + batch.num_rows]
            offset += batch.num_rows
            hit = here >= 0
            if not hit.any():
                continue
            mask = pa.array(hit)
            for c in columns:
                out[c][here[hit]] = to_numpy(batch.column(c).filter(mask))
            found[here[hit]] = True
    if not found.all():
        raise CacheError(
            f"{int((~found).sum())} id(s) missing from cache {str(directory)!r}, e.g. "
            f"{unique[~found][:5].tolist()}"
        )
    return {c: values[inverse] for c, values in out.items()}


@dataclass
class Pairs:
    """One split's aligned arrays: row i of `image`, `text` and `negative` belong to pair i."""

    pair_ids: np.ndarray
    image_ids: np.ndarray
    captions: np.ndarray
    image: np.ndarray  # [N, d_image] float16, repeated when captions share an image
    text: np.ndarray  # [N, d_text]
    negative: np.ndarray  # [N, d_text] hard-negative captions' embeddings

    def __len__(self) -> int:
        return len(self.pair_ids)

    def image_index(self) -> tuple[np.ndarray, np.ndarray]:
        """Row of each unique image, and per caption the index of its image among those:
        retrieval ranks unique images, while several captions may share one."""
        _, first, inverse = np.unique(self.image_ids, return_index=True, return_inverse=True)
        return first, inverse


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

    def __len__(self) -> int:
        return len(self.pair_ids)


def pair_index(
    corpus_dir: Path,
    image_dir: Path,
    text_dir: Path,
    image_layer: str,
    text_layer: str,
    split: str | None,
) -> PairIndex:
    """Join the corpus index with both caches' ids for one split: missing layers, foreign
    caches and all-rejected splits fail here, having read only id columns."""
    index = read_pairs(corpus_dir)
    if split is not None:
        index = index.filter(pc.equal(index["split"], split))
    if index.num_rows == 0:
        raise CacheError(f"split {split!r} of {str(corpus_dir)!r} is empty")
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
                f"{str(directory)!r} nor among its rejects, e.g. {missing[:5].tolist()}; the "
                "cache does not belong to this corpus: delete it and rerun `raysys extract`"
            )
    keep = (image_pos >= 0) & (text_pos >= 0)
    if not keep.any():
        raise CacheError(f"every pair of split {split!r} was rejected during extraction")
    return PairIndex(
        pair_ids=want_text[keep],
        image_ids=want_image[keep],
        captions=index["caption"].to_numpy(zero_copy_only=False)[keep],
    )


def load_pairs(
    corpus_dir: Path,
    image_dir: Path,
    text_dir: Path,
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
    image_dir: Path,
    text_dir: Path,
    image_layer: str,
    text_layer: str,
    rows: PairIndex,
    select: np.ndarray | None = None,
) -> Pairs:
    """The embeddings of an already joined `pair_index` (or of its `select` positions), so a
    caller that needed the index first does not join the caches twice."""
    if select is not None:
        rows = PairIndex(rows.pair_ids[select], rows.image_ids[select], rows.captions[select])
    image = read_rows(image_dir, [image_layer], rows.image_ids)
    text = read_rows(text_dir, [text_layer, "neg_" + text_layer], rows.pair_ids)
    pairs = Pairs(
        pair_ids=rows.pair_ids,
        image_ids=rows.image_ids,
        captions=rows.captions,
        image=image[image_layer],
        text=text[text_layer],
        negative=text["neg_" + text_layer],
    )
    check_finite(pairs, f"{image_layer}/{text_layer}")
    return pairs


def check_finite(pairs: Pairs, what: str) -> None:
    """NaN or inf embeddings (e.g. a float16 overflow) would silently poison training."""
    check_finite_rows(
        pairs.pair_ids, [pairs.image, pairs.text, pairs.negative], f"in layers {what}"
    )


def check_finite_rows(pair_ids: np.ndarray, matrices: list[np.ndarray], where: str) -> None:
    """`check_finite` on bare row-aligned matrices (e.g. one streamed batch): bad rows are
    reported by pair id."""
    bad = np.zeros(len(pair_ids), dtype=bool)
    for matrix in matrices:
        bad |= ~np.isfinite(matrix).all(1)
    if bad.any():
        ids = np.asarray(pair_ids)[bad]
        raise CacheError(
            f"{int(bad.sum())} pair(s) have NaN or inf embeddings {where}, e.g. "
            f"{ids[:10].tolist()}; re-extract them or choose another layer"
        )


def rejected_ids(directory: Path) -> np.ndarray:
    path = Path(directory) / REJECTS
    if not path.is_file():
        return np.array([], dtype=str)
    return pq.read_table(path, columns=["id"])["id"].to_numpy(zero_copy_only=False).astype(str)


def _positions(have: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Index of each wanted id in `have`, or -1 where it is missing."""
    if len(have) == 0:
        return np.full(len(want), -1)
    order = np.argsort(have)
    slot = np.searchsorted(have, want, sorter=order).clip(max=len(have) - 1)
    pos = order[slot]
    return np.where(have[pos] == want, pos, -1)
