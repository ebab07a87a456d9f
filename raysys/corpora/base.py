"""What every corpus hands the extract stage: a small in-memory pair index plus its images.

Captions are small (COCO's 600k fit in tens of MB) and every later stage joins on them, so the
pair index lives in memory as one Arrow table. Images are not: a corpus gives them either as a
table of `id -> image bytes or URI` (synthetic, manifests: URIs are read lazily in Ray Data's
CPU tasks) or as a function that opens a Ray Dataset over them (webdataset shards), so a
large corpus streams through extraction and is never held whole by the driver.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
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
    cache directory, so a changed corpus never reuses a stale cache. `images` maps image id
    to `image` (bytes) or `uri` (str, read by the image pass); `read_images` instead opens a
    Ray Dataset of `id, image` rows (for sources only Ray Data reads well, like tar shards).
    `zeroshot` holds the corpus's zero-shot tasks, task -> class -> prompt texts, whose
    classes the pairs' `labels` name; empty for a corpus without tasks.
    """

    key: str
    pairs: pa.Table
    images: pa.Table | None = None
    read_images: Callable[[], ray.data.Dataset] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    zeroshot: dict[str, dict[str, list[str]]] = field(default_factory=dict)

    @property
    def image_ids(self) -> pa.Array:
        """Every image the image pass must cache or reject, once each."""
        return self.pairs["image_id"].combine_chunks().unique()

    def thumbnails(self, image_ids: Iterable[str]) -> list[bytes] | None:
        """Encoded images for a few ids (the TensorBoard projector), or None when this
        corpus cannot fetch single images cheaply (tar shards)."""
        if self.images is None:
            return None
        wanted = list(image_ids)
        index = {i: k for k, i in enumerate(self.images["id"].to_pylist())}
        column = "image" if "image" in self.images.column_names else "uri"
        values = self.images[column]
        out: list[bytes] = []
        for image_id in wanted:
            value = values[index[image_id]].as_py()
            if column == "uri":
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
