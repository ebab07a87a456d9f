"""Steps per epoch as Ray Train workers count them, for tests that check step numbers:
training shards are cut by bucket (a hash of the image id), so they differ a little in
size and an epoch is what the smallest one fills (48 train pairs of the small cache in two
shards of 25 and 23: 2 steps of 16, not 3)."""

from __future__ import annotations

from raysys import config
from raysys.commands import trained_source
from raysys.data.batches import batch_plan


def steps_per_epoch(run_cfg: config.Config, ext) -> int:
    index = trained_source(run_cfg, ext).index("train")
    return batch_plan(run_cfg.train, len(index), index.buckets).steps_per_epoch


def validated_steps(total: int, every: int) -> list[int]:
    """The steps a run of `total` steps validates at: every `every`, and always the last."""
    return list(range(every, total + 1, every)) + ([total] if total % every else [])
