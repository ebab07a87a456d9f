"""Manifest and webdataset corpora, from local disk and from a real S3 server (moto on
127.0.0.1): the pairs they yield, their splits and keys, bad input, and extraction of each."""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysys import config, storage
from raysys.config import CorpusConfig
from raysys.corpora import load_corpus
from raysys.corpora.base import split_of
from raysys.corpora.synthetic import SyntheticConfig, generate
from raysys.data import cache
from raysys.errors import ConfigError, CorpusError

N_IMAGES = 12


@pytest.fixture(scope="module")
def scenes() -> list[dict]:
    """Real PNGs with captions: the synthetic renderer's, two captions per image."""
    rows = generate(SyntheticConfig(size=2 * N_IMAGES, image_size=64, captions_per_image=2))
    by_image: dict[str, dict] = {}
    for r in rows:
        entry = by_image.setdefault(r["image_id"], {"image": r["image"], "captions": []})
        entry["captions"].append(r["caption"])
    return [{"name": f"img/{k}.png", **v} for k, v in by_image.items()]


def _write_images(root: Path, scenes: list[dict]) -> None:
    (root / "img").mkdir(parents=True, exist_ok=True)
    for s in scenes:
        (root / s["name"]).write_bytes(s["image"])


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _per_pair_rows(scenes: list[dict]) -> list[dict]:
    """One row per (image, caption), the flattened-COCO shape; the first pair supplies its
    own negative."""
    rows = [{"image": s["name"], "caption": c} for s in scenes for c in s["captions"]]
    rows[0]["negative"] = "a supplied negative"
    return rows


def _corpus(path: str | Path, **kw) -> CorpusConfig:
    name = kw.pop("name", "manifest")
    return CorpusConfig(name=name, path=str(path), **kw)


def test_manifest_shapes_and_formats_give_the_same_pairs(scenes, tmp_path) -> None:
    _write_images(tmp_path, scenes)
    per_pair = _jsonl(tmp_path / "pairs.jsonl", _per_pair_rows(scenes))
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
        "image,caption\n"
        + "".join(f"{r['image']},{r['caption']}\n" for r in _per_pair_rows(scenes))
    )
    loaded = [load_corpus(_corpus(p)) for p in (per_pair, coco, csv)]
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
    rows = _per_pair_rows(scenes)
    path = _jsonl(tmp_path / "m.jsonl", rows)
    key = load_corpus(_corpus(path)).key
    assert load_corpus(_corpus(path)).key == key  # stable
    _jsonl(path, [dict(rows[0], caption="an edited caption")] + rows[1:])
    edited = load_corpus(_corpus(path)).key
    assert edited != key
    assert load_corpus(_corpus(path, limit=3)).key not in (key, edited)
    assert load_corpus(_corpus(path, limit=3)).images.num_rows == 3


def test_split_column_is_used_and_checked(scenes, tmp_path) -> None:
    rows = [
        {"image": s["name"], "caption": s["captions"][0], "split": sp}
        for s, sp in zip(scenes, ["train", "validation", "test", "restval"] * 3, strict=True)
    ]
    corpus = load_corpus(_corpus(_jsonl(tmp_path / "m.jsonl", rows)))
    assert corpus.pairs["split"].to_pylist()[:4] == ["train", "val", "test", "train"]
    rows[1]["split"] = "holdout"
    with pytest.raises(CorpusError, match="split 'holdout' is not one of"):
        load_corpus(_corpus(_jsonl(tmp_path / "bad.jsonl", rows)))


def test_manifest_errors_say_what_to_fix(scenes, tmp_path) -> None:
    path = _jsonl(tmp_path / "m.jsonl", [{"file": "a.png", "text": "a cat"}])
    with pytest.raises(ConfigError, match="no column 'image'.*columns: file, text"):
        load_corpus(_corpus(path))
    with pytest.raises(ConfigError, match="unknown manifest format '.txt'"):
        load_corpus(_corpus(tmp_path / "m.txt"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_corpus(_corpus(tmp_path / "missing.jsonl"))
    two = _jsonl(
        tmp_path / "n.jsonl", [{"image": "a.png", "caption": ["a", "b"], "negative": ["c"]}]
    )
    with pytest.raises(CorpusError, match="2 captions but 1 negatives"):
        load_corpus(_corpus(two))
    with pytest.raises(ConfigError, match="unknown corpus 'coco'"):
        load_corpus(CorpusConfig(name="coco"))


def _write_shards(root: Path, scenes: list[dict], per_shard: int = 5) -> list[Path]:
    """img2dataset's layout: `<key>.jpg|png` + `<key>.txt` + `<key>.json` per sample; the
    last sample of each shard carries its captions in the .json only (COCO style, a list)."""
    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for s0 in range(0, len(scenes), per_shard):
        path = root / f"{s0 // per_shard:05d}.tar"
        with tarfile.open(path, "w") as tf:
            chunk = scenes[s0 : s0 + per_shard]
            for k, scene in enumerate(chunk):
                key = f"{s0 // per_shard:05d}{k:04d}"
                members = {f"{key}.png": scene["image"]}
                if k < len(chunk) - 1:
                    members[f"{key}.txt"] = scene["captions"][0].encode()
                    members[f"{key}.json"] = json.dumps({"key": key}).encode()
                else:
                    members[f"{key}.json"] = json.dumps({"caption": scene["captions"]}).encode()
                for name, data in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        shards.append(path)
    return shards


def test_webdataset_shards_read_with_ray_data(ray_cluster, scenes, tmp_path) -> None:
    _write_shards(tmp_path / "shards", scenes)
    corpus = load_corpus(_corpus(tmp_path / "shards", name="webdataset"))
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
    limited = load_corpus(_corpus(f"{tmp_path}/shards/0000[01].tar", name="webdataset", limit=6))
    assert len(limited.image_ids) == 6
    assert len(limited.read_images().take_all()) == 6


def test_manifest_extraction_rejects_unreadable_files(ray_cluster, scenes, tmp_path) -> None:
    """End to end through the image pass: a missing file, a corrupt one and a row with no
    image are counted and recorded as rejects with their reasons; the rest are cached."""
    from raysys.extract import extract

    _write_images(tmp_path, scenes)
    (tmp_path / "img" / "corrupt.png").write_bytes(b"not a png")
    rows = _per_pair_rows(scenes)
    rows += [
        {"image": "img/missing.png", "caption": "a red circle"},
        {"image": "img/corrupt.png", "caption": "a blue square"},
        {"caption": "a green triangle"},
    ]
    path = _jsonl(tmp_path / "m.jsonl", rows)
    overrides = [
        "corpus.name=manifest",
        f"corpus.path={path}",
        f"extract.cache_dir={tmp_path / 'cache'}",
        "extract.image_size=64",
        "extract.max_reject_fraction=0.5",
    ]
    ext = extract(config.load(None, overrides))
    assert ext.image_manifest["rows"] == N_IMAGES and ext.image_manifest["rejects"] == 3
    rejects = pq.read_table(ext.image_dir / cache.REJECTS).to_pydict()
    reasons = dict(zip(rejects["id"], rejects["reason"], strict=True))
    assert reasons["img/missing.png"].startswith("missing or unreadable image file")
    assert "img/corrupt.png" in reasons and reasons["row-000000026"] == "no image in the corpus row"
    assert ext.image_manifest["corpus"]["kind"] == "manifest"
    assert ext.text_manifest["corpus"]["negatives"]["corpus"] == 1
    ids = cache.read_ids(ext.image_dir, ["L00"])
    assert sorted(ids) == sorted(s["name"] for s in scenes)


@pytest.mark.slow
def test_s3_manifest_and_shards_extract(ray_cluster, s3_server, scenes, tmp_path) -> None:
    """Manifest, its images and tar shards all on the S3 server: both corpora load and the
    manifest's images are read from S3 by the image pass's CPU tasks."""
    from raysys.extract import extract

    bucket = s3_server.make_bucket("raysys-corpora")
    _write_images(tmp_path / "local", scenes)
    _jsonl(tmp_path / "local" / "m.jsonl", _per_pair_rows(scenes))
    storage.upload_dir(tmp_path / "local", f"{bucket}/coco")
    _write_shards(tmp_path / "shards", scenes)
    storage.upload_dir(tmp_path / "shards", f"{bucket}/wds")

    shards = load_corpus(_corpus(f"{bucket}/wds", name="webdataset"))
    assert len(shards.image_ids) == N_IMAGES
    images = {r["id"]: r["image"] for r in shards.read_images().take_all()}
    assert images["000000000"] == scenes[0]["image"]

    # The cache on S3 too: extraction works in a local mirror and publishes finished stages.
    overrides = [
        "corpus.name=manifest",
        f"corpus.path={bucket}/coco/m.jsonl",
        f"extract.cache_dir={bucket}/cache",
        f"extract.mirror_dir={tmp_path / 'mirror1'}",
        "extract.image_size=64",
    ]
    ext = extract(config.load(None, overrides))
    assert ext.image_manifest["rows"] == N_IMAGES and ext.image_manifest["rejects"] == 0
    ids, cols = cache.read_layers(ext.image_dir, [ext.image_manifest["layers"][-1]])
    assert sorted(ids) == sorted(s["name"] for s in scenes)
    assert np.isfinite(next(iter(cols.values())).astype(np.float32)).all()
    key = ext.corpus_dir.name
    for stage in (ext.image_dir, ext.text_dir):
        rel = stage.relative_to(ext.corpus_dir.parent).as_posix()
        assert json.loads(storage.read_text(f"{bucket}/cache/{rel}/manifest.json"))["rows"] > 0
    assert storage.exists(f"{bucket}/cache/{key}/pairs.parquet")

    # A finished stage whose upload never completed is published by the next run.
    rel = ext.image_dir.relative_to(ext.corpus_dir.parent).as_posix()
    fs, path = storage.fsspec_fs(f"{bucket}/cache/{rel}/manifest.json")
    fs.rm_file(path)
    fs.pipe_file(path.replace("manifest.json", "part-stray.parquet"), b"a half-published part")
    extract(config.load(None, overrides))
    assert storage.exists(f"{bucket}/cache/{rel}/manifest.json")

    # Another machine (another mirror) downloads the finished stages instead of recomputing,
    # and only the files their manifests list (not the stray part).
    again = extract(
        config.load(None, overrides[:3] + [f"extract.mirror_dir={tmp_path / 'm2'}"] + overrides[4:])
    )
    assert again.image_dir.is_relative_to(tmp_path / "m2")
    assert again.image_manifest == ext.image_manifest  # the same stage, not a new pass
    assert cache.read_ids(again.image_dir, ["L00"]).tolist() == ids.tolist()
    assert not (again.image_dir / "part-stray.parquet").exists()


def test_unreachable_bucket_fails_fast(s3_server, monkeypatch) -> None:
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    started = time.monotonic()
    with pytest.raises(ConfigError, match="does not exist"):
        load_corpus(_corpus("s3://no-such-bucket-xyz/coco/m.jsonl"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_corpus(_corpus("s3://no-such-bucket-xyz/wds", name="webdataset"))
    assert time.monotonic() - started < 30


def test_webdataset_extraction_streams_and_resumes(ray_cluster, scenes, tmp_path) -> None:
    """The image pass reads the shards through Ray Data (never the driver); a pass that lost
    its manifest and some parts (as a killed one would) embeds only the missing ids. (The
    image pass alone: the text pass of a webdataset corpus is the in-memory one.)"""
    from raysys.backbones import configured_backbone
    from raysys.extract import image_rows, run_pass

    _write_shards(tmp_path / "shards", scenes)
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
    manifest = run_pass(backbone, image_rows(corpus), out, cfg.extract, {})
    assert manifest["rows"] == N_IMAGES and manifest["rejects"] == 0
    parts = sorted(out.glob("part-*.parquet"))
    assert len(parts) >= 3
    lost = cache.ids_in([str(p) for p in parts[:2]])
    for p in parts[:2]:
        p.unlink()
    (out / cache.MANIFEST).unlink()
    again = run_pass(backbone, image_rows(corpus), out, cfg.extract, {})
    assert again["resumed_rows"] == N_IMAGES - len(lost)
    ids = cache.read_ids(out, ["L00"])
    assert sorted(ids) == sorted(str(i) for i in corpus.image_ids.to_pylist())


def test_coco_captions_become_a_manifest(scenes, tmp_path) -> None:
    from raysys.corpora.manifest import coco_rows

    _write_images(tmp_path, scenes[:3])
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
    corpus = load_corpus(_corpus(_jsonl(tmp_path / "coco.jsonl", rows), id_key="id"))
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
    corpus = load_corpus(_corpus(_jsonl(tmp_path / "m.jsonl", rows), id_key="id"))
    assert corpus.pairs["pair_id"].to_pylist() == ["007#0", "7#0", "7#1", "8#0"]
    assert corpus.pairs["caption"].to_pylist()[3] is None  # the text pass rejects it
    (tmp_path / "m.csv").write_text("image,caption,id,split\na.png,x,007,\nb.png,y,7,test\n")
    csv = load_corpus(_corpus(tmp_path / "m.csv", id_key="id"))
    assert csv.pairs["image_id"].to_pylist() == ["007", "7"]
    assert csv.pairs["split"].to_pylist()[1] == "test"
    clash = _jsonl(tmp_path / "clash.jsonl", [rows[0], dict(rows[1], id="007")])
    with pytest.raises(CorpusError, match="id '007' names two different images"):
        load_corpus(_corpus(clash, id_key="id"))
    pq.write_table(
        pa.table({"image": [{"bytes": b"\x89PNG-ish", "path": "x.png"}], "caption": ["a cat"]}),
        tmp_path / "hf.parquet",
    )
    hf = load_corpus(_corpus(tmp_path / "hf.parquet"))
    assert hf.images["image"].to_pylist() == [b"\x89PNG-ish"]
    assert _image_uri("../train2017/x.jpg", "s3://b/coco/annotations") == (
        "s3://b/coco/train2017/x.jpg"
    )
    assert _image_uri("./x.jpg", str(tmp_path)) == str(tmp_path / "x.jpg")


def test_webdataset_key_is_stable_and_duplicates_refused(ray_cluster, scenes, tmp_path) -> None:
    shards = tmp_path / "shards"
    _write_shards(shards, scenes, per_shard=3)
    cfg = _corpus(shards, name="webdataset")
    assert len({load_corpus(cfg).key for _ in range(3)}) == 1  # Ray Data's order varies
    with pytest.raises(ConfigError, match="brace ranges are not expanded"):
        load_corpus(_corpus(f"{shards}/{{00000..00003}}.tar", name="webdataset"))
    _write_shards(tmp_path / "twice", scenes[:3], per_shard=3)
    (tmp_path / "twice" / "00000.tar").rename(tmp_path / "twice" / "copy.tar")
    _write_shards(tmp_path / "twice", scenes[:3], per_shard=3)
    with pytest.raises(CorpusError, match="sample keys appear more than once"):
        load_corpus(_corpus(tmp_path / "twice", name="webdataset", limit=1))
