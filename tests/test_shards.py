"""Shard-local training reads, without Ray: extraction actors write their parts by bucket, and
a train worker's read of its shards costs its row groups' bytes only, measured at the
filesystem layer every cache read goes through (`storage.pyarrow_fs`)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from fsspec.implementations.local import LocalFileSystem

from raysys import storage
from raysys.backbones import REJECT, Backbone
from raysys.data import cache
from raysys.data.batches import BatchPlan
from raysys.data.pairs import BUCKETS, buckets
from raysys.embed import EmbedActor, Prepare, part_buckets

# 8192 pairs in two parts per cache: row groups of ~32 images / ~64 captions, column chunks of
# ~24 KB, so every gap between a worker's chunks is larger than the 8 KiB Arrow's pre-buffered
# reads would bridge (a real cache's gaps are whole layers of other depths).
IMAGES, CAPTIONS, PARTS = 4096, 2, 2
D_IMAGE, D_TEXT = 384, 192


class Rows(Backbone):
    """A backbone whose 'model' returns its input rows `x` as layer 0 (and `-x` as a text
    negative's); an image backbone also has a layer 1, `2x`, that training does not read."""

    name = "given-rows"

    def __init__(self, modality: str, dim: int) -> None:
        self.modality, self.dim = modality, dim

    @property
    def layer_ids(self) -> list[int]:
        return [0, 1] if self.modality == "image" else [0]

    @property
    def dims(self) -> list[int]:
        return [self.dim] * len(self.layer_ids)

    def preprocess(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"id": batch["id"], "x": batch["x"], REJECT: np.full(len(batch["id"]), "")}

    def load(self, device: torch.device) -> None:
        self.device = device

    def embed(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = np.asarray(batch["x"], dtype=np.float32)
        return {"L00": x} | ({"neg_L00": -x} if self.modality == "text" else {"L01": 2 * x})

    def describe(self) -> dict[str, Any]:
        return {"backbone": self.name}


def _extract(out, backbone: Rows, ids: np.ndarray, bucket: np.ndarray | None) -> None:
    """One pass as `raysys.extract` runs it (Prepare, then an actor per part), rows in a
    shuffled order, and a manifest."""
    rng = np.random.default_rng(len(ids))
    order = rng.permutation(len(ids))
    prepare = Prepare(backbone)
    actor = EmbedActor(backbone, False, 1, str(out), batch_size=256)
    for part in np.array_split(order, PARTS):
        batch = {"id": ids[part], "x": _values(ids[part], backbone.dim)}
        if bucket is not None:
            batch["bucket"] = bucket[part]
        result = actor(prepare(batch))
        assert result["error"][0] == "" and int(result["rows"][0]) == len(part)
    columns = ["L00", "neg_L00"] if backbone.modality == "text" else ["L00", "L01"]
    cache.write_manifest(out, {"columns": columns, "layers": ["L00"]})


def _values(ids: np.ndarray, dim: int) -> np.ndarray:
    """Each row's values from its id alone, so any read can be checked against it."""
    number = np.array([int(str(i).lstrip("imgp").replace("-", "")) for i in ids])
    return np.sin(number[:, None] * 1.37 + np.arange(dim) * 0.71).astype(np.float32)


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> tuple[str, str, cache.PairIndex]:
    root = tmp_path_factory.mktemp("shards")
    image_ids = np.array([f"img{i}" for i in range(IMAGES)])
    pair_image = np.repeat(image_ids, CAPTIONS)
    pair_ids = np.array([f"p{i}-{c}" for i in range(IMAGES) for c in range(CAPTIONS)])
    bucket = buckets(pair_image)
    # The image pass buckets its own ids; the text pass is given its pairs' image buckets.
    _extract(root / "img", Rows("image", D_IMAGE), image_ids, None)
    _extract(root / "txt", Rows("text", D_TEXT), pair_ids, bucket)
    index = cache.PairIndex(pair_ids, pair_image, pair_ids, buckets=bucket)
    return str(root / "img"), str(root / "txt"), index


def test_parts_are_sorted_by_bucket_one_row_group_each(caches) -> None:
    image_dir, text_dir, index = caches
    for directory in (image_dir, text_dir):
        for path in cache.data_files(directory):
            meta = pq.ParquetFile(path).metadata
            table = pq.read_table(path, columns=["id", "bucket"])
            bucket = table["bucket"].to_numpy()
            assert table.schema.field("bucket").type == pa.int16()
            assert (np.diff(bucket) >= 0).all()
            assert meta.num_row_groups == len(np.unique(bucket))
            for g in range(meta.num_row_groups):
                stats = meta.row_group(g).column(meta.num_columns - 1).statistics
                assert stats.min == stats.max  # one bucket per row group
    # Image rows carry their own id's bucket; caption rows their image's, as given.
    images = pq.read_table(cache.data_files(image_dir), columns=["id", "bucket"])
    ids = images["id"].to_numpy(zero_copy_only=False).astype(str)
    np.testing.assert_array_equal(images["bucket"].to_numpy(), buckets(ids))
    texts = pq.read_table(cache.data_files(text_dir), columns=["id", "bucket"])
    at = {p: b for p, b in zip(index.pair_ids, index.buckets, strict=True)}
    assert [at[p] for p in texts["id"].to_pylist()] == texts["bucket"].to_pylist()


def test_a_text_pass_given_no_buckets_writes_an_unsorted_part(tmp_path) -> None:
    """A pair id does not tell a caption's image: such a part is read whole, never by the
    wrong bucket."""
    ids = np.array([f"p{i}-0" for i in range(50)])
    _extract(tmp_path, Rows("text", 8), ids, None)
    part = cache.data_files(tmp_path)[0]
    assert "bucket" not in pq.read_schema(part).names
    got = cache.read_rows(tmp_path, ["L00"], ids[:5], buckets=np.array([3]))["L00"]
    np.testing.assert_array_equal(got, _values(ids[:5], 8).astype(np.float16))


def test_rows_a_text_pass_leaves_without_a_bucket_get_their_ids() -> None:
    """Rows the corpus index has no bucket for (the zero-shot prompts beside the captions)
    are bucketed by their own id, never dropped or written as bucket 0."""
    batch = {"id": np.array(["p1-0", "zeroshot:ab", "p2-0"]), "bucket": [5, None, 7]}
    got = part_buckets(batch, "text")
    assert got.dtype == np.int16
    np.testing.assert_array_equal(got, [5, buckets(np.array(["zeroshot:ab"]))[0], 7])
    assert part_buckets({"id": batch["id"]}, "text") is None
    np.testing.assert_array_equal(part_buckets({"id": batch["id"]}, "image"), buckets(batch["id"]))


class Counting(pafs.FSSpecHandler):
    """Local files through a pyarrow filesystem that counts the bytes each file gives."""

    def __init__(self) -> None:
        super().__init__(LocalFileSystem())
        self.read: dict[str, int] = defaultdict(int)

    def open_input_file(self, path: str) -> pa.PythonFile:
        return pa.PythonFile(_Counted(self.fs.open(path, mode="rb"), self.read, path), mode="r")


class _Counted:
    def __init__(self, raw: Any, tally: dict[str, int], path: str) -> None:
        self.raw, self.tally, self.path = raw, tally, path

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.tally[self.path] += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        got = self.raw.readinto(buffer)
        self.tally[self.path] += got
        return got

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


@pytest.fixture
def counting(monkeypatch) -> Counting:
    handler = Counting()
    real = storage.pyarrow_fs

    def counted(uri):
        _, path = real(uri)
        return pafs.PyFileSystem(handler), path

    monkeypatch.setattr(storage, "pyarrow_fs", counted)
    return handler


def _chunks(path: str, columns: list[str], wanted: set[int] | None) -> int:
    """Compressed bytes of `columns`' chunks in the row groups of `wanted` buckets (all)."""
    meta = pq.ParquetFile(path).metadata
    names = [meta.schema.column(i).path.split(".")[0] for i in range(meta.num_columns)]
    total = 0
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        stats = group.column(names.index("bucket")).statistics
        if wanted is None or stats.min in wanted:
            total += sum(group.column(names.index(c)).total_compressed_size for c in columns)
    return total


@pytest.mark.parametrize("world", [2, 4])
def test_a_train_worker_reads_only_its_shards_row_groups(caches, counting, world) -> None:
    image_dir, text_dir, index = caches
    files = {d: cache.data_files(d) for d in (image_dir, text_dir)}
    columns = {image_dir: ["L00"], text_dir: ["L00", "neg_L00"]}
    # What opening a part costs (its footer read), measured once per file.
    footers = {}
    for path in files[image_dir] + files[text_dir]:
        cache.parquet_file(path)
        footers[path] = counting.read.pop(path)
    full = cache.load_index_rows(image_dir, text_dir, "L00", "L00", index)
    counting.read.clear()
    plan = BatchPlan(len(index), 64, world, seed=0, buckets=index.buckets)
    layers = {d: sum(_chunks(p, columns[d], None) for p in files[d]) for d in files}
    for rank in range(world):
        rows = plan.worker_rows(rank, world)
        got = cache.load_index_rows(image_dir, text_dir, "L00", "L00", index, select=rows)
        # The rows a full read gives for its positions, and only those.
        np.testing.assert_array_equal(got.pair_ids, full.pair_ids[rows])
        for name in ("image", "text", "negative"):
            np.testing.assert_array_equal(getattr(got, name), getattr(full, name)[rows])
        mine = {b for b in range(BUCKETS) if b % world in plan.worker_shards(rank, world)}
        for directory in files:
            read = sum(counting.read.pop(p, 0) for p in files[directory])
            # Exactly: every footer, and the id and layer chunks of this worker's row groups.
            want = sum(
                footers[p] + _chunks(p, ["id", *columns[directory]], mine) for p in files[directory]
            )
            assert read == want
            layer = sum(_chunks(p, columns[directory], mine) for p in files[directory])
            assert layer / layers[directory] == pytest.approx(1 / world, rel=0.25)
            print(
                f"world {world} rank {rank} {directory.rsplit('/', 1)[-1]}: read {read} bytes "
                f"(layers {layer}, footers {sum(footers[p] for p in files[directory])}) of "
                f"{layers[directory]} layer bytes = {read / layers[directory]:.3f}"
            )
        assert not counting.read  # nothing else was opened
