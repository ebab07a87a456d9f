"""Webdataset corpora (read with Ray Data) and extraction of manifest and webdataset corpora,
from local disk and from a real S3 server (moto on 127.0.0.1), on a real local Ray."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from corpus_files import (
    N_IMAGES,
    corpus_config,
    jsonl,
    per_pair_rows,
    write_images,
    write_shards,
)

from raysys import config, storage
from raysys.corpora import load_corpus
from raysys.data import cache
from raysys.errors import ConfigError, CorpusError


def test_webdataset_shards_read_with_ray_data(ray_cluster, scenes, tmp_path) -> None:
    write_shards(tmp_path / "shards", scenes)
    corpus = load_corpus(corpus_config(tmp_path / "shards", name="webdataset"))
    pairs = corpus.pairs
    # 3 shards (5, 5, 2 samples); each shard's last sample has 2 captions from its .json.
    assert corpus.info["shards"] == 3 and len(corpus.image_ids) == N_IMAGES
    assert pairs.num_rows == N_IMAGES + 3
    by_pair = {r["pair_id"]: r for r in pairs.to_pylist()}
    assert by_pair["000000000#0"]["caption"] == scenes[0]["captions"][0]
    assert by_pair["000000004#1"]["caption"] == scenes[4]["captions"][1]
    images = {r["id"]: r["image"] for r in corpus.read_images().take_all()}
    assert images["000010002"] == scenes[7]["image"] and len(images) == N_IMAGES
    # A glob and `limit` select shards and images.
    limited = load_corpus(
        corpus_config(f"{tmp_path}/shards/0000[01].tar", name="webdataset", limit=6)
    )
    assert len(limited.image_ids) == 6
    assert len(limited.read_images().take_all()) == 6


def test_manifest_extraction_rejects_unreadable_files(ray_cluster, scenes, tmp_path) -> None:
    """End to end through the image pass: a missing file, a corrupt one and a row with no
    image are counted and recorded as rejects with their reasons; the rest are cached."""
    from raysys.extract import extract

    write_images(tmp_path, scenes)
    (tmp_path / "img" / "corrupt.png").write_bytes(b"not a png")
    rows = per_pair_rows(scenes)
    rows += [
        {"image": "img/missing.png", "caption": "a red circle"},
        {"image": "img/corrupt.png", "caption": "a blue square"},
        {"caption": "a green triangle"},
    ]
    path = jsonl(tmp_path / "m.jsonl", rows)
    overrides = [
        "corpus.name=manifest",
        f"corpus.path={path}",
        f"extract.cache_dir={tmp_path / 'cache'}",
        "extract.image_size=64",
        "extract.max_reject_fraction=0.5",
    ]
    ext = extract(config.load(None, overrides))
    assert ext.image_manifest["rows"] == N_IMAGES and ext.image_manifest["rejects"] == 3
    rejects = pq.read_table(Path(ext.image_dir) / cache.REJECTS).to_pydict()
    reasons = dict(zip(rejects["id"], rejects["reason"], strict=True))
    assert reasons["img/missing.png"].startswith("missing or unreadable image file")
    assert "img/corrupt.png" in reasons and reasons["row-000000026"] == "no image in the corpus row"
    assert ext.image_manifest["corpus"]["kind"] == "manifest"
    assert ext.text_manifest["corpus"]["negatives"]["corpus"] == 1
    ids = cache.read_ids(ext.image_dir, ["L00"])
    assert sorted(ids) == sorted(s["name"] for s in scenes)


def test_s3_manifest_and_shards_extract(ray_cluster, s3_server, scenes, tmp_path) -> None:
    """Manifest, its images and tar shards all on the S3 server: both corpora load and the
    manifest's images are read from S3 by the image pass's CPU tasks."""
    from raysys.extract import extract

    bucket = s3_server.make_bucket("raysys-corpora")
    write_images(tmp_path / "local", scenes)
    jsonl(tmp_path / "local" / "m.jsonl", per_pair_rows(scenes))
    storage.upload_dir(tmp_path / "local", f"{bucket}/coco")
    write_shards(tmp_path / "shards", scenes)
    storage.upload_dir(tmp_path / "shards", f"{bucket}/wds")

    shards = load_corpus(corpus_config(f"{bucket}/wds", name="webdataset"))
    assert len(shards.image_ids) == N_IMAGES
    images = {r["id"]: r["image"] for r in shards.read_images().take_all()}
    assert images["000000000"] == scenes[0]["image"]

    # The cache on S3 too: the actors write their parts there, nothing is kept locally.
    overrides = [
        "corpus.name=manifest",
        f"corpus.path={bucket}/coco/m.jsonl",
        f"extract.cache_dir={bucket}/cache",
        "extract.image_size=64",
        "corpus.index_job=ray",  # the Ray Data index job, writing its buckets to S3
    ]
    ext = extract(config.load(None, overrides))
    assert ext.image_dir.startswith(f"{bucket}/cache/") and ext.corpus_dir.startswith(bucket)
    assert ext.image_manifest["rows"] == N_IMAGES and ext.image_manifest["rejects"] == 0
    ids, cols = cache.read_layers(ext.image_dir, [ext.image_manifest["layers"][-1]])
    assert sorted(ids) == sorted(s["name"] for s in scenes)
    assert np.isfinite(next(iter(cols.values())).astype(np.float32)).all()
    for stage in (ext.image_dir, ext.text_dir):
        manifest = json.loads(storage.read_text(f"{stage}/manifest.json"))
        listed = cache.list_files(stage)
        assert manifest["rows"] > 0 and manifest["files"]
        for name, entry in manifest["files"].items():  # each file recorded as it is on S3
            assert (listed[name].size, listed[name].etag) == (entry["bytes"], entry["etag"])
    marker = json.loads(storage.read_text(f"{ext.corpus_dir}/index/_index.json"))
    assert marker["rows"] == 2 * N_IMAGES and marker["images"] == N_IMAGES
    assert set(cache.list_files(f"{ext.corpus_dir}/index")) == {*marker["files"], "_index.json"}

    # A second run reuses every part (none rewritten) and never reads a stray file that is
    # not in the manifest.
    fs, path = storage.fsspec_fs(f"{ext.image_dir}/part-stray.parquet")
    fs.pipe_file(path, b"a stray file a broken writer left")
    before = {s: cache.list_files(s) for s in (ext.image_dir, ext.text_dir)}
    again = extract(config.load(None, overrides))
    assert again.image_manifest == ext.image_manifest  # the same stage, not a new pass
    assert {s: cache.list_files(s) for s in (ext.image_dir, ext.text_dir)} == before
    assert cache.read_ids(again.image_dir, ["L00"]).tolist() == ids.tolist()


def test_webdataset_extraction_streams_and_resumes(ray_cluster, scenes, tmp_path) -> None:
    """The image pass reads the shards through Ray Data (never the driver); a pass that lost
    its manifest and some parts (as a killed one would) embeds only the missing ids. (The
    image pass alone: the text pass of a webdataset corpus is the in-memory one.)"""
    from raysys.backbones import configured_backbone
    from raysys.extract import image_rows, run_pass

    write_shards(tmp_path / "shards", scenes)
    overrides = [
        "corpus.name=webdataset",
        f"corpus.path={tmp_path / 'shards'}",
        "extract.image_size=64",
        "extract.batch_size=2",
        "extract.part_rows=2",
    ]
    cfg = config.load(None, overrides)
    corpus = load_corpus(cfg.corpus)
    out = tmp_path / "image"
    backbone = configured_backbone(cfg.extract, "image")
    manifest = run_pass(backbone, image_rows(corpus), str(out), cfg.extract, {})
    assert manifest["rows"] == N_IMAGES and manifest["rejects"] == 0
    parts = sorted(out.glob("part-*.parquet"))
    assert len(parts) >= 3
    lost = cache.ids_in([str(p) for p in parts[:2]])
    for p in parts[:2]:
        p.unlink()
    (out / cache.MANIFEST).unlink()
    again = run_pass(backbone, image_rows(corpus), str(out), cfg.extract, {})
    assert again["resumed_rows"] == N_IMAGES - len(lost)
    ids = cache.read_ids(out, ["L00"])
    assert sorted(ids) == sorted(str(i) for i in corpus.image_ids.to_pylist())


def test_webdataset_key_is_stable_and_duplicates_refused(ray_cluster, scenes, tmp_path) -> None:
    shards = tmp_path / "shards"
    write_shards(shards, scenes, per_shard=3)
    cfg = corpus_config(shards, name="webdataset")
    assert len({load_corpus(cfg).key for _ in range(3)}) == 1  # Ray Data's order varies
    with pytest.raises(ConfigError, match="brace ranges are not expanded"):
        load_corpus(corpus_config(f"{shards}/{{00000..00003}}.tar", name="webdataset"))
    write_shards(tmp_path / "twice", scenes[:3], per_shard=3)
    (tmp_path / "twice" / "00000.tar").rename(tmp_path / "twice" / "copy.tar")
    write_shards(tmp_path / "twice", scenes[:3], per_shard=3)
    twice = corpus_config(tmp_path / "twice", name="webdataset", index_job="ray")
    for cache_dir in (None, str(tmp_path / "cache")):  # in memory, and by the Ray Data job
        with pytest.raises(CorpusError, match="sample keys appear more than once"):
            load_corpus(twice, cache_dir)


def test_ray_data_index_gives_the_loaders_pairs_and_is_found_again(
    ray_cluster, scenes, tmp_path, monkeypatch
) -> None:
    """The index job (read in byte ranges, gathered by bucket, negatives generated in Ray
    Data's tasks) gives exactly the pairs the in-process loader gives, for a manifest with
    rows spread over images, labels and given splits, and for tar shards; a second load
    finds the finished index by its key and builds nothing (no negative is generated)."""
    import raysys.corpora.index as index_job
    from raysys.corpora import manifest, negatives

    rows = per_pair_rows(scenes)
    for i, r in enumerate(rows):
        r |= ({"label": f"cls{i % 2}"} if i % 2 == 0 else {}) | (
            {"split": "test"} if i % 5 == 0 else {}
        )
    write_shards(tmp_path / "shards", scenes)
    monkeypatch.setattr(manifest, "CHUNK_BYTES", 300)  # several read tasks
    columns = ["pair_id", "image_id", "caption", "negative", "negative_source", "split"]
    for cfg, extra in (
        (corpus_config(jsonl(tmp_path / "m.jsonl", rows), label_key="label"), ["labels"]),
        (corpus_config(tmp_path / "shards", name="webdataset"), []),
    ):
        cfg.index_job = "ray"
        loaded = load_corpus(cfg)  # in this process, all in memory
        indexed = load_corpus(cfg, str(tmp_path / "cache"))
        assert indexed.pairs is None and indexed.key == loaded.key
        got = indexed.pair_table(columns + extra).sort_by("pair_id")
        assert (
            got.to_pylist() == loaded.pairs.select(columns + extra).sort_by("pair_id").to_pylist()
        )
        files = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.parquet")}

        def refuse(*args, **kwargs):
            raise AssertionError("the finished index was rebuilt")

        with monkeypatch.context() as m:
            m.setattr(negatives, "make_negative", refuse)
            m.setattr(index_job, "build", refuse)
            again = load_corpus(cfg, str(tmp_path / "cache"))
        assert again.index == indexed.index and again.image_ids.equals(indexed.image_ids)
        assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.parquet")} == files


def test_a_parquet_read_starts_a_few_footer_readers_not_ray_datas_32(ray_cluster, tmp_path):
    """Ray Data reads every Parquet file's footer on a pool of FooterReader actors, 32 by
    default: on 2 cores a read of a 39-file corpus index started up to 32 Python processes
    and took 9-15 s. raysys's drivers set the pool's size (`runtime.FOOTER_READERS`)."""
    import pyarrow as pa
    import ray.data
    from ray.util.state import list_actors

    from raysys import runtime

    for i in range(40):  # like a corpus index: many small files
        pq.write_table(pa.table({"x": [i]}), tmp_path / f"{i:02d}.parquet")

    def readers() -> set[str]:
        found = list_actors(
            address=ray_cluster.get_runtime_context().gcs_address,
            filters=[("class_name", "=", "FooterReader")],
            limit=10_000,
            raise_on_missing_output=False,
        )
        return {a.actor_id for a in found}

    before = readers()
    assert sorted(ray.data.read_parquet(str(tmp_path)).to_pandas()["x"]) == list(range(40))
    started = readers() - before
    assert 1 <= len(started) <= int(runtime.FOOTER_READERS), len(started)
