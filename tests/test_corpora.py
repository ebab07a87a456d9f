"""Manifest corpora, from local disk: the pairs they yield, their splits and keys, and bad
input; a missing bucket on a real S3 server (moto on 127.0.0.1) fails fast. (Webdataset corpora,
which Ray Data reads, and extraction of each kind: tests/test_corpora_ray.py.)"""

from __future__ import annotations

import json
import tarfile
import time
from pathlib import Path

import pyarrow as pa
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

from raysys.config import CorpusConfig
from raysys.corpora import load_corpus, webdataset
from raysys.corpora.base import split_of
from raysys.errors import ConfigError, CorpusError


def test_manifest_shapes_and_formats_give_the_same_pairs(scenes, tmp_path) -> None:
    write_images(tmp_path, scenes)
    per_pair = jsonl(tmp_path / "pairs.jsonl", per_pair_rows(scenes))
    coco = tmp_path / "coco.parquet"  # one row per image, a list of captions
    pq.write_table(
        pa.table(
            {
                "image": [s["name"] for s in scenes],
                "caption": [s["captions"] for s in scenes],
                "negative": [["a supplied negative", None]] + [None] * (len(scenes) - 1),
            }
        ),
        coco,
    )
    csv = tmp_path / "pairs.csv"
    csv.write_text(
        "image,caption\n" + "".join(f"{r['image']},{r['caption']}\n" for r in per_pair_rows(scenes))
    )
    loaded = [load_corpus(corpus_config(p)) for p in (per_pair, coco, csv)]
    first = loaded[0].pairs
    assert first.num_rows == 2 * N_IMAGES
    assert first["pair_id"].to_pylist()[:2] == ["img/syn-000000.png#0", "img/syn-000000.png#1"]
    for corpus in loaded[1:]:
        for column in ("pair_id", "image_id", "caption", "split"):
            assert corpus.pairs[column].to_pylist() == first[column].to_pylist(), column
    # Relative image paths resolve against the manifest's directory.
    uris = loaded[0].images["uri"].to_pylist()
    assert uris[0] == str(tmp_path / "img" / "syn-000000.png") and len(uris) == N_IMAGES
    # Supplied negatives are kept and marked; the others are one-edit generated ones.
    for corpus in loaded[:2]:
        sources = corpus.pairs["negative_source"].to_pylist()
        negatives = corpus.pairs["negative"].to_pylist()
        captions = corpus.pairs["caption"].to_pylist()
        assert (negatives[0], sources[0]) == ("a supplied negative", "corpus")
        assert all(s.startswith("generated:") for s in sources[1:])
        assert all(n != c for n, c in zip(negatives, captions, strict=True))
    # Splits: from a hash of the image id, the same for every caption of an image.
    split = dict(zip(first["image_id"].to_pylist(), first["split"].to_pylist(), strict=False))
    for image_id, s in split.items():
        assert s == split_of(image_id, 0, 0.1, 0.1)
    assert len(set(first["split"].to_pylist())) > 1 or N_IMAGES < 5


def test_corpus_key_follows_the_content(scenes, tmp_path) -> None:
    rows = per_pair_rows(scenes)
    path = jsonl(tmp_path / "m.jsonl", rows)
    key = load_corpus(corpus_config(path)).key
    assert load_corpus(corpus_config(path)).key == key  # stable
    jsonl(path, [dict(rows[0], caption="an edited caption")] + rows[1:])
    edited = load_corpus(corpus_config(path)).key
    assert edited != key
    assert load_corpus(corpus_config(path, limit=3)).key not in (key, edited)
    assert load_corpus(corpus_config(path, limit=3)).images.num_rows == 3


def test_split_column_is_used_and_checked(scenes, tmp_path) -> None:
    rows = [
        {"image": s["name"], "caption": s["captions"][0], "split": sp}
        for s, sp in zip(scenes, ["train", "validation", "test", "restval"] * 3, strict=True)
    ]
    corpus = load_corpus(corpus_config(jsonl(tmp_path / "m.jsonl", rows)))
    assert corpus.pairs["split"].to_pylist()[:4] == ["train", "val", "test", "train"]
    rows[1]["split"] = "holdout"
    with pytest.raises(CorpusError, match="split 'holdout' is not one of"):
        load_corpus(corpus_config(jsonl(tmp_path / "bad.jsonl", rows)))


def test_manifest_errors_say_what_to_fix(scenes, tmp_path) -> None:
    path = jsonl(tmp_path / "m.jsonl", [{"file": "a.png", "text": "a cat"}])
    with pytest.raises(ConfigError, match="no column 'image'.*columns: file, text"):
        load_corpus(corpus_config(path))
    with pytest.raises(ConfigError, match="unknown manifest format '.txt'"):
        load_corpus(corpus_config(tmp_path / "m.txt"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_corpus(corpus_config(tmp_path / "missing.jsonl"))
    two = jsonl(
        tmp_path / "n.jsonl", [{"image": "a.png", "caption": ["a", "b"], "negative": ["c"]}]
    )
    with pytest.raises(CorpusError, match="2 captions but 1 negatives"):
        load_corpus(corpus_config(two))
    with pytest.raises(ConfigError, match="unknown corpus 'coco'"):
        load_corpus(CorpusConfig(name="coco"))


def test_unreachable_bucket_fails_fast(s3_server, monkeypatch) -> None:
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    started = time.monotonic()
    with pytest.raises(ConfigError, match="does not exist"):
        load_corpus(corpus_config("s3://no-such-bucket-xyz/coco/m.jsonl"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_corpus(corpus_config("s3://no-such-bucket-xyz/wds", name="webdataset"))
    assert time.monotonic() - started < 30


def test_coco_captions_become_a_manifest(scenes, tmp_path) -> None:
    from raysys.corpora.manifest import coco_rows

    write_images(tmp_path, scenes[:3])
    annotations = {
        "images": [
            {"id": 7, "file_name": "syn-000001.png"},
            {"id": 3, "file_name": "syn-000000.png"},
        ]
        + [{"id": 9, "file_name": "syn-000002.png"}],
        "annotations": [
            {"id": 2, "image_id": 3, "caption": "second "},
            {"id": 1, "image_id": 3, "caption": "first"},
            {"id": 5, "image_id": 7, "caption": "only"},
        ],
    }
    rows = coco_rows(annotations, "img")
    assert rows == [
        {"image": "img/syn-000000.png", "caption": ["first", "second"], "id": "3"},
        {"image": "img/syn-000001.png", "caption": ["only"], "id": "7"},
    ]  # image 9 has no captions
    corpus = load_corpus(corpus_config(jsonl(tmp_path / "coco.jsonl", rows), id_key="id"))
    assert corpus.pairs["pair_id"].to_pylist() == ["3#0", "3#1", "7#0"]
    assert corpus.images["uri"].to_pylist()[0] == str(tmp_path / "img" / "syn-000000.png")


def test_manifest_rows_of_every_plausible_shape(tmp_path) -> None:
    """What real manifests hold: mixed caption shapes, ids with leading zeros, blank cells,
    a row without a caption, Hugging Face `{bytes, path}` image structs, `..` paths."""
    from raysys.corpora.manifest import _image_uri

    rows = [
        {"image": "a.png", "caption": "one caption", "id": "007"},
        {"image": "b.png", "caption": ["two", "captions"], "id": "7"},
        {"image": "c.png", "caption": None, "negative": "unused", "id": "8"},
    ]
    corpus = load_corpus(corpus_config(jsonl(tmp_path / "m.jsonl", rows), id_key="id"))
    assert corpus.pairs["pair_id"].to_pylist() == ["007#0", "7#0", "7#1", "8#0"]
    assert corpus.pairs["caption"].to_pylist()[3] is None  # the text pass rejects it
    (tmp_path / "m.csv").write_text("image,caption,id,split\na.png,x,007,\nb.png,y,7,test\n")
    csv = load_corpus(corpus_config(tmp_path / "m.csv", id_key="id"))
    assert csv.pairs["image_id"].to_pylist() == ["007", "7"]
    assert csv.pairs["split"].to_pylist()[1] == "test"
    clash = jsonl(tmp_path / "clash.jsonl", [rows[0], dict(rows[1], id="007")])
    with pytest.raises(CorpusError, match="id '007' names two different images"):
        load_corpus(corpus_config(clash, id_key="id"))
    pq.write_table(
        pa.table({"image": [{"bytes": b"\x89PNG-ish", "path": "x.png"}], "caption": ["a cat"]}),
        tmp_path / "hf.parquet",
    )
    hf = load_corpus(corpus_config(tmp_path / "hf.parquet"))
    assert hf.images["image"].to_pylist() == [b"\x89PNG-ish"]
    assert _image_uri("../train2017/x.jpg", "s3://b/coco/annotations") == (
        "s3://b/coco/train2017/x.jpg"
    )
    assert _image_uri("./x.jpg", str(tmp_path)) == str(tmp_path / "x.jpg")


def test_synthetic_corpus_carries_labels_tasks_and_its_overlap() -> None:
    from raysys.corpora import negative_counts
    from raysys.corpora.synthetic import NEGATIVE_EDITS

    corpus = load_corpus(CorpusConfig(name="synthetic", size=60, image_size=32, seed=4))
    pairs = corpus.pairs
    assert pairs.schema.field("labels").type == pa.string()
    assert all(json.loads(v)["arrangement"] for v in pairs["labels"].to_pylist())
    assert set(corpus.zeroshot) == {"arrangement", "large_shape", "large_colour"}
    assert set(negative_counts(pairs)) <= {f"exact:{e}" for e in NEGATIVE_EDITS}
    assert set(corpus.info["overlap"].values()) == {0}
    assert corpus.info["split"]["pairs"] == {"train": 48, "val": 6, "test": 6}
    json.dumps(corpus.info)  # it goes into the cache manifest


def test_pairs_table_keeps_labels_only_when_rows_have_them(scenes, tmp_path) -> None:
    from raysys.corpora.base import PAIR_COLUMNS, pairs_table
    from raysys.data import cache

    rows = [{"pair_id": "p0", "caption": "a"}, {"pair_id": "p1", "caption": "b"}]
    assert pairs_table(rows).column_names == list(PAIR_COLUMNS)
    rows[1]["labels"] = '{"task": "x"}'
    table = pairs_table(rows)
    assert table["labels"].to_pylist() == [None, '{"task": "x"}']
    cache.write_pairs(tmp_path / "corpus", table)
    assert cache.read_pairs(tmp_path / "corpus")["labels"].to_pylist() == [None, '{"task": "x"}']
    write_images(tmp_path, scenes)
    plain = load_corpus(corpus_config(jsonl(tmp_path / "m.jsonl", per_pair_rows(scenes))))
    assert "labels" not in plain.pairs.column_names and plain.zeroshot == {}


def test_inline_images_survive_a_second_load_from_the_cache(scenes, tmp_path) -> None:
    """The index keeps an inline image's digest, not its bytes: the corpus loaded again once
    its index exists (a resumed image pass, a second vision model) still gives the image pass
    the images themselves."""
    from raysys.extract import image_rows

    path = tmp_path / "inline.parquet"
    images = [s["image"] for s in scenes]
    pq.write_table(pa.table({"image": images, "caption": [s["captions"] for s in scenes]}), path)
    cache_dir = str(tmp_path / "cache")
    first = load_corpus(corpus_config(path), cache_dir)
    again = load_corpus(corpus_config(path), cache_dir)  # the index is there now
    assert again.index == first.index and again.key == first.key
    for corpus in (first, again):
        rows = image_rows(corpus)
        assert rows.table is not None, "the image pass must get the bytes, not index values"
        assert sorted(rows.table["image"].to_pylist()) == sorted(images)


class _TextMembers:
    """Stands in for `ray.data.read_webdataset` over the shards' text members (no Ray in
    this file): one sample per key, its members' bytes by suffix."""

    def __init__(self, uris: list[str]) -> None:
        self.uris = uris

    def iter_rows(self):
        for uri in self.uris:
            samples: dict[str, dict] = {}
            with tarfile.open(uri) as tf:
                for member in tf.getmembers():
                    key, suffix = member.name.split(".", 1)
                    if suffix in webdataset.TEXT_SUFFIXES:
                        sample = samples.setdefault(key, {"__key__": key})
                        sample[suffix] = tf.extractfile(member).read()
            yield from samples.values()


def test_a_limited_webdataset_reads_the_same_images_once_indexed(
    scenes, tmp_path, monkeypatch
) -> None:
    """With `corpus.limit`, the image pass of a corpus loaded from its index (a resumed or
    second image pass) reads the limit's images from the shards the limit read, as the first
    load does, not every sample of every shard (which the pass then refused as foreign)."""
    write_shards(tmp_path / "shards", scenes)  # 12 images, 5 per shard: 3 shards
    monkeypatch.setattr(webdataset, "texts", lambda cfg, uris: _TextMembers(uris))
    opened: list[tuple[list[str], list[str] | None]] = []

    def read_images(cfg, uris, keep):
        opened.append(
            ([Path(u).name for u in uris], None if keep is None else sorted(keep.to_pylist()))
        )

    monkeypatch.setattr(webdataset, "read_images", read_images)
    cfg = corpus_config(tmp_path / "shards", name="webdataset", limit=6)
    for _ in range(2):  # the first load writes the index, the second reads it
        load_corpus(cfg, str(tmp_path / "cache")).read_images()
    first, again = opened
    assert first[0] == ["00000.tar", "00001.tar"]  # 10 samples hold the limit's 6
    assert first[1] is not None and len(first[1]) == 6
    assert again == first


def test_webdataset_key_follows_label_key_only_when_set(scenes, tmp_path) -> None:
    """An index built without labels is not reused once `corpus.label_key` is set (its
    zero-shot labels would silently be missing); unset, the key is the one it always was,
    so existing caches stay valid."""
    from raysys.corpora.base import settings
    from raysys.data.cache import content_key

    write_shards(tmp_path / "shards", scenes)
    path = str(tmp_path / "shards")
    plain = corpus_config(path, name="webdataset")
    keys = {
        label: webdataset.fingerprint(corpus_config(path, name="webdataset", label_key=label))[0]
        for label in ("", "label", "class")
    }
    assert len(set(keys.values())) == 3
    shards = webdataset.shard_files(path)
    before = content_key("webdataset", webdataset.WEBDATASET_VERSION, shards, settings(plain))
    assert keys[""] == before
