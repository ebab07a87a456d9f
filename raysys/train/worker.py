"""The Ray Train worker loop: load this worker's data, build the model, step, validate, report.

Step-based and resumable at any reported checkpoint. The compute is `raysys.train.step`;
this module adds what only a Ray Train worker does: its data share, checkpoints through
`ray.train.report`, early stopping agreed by all ranks, TensorBoard on rank 0.
"""

from __future__ import annotations

import functools
import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
from torch.utils.tensorboard import SummaryWriter

from raysys import storage
from raysys.config import Config, from_dict
from raysys.data.batches import MemoryBatches, StreamBatches, batch_plan
from raysys.data.cache import Pairs
from raysys.data.source import PairSource
from raysys.data.stream import arrays
from raysys.evaluate import score_model
from raysys.jam import JAM
from raysys.train.step import (
    Trainer,
    all_agree,
    check_dims,
    fit_global_input_stats,
    input_moments,
    jam_config,
    set_global_input_stats,
)

STATE_FILE = "train_state.pt"
HISTORY_FILE = "history.json"  # every report so far; the latest checkpoint holds all of it
MODEL_DIR = "model"
STATS_BATCH = 8192  # rows per batch of the extra pass that computes a stream's moments


@dataclass
class Progress:
    """What a checkpoint carries besides the weights: best score, patience, history."""

    best: float | None = None
    stale: int = 0
    history: list[dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        self.history = self.history or []


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker entry point (the `train_loop_per_worker` of the driver's trainer)."""
    # Ray Train logs every report at INFO on the root logger and also routes print() there;
    # at WARNING, only our one-line validation summaries (and real warnings) reach the driver.
    logging.getLogger().setLevel(logging.WARNING)
    cfg = from_dict(config["cfg"])
    source = PairSource(**config["source"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, config.get("threads", 1)))
    torch.manual_seed(cfg.train.seed)
    device = ray.train.torch.get_device()

    val = source.load("val") if rank == 0 else None
    model, steps_per_epoch, batches_of = _data_and_model(cfg, config, source, rank, world)
    trainer = Trainer(
        ray.train.torch.prepare_model(model), cfg.train, steps_per_epoch * cfg.train.epochs
    )
    progress = _restore(config, trainer, rank)
    # Same initial weights on every rank (DDP also broadcasts them), independent dropout.
    torch.manual_seed(cfg.train.seed + 1000 * rank + trainer.step)
    # After the model and its optimiser state: a GPU's free memory decides where data lives.
    batches, where = batches_of(device)
    if rank == 0:
        print(f"[train] {cfg.train.objective}: {world} worker(s), {where}", flush=True)
    writer = None
    if rank == 0 and config.get("tensorboard_dir"):
        # purge_step drops events a crashed attempt logged past the checkpoint we resume from.
        writer = SummaryWriter(config["tensorboard_dir"], purge_step=trainer.step + 1)
    publish = None
    if writer and config.get("tensorboard_uri"):
        # This worker's node may share no disk with the driver, and may be lost: its curves
        # go to the URI at every validation, not only at the end.
        tensorboard = (config["tensorboard_dir"], config["tensorboard_uri"])
        publish = functools.partial(storage.upload_dir, *tensorboard)

    _steps(cfg, trainer, batches, val, progress, steps_per_epoch, writer, device, publish)
    if writer:
        writer.close()
        if publish:
            publish()


Batches = MemoryBatches | StreamBatches


def _data_and_model(
    cfg: Config, config: dict[str, Any], source: PairSource, rank: int, world: int
) -> tuple[JAM, int, Callable[[torch.device], tuple[Batches, str]]]:
    """The model, standardised by the moments of every worker's data, the steps per epoch,
    and how to make this worker's batches on a device (with a line saying where they live)."""
    tcfg = cfg.train
    stream_rows = config.get("stream_rows")
    if stream_rows is None:
        # Only this worker's shards are read (two layer columns, row batches at a time).
        index = source.index("train")
        plan = batch_plan(tcfg, len(index))
        data = source.load_index(index, select=plan.worker_rows(rank, world))
        model = JAM(jam_config(tcfg, data.image.shape[1], data.text.shape[1]))
        fit_global_input_stats(model, torch.as_tensor(data.image), torch.as_tensor(data.text))

        def memory_batches(device: torch.device) -> tuple[Batches, str]:
            share = config.get("gpu_share", 1.0)
            batches = MemoryBatches(data, plan, tcfg.data_on_device, rank, world, device, share)
            where = (
                f"{plan.shards} data shard(s) of {plan.shard_size} pairs; each worker holds "
                f"{len(data)} pairs {batches.where}"
            )
            return batches, where

        return model, plan.steps_per_epoch, memory_batches
    # Ray Train hands each worker an equal share of the pair view, one epoch per pass.
    shard = ray.train.get_dataset_shard("train")
    per_worker = tcfg.batch_size // world
    steps_per_epoch = stream_rows // world // per_worker
    model = JAM(jam_config(tcfg, *config["dims"]))
    moments = []  # one extra pass over the stream, for the standardisation's moments
    for batch in shard.iter_batches(batch_size=STATS_BATCH, batch_format="pyarrow"):
        x = arrays(batch)
        moments.append(input_moments(torch.as_tensor(x["image"]), torch.as_tensor(x["text"])))
    set_global_input_stats(model, torch.stack(moments).sum(0))
    where = (
        f"streaming {stream_rows} pairs through Ray Data ({config['stream_reason']}), "
        f"{per_worker} per worker per step"
    )

    def stream_batches(device: torch.device) -> tuple[Batches, str]:
        return StreamBatches(shard, per_worker, steps_per_epoch, device), where

    return model, steps_per_epoch, stream_batches


def checkpoint_at(uri: str) -> ray.train.Checkpoint:
    """A Ray Train checkpoint at a local path or an `s3://` URI (read through storage's
    filesystem, so the endpoint and credentials are the environment's)."""
    fs, path = storage.pyarrow_fs(uri)
    return ray.train.Checkpoint(path=path, filesystem=fs)


def _restore(config: dict[str, Any], trainer: Trainer, rank: int) -> Progress:
    """Continue from Ray Train's checkpoint (a restarted worker group) or the driver's
    `resume_from` (a stopped run: a path, or an `s3://` URI this worker reads itself, as it
    may run on a node that shares no disk with the driver); a fresh run starts at step 0."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and config.get("resume_from"):
        checkpoint = checkpoint_at(config["resume_from"])
    if not checkpoint:
        return Progress()
    with checkpoint.as_directory() as ckpt:
        saved = JAM.load(Path(ckpt) / MODEL_DIR)
        jam = trainer.jam
        check_dims(saved, jam.cfg.d_image, jam.cfg.d_text, "the checkpoint")
        jam.load_state_dict(saved.state_dict())
        state = torch.load(Path(ckpt) / STATE_FILE, weights_only=True)
        trainer.load_state_dict(state["trainer"])
        history = json.loads((Path(ckpt) / HISTORY_FILE).read_text())
        progress = Progress(state.get("best"), state.get("stale", 0), history)
    if rank == 0:
        print(f"[train] {trainer.tcfg.objective}: resumed at step {trainer.step}", flush=True)
    return progress


def _steps(
    cfg: Config,
    trainer: Trainer,
    batches: Batches,
    val: Pairs | None,
    progress: Progress,
    steps_per_epoch: int,
    writer: Any,
    device: torch.device,
    publish: Callable[[], None] | None = None,
) -> None:
    """Train to the last step, validating and reporting every `eval_every` steps (and
    publishing the TensorBoard events after each, where `publish` is given)."""
    tcfg = cfg.train
    sums: dict[str, float] = {}
    window_start, window_steps = time.perf_counter(), 0
    while trainer.step < trainer.total_steps:
        stats = trainer.train_step(*batches.get(trainer.step))
        window_steps += 1
        for key, value in stats.items():
            sums[key] = sums.get(key, 0.0) + value
            if writer:
                writer.add_scalar(f"train/{key}", value, trainer.step)
        if trainer.step % tcfg.eval_every and trainer.step < trainer.total_steps:
            continue
        elapsed = time.perf_counter() - window_start
        report = {f"train/{k}": v / window_steps for k, v in sums.items()}
        report["train/samples_per_s"] = window_steps * tcfg.batch_size / elapsed
        report |= {"step": trainer.step, "epoch": trainer.step / steps_per_epoch}
        stop = _report(cfg, trainer, val, progress, report, writer)
        if publish:
            publish()
        if all_agree(stop, device):
            break
        sums, window_start, window_steps = {}, time.perf_counter(), 0


def _report(
    cfg: Config,
    trainer: Trainer,
    val: Pairs | None,
    progress: Progress,
    report: dict[str, Any],
    writer: Any,
) -> bool:
    """Validate (rank 0), checkpoint and report; returns rank 0's early-stopping decision."""
    stop = False
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if val is not None:  # rank 0
            stop = _validate(cfg, trainer, val, progress, report)
            _save_checkpoint(Path(tmp), trainer, progress, report)
            ckpt = ray.train.Checkpoint.from_directory(tmp)
            if writer:
                for key, value in report.items():
                    if key.startswith("val/") or key == "train/samples_per_s":
                        writer.add_scalar(key, value, trainer.step)
                writer.flush()
        ray.train.report(report, checkpoint=ckpt)
    return stop


def _validate(
    cfg: Config, trainer: Trainer, val: Pairs, progress: Progress, report: dict[str, Any]
) -> bool:
    """Score the val split into `report`, track the best score; True when patience ran out."""
    tcfg = cfg.train
    scores = score_model(trainer.jam, val, cfg.eval)
    report |= {f"val/{k}": v for k, v in scores.items()}
    score = report[tcfg.best_metric]
    best = progress.best
    improved = best is None or (score > best if tcfg.best_mode == "max" else score < best)
    progress.best, progress.stale = (score, 0) if improved else (best, progress.stale + 1)
    stop = 0 < tcfg.early_stop_patience <= progress.stale
    print(
        f"[train] {tcfg.objective} step {trainer.step}/{trainer.total_steps} "
        f"loss {report['train/loss']:.3f} val i2t_r1 {scores['i2t_r1']:.3f} "
        f"t2i_r1 {scores['t2i_r1']:.3f} mutual_knn {scores['mutual_knn']:.3f} "
        f"{report['train/samples_per_s']:.0f} samples/s" + (" (early stop)" if stop else ""),
        flush=True,
    )
    return stop


def _save_checkpoint(
    directory: Path, trainer: Trainer, progress: Progress, report: dict[str, Any]
) -> None:
    trainer.jam.save(directory / MODEL_DIR)
    torch.save(
        {"trainer": trainer.state_dict(), "best": progress.best, "stale": progress.stale},
        directory / STATE_FILE,
    )
    progress.history.append(report)
    (directory / HISTORY_FILE).write_text(json.dumps(progress.history))
