"""Training batches: which pairs make up each global batch, and where a worker keeps them.

`BatchPlan` cuts the train split into fixed, seeded shards; each worker holds only its
shards (`MemoryBatches`, on the GPU or in host memory) and takes an equal slice of every
global batch from them. A split too large for memory streams instead (`StreamBatches`,
over the pair view of `raysys.data.stream`).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from raysys.config import TrainConfig
from raysys.data.pairs import BUCKETS
from raysys.errors import ConfigError

if TYPE_CHECKING:
    from raysys.data.pairs import Pairs


@dataclass
class BatchPlan:
    """Which pairs make up every global batch, and which worker holds them.

    The split's `n` pairs are cut once into `shards` fixed shards. With `buckets` (each
    pair's `raysys.data.pairs.buckets` value, by its image id), shard s holds the pairs whose
    bucket % shards == s: the embedding caches are laid out by bucket, so a worker reads only
    its shards' rows. Those shards differ a little in size; an epoch has as many steps as the
    smallest one fills, and each shard's epoch order is a seeded permutation of its own pairs
    (the ones past the smallest shard's size sit out that epoch, different ones each epoch).
    Without `buckets` (synthetic data, benchmarks), the shards are equal slices of one seeded
    permutation (the remainder, fewer than `shards` pairs, left out).

    Global batch `step` takes `batch_size / shards` pairs from each shard, in shard order.
    Worker r of N holds shards r·S/N … (r+1)·S/N − 1, and its slice of each global batch is
    exactly its shards' parts, so the gathered batch is the same for any N that divides S, and
    a run resumed at any step sees the batches it would have seen without the interruption.
    """

    n: int
    batch_size: int
    shards: int
    seed: int
    buckets: np.ndarray | None = None  # [n] int, each pair's bucket; None: seeded slices

    def __post_init__(self) -> None:
        self._epoch_orders: dict[tuple[int, int], np.ndarray] = {}
        if self.buckets is not None:
            if len(self.buckets) != self.n:
                raise ValueError(f"{len(self.buckets)} buckets for {self.n} pairs")
            if self.shards > BUCKETS:
                raise ConfigError(
                    f"train.data_shards={self.shards}: at most {BUCKETS} (the cache's buckets; "
                    "a shard is a set of buckets)"
                )

    @functools.cached_property
    def _members(self) -> list[np.ndarray]:
        """Each shard's positions in the split's pair index, ascending."""
        if self.buckets is not None:
            shard_of = (np.asarray(self.buckets) % self.shards).astype(np.int16)
            # Stable (a radix sort on int16): positions ascend within a shard.
            order = np.argsort(shard_of, kind="stable")
            bounds = np.searchsorted(shard_of[order], np.arange(self.shards + 1))
            return [order[bounds[s] : bounds[s + 1]] for s in range(self.shards)]
        size = self.n // self.shards
        order = np.random.default_rng([self.seed, self.n]).permutation(self.n)
        return [np.sort(order[s * size : (s + 1) * size]) for s in range(self.shards)]

    @property
    def sizes(self) -> list[int]:
        """Pairs in each shard."""
        return [len(m) for m in self._members]

    @property
    def shard_size(self) -> int:
        """The smallest shard's size: what every shard gives an epoch."""
        return min(self.sizes)

    @property
    def per_shard(self) -> int:
        return self.batch_size // self.shards

    @property
    def steps_per_epoch(self) -> int:
        steps = self.shard_size // self.per_shard
        if steps == 0:
            raise ConfigError(
                f"the train split's smallest of {self.shards} shard(s) holds {self.shard_size} "
                f"pairs, fewer than the {self.per_shard} pairs a shard puts in each global "
                f"batch of {self.batch_size}: lower train.batch_size or train.data_shards (in "
                "a sweep, the sweep.params value that sets them)"
            )
        return steps

    def shard_rows(self, shard: int) -> np.ndarray:
        """Positions (in the split's pair index) of the pairs in `shard`, ascending."""
        return self._members[shard]

    def worker_shards(self, rank: int, world: int) -> range:
        per_worker = self.shards // world
        return range(rank * per_worker, (rank + 1) * per_worker)

    def worker_rows(self, rank: int, world: int) -> np.ndarray:
        """What worker `rank` loads: its shards' pairs, shard after shard."""
        return np.concatenate([self.shard_rows(s) for s in self.worker_shards(rank, world)])

    def _in_shard(self, step: int, shard: int) -> np.ndarray:
        """Positions within `shard` of its part of global batch `step`."""
        epoch, index = divmod(step, self.steps_per_epoch)
        key = (epoch, shard)
        if key not in self._epoch_orders:
            if len(self._epoch_orders) > 2 * self.shards:  # keep about one epoch's orders
                self._epoch_orders.clear()
            rng = np.random.default_rng([self.seed, epoch, shard])
            self._epoch_orders[key] = rng.permutation(self.sizes[shard])
        return self._epoch_orders[key][index * self.per_shard : (index + 1) * self.per_shard]

    def worker_batch(self, step: int, rank: int, world: int) -> np.ndarray:
        """Worker `rank`'s slice of global batch `step`, as positions in its `worker_rows`."""
        shards = self.worker_shards(rank, world)
        starts = np.cumsum([0] + [self.sizes[s] for s in shards[:-1]])
        return np.concatenate(
            [start + self._in_shard(step, s) for start, s in zip(starts, shards, strict=True)]
        )

    def global_batch(self, step: int) -> np.ndarray:
        """Global batch `step` as positions in the split's pair index (one process)."""
        return self.worker_rows(0, 1)[self.worker_batch(step, 0, 1)]


def batch_plan(tcfg: TrainConfig, n: int, buckets: np.ndarray | None = None) -> BatchPlan:
    return BatchPlan(n, tcfg.batch_size, tcfg.data_shards or tcfg.num_workers, tcfg.seed, buckets)


def keep_on_device(
    setting: str,
    rows: int,
    width: int,
    device: torch.device,
    share: float = 1.0,
    bytes_per_value: float = 2.0,
) -> tuple[bool, str]:
    """Whether a worker's shard lives on its GPU (fast indexing) or in host memory (copied
    per batch); the reason is printed so a user knows which one they got. `share` is this
    worker's fraction of the GPU: packed sweep trials split its free memory. Values are 2
    bytes in a float16 cache, 4 in a float32 one."""
    need = rows * width * bytes_per_value
    if device.type != "cuda":
        return True, "in host memory, the CPU device's own"
    if setting != "auto":
        on = setting == "true"
        return on, f"{'on the GPU' if on else 'in pinned host memory'} (data_on_device={setting})"
    free, _ = torch.cuda.mem_get_info(device)
    free = int(free * share)
    fits = need < free // 2
    where = "on the GPU" if fits else "in pinned host memory"
    return fits, f"{where} ({need / 2**30:.2f} GiB vs {free / 2**30:.1f} GiB free)"


class MemoryBatches:
    """Batches from a worker's in-memory shard, by `BatchPlan`: any step, in any order. A
    batch is (image, text, negative, image keys), what `Trainer.train_step` takes.

    On the GPU, the shard is indexed there. In host memory (the CPU device, or a GPU whose
    free memory it does not fit), the shard stays where it was read (as cached: float16, or
    float32 for caches that store it) and each batch is gathered into one of two reused
    pinned buffers, so its copy to the GPU is truly asynchronous; a pinned copy of the whole
    shard would double the host memory, and indexing it returns unpinned memory anyway.
    """

    def __init__(
        self,
        data: Pairs,
        plan: BatchPlan,
        setting: str,
        rank: int,
        world: int,
        device: torch.device,
        share: float = 1.0,
    ) -> None:
        arrays = (data.image, data.text, data.negative)
        width = sum(a.shape[1] for a in arrays)
        per_value = sum(a.nbytes for a in arrays) / max(1, len(data) * width)
        on_device, self.where = keep_on_device(
            setting, len(data), width, device, share, per_value or 2.0
        )
        self.home = device if on_device else torch.device("cpu")
        # The embeddings (no host copy) and each row's image key: which rows show one image.
        arrays += (data.image_keys(),)
        self.tensors = [torch.as_tensor(a).to(self.home) for a in arrays]
        self.plan, self.rank, self.world, self.device = plan, rank, world, device
        self.staging: list[list[torch.Tensor]] = []
        self.copied: list[Any] = [None, None]  # per buffer: the event its last copy recorded
        if self.home != device and device.type == "cuda":
            rows = len(plan.worker_batch(0, rank, world))
            self.staging = [
                [
                    torch.empty((rows, *t.shape[1:]), dtype=t.dtype, pin_memory=True)
                    for t in self.tensors
                ]
                for _ in range(2)
            ]

    def close(self) -> None:
        """Nothing to let go (the shard is the caller's); a stream's `close` has."""

    def get(self, step: int) -> tuple[torch.Tensor, ...]:
        mine = torch.as_tensor(self.plan.worker_batch(step, self.rank, self.world))
        if not self.staging:
            mine = mine.to(self.home)
            return tuple(t[mine].to(self.device) for t in self.tensors)
        # Two buffers: the batch before this one may still be copying out of the other.
        slot = step % 2
        if self.copied[slot] is not None:
            self.copied[slot].synchronize()  # the copy that last read this buffer is done
        out = []
        for t, buffer in zip(self.tensors, self.staging[slot], strict=True):
            torch.index_select(t, 0, mine, out=buffer)
            out.append(buffer.to(self.device, non_blocking=True))
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))  # the copies' stream
        self.copied[slot] = event
        return tuple(out)


SHUFFLE_WINDOW = 4  # a streamed worker's rows are mixed within windows of this many batches
# A streamed batch's arrays are pyarrow's buffers, read-only, and become tensors without a
# copy; they are only read (moved and cast), so torch's warning about it is noise in a run's log.
warnings.filterwarnings(
    "ignore", "The given NumPy array is not writable", UserWarning, "raysys.data.batches"
)


class StreamBatches:
    """Batches streamed from the pair view: `read(epoch)` gives this worker's batches of an
    epoch as checked arrays (a `ViewShard`'s, made windows ahead of the step in its reader
    threads).

    Steps must be asked for in order. A resumed run skips the batches of the current epoch
    that were already trained on, which are the very pairs it trained on: the reader's order
    is fixed by (seed, epoch). Every epoch is read to its end, so the next one starts cleanly
    on all workers.
    """

    def __init__(
        self,
        read: Callable[[int], Iterator[dict[str, np.ndarray]]],
        steps_per_epoch: int,
        device: torch.device,
    ) -> None:
        self.read, self.steps_per_epoch, self.device = read, steps_per_epoch, device
        self._iter: Any = None

    def _epochs(self, start: int) -> Iterator[tuple[torch.Tensor, ...]]:
        """Every batch from step `start` on, as tensors on the device."""
        # Lazy: the view module reads Parquet, and `bench step` runs without pyarrow.
        from raysys.data.view_shard import COLUMNS

        epoch, skip = divmod(start, self.steps_per_epoch)
        while True:
            batches = self.read(epoch)
            try:
                for i, x in enumerate(batches):
                    if skip <= i < self.steps_per_epoch:
                        yield tuple(
                            torch.as_tensor(x[c]).to(self.device) for c in (*COLUMNS, "image_keys")
                        )
            finally:
                getattr(batches, "close", lambda: None)()  # its reader threads and files
            epoch, skip = epoch + 1, 0

    def get(self, step: int) -> tuple[torch.Tensor, ...]:
        if self._iter is None:
            self._iter = self._epochs(step)
        return next(self._iter)

    def close(self) -> None:
        """Stop the stream now (its threads, its open files), not whenever the garbage
        collector finds the generator: a Tune trial's process trains population after
        population."""
        if self._iter is not None:
            self._iter.close()
            self._iter = None
