"""A Train worker's streamed share of a pair view: what `raysys train` and a sweep's
populations both read when their split does not fit in memory.

Both read the view with pyarrow (`raysys.data.view_shard`), not Ray Data: inside a Tune trial
Ray Data's tasks wait forever for a core the trial's placement group holds, and an order fixed
by (seed, epoch) lets a resumed run read the very batches the stopped one would have.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from raysys.config import TrainConfig
from raysys.data.batches import SHUFFLE_WINDOW, StreamBatches
from raysys.data.stream import view_files
from raysys.data.view_shard import ViewShard, arrays
from raysys.errors import ConfigError
from raysys.train.step import input_moments


@dataclass
class StreamedShare:
    batches: StreamBatches
    steps_per_epoch: int
    moments: torch.Tensor  # this rank's input moments (`input_moments`), to all-reduce
    dims: tuple[int, int]  # the view's (image, text) widths
    where: str  # the line the run prints about its data


def streamed_share(
    config: dict[str, Any], tcfg: TrainConfig, rank: int, world: int, device: torch.device
) -> StreamedShare:
    """Rank `rank` of `world`'s share of the view the driver planned (`config["stream_view"]`):
    its moments (one extra pass over its rows) and its batches of `batch_size // world`."""
    view = ViewShard(view_files(config["stream_view"]), rank, world, tcfg.seed)
    per_worker = tcfg.batch_size // world
    steps_per_epoch = view.rows // per_worker
    if steps_per_epoch == 0:
        raise ConfigError(
            f"the streamed train split's {view.total} pairs give each of {world} worker(s) "
            f"{view.rows}, fewer than its {per_worker} of a global batch of {tcfg.batch_size}: "
            "lower train.batch_size"
        )
    parts = []
    for table in view.tables(0):
        x = arrays(table)
        parts.append(input_moments(x["image"], x["text"], device))
    window = SHUFFLE_WINDOW * per_worker

    def read(epoch: int) -> Iterator[dict[str, np.ndarray]]:
        return view.batches(epoch, per_worker, window)

    where = (
        f"streaming {view.total} pairs from their pair view, {view.rows} per worker per epoch "
        f"in {len(view.groups)} row groups ({config['stream_reason']})"
    )
    return StreamedShare(
        StreamBatches(read, steps_per_epoch, device),
        steps_per_epoch,
        torch.stack(parts).sum(0),
        tuple(config["dims"]),
        where,
    )
