"""The whole pipeline, as `raysys run` and `raysys train` drive it: extract, a raw baseline,
one Ray Train run per objective, test-split evaluation and the report."""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from raysys import cache, config, storage
from raysys.config import Config
from raysys.corpora import Corpus
from raysys.errors import ConfigError
from raysys.evaluate import score_model, score_raw
from raysys.extract import Extracted, extract
from raysys.jam import JAM
from raysys.report import table, write_report, write_results
from raysys.tensorboard import write_hparams, write_projector
from raysys.train import Paths, check_dims, train


def train_paths(cfg: Config, ext: Extracted) -> Paths:
    return Paths(
        corpus_dir=str(ext.corpus_dir),
        image_dir=str(ext.image_dir),
        text_dir=str(ext.text_dir),
        image_layer=cache.resolve_layer(ext.image_manifest, cfg.train.vision_layer),
        text_layer=cache.resolve_layer(ext.text_manifest, cfg.train.text_layer),
    )


PROVENANCE = "provenance.json"  # beside an exported model: what it was trained on
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


def check_best_metric(cfg: Config) -> None:
    """train.best_metric must name a metric validation actually reports."""
    ks = cfg.eval.retrieval_ks
    names = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in ks]
    names += ["hardneg_acc", "mutual_knn", "cka", "unbiased_cka", "cknna", "svcca", "recon_mse"]
    if cfg.train.best_metric.removeprefix("val/") not in names:
        raise ConfigError(
            f"train.best_metric={cfg.train.best_metric!r} is not a validation metric; choose "
            "from " + ", ".join(f"val/{n}" for n in names)
        )


def prepare_out_dir(out_dir: Path) -> None:
    """Refuse to reuse a finished run's directory: Ray Train would resume its old
    checkpoints and the new results would silently be the old model's."""
    used = [n for n in ("results.csv", "ray", "models", "tune") if (out_dir / n).exists()]
    if used:
        raise ConfigError(
            f"{str(out_dir)!r} already holds a run ({', '.join(used)}); choose another --out "
            "or delete it"
        )
    out_dir.mkdir(parents=True, exist_ok=True)


def run(
    cfg: Config, out_dir: Path | str, objectives: list[str], resume: bool = False
) -> list[dict[str, Any]]:
    """Train each objective on the same cached layers; returns the results rows.

    With `resume`, `out_dir` is a stopped run: each objective's Ray Train run continues from
    its latest checkpoint (a finished one returns at once).
    """
    started = time.perf_counter()
    remote = storage.is_remote(out_dir)
    ray_storage = None
    if remote:
        # Checkpoints go straight to object storage through Ray Train; the small outputs are
        # staged locally and uploaded at the end.
        if resume:
            raise ConfigError("resume= needs a local run directory; s3:// resume is not supported")
        uri = str(out_dir)
        storage.check_writable(uri)
        if storage.exists(storage.join(uri, "results.csv")):
            raise ConfigError(f"{uri!r} already holds a run; choose another --out")
        ray_storage = storage.join(uri, "ray")
        out_dir = Path(tempfile.mkdtemp(prefix="raysys-stage-"))
    if not resume:
        prepare_out_dir(out_dir)
        config.dump(cfg, out_dir / "config.yaml")
    ext = extract(cfg)
    paths = train_paths(cfg, ext)
    # Bad caches and too-small splits fail here, clearly, not inside a Ray worker. The train
    # split's embeddings are read only by the workers, each its own shard; the driver reads
    # its ids (and the small val/test splits whole).
    splits = {"train": paths.index("train"), **{s: paths.load(s) for s in ("val", "test")}}
    check_split_sizes(cfg, {k: len(v) for k, v in splits.items()})
    check_best_metric(cfg)
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
    sample = projector_sample(ext.corpus, test)
    metrics_log: dict[str, Any] = {}
    for objective in objectives:
        run_cfg = dataclasses.replace(
            cfg, train=dataclasses.replace(cfg.train, objective=objective)
        )
        print(
            f"[train] {objective}: {cfg.train.epochs} epochs, {cfg.train.num_workers} workers",
            flush=True,
        )
        result = train(run_cfg, paths, out_dir, objective, resume=resume, storage_uri=ray_storage)
        provenance = {
            **base,
            "objective": objective,
            "corpus_key": ext.image_manifest["corpus_key"],
            "image_layer": paths.image_layer,
            "text_layer": paths.text_layer,
        }
        (result.model_dir / PROVENANCE).write_text(json.dumps(provenance, indent=1))
        model = JAM.load(result.model_dir)
        scores = score_model(model, test, cfg.eval)
        write_tensorboard_summaries(
            out_dir / "tensorboard" / objective, run_cfg, model, scores, sample
        )
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
    if remote:
        storage.upload_dir(out_dir, uri)
        shutil.rmtree(out_dir)
    return rows


def evaluate_model(cfg: Config, model_dir: Path) -> list[dict[str, Any]]:
    """Score an exported model on any corpus's cache (`eval.split`), beside the raw row.

    The layers default to those the model was trained on (its provenance.json); the corpus
    and backbones come from the config, so the same model can be scored on another corpus.
    """
    model = JAM.load(model_dir)
    prov_path = model_dir / PROVENANCE
    provenance = json.loads(prov_path.read_text()) if prov_path.is_file() else {}
    ext = extract(cfg)
    paths = train_paths(cfg, ext)
    if "image_layer" in provenance:
        paths.image_layer, paths.text_layer = provenance["image_layer"], provenance["text_layer"]
    pairs = paths.load(cfg.eval.split)
    check_dims(model, pairs.image.shape[1], pairs.text.shape[1], f"model {str(model_dir)!r}")
    base = {
        "vision": cfg.extract.vision,
        "text": cfg.extract.text,
        "vision_layer": ext.image_manifest["layers"].index(paths.image_layer),
        "text_layer": ext.text_manifest["layers"].index(paths.text_layer),
    }
    name = provenance.get("objective", model_dir.name)
    return [
        {"objective": "raw", **base, **score_raw(pairs, cfg.eval)},
        {"objective": name, **base, **score_model(model, pairs, cfg.eval)},
    ]


PROJECTOR_POINTS = 200  # enough to see the structure, small enough for the browser


def projector_sample(corpus: Corpus, test: cache.Pairs) -> dict[str, Any]:
    """The first test pairs, with their captions and image thumbnails (None where the corpus
    cannot hand out single images cheaply, as tar shards), for the projector."""
    n = min(PROJECTOR_POINTS, len(test))
    thumbnails = corpus.thumbnails(str(i) for i in test.image_ids[:n])
    return {
        "image": test.image[:n],
        "text": test.text[:n],
        "labels": [str(c) for c in test.captions[:n]],
        "thumbnails": thumbnails,
    }


def write_tensorboard_summaries(
    log_dir: Path, cfg: Config, model: JAM, scores: dict[str, float], sample: dict[str, Any]
) -> None:
    """HParams (config -> test metrics, so runs compare in the HParams tab) and the
    embedding projector over a sample of test latents with captions and thumbnails."""
    import torch

    hparams = {
        "objective": cfg.train.objective,
        "vision": cfg.extract.vision,
        "text": cfg.extract.text,
        "train": {k: v for k, v in config.to_dict(cfg.train).items() if k != "objective"},
    }
    write_hparams(log_dir, hparams, {f"test/{k}": v for k, v in scores.items()})
    model.eval()
    with torch.no_grad():
        latents = {
            "image": model.encode_image(torch.as_tensor(sample["image"])),
            "text": model.encode_text(torch.as_tensor(sample["text"])),
        }
    write_projector(log_dir, latents, sample["labels"], sample["thumbnails"])
