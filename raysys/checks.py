"""Checks that need no data: they run before Ray starts or anything is extracted, so a typo
costs seconds, not an extraction. Checks that need the cache (split sizes) are here too, to
be found in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING

from raysys.backbones import configured_backbone
from raysys.config import Config
from raysys.errors import ConfigError
from raysys.report.schema import metric_names

if TYPE_CHECKING:
    from raysys.data.cache import Pairs
    from raysys.data.source import PairSource

MIN_EVAL_PAIRS = 4  # unbiased HSIC (unbiased CKA, CKNNA) needs more than 3 samples


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


def checked_eval_splits(cfg: Config, source: PairSource) -> dict[str, Pairs]:
    """The val and test splits, read once, after checking that every split is big enough.

    Bad caches and too-small splits fail here, in the driver, not inside a Ray worker. The
    train split's embeddings are read only by the workers, each its own shard: the driver
    reads its ids."""
    splits = {split: source.load(split) for split in ("val", "test")}
    sizes = {"train": len(source.index("train"))} | {k: len(v) for k, v in splits.items()}
    check_split_sizes(cfg, sizes)
    return splits


def check_split_sizes(cfg: Config, sizes: dict[str, int]) -> None:
    """Enough pairs for one global batch and for the evaluation metrics (needs the cache)."""
    if sizes["train"] < cfg.train.batch_size:
        raise ConfigError(
            f"the train split has {sizes['train']} pairs, fewer than one global batch "
            f"(train.batch_size={cfg.train.batch_size}); lower train.batch_size or raise "
            "corpus.size"
        )
    for split in ("val", "test"):
        if sizes[split] < MIN_EVAL_PAIRS:
            raise ConfigError(
                f"the {split} split has {sizes[split]} pairs; evaluation needs at least "
                f"{MIN_EVAL_PAIRS}: raise corpus.size or corpus.{split}_fraction"
            )
