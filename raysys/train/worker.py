"""The Ray Train worker: load this worker's data, build the model, run the training loop.

Step-based and resumable at any reported checkpoint. The compute is `raysys.train.step` and
the loop (steps, validation, checkpoints, early stopping agreed by all ranks) is
`raysys.train.loop`; this module adds what only a Ray Train worker does: its data share,
checkpoints through `ray.train.report`, TensorBoard on rank 0 published to the run's URI.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
from torch.utils.tensorboard import SummaryWriter

from raysys import storage
from raysys.config import Config, from_dict
from raysys.data.batches import MemoryBatches, StreamBatches, batch_plan
from raysys.data.source import PairSource
from raysys.evaluate import val_rows
from raysys.jam import JAM
from raysys.train.loop import (
    HISTORY_FILE,
    MODEL_DIR,
    STATE_FILE,
    Progress,
    check_same_epochs,
    load_checkpoint,
    run_steps,
)
from raysys.train.step import (
    Trainer,
    fit_global_input_stats,
    jam_config,
    set_global_input_stats,
)
from raysys.train.streamed import streamed_share

__all__ = ["HISTORY_FILE", "MODEL_DIR", "STATE_FILE", "checkpoint_at", "train_loop"]


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

    val = None
    if rank == 0:  # only the capped, seeded val sample is read (eval.val_pairs)
        val_index = source.index("val")
        val = source.load_index(val_index, select=val_rows(len(val_index), cfg.eval))
    model, steps_per_epoch, batches_of = _data_and_model(cfg, config, source, rank, world, device)
    trainer = Trainer(
        ray.train.torch.prepare_model(model), cfg.train, steps_per_epoch * cfg.train.epochs
    )
    progress = _restore(config, trainer, rank, device)
    check_same_epochs(progress.history, steps_per_epoch)
    # Dropout independent per rank, from the model's own generator, reseeded at each step.
    model.seed_dropout(cfg.train.seed + 1000 * rank, device)
    # After the model and its optimiser state: a GPU's free memory decides where data lives.
    batches, where = batches_of(device)
    del batches_of  # its closure holds the host shard, which the batches no longer need
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

    try:
        run_steps(
            cfg, trainer, batches, val, progress, steps_per_epoch, device, _report, writer, publish
        )
    finally:
        batches.close()  # a stream's reader threads and files
    if writer:
        writer.close()
        if publish:
            publish()


Batches = MemoryBatches | StreamBatches


def _data_and_model(
    cfg: Config,
    config: dict[str, Any],
    source: PairSource,
    rank: int,
    world: int,
    device: torch.device,
) -> tuple[JAM, int, Callable[[torch.device], tuple[Batches, str]]]:
    """The model, standardised by the moments of every worker's data (computed on `device`),
    the steps per epoch, and how to make this worker's batches on a device (with a line
    saying where they live)."""
    tcfg = cfg.train
    stream_rows = config.get("stream_rows")
    if stream_rows is None:
        # Only this worker's shards are read: their buckets' row groups of two layer columns,
        # a record batch at a time.
        index = source.index("train")
        plan = batch_plan(tcfg, len(index), index.buckets)
        data = source.load_index(index, select=plan.worker_rows(rank, world))
        model = JAM(jam_config(tcfg, data.image.shape[1], data.text.shape[1]))
        fit_global_input_stats(model, data.image, data.text, device)

        def memory_batches(device: torch.device) -> tuple[Batches, str]:
            share = config.get("gpu_share", 1.0)
            batches = MemoryBatches(data, plan, tcfg.data_on_device, rank, world, device, share)
            where = (
                f"{plan.shards} data shard(s) of {min(plan.sizes)}-{max(plan.sizes)} pairs "
                f"(by bucket); each worker holds {len(data)} pairs {batches.where}"
            )
            return batches, where

        return model, plan.steps_per_epoch, memory_batches
    share = streamed_share(config, tcfg, rank, world, device)
    model = JAM(jam_config(tcfg, *share.dims))
    set_global_input_stats(model, share.moments)
    return model, share.steps_per_epoch, lambda _device: (share.batches, share.where)


def checkpoint_at(uri: str) -> ray.train.Checkpoint:
    """A Ray Train checkpoint at a local path or an `s3://` URI (read through storage's
    filesystem, so the endpoint and credentials are the environment's)."""
    fs, path = storage.pyarrow_fs(uri)
    return ray.train.Checkpoint(path=path, filesystem=fs)


def _restore(config: dict[str, Any], trainer: Trainer, rank: int, device: torch.device) -> Progress:
    """Continue from Ray Train's checkpoint (a restarted worker group) or the driver's
    `resume_from` (a stopped run: a path, or an `s3://` URI this worker reads itself, as it
    may run on a node that shares no disk with the driver); a fresh run starts at step 0."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and config.get("resume_from"):
        checkpoint = checkpoint_at(config["resume_from"])
    if not checkpoint:
        return Progress()
    with checkpoint.as_directory() as ckpt:
        progress = load_checkpoint(Path(ckpt), trainer, device)
    if rank == 0:
        print(f"[train] {trainer.tcfg.objective}: resumed at step {trainer.step}", flush=True)
    return progress


def _report(summary: dict[str, Any], ckpt: Path | None) -> None:
    """`raysys.train.loop`'s report: Ray Train persists rank 0's checkpoint directory."""
    checkpoint = ray.train.Checkpoint.from_directory(ckpt) if ckpt else None
    ray.train.report(summary, checkpoint=checkpoint)
