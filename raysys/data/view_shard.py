"""A training worker's share of a pair view, read with pyarrow rather than Ray Data.

A sweep's populations train inside Tune trials, where Ray Data's tasks wait forever for a
core the trial's placement group holds (found 2026-11-30). So the sweep's driver, which no
placement group holds, builds each streamed population's view before Tune starts
(`raysys.data.stream.write_pair_view`), and the trial's workers read their shares of it
here, window by window (below), the next ones made in background threads while this one
trains.
`raysys train`'s workers read their shares here too (`raysys.train.streamed`), for the
fixed order below.

An epoch's order depends only on (seed, epoch): every rank shuffles the view's row groups
alike and takes its own equal run of rows, so ranks take equal steps, and a resumed run
reads exactly the batches the stopped one would have (Ray Data's order is not fixed). Rows
are then mixed within windows of at least a few batches, as Ray Data's local shuffle buffer
mixes them; a window always takes whole row-group slices, so with Ray Data's large row
groups (about 64 MB each) it is one or two row groups.

Each window is mixed by a generator of its own, seeded by (seed, epoch, rank, window), so
windows are made independently: `READERS` of them at once, in threads, and handed on in
order. A window's thread does all of its rows' work: it reads, decodes and reorders them
(pyarrow, without the GIL), then turns them into checked arrays (`arrays`: NaN and inf rows
refused, image keys hashed), so what is left in the training thread is cutting batches.
Batches run across window boundaries, so no row is dropped but the epoch's last partial
batch.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from itertools import islice
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa

from raysys.data import cache
from raysys.data.pairs import image_keys
from raysys.errors import CacheError

COLUMNS = ("image", "text", "negative")  # a view's layers, beside its pair and image ids
FOOTER_READERS = 8
# Windows made at once: decoding is most of a streamed batch's cost (about 42 µs of 73 for an
# 18 KiB row, one core), so a GPU node's cores share it; each one in flight holds a window.
MOST_READERS = 4
READERS = max(1, min(MOST_READERS, os.cpu_count() or 1))

T = TypeVar("T")
R = TypeVar("R")


def in_order(make: Callable[[T], R], items: Iterable[T], workers: int, name: str) -> Iterator[R]:
    """`make(item)` for each of `items`, `workers` at once in threads, yielded in order;
    left early (a closed generator), the ones not started are cancelled."""
    pool = ThreadPoolExecutor(workers, thread_name_prefix=name)
    todo = iter(items)
    pending: deque[Future[R]] = deque(pool.submit(make, i) for i in islice(todo, workers))
    try:
        while pending:
            first = pending.popleft()
            pending.extend(pool.submit(make, i) for i in islice(todo, 1))  # keep them busy
            yield first.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@dataclass(frozen=True)
class RowGroup:
    file: str
    index: int
    rows: int


class ViewShard:
    """Rank `rank` of `world`'s share of the view's `files` (each epoch: `rows` of them),
    `readers` row groups or windows made at once."""

    def __init__(
        self, files: list[str], rank: int, world: int, seed: int, readers: int = READERS
    ) -> None:
        self.rank, self.world, self.seed, self.readers = rank, world, seed, readers
        # Footers read at once: a large view on S3 has hundreds of files, a round trip each.
        with ThreadPoolExecutor(FOOTER_READERS, thread_name_prefix="view-footer") as pool:
            footers = pool.map(cache.footer, files)
            self._footers = dict(zip(files, footers, strict=True))
        self.groups = [
            RowGroup(f, i, footer.row_group(i).num_rows)
            for f, footer in self._footers.items()
            for i in range(footer.num_row_groups)
        ]
        self.total = sum(g.rows for g in self.groups)
        self.rows = self.total // world  # the last `total % world` rows of an epoch go unread

    def _pieces(self, epoch: int) -> list[tuple[RowGroup, int, int]]:
        """This rank's slices (row group, offset, length) of the epoch's order."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.groups))
        start, end = self.rank * self.rows, (self.rank + 1) * self.rows
        pieces, at = [], 0
        for g in order:
            group = self.groups[g]
            lo, hi = max(start, at), min(end, at + group.rows)
            if lo < hi:
                pieces.append((group, lo - at, hi - lo))
            at += group.rows
        return pieces

    def _read(self, group: RowGroup) -> pa.Table:
        try:
            return cache.read_row_group(group.file, group.index, self._footers[group.file])
        except (OSError, pa.ArrowException) as e:
            raise CacheError(
                f"cannot read row group {group.index} of the pair view file {group.file!r}: "
                f"{e}; delete the view's directory and rerun (it is rebuilt)"
            ) from e

    def _slice(self, piece: tuple[RowGroup, int, int]) -> pa.Table:
        """One of `_pieces`' slices: its row group read, then cut."""
        group, offset, length = piece
        return self._read(group).slice(offset, length)

    def tables(self, epoch: int) -> Iterator[pa.Table]:
        """This rank's rows of `epoch`, a row group's slice at a time (`readers` read at once,
        handed on in order)."""
        return in_order(self._slice, self._pieces(epoch), self.readers, "view-read")

    def _windows(self, epoch: int, rows: int) -> list[list[tuple[RowGroup, int, int]]]:
        """This rank's slices of `epoch` grouped into windows of whole slices, each at least
        `rows` rows but the last."""
        windows: list[list[tuple[RowGroup, int, int]]] = [[]]
        count = 0
        for piece in self._pieces(epoch):
            if count >= rows:
                windows.append([])
                count = 0
            windows[-1].append(piece)
            count += piece[2]
        return windows if windows[0] else []

    def batches(self, epoch: int, size: int, window: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """This rank's rows of `epoch` in batches of `size` as checked arrays (`arrays`; a
        last, short batch dropped, so ranks take equal steps), rows mixed within windows of
        whole row-group slices, at least `window` rows each but the epoch's last (rows are
        copied as their window is reordered, and again only in a batch that spans two)."""
        shuffle = window > size

        def make(k_pieces: tuple[int, list[tuple[RowGroup, int, int]]]) -> dict[str, np.ndarray]:
            k, pieces = k_pieces
            whole = pa.concat_tables(map(self._slice, pieces))
            if shuffle:
                rng = np.random.default_rng([self.seed, epoch, self.rank, k])
                whole = whole.take(rng.permutation(len(whole)))
            return arrays(whole)

        windows = enumerate(self._windows(epoch, max(window, size)))
        # Closed with this generator (a stream stopped mid-epoch): its threads stop at once.
        with closing(in_order(make, windows, self.readers, "view-read")) as made:
            yield from rebatch(made, size)


def rebatch(parts: Iterable[dict[str, np.ndarray]], size: int) -> Iterator[dict[str, np.ndarray]]:
    """`parts` (dicts of row-aligned arrays) cut into batches of `size` rows, a last, short
    one dropped; a batch is a view into its part, or a copy where it spans two. The rows
    left over are copied, so a part is let go before the next one is waited for."""
    carry: dict[str, np.ndarray] | None = None
    for part in parts:
        rows, at = _rows(part), 0
        if carry is not None:
            at = min(size - _rows(carry), rows)
            carry = {c: np.concatenate([carry[c], part[c][:at]]) for c in part}
            if _rows(carry) == size:
                yield carry
                carry = None
        if carry is None:
            while at + size <= rows:
                yield {c: a[at : at + size] for c, a in part.items()}
                at += size
            carry = {c: a[at:].copy() for c, a in part.items()} if at < rows else None
        del part


def _rows(part: dict[str, np.ndarray]) -> int:
    return len(next(iter(part.values())))


def arrays(batch: Any) -> dict[str, np.ndarray]:
    """A pyarrow batch of the view as `[rows, dim]` matrices in each column's cached dtype
    (float16, or float32 for a decoder LM's text layers), with NaN or inf rows
    reported by pair id (`cache.check_finite_rows`), and each row's image key."""
    out = {c: cache.to_numpy(batch.column(c)) for c in COLUMNS}
    cache.check_finite_rows(
        batch.column("pair_id"), list(out.values()), "in the streamed pair view"
    )
    out["image_keys"] = image_keys(batch.column("image_id").to_numpy(zero_copy_only=False))
    return out
