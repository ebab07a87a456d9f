"""The corpus index as a Ray Data job: source rows -> pairs, splits, negatives, by bucket.

A large manifest or a set of tar shards is never held by the driver. Ray Data reads the
source in independent tasks (byte ranges of a JSON Lines manifest, row groups of a Parquet
one, the text members of each shard), each row becomes a source row (`base.SOURCE_SCHEMA`)
tagged with its image's bucket (`pairs.buckets`), and a `groupby("bucket").map_groups` hands
each bucket, every row of its images together, to `bucket_job`: gather each image's captions
into pairs (`base.gather_images`: pair ids, the image's split), generate the missing hard
negatives (`negatives.negatives_table`) and write the bucket's file of the index
(`raysys.data.index`) on the cache URI. Only a summary per bucket (counts, checksum) comes
back to the driver, which writes the index's marker last.

The same plain functions build a small corpus's pairs in one process
(`raysys.corpora.load_corpus` without a cache, a `corpus.limit`, inline images), so both
paths give the same pairs.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from raysys.config import INDEX_JOBS, CorpusConfig
from raysys.corpora import manifest, webdataset
from raysys.corpora.base import finish_pairs, gather_images
from raysys.corpora.negatives import negatives_table
from raysys.data import index
from raysys.data.pairs import BUCKETS
from raysys.errors import ConfigError, RaysysError

PARTITION_BYTES = 32 << 20  # source bytes per shuffle partition of the bucket groupby
READ_CPUS = 0.5  # per read / bucket task: what the 2-core default leaves free for the rest


AUTO_BYTES = 64 << 20  # `index_job=auto`: sources larger than this are indexed by Ray Data


def streamed(cfg: CorpusConfig, source_bytes: int) -> bool:
    """Whether the Ray Data job builds this corpus's index (`corpus.index_job`): a whole
    manifest of image paths or whole shards. A `corpus.limit` reads only its head and
    inline images ride with their rows, so those are read in one process
    (`manifest.load`, `webdataset.load`), as is a small source under `auto`."""
    if cfg.index_job not in INDEX_JOBS:
        raise ConfigError(f"corpus.index_job={cfg.index_job!r}; use one of {', '.join(INDEX_JOBS)}")
    if cfg.limit or cfg.name not in ("manifest", "webdataset") or cfg.index_job == "local":
        return False
    if cfg.name == "manifest" and manifest.inline_images(cfg):
        return False
    return cfg.index_job == "ray" or source_bytes > AUTO_BYTES


class AddBucket:
    """Source rows -> the same rows with their image's bucket, the groupby key."""

    def __call__(self, rows: pa.Table) -> pa.Table:
        return index.with_buckets(rows)


class ReadChunks:
    """A manifest's read tasks (`manifest.chunks`) -> their source rows."""

    def __init__(self, cfg: CorpusConfig) -> None:
        self.cfg = cfg

    def __call__(self, batch: pa.Table) -> pa.Table:
        chunks = [json.loads(c) for c in batch["chunk"].to_pylist()]
        tables = [manifest.read_chunk(self.cfg, chunk) for chunk in chunks]
        return pa.concat_tables(tables)


def bucket_job(rows: pa.Table, cfg: CorpusConfig, corpus_dir: str, repeats: str) -> pa.Table:
    """One bucket's source rows -> its index file; returns the bucket's summary row."""
    bucket = int(rows["bucket"][0].as_py())
    gathered = gather_images(
        rows.drop_columns(["bucket"]),
        cfg.seed,
        cfg.val_fraction,
        cfg.test_fraction,
        repeats=repeats,
    )
    pairs = negatives_table(finish_pairs(gathered, cfg.label_key, image=cfg.name == "manifest"))
    part = index.write_bucket(corpus_dir, bucket, index.with_buckets(pairs))
    return pa.table({"summary": [json.dumps(part)], "bucket": [bucket]})


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """A raysys error raised inside a Ray Data task (a bad row, a repeated key) reaches the
    driver wrapped in Ray's task errors: raise it as itself, so the user reads what to fix."""
    try:
        yield
    except RaysysError:
        raise
    except Exception as e:
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, RaysysError):
            cause = cause.__cause__ or getattr(cause, "cause", None)
        if cause is None:
            raise
        raise type(cause)(str(cause)) from None


def _progress(summaries: Iterator[dict[str, Any]], started: float) -> Iterator[dict[str, Any]]:
    """The buckets' summaries as they finish, with a progress line every 8 buckets."""
    pairs = 0
    for n, row in enumerate(summaries, 1):
        part = json.loads(row["summary"])
        pairs += part["rows"]
        if n % 8 == 0:
            elapsed = time.perf_counter() - started
            print(
                f"[index] {n} buckets written: {pairs} pairs, "
                f"{pairs / max(elapsed, 1e-9):.0f} pairs/s, {elapsed:.0f}s",
                flush=True,
            )
        yield part


def build(
    cfg: CorpusConfig, corpus_dir: str, info: dict[str, Any], uris: list[str]
) -> dict[str, Any]:
    """Run the index job for a streamed corpus (`streamed`) into `corpus_dir`; returns the
    marker. `uris` are a webdataset's shards (unused for a manifest). Progress: Ray Data's
    bars while reading, then a line every 8 finished buckets."""
    import ray.data

    started = time.perf_counter()
    if cfg.name == "manifest":
        manifest.check_head(cfg)
        chunks = manifest.chunks(cfg, info["bytes"])
        items = [{"chunk": json.dumps(c)} for c in chunks]
        rows = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            ReadChunks(cfg), batch_size=1, batch_format="pyarrow", num_cpus=READ_CPUS
        )
        repeats = ""
    else:
        rows = webdataset.texts(cfg, uris).map_batches(
            webdataset.SampleRows(cfg), batch_format="pyarrow", num_cpus=READ_CPUS
        )
        repeats = webdataset.repeated_keys(cfg)
    rows = rows.map_batches(AddBucket(), batch_format="pyarrow", num_cpus=READ_CPUS)
    # Few shuffle partitions for a small source (each is a task or an actor to start), at
    # most one per bucket for a large one; a partition holds whole buckets.
    partitions = min(BUCKETS, max(2, math.ceil(info["bytes"] / PARTITION_BYTES)))
    done = rows.groupby("bucket", num_partitions=partitions).map_groups(
        bucket_job,
        fn_args=(cfg, corpus_dir, repeats),
        batch_format="pyarrow",
        num_cpus=READ_CPUS,
    )
    with _user_errors():
        parts = list(_progress(done.iter_rows(), started))
    if not parts:
        raise ConfigError(f"corpus {cfg.path!r} holds no rows")
    info = info | {"seconds": round(time.perf_counter() - started, 2)}
    marker = index.write_marker(corpus_dir, parts, info)
    if cfg.label_key and not marker.get("labels"):
        raise ConfigError(
            f"corpus {cfg.path!r} has no value in {cfg.label_key!r} (corpus.label_key, the "
            "zero-shot labels) on any row; set corpus.label_key= to read none"
        )
    return marker
