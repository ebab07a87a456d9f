"""A worker's share of a pair view read with pyarrow (what a sweep's trials stream from):
ranks split every epoch into equal, disjoint runs of rows, the order is fixed by (seed,
epoch), and batches are whole. On a local directory and on the S3 server, without Ray."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysys import storage
from raysys.data import cache
from raysys.data.batches import StreamBatches
from raysys.data.view_shard import ViewShard

GROUPS = [(0, 37), (1, 50), (1, 13), (2, 64), (2, 7), (2, 29)]  # (file, rows): 200 rows


def _write_view(where: str) -> list[str]:
    """Three Parquet files of a view's columns, in row groups of uneven sizes."""
    files, start = [], 0
    for f in range(3):
        tables = []
        for _, rows in [g for g in GROUPS if g[0] == f]:
            ids = np.arange(start, start + rows)
            start += rows
            vectors = np.repeat(ids[:, None], 4, axis=1).astype(np.float16)
            tables.append(
                pa.table(
                    {
                        "pair_id": [f"p{i}" for i in ids],
                        "image_id": [f"i{i}" for i in ids],
                        "image": cache.list_array(vectors),
                        "text": cache.list_array(vectors),
                        "negative": cache.list_array(-vectors),
                    }
                )
            )
        uri = storage.join(where, f"part-{f}.parquet")
        fs, path = storage.pyarrow_fs(uri)
        with pq.ParquetWriter(path, tables[0].schema, filesystem=fs) as writer:
            for table in tables:
                writer.write_table(table)
        files.append(uri)
    return files


@pytest.fixture(params=["local", "s3"])
def view(request, tmp_path, monkeypatch) -> list[str]:
    if request.param == "local":
        return _write_view(str(tmp_path))
    server = request.getfixturevalue("s3_server")
    server.patch_env(monkeypatch)
    return _write_view(f"{server.make_bucket('view-shard')}/views/train-x")


def _ids(tables) -> list[int]:
    return [int(p[1:]) for t in tables for p in t.column("pair_id").to_pylist()]


def _batch_ids(batches) -> list[int]:
    """The pair ids of arrays batches: each row's vector is its id, four times."""
    return [int(i) for b in batches for i in b["image"][:, 0]]


def test_ranks_take_equal_disjoint_runs_of_one_shuffled_order(view) -> None:
    for world in (1, 2, 3):
        shards = [ViewShard(view, rank, world, seed=7) for rank in range(world)]
        assert [len(s.groups) for s in shards] == [len(GROUPS)] * world
        seen = [_ids(s.tables(epoch=4)) for s in shards]
        assert [len(ids) for ids in seen] == [200 // world] * world
        together = [i for ids in seen for i in ids]
        assert len(set(together)) == len(together) == 200 // world * world
        if world == 1:
            assert sorted(together) == list(range(200))
            assert together != list(range(200))  # row groups shuffled


def test_an_epochs_order_depends_on_seed_and_epoch_alone(view) -> None:
    a, b = ViewShard(view, 1, 2, seed=3), ViewShard(view, 1, 2, seed=3)
    first = _batch_ids(a.batches(epoch=2, size=16, window=64))
    assert first == _batch_ids(b.batches(epoch=2, size=16, window=64))  # a resumed run's batches
    assert first != _batch_ids(a.batches(epoch=3, size=16, window=64))
    assert first != _batch_ids(ViewShard(view, 1, 2, seed=4).batches(epoch=2, size=16, window=64))


def test_batches_are_whole_and_the_window_mixes_rows_across_row_groups(view) -> None:
    shard = ViewShard(view, 0, 1, seed=0)
    plain = list(shard.batches(epoch=0, size=16))
    assert [len(b["image"]) for b in plain] == [16] * (200 // 16)  # the last 8 rows dropped
    assert _batch_ids(plain) == _ids(shard.tables(0))[: 200 // 16 * 16]  # no window: in order
    mixed = list(shard.batches(epoch=0, size=16, window=64))
    assert [len(b[c]) for b in mixed for c in b] == [16] * (200 // 16) * 4
    assert _batch_ids(mixed) != _batch_ids(plain)
    # Rows stay within windows of a few row groups, not the whole epoch: mixed, yet every
    # row comes once.
    assert len(set(_batch_ids(mixed))) == 200 // 16 * 16


def test_windows_made_in_parallel_give_the_batches_made_one_at_a_time(view) -> None:
    """Each window is mixed by its own generator, so how many are made at once (the node's
    cores) never changes an epoch's batches; batches run across window boundaries."""
    runs = {}
    for readers in (1, 3):
        shard = ViewShard(view, 0, 1, seed=9, readers=readers)
        runs[readers] = [_batch_ids(shard.batches(epoch=1, size=16, window=32))]
        runs[readers].append(_ids(shard.tables(epoch=1)))
    assert runs[1] == runs[3]
    windows = shard._windows(1, 32)
    assert len(windows) > 2 and all(sum(p[2] for p in w) >= 32 for w in windows[:-1])
    assert [p for w in windows for p in w] == shard._pieces(1)  # whole slices, in order


def test_in_order_keeps_the_order_raises_in_turn_and_cancels_the_rest_when_left() -> None:
    import threading
    import time

    from raysys.data.view_shard import in_order

    def slow_first(i: int) -> int:
        time.sleep(0.05 * (3 - i) if i < 3 else 0)  # later items finish first
        if i == 5:
            raise ValueError("item 5")
        return i

    made = in_order(slow_first, range(8), 3, "test-order")
    assert [next(made) for _ in range(5)] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="item 5"):
        next(made)
    started = []
    left = in_order(lambda i: started.append(i) or time.sleep(0.02), range(100), 2, "test-left")
    next(left)
    left.close()  # the consumer stops: nothing more starts, its threads are gone
    count = len(started)
    assert count <= 4
    time.sleep(0.1)
    assert len(started) == count
    assert not [t for t in threading.enumerate() if t.name.startswith("test-left")]


def test_stream_batches_resume_mid_epoch_on_the_same_pairs(view) -> None:
    import torch

    shard = ViewShard(view, 0, 1, seed=5)
    steps = 200 // 16

    def read(epoch: int):
        return shard.batches(epoch, 16, 48)

    def ids_from(start: int, n: int) -> list[list[float]]:
        batches = StreamBatches(read, steps, torch.device("cpu"))
        return [batches.get(s)[0][:, 0].tolist() for s in range(start, start + n)]

    straight = ids_from(0, 2 * steps + 3)
    assert ids_from(steps + 5, steps - 2) == straight[steps + 5 : 2 * steps + 3]


def test_a_trials_streamed_population_reads_the_view_and_refuses_too_large_a_batch(
    tmp_path,
) -> None:
    """The trial's data path (`population_driver._data_and_population`) on a published
    view, in this process and without Ray: the population's standardisation comes from the
    view's rows, and its batches are the view's."""
    import json

    import torch

    from raysys import config
    from raysys.data import stream
    from raysys.errors import ConfigError
    from raysys.train.population_driver import Place, _data_and_population

    files = _write_view(str(tmp_path))
    cache.put_bytes(
        storage.join(str(tmp_path), stream.DONE),
        json.dumps({"rows": 200, "files": [f.rsplit("/", 1)[1] for f in files]}).encode(),
    )
    settings = {"stream_rows": 200, "stream_view": str(tmp_path), "dims": [4, 4]}
    settings["stream_reason"] = "train.data_on_device=stream"
    place = Place(0, 1, torch.device("cpu"), lambda *_: None, lambda m: m)
    cfg = config.load(None, ["train.batch_size=16", "train.hidden=[8]", "train.latent=4"])
    members = [cfg.train, cfg.train]
    population, steps, batches = _data_and_population(cfg, settings, members, [], [0, 0], place)
    assert steps == 200 // 16 and population.size == 2
    assert "streaming 200 pairs from their pair view, 200 per worker per epoch" in batches.where
    image, text, negative, keys = batches.get(0)  # one layer pair: every member's rows
    assert image.shape == text.shape == (16, 4) and torch.equal(negative, -text)
    assert torch.equal(image[:, 0], text[:, 0]) and len(set(keys.tolist())) == 16
    # Standardised by the view's rows (each image row is its id, four times: mean 99.5).
    buffers = dict(population.named_buffers())
    [mean] = [v for k, v in buffers.items() if k.endswith("image_mean")]
    assert torch.allclose(mean.double(), torch.full((2, 4), 99.5, dtype=torch.float64))

    big = config.load(None, ["train.batch_size=256", "train.hidden=[8]", "train.latent=4"])
    with pytest.raises(ConfigError, match=r"200 pairs give each of 1 worker\(s\) 200, fewer"):
        _data_and_population(big, settings, [big.train], [], [0], place)


def test_a_damaged_view_file_is_named_and_a_closed_stream_leaves_no_reader(tmp_path) -> None:
    import threading

    import torch

    from raysys.errors import CacheError

    files = _write_view(str(tmp_path))
    shard = ViewShard(files, 0, 1, seed=0)  # footers read: the files looked whole
    batches = StreamBatches(lambda e: shard.batches(e, 16, 64), 200 // 16, torch.device("cpu"))

    def readers() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name.startswith("view-read")}

    before = readers()  # (other tests' abandoned streams wait for the garbage collector)
    batches.get(0)
    assert readers() - before
    batches.close()  # mid-epoch: its reader threads and files are let go now
    assert readers() <= before

    damaged = files[2]
    data = bytearray(open(damaged, "rb").read())
    data[8:400] = bytes(392)  # the first row group's pages
    open(damaged, "wb").write(bytes(data))
    with pytest.raises(CacheError, match=r"row group 0 of the pair view file .*part-2\.parquet"):
        for group in shard.groups:
            shard._read(group)


def test_rebatch_cuts_whole_batches_across_parts_and_drops_the_short_last() -> None:
    import itertools

    from raysys.data.view_shard import rebatch

    ids = np.arange(30)
    bounds = [0, 5, 8, 28, 30]  # parts of 5, 3, 20 and 2 rows
    parts = [{"image": ids[a:b], "keys": -ids[a:b]} for a, b in itertools.pairwise(bounds)]
    batches = list(rebatch(parts, 4))
    assert [b["image"].tolist() for b in batches] == [
        list(range(i, i + 4)) for i in range(0, 28, 4)
    ]
    assert all(np.array_equal(b["keys"], -b["image"]) for b in batches)  # rows stay aligned
    assert np.shares_memory(batches[3]["image"], ids)  # within a part: a view, not a copy
    assert list(rebatch(parts[:1], 8)) == []


def test_a_nan_row_in_the_view_stops_the_stream_naming_its_pair(tmp_path) -> None:
    from raysys.errors import CacheError

    vectors = np.ones((40, 4), np.float16)
    vectors[29, 2] = np.nan
    path = str(tmp_path / "part-0.parquet")
    pq.write_table(
        pa.table(
            {
                "pair_id": [f"p{i}" for i in range(40)],
                "image_id": [f"i{i}" for i in range(40)],
                "image": cache.list_array(np.ones((40, 4), np.float16)),
                "text": cache.list_array(vectors),
                "negative": cache.list_array(-np.ones((40, 4), np.float16)),
            }
        ),
        path,
        row_group_size=10,
    )
    with pytest.raises(CacheError, match=r"1 pair\(s\) have NaN or inf .*\['p29'\]"):
        list(ViewShard([path], 0, 1, seed=0, readers=2).batches(0, 8, 16))
