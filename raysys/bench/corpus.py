"""`raysys bench corpus`: the corpus index job on a synthetic corpus of N captions.

It writes a corpus of `--rows` captions (one image each) as a JSON Lines manifest or as
img2dataset-style tar shards, streamed to disk so the driver never holds it, then times the
real index job (`raysys.corpora.load_corpus` with `corpus.index_job=ray` into a fresh cache
directory: read, split, gather by bucket, generate negatives, write). Captions are drawn from
colours, objects and relations, so the negative rules fire as on real captions. Images are a
single tiny PNG (webdataset) or one shared path (manifest): the index never decodes images.

It prints rows/s and the driver's peak RSS (`ru_maxrss` of this process); `bench.json` holds
`rows`, `rows_per_s`, `driver_peak_rss_mb`. The driver's memory should not grow with the
corpus: compare the figure at 100,000 and at 1,000,000 rows.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from raysys.bench.common import peak_rss_mb, write_result
from raysys.config import Config, CorpusConfig
from raysys.corpora import load_corpus
from raysys.errors import ConfigError
from raysys.runtime import init_ray

FORMATS = ("manifest", "webdataset")
SHARD_SAMPLES = 10_000  # samples per tar shard, as img2dataset writes them
_COLOURS = ("red", "blue", "green", "yellow", "white", "black", "brown", "orange")
_NOUNS = ("dog", "cat", "car", "bus", "man", "woman", "chair", "table", "kite", "ball")
_RELATIONS = ("next to", "on top of", "behind", "in front of", "near", "under", "with")
_PLACES = ("in a park", "on a street", "in a kitchen", "at the beach", "in a field", "")
# A 1x1 PNG: the smallest real image a webdataset sample can carry.
TINY_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944415408"
    "d763f8cfc0000003010100c9fe92ef0000000049454e44ae426082"
)


def captions(rows: int, seed: int = 0) -> Iterator[str]:
    """`rows` captions of two objects in a relation, drawn with a fixed seed."""
    rng = random.Random(seed)
    for _ in range(rows):
        a, b = rng.sample(_COLOURS, 2)
        x, y = rng.choice(_NOUNS), rng.choice(_NOUNS)
        place = rng.choice(_PLACES)
        text = f"a {a} {x} {rng.choice(_RELATIONS)} a {b} {y} {place}".strip()
        yield text[0].upper() + text[1:] + "."


def write_manifest(path: Path, rows: int) -> None:
    """A JSON Lines manifest, one image id and caption per row (every row names one shared
    image file: the index reads ids and captions, never images)."""
    with path.open("w") as f:
        for n, caption in enumerate(captions(rows)):
            f.write(json.dumps({"id": f"img{n:09d}", "image": "tiny.png", "caption": caption}))
            f.write("\n")


def write_shards(root: Path, rows: int) -> None:
    """Tar shards of `SHARD_SAMPLES` samples: `<key>.png` (tiny) and `<key>.txt`."""
    root.mkdir(parents=True, exist_ok=True)
    tf = None
    for n, caption in enumerate(captions(rows)):
        if n % SHARD_SAMPLES == 0:
            if tf is not None:
                tf.close()
            tf = tarfile.open(root / f"{n // SHARD_SAMPLES:05d}.tar", "w")
        key = f"{n // SHARD_SAMPLES:05d}{n % SHARD_SAMPLES:05d}"
        for name, data in ((f"{key}.png", TINY_PNG), (f"{key}.txt", caption.encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    if tf is not None:
        tf.close()


def bench_corpus(cfg: Config, out_dir: Path, rows: int, kind: str) -> dict[str, Any]:
    """Write the corpus, index it with the Ray Data job and report the rate and memory."""
    if kind not in FORMATS:
        raise ConfigError(f"--format {kind!r}: use one of {', '.join(FORMATS)}")
    if rows < 1:
        raise ConfigError("--rows must be at least 1")
    init_ray(cfg.ray)  # before the clock: the job, not Ray's start, is timed
    with tempfile.TemporaryDirectory(prefix="raysys-bench-corpus-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        if kind == "manifest":
            write_manifest(root / "corpus.jsonl", rows)
            source = CorpusConfig(name="manifest", path=str(root / "corpus.jsonl"), id_key="id")
        else:
            write_shards(root / "shards", rows)
            source = CorpusConfig(name="webdataset", path=str(root / "shards"))
        written_s = time.perf_counter() - started
        source.index_job = "ray"
        before = peak_rss_mb()
        print(f"[bench corpus] {rows} captions as {kind} in {written_s:.1f}s", flush=True)
        started = time.perf_counter()
        corpus = load_corpus(source, str(root / "cache"))
        seconds = time.perf_counter() - started
        marker = json.loads((Path(corpus.index) / "index" / "_index.json").read_text())
    if marker["rows"] != rows:
        raise RuntimeError(f"the index holds {marker['rows']} pairs for {rows} captions")
    result = {
        "rows": rows,
        "format": kind,
        "seconds": round(seconds, 2),
        "rows_per_s": round(rows / seconds, 1),
        "driver_peak_rss_mb": round(peak_rss_mb(), 1),
        "driver_rss_before_mb": round(before, 1),
        "negatives": marker["negatives"],
        "buckets": len(marker["files"]),
    }
    record = write_result(out_dir, result)
    print(
        f"[bench corpus] indexed {rows} {kind} captions in {seconds:.1f}s: "
        f"{result['rows_per_s']:.0f} rows/s; driver peak RSS {result['driver_peak_rss_mb']:.0f} "
        f"MB ({result['driver_rss_before_mb']:.0f} MB before the job) -> {out_dir}",
        flush=True,
    )
    return record


def run(args: argparse.Namespace, cfg: Config, out: Path) -> None:
    bench_corpus(cfg, out, args.rows, args.format)
