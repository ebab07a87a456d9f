"""The whole pipeline, as `raysys run` and `raysys train` drive it: extract, a raw baseline,
one Ray Train run per objective, test-split evaluation and the report."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from raysys import cache, config
from raysys.config import Config
from raysys.errors import ConfigError
from raysys.evaluate import score_model, score_raw
from raysys.extract import Extracted, extract
from raysys.jam import JAM
from raysys.report import table, write_report, write_results
from raysys.train import Paths, train


def train_paths(cfg: Config, ext: Extracted) -> Paths:
    return Paths(
        corpus_dir=str(ext.corpus_dir),
        image_dir=str(ext.image_dir),
        text_dir=str(ext.text_dir),
        image_layer=cache.resolve_layer(ext.image_manifest, cfg.train.vision_layer),
        text_layer=cache.resolve_layer(ext.text_manifest, cfg.train.text_layer),
    )


MIN_EVAL_PAIRS = 4  # unbiased HSIC (unbiased CKA, CKNNA) needs more than 3 samples


def check_split_sizes(cfg: Config, sizes: dict[str, int]) -> None:
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


def prepare_out_dir(out_dir: Path) -> None:
    """Refuse to reuse a finished run's directory: Ray Train would resume its old
    checkpoints and the new results would silently be the old model's."""
    used = [name for name in ("results.csv", "ray", "models") if (out_dir / name).exists()]
    if used:
        raise ConfigError(
            f"{str(out_dir)!r} already holds a run ({', '.join(used)}); choose another --out "
            "or delete it"
        )
    out_dir.mkdir(parents=True, exist_ok=True)


def run(cfg: Config, out_dir: Path, objectives: list[str]) -> list[dict[str, Any]]:
    """Train each objective on the same cached layers; returns the results rows."""
    started = time.perf_counter()
    prepare_out_dir(out_dir)
    config.dump(cfg, out_dir / "config.yaml")
    ext = extract(cfg)
    paths = train_paths(cfg, ext)
    # Load every split once on the driver: bad caches and too-small splits fail here,
    # clearly, not inside a Ray worker.
    splits = {split: paths.load(split) for split in ("train", "val", "test")}
    check_split_sizes(cfg, {k: len(v) for k, v in splits.items()})
    test = splits["test"]
    base = {
        "vision": cfg.extract.vision,
        "text": cfg.extract.text,
        "vision_layer": ext.image_manifest["layers"].index(paths.image_layer),
        "text_layer": ext.text_manifest["layers"].index(paths.text_layer),
    }
    rows = [{"objective": "raw", **base, **score_raw(test, cfg.eval)}]
    print(
        f"[evaluate] raw embeddings on {len(test)} test pairs: mutual_knn "
        f"{rows[0]['mutual_knn']:.3f}",
        flush=True,
    )
    metrics_log: dict[str, Any] = {}
    for objective in objectives:
        run_cfg = dataclasses.replace(
            cfg, train=dataclasses.replace(cfg.train, objective=objective)
        )
        print(
            f"[train] {objective}: {cfg.train.epochs} epochs, {cfg.train.num_workers} workers",
            flush=True,
        )
        result = train(run_cfg, paths, out_dir, objective)
        scores = score_model(JAM.load(result.model_dir), test, cfg.eval)
        rows.append({"objective": objective, **base, **scores, "train_s": round(result.seconds, 1)})
        # history: Ray Train's checkpointed reports, i.e. one entry per validation.
        metrics_log[objective] = {"test": scores, "history": result.history}
        print(
            f"[train] {objective}: {result.seconds:.0f}s, test i2t_r1 {scores['i2t_r1']:.3f}, "
            f"mutual_knn {scores['mutual_knn']:.3f} -> {result.model_dir}",
            flush=True,
        )
    (out_dir / "metrics.json").write_text(json.dumps(metrics_log, indent=1, default=str))
    write_results(out_dir, rows)
    images = len(np.unique(test.image_ids))
    notes = [
        f"Test split: {len(test)} pairs over {images} images; chance R@1 is {1 / images:.3f}.",
        f"Wall time {time.perf_counter() - started:.0f}s.",
    ]
    write_report(out_dir, rows, notes=notes)
    print("\n" + table(rows) + "\n", flush=True)
    return rows
