"""A population as one Ray Train run: the worker (data of every member's layer pair, the
stacked model, the loop) and the driver (fit, then each member's best model exported).

A population's members share one model pair's cache, batch size, step count and seed (the
sweep groups them so), so one data plan, seeded by the population's config, serves all: each
worker reads its shard's rows once per distinct layer pair, and a step's batch is the same
rows for every member, each at its own layers (zero-padded to the widest when widths differ).
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import ray.tune
import torch
from ray.train import ScalingConfig
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback
from torch.utils.tensorboard import SummaryWriter

from raysys import storage
from raysys.checks import STREAMED_LAYER_PAIRS, UNPLANNED_STREAM
from raysys.config import Config, TrainConfig, from_dict, to_dict
from raysys.data.batches import MemoryBatches, batch_plan
from raysys.data.source import PairSource
from raysys.errors import ConfigError, RaysysError
from raysys.evaluate import val_rows
from raysys.jam.population import Population
from raysys.runtime import init_ray
from raysys.train.driver import (
    checkpoint_at,
    fit,
    latest_checkpoint,
    planned_stream,
    run_config,
    saved_checkpoints,
)
from raysys.train.loop import check_same_epochs
from raysys.train.population import PopulationTrainer, build_members
from raysys.train.population_loop import (
    HISTORY_FILE,
    BestWeights,
    Member,
    PopulationProgress,
    Report,
    Validation,
    export_members,
    load_population,
    run_population,
)
from raysys.train.step import input_moments, set_global_input_stats
from raysys.train.streamed import streamed_share

__all__ = ["PopulationResult", "train_population"]


@dataclass
class PopulationResult:
    """What a population's fit left: each member's exported best model and bookkeeping."""

    members: list[Member]
    model_dirs: list[Path]
    history: list[dict[str, Any]]
    seconds: float


# --- the worker --------------------------------------------------------------------------------


class StackedBatches:
    """One batch of rows at every member's layers: ``[P, b, d]`` (zero-padded to the widest
    layer), or the one layer pair's ``[b, d]`` when every member reads the same layers."""

    def __init__(self, per_layer: list[Any], layer_of: list[int], widths: tuple[int, int]):
        self.per_layer, self.widths = per_layer, widths
        self.layer_of = torch.tensor(layer_of)

    def close(self) -> None:
        for layer in self.per_layer:
            layer.close()

    def get(self, step: int) -> tuple[torch.Tensor, ...]:
        batches = [b.get(step) for b in self.per_layer]
        if len(batches) == 1:
            return batches[0]
        d_image, d_text = self.widths
        stacked = []
        for column, width in ((0, d_image), (1, d_text), (2, d_text)):
            parts = [b[column] for b in batches]
            layer = torch.stack(
                [torch.nn.functional.pad(x, (0, width - x.shape[-1])) for x in parts]
            )
            stacked.append(layer[self.layer_of.to(layer.device)])
        return (*stacked, batches[0][3])


@dataclass
class Place:
    """Where a population's loop runs: a Ray Train worker (its rank, device and checkpoint)
    or the Tune trial's own process (rank 0 of 1)."""

    rank: int
    world: int
    device: torch.device
    report: Report
    prepare: Callable[[torch.nn.Module], torch.nn.Module]
    checkpoint: ray.train.Checkpoint | None = None  # a restarted worker group's


def population_loop(config: dict[str, Any]) -> None:
    """Ray Train worker entry point of a population."""
    ctx = ray.train.get_context()
    place = Place(
        rank=ctx.get_world_rank(),
        world=ctx.get_world_size(),
        device=ray.train.torch.get_device(),
        report=_report,
        prepare=ray.train.torch.prepare_model,
        checkpoint=ray.train.get_checkpoint(),
    )
    _run(config, place)


def _run(config: dict[str, Any], place: Place) -> None:
    """Build the population, restore it, train it (on every rank)."""
    logging.getLogger().setLevel(logging.WARNING)
    cfg = from_dict(config["cfg"])
    tcfgs = [TrainConfig(**t) for t in config["members"]]
    ids: list[str] = config["ids"]
    sources = [PairSource(**s) for s in config["sources"]]
    layer_of: list[int] = config["layer_of"]
    rank, world, device = place.rank, place.world, place.device
    torch.set_num_threads(max(1, config.get("threads", 1)))

    val = None
    if rank == 0:  # each layer pair's capped, seeded val sample
        pairs = []
        for source in sources:
            index = source.index("val")
            pairs.append(source.load_index(index, select=val_rows(len(index), cfg.eval)))
        val = Validation(pairs, layer_of)
    population, steps_per_epoch, batches = _data_and_population(
        cfg, config, tcfgs, sources, layer_of, place
    )
    model = place.prepare(population)
    trainer = PopulationTrainer(model, tcfgs, steps_per_epoch * cfg.train.epochs)
    progress = _restore(config, trainer, ids, place)
    check_same_epochs(progress.history, steps_per_epoch)
    for m, member in enumerate(progress.members):
        if member.stopped:
            trainer.freeze(m)
    # Each member's dropout from its own seed (as it would draw alone), independent per rank.
    seeds = [t.seed + 1000 * rank for t in tcfgs]
    trainer.population.seed_dropout(seeds)  # on the device its weights are on
    writers = None
    if rank == 0 and config.get("tensorboard_dir"):
        root = Path(config["tensorboard_dir"])
        writers = [SummaryWriter(root / i, purge_step=trainer.step + 1) for i in ids]
    publish = None
    if writers and config.get("tensorboard_uri"):
        publish = functools.partial(
            _publish, config["tensorboard_dir"], config["tensorboard_uri"], ids
        )
    rungs = None
    if rank == 0 and config.get("rungs") is not None:
        actor = config["rungs"]  # the sweep's `raysys.sweep.asha.Rungs` actor
        rungs = lambda member, t, score: ray.get(actor.stop.remote(member, t, score))  # noqa: E731
    if rank == 0:
        layers = len(set(layer_of))
        print(
            f"[train] population {config.get('name', '')}: {len(ids)} member(s) on {layers} "
            f"layer pair(s), {world} worker(s), {batches.where}",
            flush=True,
        )
    try:
        run_population(
            cfg, trainer, batches, val, progress, steps_per_epoch, device, place.report,
            writers, publish, rungs,
        )  # fmt: skip
    finally:
        batches.close()
    if writers:
        for writer in writers:
            writer.close()
        if publish:
            publish()


def _publish(local: str, uri: str, ids: list[str]) -> None:
    for i in ids:
        storage.upload_dir(Path(local) / i, storage.join(uri, i))


def _data_and_population(
    cfg: Config,
    config: dict[str, Any],
    tcfgs: list[TrainConfig],
    sources: list[PairSource],
    layer_of: list[int],
    place: Place,
) -> tuple[Population, int, Any]:
    """The stacked model, each member standardised by the moments of its own layers over
    every worker's data, the steps per epoch, and this worker's batches."""
    tcfg = cfg.train
    rank, world, device = place.rank, place.world, place.device
    stream_rows = config.get("stream_rows")
    if stream_rows is None:
        index = sources[0].index("train")
        plan = batch_plan(tcfg, len(index), index.buckets)
        select = plan.worker_rows(rank, world)
        data = [s.load_index(index if i == 0 else s.index("train"), select=select) for i, s in
                enumerate(sources)]  # fmt: skip
        if any(len(d) != len(data[0]) for d in data):
            raise RaysysError("the population's layer pairs hold different train pairs")
        dims = [(d.image.shape[1], d.text.shape[1]) for d in data]
        moments = [input_moments(d.image, d.text, device) for d in data]
        share = config.get("gpu_share", 1.0)
        per_layer = [
            MemoryBatches(d, plan, tcfg.data_on_device, rank, world, device, share) for d in data
        ]
        where = (
            f"{plan.shards} data shard(s) of {min(plan.sizes)}-{max(plan.sizes)} pairs "
            f"(by bucket); each worker holds {len(data[0])} pairs {per_layer[0].where}"
        )
        steps_per_epoch = plan.steps_per_epoch
    else:  # one layer pair (the sweep groups a streamed split's members by layer pair)
        share = streamed_share(config, tcfg, rank, world, device)
        dims, moments, per_layer = [share.dims], [share.moments], [share.batches]
        steps_per_epoch, where = share.steps_per_epoch, share.where
    members = build_members(tcfgs, [dims[layer] for layer in layer_of])
    for member, layer in zip(members, layer_of, strict=True):  # all-reduced over ranks
        set_global_input_stats(member, moments[layer])
    population = Population.from_members(members)
    batches = StackedBatches(per_layer, layer_of, (population.d_image, population.d_text))
    batches.where = where
    return population, steps_per_epoch, batches


def _restore(
    config: dict[str, Any], trainer: PopulationTrainer, ids: list[str], place: Place
) -> PopulationProgress:
    """Continue from Ray Train's checkpoint or the driver's `resume_from`; else start."""
    checkpoint = place.checkpoint
    if checkpoint is None and config.get("resume_from"):
        checkpoint = checkpoint_at(config["resume_from"])
    if not checkpoint:
        return PopulationProgress([Member(i) for i in ids], best=BestWeights(trainer.population))
    with checkpoint.as_directory() as ckpt:
        progress = load_population(Path(ckpt), trainer, place.device)
    if [m.id for m in progress.members] != ids:
        raise RaysysError("the checkpoint holds another population's members")
    if place.rank == 0:
        name = config.get("name", "")
        print(f"[train] population {name}: resumed at step {trainer.step}", flush=True)
    return progress


def _report(summary: dict[str, Any], ckpt: Path | None) -> None:
    checkpoint = ray.train.Checkpoint.from_directory(ckpt) if ckpt else None
    ray.train.report(summary, checkpoint=checkpoint)


# --- the driver ------------------------------------------------------------------------------


def train_population(
    cfg: Config,
    tcfgs: list[TrainConfig],
    ids: list[str],
    sources: list[PairSource],
    layer_of: list[int],
    out_dir: Path,
    name: str,
    scaling_plan: tuple[ScalingConfig, int],
    resume: bool = False,
    storage_uri: str | None = None,
    tune: bool = False,
    tensorboard_uri: str | None = None,
    trials_at_once: int = 1,
    rungs: Any = None,
    here: bool = False,
    streaming: dict[str, Any] | None = None,
) -> PopulationResult:
    """Fit a population and export each member's best model to `<out_dir>/models/<member
    id>` (none for a member that diverged before its first validation); `cfg` holds what
    the members share (its `train` is the first member's), `tcfgs` each member's own train
    settings and `layer_of` which of `sources` (layer pairs of one extraction) each member
    reads. Checkpoints, resume and the TensorBoard upload work as
    `raysys.train.driver.train`'s; `rungs` is the sweep's ASHA actor (`raysys.sweep.asha`),
    asked at each validation whether a member stops, and `tune` reports each validation to
    the Tune trial this runs in.

    `streaming` is the sweep's plan of this population's train split
    (`raysys.sweep.tune.plan_streams`: its pair view, already built, read with pyarrow on
    every path; None or {}: held in memory, which is checked again here, where Ray Data must
    not build a view, since it hangs inside a Tune trial).

    With `here` a one-worker population trains in this process (a Tune trial that holds the
    worker's CPU and GPU share itself) instead of a Ray Train worker group: the same loop,
    checkpoints laid out alike, without a controller, a worker process and their start-up
    (10-12 s a population in `raysys bench sweep` on 2 cores, against 30-35 s of training)."""
    init_ray(cfg.ray)
    scaling_config, threads = scaling_plan
    if here and scaling_config.num_workers != 1:
        raise ConfigError("only a one-worker population trains in its caller's process")
    out_dir = out_dir.resolve()
    started = time.perf_counter()
    streaming = streaming or {}
    if not streaming:  # planned in memory; the cluster may hold less now than then
        planned_stream(
            cfg.train, sources[0], scaling_config, trials_at_once, refuse=UNPLANNED_STREAM
        )
    if streaming and len(sources) > 1:
        raise ConfigError(STREAMED_LAYER_PAIRS)
    run_dir = storage.join(storage_uri or out_dir / "ray", name)
    loop_config = {
        "cfg": to_dict(cfg),
        "members": [asdict(t) for t in tcfgs],
        "ids": ids,
        "name": name,
        "sources": [asdict(s) for s in sources],
        "layer_of": layer_of,
        "threads": threads,
        "tensorboard_dir": str(out_dir / "tensorboard"),
        "tensorboard_uri": tensorboard_uri,
        "gpu_share": (scaling_config.resources_per_worker or {}).get("GPU", 1.0) or 1.0,
        "resume_from": latest_checkpoint(run_dir) if resume else None,
        "rungs": rungs,
        **streaming,
    }
    if here:
        _fit_here(loop_config, scaling_config, run_dir, cfg.train, tune)
    else:
        callbacks = [TuneReportCallback()] if tune else None
        trainer = TorchTrainer(
            population_loop,
            train_loop_config=loop_config,
            scaling_config=scaling_config,
            # The latest checkpoints: each holds every member's best weights as well.
            run_config=run_config(
                cfg.train, out_dir, name, storage_uri, callbacks, by_metric=False
            ),
        )
        fit(trainer)
    seconds = time.perf_counter() - started
    # The newest checkpoint (this fit's last, or a finished population's on resume).
    latest = latest_checkpoint(run_dir)
    if latest is None:
        raise RaysysError(f"the population in {run_dir!r} reported no checkpoint; delete it")
    model_dirs = [out_dir / "models" / i for i in ids]
    with checkpoint_at(latest).as_directory() as ckpt:
        members = export_members(Path(ckpt), model_dirs)
        history = json.loads((Path(ckpt) / HISTORY_FILE).read_text())
    return PopulationResult(members, model_dirs, history, seconds)


# --- a one-worker population in its caller's process --------------------------------------


class OwnCheckpoints:
    """The checkpoints of a population trained in its own process, laid out as Ray Train
    lays out a run directory (`checkpoint_*` directories, each file written before the
    history that marks it complete), so `latest_checkpoint` and resume read either; the
    newest `keep` stay (all when `keep` is 0)."""

    def __init__(self, run_dir: str, keep: int) -> None:
        self.run_dir, self.keep = run_dir, keep

    def save(self, ckpt: Path, step: int) -> None:
        dest = storage.join(self.run_dir, f"checkpoint_{step:09d}")
        history = ckpt / HISTORY_FILE
        for path in [*sorted(p for p in ckpt.iterdir() if p != history), history]:
            upload = storage.upload_dir if path.is_dir() else storage.upload_file
            upload(path, storage.join(dest, path.name))
        saved = sorted(saved_checkpoints(self.run_dir), key=lambda c: c.report["step"])
        for old in saved[: -self.keep] if self.keep > 0 else []:
            storage.remove(old.path)


def _fit_here(
    config: dict[str, Any],
    scaling_config: ScalingConfig,
    run_dir: str,
    tcfg: TrainConfig,
    tune: bool,
) -> None:
    """Train as a Ray Train worker of one would, in this process."""
    device = torch.device("cpu")
    if scaling_config.use_gpu:  # Ray points CUDA_VISIBLE_DEVICES at this trial's GPU
        if not torch.cuda.is_available():
            raise RaysysError("this trial was given a GPU, but torch sees no CUDA device")
        device = torch.device("cuda", 0)
    own = OwnCheckpoints(run_dir, tcfg.keep_checkpoints)

    def report(summary: dict[str, Any], ckpt: Path | None) -> None:
        if ckpt is not None:
            own.save(ckpt, summary["step"])
        if tune:
            ray.tune.report(summary)

    _run(config, Place(0, 1, device, report, lambda m: m.to(device)))
