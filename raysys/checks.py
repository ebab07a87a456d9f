"""Checks that need no data: they run before Ray starts or anything is extracted, so a typo
costs seconds, not an extraction. Checks that need the cache (split sizes) are here too, to
be found in one place."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from raysys.backbones import configured_backbone
from raysys.config import Config
from raysys.errors import ConfigError
from raysys.report.schema import metric_names

if TYPE_CHECKING:
    from raysys.data.pairs import Pairs
    from raysys.data.source import PairSource

MIN_EVAL_PAIRS = 4  # unbiased HSIC (unbiased CKA, CKNNA) needs more than 3 samples
SHARED_GPU_FIX = (
    "set sweep.trials_per_gpu=1 (each of a trial's workers gets a whole GPU) or "
    "sweep.workers_per_trial=1 (one-rank trials share each GPU)"
)


# A sweep plans which populations stream before Tune starts, from the nodes it sees then.
UNPLANNED_STREAM = (
    "this population's train split no longer fits in the cluster's memory, but the sweep "
    "planned it in memory (the cluster it saw when it started held more): set "
    "train.data_on_device=stream"
)
STREAMED_LAYER_PAIRS = (
    "this population's train split streams (it does not fit in memory), and a population "
    "over several layer pairs holds them all in memory: set train.data_on_device=stream, "
    "which groups populations by layer pair"
)


def check_corpus(cfg: Config) -> None:
    """An unknown corpus kind is a config error, found before a run directory or Ray exists
    (on a cluster: before any node scales up)."""
    from raysys.corpora import KINDS  # lazy: the corpora read Parquet, this module need not

    if cfg.corpus.name not in KINDS:
        raise ConfigError(f"unknown corpus {cfg.corpus.name!r}; available: {', '.join(KINDS)}")


def check_best_metric(cfg: Config) -> None:
    """train.best_metric must name a metric validation actually reports."""
    names = metric_names(cfg.eval.retrieval_ks)
    if cfg.train.best_metric.removeprefix("val/") not in names:
        raise ConfigError(
            f"train.best_metric={cfg.train.best_metric!r} is not a validation metric; choose "
            "from " + ", ".join(f"val/{n}" for n in names)
        )


def check_whole_gpus(workers: int, gpus_per_worker: float, what: str, fix: str) -> None:
    """Ranks of one Train run must not share a GPU: Ray places workers that each ask for a
    fraction of a GPU on the same one whenever it can, and NCCL then stops the run at its first
    collective ("Duplicate GPU detected"), after the workers and their data have started. One
    rank may hold a fraction (packed one-worker trials), and whole GPUs never overlap."""
    if workers > 1 and gpus_per_worker > 0 and not float(gpus_per_worker).is_integer():
        raise ConfigError(
            f"{what} gives each of a run's {workers} Ray Train workers {gpus_per_worker:g} of a "
            "GPU, so Ray may put two ranks of one run on the same GPU and NCCL would fail "
            f'("Duplicate GPU detected"): {fix}'
        )


def check_sweep_gpus(cfg: Config) -> None:
    """A GPU sweep's trials either have one worker or whole GPUs (see `check_whole_gpus`);
    checked with the plan, before Ray starts."""
    s = cfg.sweep
    if cfg.train.use_gpu:
        check_whole_gpus(
            s.workers_per_trial,
            1.0 / s.trials_per_gpu,
            f"sweep.workers_per_trial={s.workers_per_trial} with "
            f"sweep.trials_per_gpu={s.trials_per_gpu}",
            SHARED_GPU_FIX,
        )


def check_train_layers(cfg: Config) -> None:
    """The backbones exist and `train.vision_layer` / `train.text_layer` index a layer the
    extraction will cache (checked against each model's own layer count)."""
    for modality, side in (("image", "vision"), ("text", "text")):
        backbone = configured_backbone(cfg.extract, modality)
        backbone.check()
        n = len(backbone.layer_ids)
        layer = getattr(cfg.train, f"{side}_layer")
        if not -n <= layer < n:
            raise ConfigError(
                f"train.{side}_layer={layer} is out of range for {backbone.name}: "
                f"extract.{side}_layers caches {n} layers (0..{n - 1}, or -1 for the last)"
            )


def checked_eval_splits(
    cfg: Config, source: PairSource, batch_sizes: Sequence[int] = ()
) -> dict[str, Pairs]:
    """The val and test splits, read once, after checking that every split is big enough
    (`batch_sizes`: a sweep's swept `train.batch_size` values, checked in place of the base).

    Bad caches and too-small splits fail here, in the driver, not inside a Ray worker. The
    train split's embeddings are read only by the workers, each its own shard: the driver
    counts its pairs, a bucket file of the corpus index at a time."""
    splits = {split: source.load(split) for split in ("val", "test")}
    sizes = {"train": source.count("train")} | {k: len(v) for k, v in splits.items()}
    check_split_sizes(cfg, sizes, batch_sizes)
    return splits


def check_split_sizes(cfg: Config, sizes: dict[str, int], batch_sizes: Sequence[int] = ()) -> None:
    """Enough pairs for one global batch of every batch size a run trains with (the base
    `train.batch_size`, or a sweep's swept values, which replace it: a sweep of [16, 32] over
    a base of 256 trains no batch of 256) and for the evaluation metrics (needs the cache)."""
    largest = max(batch_sizes) if batch_sizes else cfg.train.batch_size
    if sizes["train"] < largest:
        key = "sweep.params.train.batch_size" if batch_sizes else "train.batch_size"
        value = list(batch_sizes) if batch_sizes else largest
        raise ConfigError(
            f"the train split has {sizes['train']} pairs, fewer than one global batch of "
            f"{largest} ({key}={value}); lower {key} or raise corpus.size"
        )
    for split in ("val", "test"):
        if sizes[split] < MIN_EVAL_PAIRS:
            raise ConfigError(
                f"the {split} split has {sizes[split]} pairs; evaluation needs at least "
                f"{MIN_EVAL_PAIRS}: raise corpus.size or corpus.{split}_fraction"
            )
