"""What every corpus hands the extract stage: a small in-memory pair index plus its images.

Captions are small (COCO's 600k fit in tens of MB) and every later stage joins on them, so the
pair index lives in memory as one Arrow table. Images are not: a corpus gives them either as a
table of `id -> image bytes or URI` (synthetic, manifests: URIs are read lazily in Ray Data's
CPU tasks) or as a function that opens a Ray Dataset over them (webdataset shards), so a
large corpus streams through extraction and is never held whole by the driver.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from raysys import storage
from raysys.data.cache import OPTIONAL_PAIR_COLUMNS  # `labels`: JSON {task: class} per pair
from raysys.errors import CorpusError

if TYPE_CHECKING:
    import ray.data

PAIR_COLUMNS = ("pair_id", "image_id", "caption", "negative", "negative_source", "split")
# CorpusConfig fields that shape the pairs of any read corpus, and so its key.
KEY_FIELDS = (
    "caption_key",
    "negative_key",
    "split_key",
    "limit",
    "seed",
    "val_fraction",
    "test_fraction",
)
SPLITS = ("train", "val", "test")
# Split names other corpora use for ours; Karpathy's COCO split calls extra train images restval.
SPLIT_ALIASES = {"validation": "val", "valid": "val", "dev": "val", "restval": "train"}


@dataclass
class Corpus:
    """One corpus, ready to extract.

    `key` is a content fingerprint of the source and the config that shaped it; it names the
    cache directory, so a changed corpus never reuses a stale cache. `pairs` is the pair
    index in memory (a small corpus), or None when it lives only in the cache's bucketed
    index at `index` (a large one: `raysys.data.index`, read by the stages that need it).
    `images` maps image id to `image` (bytes) or `uri` (str, read by the image pass);
    `read_images` instead opens a Ray Dataset of `id, image` rows (tar shards); a corpus with
    neither reads its image paths from the index's `image` column. `zeroshot` holds the
    corpus's zero-shot tasks, task -> class -> prompt texts, whose classes the pairs'
    `labels` name; empty for a corpus without tasks.
    """

    key: str
    pairs: pa.Table | None
    images: pa.Table | None = None
    read_images: Callable[[], ray.data.Dataset] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    zeroshot: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    index: str = ""  # the corpus directory on the cache whose `index/` holds the pairs
    labels: list[str] | None = None  # an index-only corpus's distinct `labels` values

    def label_values(self) -> pa.Table:
        """The distinct `labels` values (JSON) as a one-column table (none: no column)."""
        if self.pairs is not None:
            if "labels" not in self.pairs.column_names:
                return pa.table({})
            return pa.table({"labels": pc.unique(self.pairs["labels"])})
        if self.labels is None:
            return pa.table({})
        return pa.table({"labels": pa.array(self.labels, pa.string())})

    def pair_table(self, columns: list[str] | None = None) -> pa.Table:
        """The pairs, from memory or read from the index (a small corpus, or a test)."""
        if self.pairs is not None:
            return self.pairs if columns is None else self.pairs.select(columns)
        from raysys.data.index import read_index

        return read_index(self.index, columns)

    @property
    def image_ids(self) -> pa.Array:
        """Every image the image pass must cache or reject, once each."""
        if self.pairs is not None:
            return self.pairs["image_id"].combine_chunks().unique()
        firsts = self.pair_table(["image_id", "first"])
        return firsts.filter(firsts["first"])["image_id"].combine_chunks()

    def thumbnails(self, image_ids: Iterable[str]) -> list[bytes] | None:
        """Encoded images for a few ids (the TensorBoard projector), or None when this
        corpus cannot fetch single images cheaply (tar shards)."""
        wanted = list(image_ids)
        images = self.images
        if images is None and self.read_images is None and self.index:
            from raysys.data.index import read_index
            from raysys.data.pairs import buckets

            # Only the wanted images' bucket files of the index are read.
            wanted_buckets = set(buckets(np.asarray(wanted, dtype=str)).tolist())
            firsts = read_index(self.index, ["image_id", "image", "first"], None, wanted_buckets)
            firsts = firsts.filter(firsts["first"])
            images = firsts.filter(pc.is_in(firsts["image_id"], pa.array(wanted, pa.string())))
            images = images.select(["image_id", "image"]).rename_columns(["id", "uri"])
        if images is None:
            return None
        index = {i: k for k, i in enumerate(images["id"].to_pylist())}
        column = "image" if "image" in images.column_names else "uri"
        values = images[column]
        out: list[bytes] = []
        for image_id in wanted:
            value = values[index[image_id]].as_py()
            if column == "uri":
                if not value:
                    return None
                fs, path = storage.fsspec_fs(value)
                try:
                    value = fs.cat_file(path)
                except OSError:
                    return None
            if not value:
                return None
            out.append(value)
        return out


def settings(cfg: Any, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """The key-shaping config fields of a corpus (see KEY_FIELDS), by name."""
    return {k: getattr(cfg, k) for k in KEY_FIELDS + extra}


def split_of(image_id: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """A stable split from a hash of the image id: adding images never moves old ones, and
    all captions of an image land in the same split (no image leaks from train into test)."""
    digest = hashlib.sha256(f"{seed}:{image_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    return "val" if u < test_fraction + val_fraction else "train"


def normalise_split(value: Any, where: str) -> str:
    text = str(value).strip().lower()
    text = SPLIT_ALIASES.get(text, text)
    if text not in SPLITS:
        raise CorpusError(
            f"{where}: split {value!r} is not one of {', '.join(SPLITS)} (or "
            f"{', '.join(SPLIT_ALIASES)}); fix the split column or drop it to get hashed splits"
        )
    return text


def as_texts(value: Any) -> list[Any]:
    """A caption/negative field as a list: one string, a list of them, or nothing."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return list(value.tolist())
    return [value]


def image_pairs(image_id: str, texts: list[tuple[Any, Any]], split: str) -> list[dict[str, Any]]:
    """The pairs of one image: `{image_id}#{k}` for its k-th (caption, negative); a value
    that is not a non-empty string becomes None (the text pass rejects a missing caption)."""
    return [
        {
            "pair_id": f"{image_id}#{k}",
            "image_id": image_id,
            "caption": caption if isinstance(caption, str) else None,
            "negative": negative if isinstance(negative, str) and negative else None,
            "split": split,
        }
        for k, (caption, negative) in enumerate(texts)
    ]


# What a source row becomes before its image's rows are gathered: one manifest row or one
# webdataset sample. `order` is its place in the source (row number, byte offset), so the
# captions of an image spread over several rows keep their order.
SOURCE_SCHEMA = pa.schema(
    [
        ("order", pa.int64()),
        ("image_id", pa.string()),
        ("image", pa.string()),  # a path or URI the image pass reads; null: none (or inline)
        ("captions", pa.list_(pa.string())),  # [null] for a row without a caption
        ("negatives", pa.list_(pa.string())),  # aligned with the captions, null where none
        ("split", pa.string()),  # the given split, normalised; null: hashed from the id
        ("label", pa.string()),  # the zero-shot class (corpus.label_key); null: none
    ]
)


def source_row(
    order: int,
    image_id: str,
    image: str | None,
    captions: list[Any],
    negatives: list[Any],
    split: Any,
    label: Any,
    where: str,
) -> dict[str, Any]:
    """One source row in `SOURCE_SCHEMA`: captions and negatives aligned (a row without a
    caption gives one pair the text pass rejects), the split normalised, the label one
    value."""
    if captions and negatives and len(negatives) != len(captions):
        raise CorpusError(
            f"{where}: {len(captions)} captions but {len(negatives)} negatives; give one "
            "negative per caption, or none"
        )
    if not captions:
        captions, negatives = [None], []
    negatives = negatives or [None] * len(captions)
    if label is not None and not (isinstance(label, str) and not label.strip()):
        if isinstance(label, (list, tuple, dict, bytes)):
            raise CorpusError(
                f"{where}: label {label!r:.80} must be one value (a class name), not "
                f"{type(label).__name__}"
            )
        label = str(label).strip()
    else:
        label = None
    return {
        "order": order,
        "image_id": image_id,
        "image": image,
        "captions": [c if isinstance(c, str) else None for c in captions],
        "negatives": [n if isinstance(n, str) and n else None for n in negatives],
        "split": None if split in (None, "") else normalise_split(split, where),
        "label": label,
    }


def gather_images(
    rows: pa.Table, seed: int, val_fraction: float, test_fraction: float, repeats: str = ""
) -> pa.Table:
    """Source rows (`SOURCE_SCHEMA`, every row of each image present) -> the images' pairs,
    ordered by each image's first row: its captions in row order as `{image_id}#{k}`, one
    image value, the first given split (else the hashed one) and one label. `repeats` is
    the error for an image id on two rows (webdataset keys must be unique); empty: allowed
    (flattened COCO manifests list an image once per caption). Plain Arrow and Python: it
    runs per bucket inside the Ray Data index job and whole for small corpora."""
    order = pc.sort_indices(rows, [("image_id", "ascending"), ("order", "ascending")])
    rows = rows.take(order)
    ids = rows["image_id"].to_pylist()
    columns = {c: rows[c].to_pylist() for c in ("order", "image", "split", "label")}
    captions, negatives = rows["captions"].to_pylist(), rows["negatives"].to_pylist()
    images: list[tuple[int, str]] = []  # (first order, image id)
    out: dict[str, tuple] = {}
    start = 0
    while start < len(ids):
        image_id, end = ids[start], start + 1
        while end < len(ids) and ids[end] == image_id:
            end += 1
        if repeats and end - start > 1:
            raise CorpusError(repeats.format(image_id=image_id))
        value = columns["image"][start]
        split = label = None
        texts: list[tuple[Any, Any]] = []
        for i in range(start, end):
            if columns["image"][i] != value:
                raise CorpusError(
                    f"id {image_id!r} names two different images ({value!r:.80} and "
                    f"{columns['image'][i]!r:.80}); give each image its own id "
                    "(corpus.id_key), or drop the id column"
                )
            split = split or columns["split"][i]
            given = columns["label"][i]
            if given is not None and label is not None and given != label:
                raise CorpusError(
                    f"image {image_id!r} has two labels, {label!r} and {given!r}; an image "
                    "has one class: fix the label column"
                )
            label = label or given
            texts += zip(captions[i], negatives[i], strict=True)
        split = split or split_of(image_id, seed, val_fraction, test_fraction)
        images.append((columns["order"][start], image_id))
        out[image_id] = (value, split, label, texts)
        start = end
    rows_out: list[dict[str, Any]] = []
    for _, image_id in sorted(images):
        value, split, label, texts = out[image_id]
        for k, pair in enumerate(image_pairs(image_id, texts, split)):
            pair |= {"image": value, "label": label, "first": k == 0}
            rows_out.append(pair)
    return pa.table(
        {
            **{c: pa.array([r[c] for r in rows_out], pa.string()) for c in PAIR_COLUMNS[:4]},
            "split": pa.array([r["split"] for r in rows_out], pa.string()),
            "image": pa.array([r["image"] for r in rows_out], pa.string()),
            "label": pa.array([r["label"] for r in rows_out], pa.string()),
            "first": pa.array([r["first"] for r in rows_out], pa.bool_()),
        }
    )


LABEL_TASK = "label"  # the zero-shot task a `corpus.label_key` column gives


def finish_pairs(pairs: pa.Table, label_key: str, image: bool = True) -> pa.Table:
    """Gathered pairs -> the index's columns: `labels` as JSON `{"label": value}` when
    `corpus.label_key` is set; the image value (a path or URI) kept for the image pass
    unless the images travel otherwise (`image=False`: tar shards)."""
    columns = ["pair_id", "image_id", "caption", "negative", "split", "first"]
    out = pairs.select(columns + (["image"] if image else []))
    if label_key:
        values = pairs["label"].to_pylist()
        labels = [None if v is None else json.dumps({LABEL_TASK: v}) for v in values]
        out = out.append_column("labels", pa.array(labels, pa.string()))
    return out


def pairs_table(rows: list[dict[str, Any]]) -> pa.Table:
    """The pair index as strings: the contract's columns, plus each optional column (e.g.
    `labels`) that any row carries (null where a row lacks it)."""
    optional = tuple(c for c in OPTIONAL_PAIR_COLUMNS if any(c in r for r in rows))
    return pa.table(
        {c: pa.array([r.get(c) for r in rows], pa.string()) for c in PAIR_COLUMNS + optional}
    )


def check_unique(pairs: pa.Table, where: str) -> None:
    ids = pairs["pair_id"]
    if len(ids.unique()) != len(ids):
        raise CorpusError(
            f"{where}: pair ids are not unique (two rows give the same image id and caption "
            "number); give each image a distinct id (corpus.id_key) or path"
        )


def table_digest(table: pa.Table) -> str:
    """A hash of a table's content (Arrow IPC bytes): what the pairs add to a corpus key."""
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()
