"""`raysys bench stream`: how fast a training worker streams a pair view, against a bare
pyarrow loop over the same files — no Ray.

A run or sweep whose train split does not fit in memory streams it from a pair view, and
its workers read the view themselves (`raysys.data.view_shard`: row groups shuffled each epoch, a
4-batch mixing window, the next windows made in background threads). This writes a synthetic
view of `--pairs` random float16 pairs at `--dims` (image, text; a negative beside each
text) in row groups of `ROW_GROUP` rows, then times `ROUNDS` epochs of each:

- **bare**: each file's record batches in file order (`ParquetFile.iter_batches`, every
  column the stream reads), the three embedding columns turned into tensors, nothing else;
- **stream**: the trial's path, `StreamBatches` over `ViewShard.batches`, with its finite
  check and image keys (made per window, in the readers' threads); one `StreamBatches` for
  every epoch, as in a run, so its readers run on across epochs.

With `--step-ms` each batch is followed by a wait of that long on both paths, standing in
for a device step: the training thread blocked on the device, the GIL free. The stream
prepares its next batches (read, window, checks) in the background meanwhile, so its rate
approaches the slower of the step and the preparation; the bare loop does its work and the
wait one after the other.

It prints the rows/s of each, `ratio` = stream / bare and the batches/s the stream feeds at
`train.batch_size`, to set beside `raysys bench step`'s time per step on the training
device. The view is local and freshly written (in the page cache): a view on S3 or a cold
disk reads slower.

Imports torch, numpy and pyarrow only; runs where Ray is absent.
"""

from __future__ import annotations

import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from raysys.bench.common import write_result
from raysys.config import Config
from raysys.data import cache
from raysys.data.batches import SHUFFLE_WINDOW, StreamBatches
from raysys.data.view_shard import COLUMNS, READERS, ViewShard
from raysys.errors import ConfigError

ROW_GROUP = 8192  # rows per row group of the synthetic view
FILES = 8
ROUNDS = 3  # timed epochs of each path


@dataclass
class StreamBench:
    """The view to read: `--pairs` pairs of these widths, in batches of `batch`."""

    pairs: int = 200_000
    d_image: int = 1024
    d_text: int = 4096
    batch: int = 256
    step_ms: float = 0.0  # a wait after each batch, standing in for a device step
    readers: int = READERS  # the stream's row groups or windows made at once


def write_view(directory: Path, bench: StreamBench, seed: int = 0) -> list[str]:
    """A pair view's columns over `FILES` Parquet files, a row group at a time."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    files, start = [], 0
    for f in range(FILES):
        rows = bench.pairs // FILES + (f < bench.pairs % FILES)
        path = directory / f"part-{f}.parquet"
        writer = None
        for at in range(0, rows, ROW_GROUP):
            n = min(ROW_GROUP, rows - at)
            ids = [f"i{start + i}" for i in range(n)]

            def matrix(d: int, n: int = n) -> pa.FixedSizeListArray:
                return cache.list_array(rng.standard_normal((n, d), dtype=np.float32))

            table = pa.table(
                {
                    "pair_id": [f"{i}-0" for i in ids],
                    "image_id": ids,
                    "image": matrix(bench.d_image),
                    "text": matrix(bench.d_text),
                    "negative": matrix(bench.d_text),
                }
            )
            writer = writer or pq.ParquetWriter(
                path, table.schema, use_dictionary=cache.dictionary_columns(table.schema)
            )
            writer.write_table(table, row_group_size=ROW_GROUP)
            start += n
        if writer is not None:
            writer.close()
            files.append(str(path))
    return files


def bare_epoch(files: list[str], batch: int, step_s: float) -> int:
    """Rows read in file order as tensors, a record batch at a time, with a `step_s` wait
    after each whole `batch` of rows (counted across files, as the stream's steps are:
    a wait per record batch, short ones at each file's end included, waited more often)."""
    rows = pending = 0
    for path in files:
        for record in pq.ParquetFile(path).iter_batches(batch_size=batch):
            for c in COLUMNS:
                torch.as_tensor(cache.to_numpy(record.column(c)))
            rows += record.num_rows
            pending += record.num_rows
            while pending >= batch:
                time.sleep(step_s)
                pending -= batch
    return rows


def stream_epochs(
    files: list[str], batch: int, epochs: int, step_s: float, readers: int
) -> tuple[int, list[float]]:
    """Rows an epoch and the seconds of each of `epochs` epochs through the trial's path (one
    rank of one), each batch followed by a `step_s` wait. The rows are every row it reads,
    as the bare loop's are: it reads each epoch to its end (the rows past its last whole
    batch too, in the next epoch's time), though it steps over whole batches only."""
    view = ViewShard(files, 0, 1, seed=0, readers=readers)
    steps = view.rows // batch

    def read(e: int) -> Any:
        return view.batches(e, batch, SHUFFLE_WINDOW * batch)

    batches = StreamBatches(read, steps, torch.device("cpu"))
    seconds = []
    try:
        for epoch in range(epochs):
            t0 = time.perf_counter()
            for s in range(steps):
                batches.get(epoch * steps + s)
                time.sleep(step_s)
            seconds.append(time.perf_counter() - t0)
    finally:
        batches.close()
    return view.rows, seconds


def bench_stream(out_dir: Path, bench: StreamBench) -> dict[str, Any]:
    """Write the view under `out_dir`, time both paths, remove the view; print and write
    `out_dir/bench.json`."""
    if bench.pairs < bench.batch:
        raise ConfigError(f"--pairs ({bench.pairs}) must hold one batch ({bench.batch})")
    where = out_dir / "stream-view"
    started = time.perf_counter()
    try:
        files = write_view(where, bench)
        write_s = time.perf_counter() - started
        bytes_per_row = 2 * (bench.d_image + 2 * bench.d_text)
        step_s = bench.step_ms / 1000
        times: dict[str, list[float]] = {"bare": []}
        rows: dict[str, int] = {}
        for _ in range(ROUNDS):
            t0 = time.perf_counter()
            rows["bare"] = bare_epoch(files, bench.batch, step_s)
            times["bare"].append(time.perf_counter() - t0)
        rows["stream"], times["stream"] = stream_epochs(
            files, bench.batch, ROUNDS, step_s, bench.readers
        )
    finally:
        shutil.rmtree(where, ignore_errors=True)
    rate = {k: rows[k] / statistics.median(v) for k, v in times.items()}
    ratio = rate["stream"] / rate["bare"]
    result = {
        "stage": "stream",
        "bare_rows_s": rate["bare"],
        "stream_rows_s": rate["stream"],
        "ratio": ratio,
        "stream_mib_s": rate["stream"] * bytes_per_row / 2**20,
        # The whole batches a second it feeds training (the rows past the last are read, and
        # counted above, but never a step).
        "stream_batches_s": (rows["stream"] // bench.batch) / statistics.median(times["stream"]),
        "rows": rows,  # per round: every row read, on both paths
        "seconds": times,
        "write_s": write_s,
        "threads": torch.get_num_threads(),
        "settings": asdict(bench) | {"row_group": ROW_GROUP, "files": FILES},
    }
    waits = f"; a {bench.step_ms:g} ms step after each batch" if bench.step_ms else ""
    print(
        f"[bench stream] {bench.pairs:,} pairs ({bench.d_image}/{bench.d_text}-d float16, "
        f"{bytes_per_row / 1024:.1f} KiB a row), batch {bench.batch}: bare "
        f"{rate['bare']:,.0f} rows/s, stream {rate['stream']:,.0f} rows/s "
        f"({result['stream_mib_s']:,.0f} MiB/s, {result['stream_batches_s']:.1f} batches/s); "
        f"ratio {ratio:.2f}{waits}; {bench.readers} reader(s)",
        flush=True,
    )
    return write_result(out_dir, result)


def run(args: Any, cfg: Config, out: Path) -> None:
    """`raysys bench stream --pairs N --dims I,T [--step-ms M] [--readers R]` (batch:
    `train.batch_size`)."""
    d_image, d_text = (int(d) for d in args.dims.split(","))
    if args.readers < 0:
        raise ConfigError(f"--readers ({args.readers}) must be 0 (the default) or more")
    readers = args.readers or READERS
    bench = StreamBench(args.pairs, d_image, d_text, cfg.train.batch_size, args.step_ms, readers)
    bench_stream(out, bench)
