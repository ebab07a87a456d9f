"""Extraction's parts that need no Ray: negatives filled in, parts sized to whole batches,
the actor plan for a given cluster, input sizes and backbone names checked, late writers'
duplicate rows dropped. (The passes themselves, on a real local Ray: test_extract_ray.py.)"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from raysys.config import ExtractConfig
from raysys.data import cache
from raysys.errors import BackboneError


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="PNG")
    return buf.getvalue()


def test_missing_negatives_are_derived_and_recorded() -> None:
    from raysys.corpora import fill_negatives

    rows = fill_negatives(
        [
            {"pair_id": "p0", "caption": "a red car left of a blue bus", "negative": None},
            {"pair_id": "p1", "caption": "a dog", "negative": "a cat"},
            {"pair_id": "p2", "caption": "hello there", "negative": None},
        ]
    )
    assert rows[0]["negative"] not in (None, rows[0]["caption"])
    assert rows[0]["negative_source"].startswith("generated:")
    assert (rows[1]["negative"], rows[1]["negative_source"]) == ("a cat", "corpus")
    # No rule applies: the gap stays visible and the text pass rejects the row.
    assert (rows[2]["negative"], rows[2]["negative_source"]) == (None, "none")


def test_parts_are_whole_batches_spread_over_the_actors() -> None:
    from raysys.extract import PARTS_PER_ACTOR, _part_rows

    # Small passes: about PARTS_PER_ACTOR parts per actor, each a whole number of batches.
    part = _part_rows(2000, 2, ExtractConfig(batch_size=64, part_rows=1024))
    assert part % 64 == 0 and 2000 / part >= 2 * PARTS_PER_ACTOR - 2
    # Large passes: capped at extract.part_rows; tiny ones still get one batch per part.
    assert _part_rows(10**6, 8, ExtractConfig(batch_size=64, part_rows=1024)) == 1024
    assert _part_rows(60, 2, ExtractConfig(batch_size=64, part_rows=1024)) == 64
    assert _part_rows(400, 2, ExtractConfig(batch_size=64, part_rows=16)) == 16


def test_a_pass_starts_no_more_actors_than_it_has_parts() -> None:
    from raysys.extract import _fit_pool

    derived = ExtractConfig()
    # A 60-image pass is one part: one actor, with the cores the second would have had.
    assert _fit_pool(2, 1, 0.0, 1, derived) == (1, 2)
    assert _fit_pool(2, 1, 0.0, 2, derived) == (2, 1)  # enough parts: the plan stands
    assert _fit_pool(4, 1, 1.0, 2, derived) == (2, 1)  # GPU actors keep their threads
    assert _fit_pool(2, 1, 0.0, 0, derived) == (1, 2)  # nothing left still plans one actor
    assert _fit_pool(2, 1, 0.0, 1, ExtractConfig(num_actors=2)) == (2, 1)  # as asked


def test_input_size_is_configurable_and_keys_the_cache() -> None:
    from raysys.backbones import get_backbone

    native = get_backbone("efficientnet-lite0", "image")
    small = get_backbone("efficientnet-lite0", "image", image_size=128)
    assert (native.image_size, small.image_size) == (224, 128)
    assert small.describe()["input"]["size"] == 128
    # The size is part of what names the cache: a resized model never reuses a native cache.
    assert cache.content_key(small.describe()) != cache.content_key(native.describe())
    pixels = small.preprocess({"id": np.array(["a"]), "image": np.array([_png((9, 9, 9))])})
    assert pixels["pixels"].shape == (1, 128, 128, 3)
    with pytest.raises(BackboneError, match="below 64"):
        get_backbone("efficientnet-lite0", "image", image_size=32)


def test_unknown_backbone_fails_before_any_work() -> None:
    from raysys.backbones import get_backbone

    with pytest.raises(BackboneError, match="available: efficientnet-lite0"):
        get_backbone("resnet-50", "image")
    with pytest.raises(BackboneError, match="available: minilm-l6"):
        get_backbone("bert-huge", "text")


@pytest.mark.parametrize("cpus", [1, 2, 4, 8, 16, 64])
def test_cpu_actor_plan_leaves_room_for_ray_data_tasks(cpus, monkeypatch) -> None:
    import raysys.runtime as runtime
    from raysys.config import ExtractConfig
    from raysys.extract import PREPROCESS_CPUS, _actor_plan

    monkeypatch.setattr(runtime, "cluster_resources", lambda: runtime.Resources(cpus, 0))
    actors, per_actor, gpus, threads = _actor_plan(ExtractConfig())
    assert gpus == 0 and actors >= 1
    assert actors * per_actor <= cpus - PREPROCESS_CPUS  # preprocessing always gets a slot
    if cpus >= 2:
        assert actors * per_actor <= cpus - 1  # and a whole CPU for repartition tasks
    assert actors * threads <= cpus  # no oversubscription of cores by torch threads
    if cpus <= 8:
        assert (actors, threads) == (cpus, 1)  # one single-threaded actor per core


def test_duplicate_rows_from_late_writers_are_dropped(tmp_path) -> None:
    from raysys.extract import _drop_duplicate_rows

    def part(name: str, ids: list[str]) -> str:
        path = tmp_path / f"part-{name}.parquet"
        values = np.arange(len(ids) * 2, dtype=np.float16).reshape(-1, 2)
        cache.write_part(pa.table({"id": ids, "L00": cache.list_array(values)}), path)
        time.sleep(0.01)  # distinct mtimes: the oldest copy of an id is the one kept
        return str(path)

    files = [part("a", ["x", "y"]), part("b", ["y", "z"]), part("c", ["x"])]
    dropped, ids, _ = _drop_duplicate_rows(files, {})
    assert dropped == 2 and sorted(ids.to_pylist()) == ["x", "y", "z"]
    assert not Path(files[2]).exists()  # only duplicates: deleted
    assert cache.ids_in(files[:2]).tolist() == ["x", "y", "z"]
    rows_left = {files[0]: 2, files[1]: 1}
    dropped, ids, rows = _drop_duplicate_rows(files[:2], {})
    assert (dropped, sorted(ids.to_pylist()), rows) == (0, ["x", "y", "z"], rows_left)


def test_a_local_cache_is_refused_where_the_work_runs_on_other_nodes(tmp_path, monkeypatch):
    """As a local --out (test_rundir.py): the actors would write the cache's parts to their
    own nodes' disks. One node with CPUs (`make run`, the test suite) is accepted; an s3://
    cache is never asked about."""
    from raysys import config, rundir
    from raysys.errors import ConfigError
    from raysys.extract import extract

    assert rundir.local_cache_refusal("runs/cache", nodes=1, driver_cpus=2.0) is None
    several = rundir.local_cache_refusal("runs/cache", nodes=2, driver_cpus=4.0)
    headless = rundir.local_cache_refusal("runs/cache", nodes=1, driver_cpus=0.0)
    assert "'runs/cache'" in several and "2 nodes" in several and "no CPUs" in headless
    for refusal in (several, headless):
        assert refusal.endswith("extract.cache_dir=s3://BUCKET/PREFIX")
    monkeypatch.setattr(rundir, "_ray_initialized", lambda: True)  # a joined cluster of two
    monkeypatch.setattr(rundir, "_cluster_shape", lambda: (2, 4.0))
    cache_dir = tmp_path / "cache"
    with pytest.raises(ConfigError, match=f"extract.cache_dir '{cache_dir}' is a local"):
        extract(config.load(None, [f"extract.cache_dir={cache_dir}"]))
    assert not cache_dir.exists()  # refused before any work
    rundir.check_local_cache(config.load(None, ["extract.cache_dir=s3://bucket/cache"]))
