"""A training worker's share of a pair view, read with pyarrow rather than Ray Data.

A sweep's populations train inside Tune trials, where Ray Data's tasks wait forever for a
core the trial's placement group holds (found 2026-11-30). So the sweep's driver, which no
placement group holds, builds each streamed population's view before Tune starts
(`raysys.data.stream.write_pair_view`), and the trial's workers read their shares of it
here, row group by row group, the next one read in the background while this one trains.
`raysys train`'s workers read their shares here too (`raysys.train.streamed`), for the
fixed order below.

An epoch's order depends only on (seed, epoch): every rank shuffles the view's row groups
alike and takes its own equal run of rows, so ranks take equal steps, and a resumed run
reads exactly the batches the stopped one would have (Ray Data's order is not fixed). Rows
are then mixed within windows of at least a few batches, as Ray Data's local shuffle buffer
mixes them; a window always takes whole row-group slices, so with Ray Data's large row
groups (about 64 MB each) it is one or two row groups.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from raysys.data import cache
from raysys.errors import CacheError

FOOTER_READERS = 8


@dataclass(frozen=True)
class RowGroup:
    file: str
    index: int
    rows: int


class ViewShard:
    """Rank `rank` of `world`'s share of the view's `files` (each epoch: `rows` of them)."""

    def __init__(self, files: list[str], rank: int, world: int, seed: int) -> None:
        self.rank, self.world, self.seed = rank, world, seed
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

    def tables(self, epoch: int) -> Iterator[pa.Table]:
        """This rank's rows of `epoch`, a row group's slice at a time (the next one read
        while this one is used: pyarrow reads without holding the GIL)."""
        pieces = self._pieces(epoch)
        with ThreadPoolExecutor(1, thread_name_prefix="view-read") as pool:
            ahead: Future | None = pool.submit(self._read, pieces[0][0]) if pieces else None
            for k, (_, offset, length) in enumerate(pieces):
                table = ahead.result()
                ahead = pool.submit(self._read, pieces[k + 1][0]) if k + 1 < len(pieces) else None
                yield table.slice(offset, length)

    def batches(self, epoch: int, size: int, window: int = 0) -> Iterator[pa.Table]:
        """This rank's rows of `epoch` in batches of `size` (a last, short one dropped, so
        ranks take equal steps), rows mixed within windows of whole row-group slices, at
        least `window` rows each but the epoch's last (each row copied once, as the window
        is reordered)."""
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        held: list[pa.Table] = []
        count = 0
        for table in self.tables(epoch):
            held.append(table)
            count += len(table)
            if count >= max(window, size):
                whole = pa.concat_tables(held)
                if window > size:
                    whole = whole.take(rng.permutation(len(whole)))
                used = len(whole) // size * size
                yield from (whole.slice(i, size) for i in range(0, used, size))
                held, count = [whole.slice(used)], len(whole) - used
        whole = pa.concat_tables(held) if held else None
        if whole is not None and len(whole) >= size:
            if window > size:
                whole = whole.take(rng.permutation(len(whole)))
            yield from (whole.slice(i, size) for i in range(0, len(whole) // size * size, size))
