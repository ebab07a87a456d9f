"""The corpus index's plain parts, without Ray: a manifest read in chunks gives the rows it
gives read whole, images are gathered across rows, the bucketed index round-trips, and a
`corpus.limit` reads only the head of a manifest. (The Ray Data job itself:
tests/test_corpora_ray.py.)"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from corpus_files import corpus_config, jsonl, per_pair_rows, write_images

from raysys.corpora import load_corpus, manifest
from raysys.corpora.base import SOURCE_SCHEMA, gather_images, source_row
from raysys.data import index
from raysys.data.pairs import buckets
from raysys.errors import CorpusError


def _rows(scenes) -> list[dict]:
    """Flattened rows with labels and a few given splits: what gathering must respect."""
    rows = per_pair_rows(scenes)
    for i, r in enumerate(rows):
        r |= {"label": f"cls{i % 2}"} if i % 2 == 0 else {}
        r |= {"split": "test"} if i % 5 == 0 else {}
    return rows


def test_manifest_chunks_give_the_rows_of_a_whole_read(scenes, tmp_path, monkeypatch) -> None:
    """Byte ranges that cut lines anywhere: each line is read once, by the range it starts in."""
    path = jsonl(tmp_path / "m.jsonl", _rows(scenes))
    cfg = corpus_config(path, label_key="label")
    monkeypatch.setattr(manifest, "CHUNK_BYTES", 97)  # far shorter than a line
    chunks = manifest.chunks(cfg, path.stat().st_size)
    assert len(chunks) > 10
    parts = pa.concat_tables(manifest.read_chunk(cfg, c) for c in chunks)
    whole = manifest.read_chunk(cfg, {"kind": "whole"})
    columns = [c for c in SOURCE_SCHEMA.names if c != "order"]
    assert parts.select(columns).to_pylist() == whole.select(columns).to_pylist()
    offsets = parts["order"].to_pylist()  # byte offsets: increasing, the first at 0
    assert offsets[0] == 0 and offsets == sorted(offsets) and len(set(offsets)) == len(offsets)


def test_gathering_keeps_row_order_and_refuses_conflicts() -> None:
    def row(order: int, image_id: str, image: str, captions: list, split=None, label=None):
        return source_row(order, image_id, image, captions, [], split, label, f"row {order}")

    rows = [
        row(5, "b", "b.png", ["b late"]),
        row(1, "b", "b.png", ["b first", "b second"], split="val", label="x"),
        row(3, "a", "a.png", [], split="test"),  # no caption: one pair the text pass rejects
    ]
    pairs = gather_images(pa.Table.from_pylist(rows, schema=SOURCE_SCHEMA), 0, 0.1, 0.1)
    assert pairs["pair_id"].to_pylist() == ["b#0", "b#1", "b#2", "a#0"]  # by first row
    assert pairs["caption"].to_pylist() == ["b first", "b second", "b late", None]
    assert pairs["split"].to_pylist() == ["val"] * 3 + ["test"]
    assert pairs["first"].to_pylist() == [True, False, False, True]
    assert pairs["label"].to_pylist()[:3] == ["x"] * 3
    conflict = [row(1, "c", "c.png", ["one"]), row(2, "c", "other.png", ["two"])]
    with pytest.raises(CorpusError, match="names two different images"):
        gather_images(pa.Table.from_pylist(conflict, schema=SOURCE_SCHEMA), 0, 0.1, 0.1)
    labels = [row(1, "d", "d.png", ["x"], label="cat"), row(2, "d", "d.png", ["y"], label="dog")]
    with pytest.raises(CorpusError, match="has two labels"):
        gather_images(pa.Table.from_pylist(labels, schema=SOURCE_SCHEMA), 0, 0.1, 0.1)
    twice = [row(0, "e", "", ["x"]), row(0, "e", "", ["y"])]
    with pytest.raises(CorpusError, match="key 'e' twice"):
        gather_images(
            pa.Table.from_pylist(twice, schema=SOURCE_SCHEMA), 0, 0.1, 0.1, "key {image_id!r} twice"
        )


def test_index_is_written_by_bucket_and_read_back(scenes, tmp_path) -> None:
    corpus = load_corpus(corpus_config(jsonl(tmp_path / "m.jsonl", _rows(scenes))))
    marker = index.write_index(tmp_path / "corpus", corpus.pairs)
    assert marker["rows"] == corpus.pairs.num_rows and marker["images"] == len(scenes)
    splits = corpus.pairs["split"].to_pylist()
    assert marker["splits"] == {s: splits.count(s) for s in sorted(set(splits))}
    back = index.read_index(tmp_path / "corpus")
    assert back.num_rows == corpus.pairs.num_rows
    assert sorted(back["pair_id"].to_pylist()) == sorted(corpus.pairs["pair_id"].to_pylist())
    # Every file holds one bucket, the bucket of each pair's image id.
    expected = buckets(back["image_id"].to_numpy(zero_copy_only=False))
    assert np.array_equal(back["bucket"].to_numpy(), expected)
    for name in marker["files"]:
        one = index.read_index(tmp_path / "corpus", wanted=[int(name[7:9])])
        assert set(one["bucket"].to_pylist()) == {int(name[7:9])}
    test = index.read_index(tmp_path / "corpus", ["pair_id"], split="test")
    assert test.column_names == ["pair_id"] and test.num_rows == marker["splits"]["test"]
    # A file altered after the marker: a clear error, not a wrong index.
    victim = tmp_path / "corpus" / "index" / sorted(marker["files"])[0]
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(Exception, match="missing or altered"):
        index.read_index(tmp_path / "corpus")


def test_limit_reads_only_the_head_of_a_manifest(scenes, tmp_path) -> None:
    """Nothing past the first row of image `limit + 1` is read: a broken line there is never
    parsed."""
    rows = per_pair_rows(scenes)  # two rows per image, in image order
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:8]) + "{not json\n")
    corpus = load_corpus(corpus_config(path, limit=3))
    assert corpus.pairs.num_rows == 6 and corpus.images.num_rows == 3
    with pytest.raises(CorpusError, match="is not JSON"):
        load_corpus(corpus_config(path))


def test_a_corpus_in_its_index_only_finds_its_images_and_thumbnails(scenes, tmp_path) -> None:
    """A large corpus keeps its pairs in the index: its images (each image's first pair) and
    a few thumbnails are read from the index files, those of the wanted buckets only."""
    from raysys.corpora.base import Corpus

    write_images(tmp_path, scenes)
    small = load_corpus(corpus_config(jsonl(tmp_path / "m.jsonl", per_pair_rows(scenes))))
    index.write_index(tmp_path / "corpus", small.pairs)
    large = Corpus(small.key, None, index=str(tmp_path / "corpus"))
    assert sorted(large.image_ids.to_pylist()) == sorted(small.images["id"].to_pylist())
    wanted = [scenes[3]["name"], scenes[0]["name"]]
    assert large.thumbnails(wanted) == [scenes[3]["image"], scenes[0]["image"]]
