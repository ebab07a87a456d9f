"""The training driver: one JAM run as a Ray Train `TorchTrainer`, then its best model.

Ray Train's four steps: the worker function (`raysys.train.worker.train_loop`), a
`ScalingConfig` that leaves the data tasks a core, a `TorchTrainer`, `fit()`. The best
checkpoint is exported as a plain model directory.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ray.train import (
    Checkpoint,
    CheckpointConfig,
    FailureConfig,
    LoggingConfig,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchTrainer

from raysys import storage
from raysys.checks import check_whole_gpus
from raysys.config import Config, TrainConfig, to_dict
from raysys.data import stream
from raysys.data.source import PairSource
from raysys.errors import ConfigError, RaysysError
from raysys.jam import JAM
from raysys.runtime import ensure_resources, init_ray
from raysys.train.worker import (
    HISTORY_FILE,
    MODEL_DIR,
    STATE_FILE,
    checkpoint_at,
    train_loop,
)


@dataclass
class TrainResult:
    objective: str
    model_dir: Path
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    seconds: float


def scaling(tcfg: TrainConfig) -> tuple[Any, int]:
    """Ray Train scaling, leaving CPU headroom: workers that reserve every core starve the
    Ray Data tasks that feed them, and on 2 cores that deadlocks without a word. On a joined
    cluster that cannot hold the workers yet (GPU nodes that start on demand), they are
    requested from the autoscaler first and the plan is sized from what arrived. With
    `use_gpu` each worker has a whole GPU (Ray Train's default), so no two ranks share one."""
    worker = {"CPU": tcfg.cpus_per_worker or 1.0} | ({"GPU": 1.0} if tcfg.use_gpu else {})
    res = ensure_resources(
        [worker] * tcfg.num_workers,
        f"{tcfg.num_workers} Ray Train worker(s)",
        hint="lower train.num_workers" + (" or set train.use_gpu=false" if tcfg.use_gpu else ""),
    )
    if tcfg.use_gpu and res.gpus < tcfg.num_workers:
        raise ConfigError(
            f"train.use_gpu with train.num_workers={tcfg.num_workers} needs that many GPUs; "
            f"the cluster has {res.gpus:g}"
        )
    cpus = tcfg.cpus_per_worker or max(0.1, min(1.0, (res.cpus - 1) / tcfg.num_workers))
    threads = max(1, int(res.cpus // tcfg.num_workers)) if not tcfg.use_gpu else 2
    return (
        ScalingConfig(
            num_workers=tcfg.num_workers,
            use_gpu=tcfg.use_gpu,
            resources_per_worker={"CPU": cpus},
        ),
        threads,
    )


def _user_error(err: BaseException | None) -> RaysysError | None:
    """The raysys error inside a Ray worker failure, however Ray wrapped it."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, RaysysError):
            return err
        cause = getattr(err, "cause", None)
        err = cause if isinstance(cause, BaseException) else err.__cause__
        seen += 1
    return None


@dataclass
class SavedCheckpoint:
    """A checkpoint directory of a Ray Train run (a path or URI) and the reports it carries
    (one per validation, the last one its own)."""

    path: str
    history: list[dict[str, Any]]

    @property
    def report(self) -> dict[str, Any]:
        return self.history[-1]


def saved_checkpoints(run_dir: Path | str) -> list[SavedCheckpoint]:
    """The complete checkpoints under a Ray Train run directory (local or `s3://`).

    Ray Train restores its own checkpoint list only when the stopped run managed to write
    its snapshot file; reading the checkpoints ourselves makes resume work either way.
    """
    saved = []
    for name in storage.list_names(run_dir):
        if not name.startswith("checkpoint_"):
            continue
        ckpt = storage.join(run_dir, name)
        if not storage.exists(storage.join(ckpt, STATE_FILE)):
            continue  # half-written: the state is saved before the history
        try:
            history = json.loads(storage.read_text(storage.join(ckpt, HISTORY_FILE)))
        except FileNotFoundError:
            continue
        saved.append(SavedCheckpoint(ckpt, history))
    return saved


def latest_checkpoint(run_dir: Path | str) -> str | None:
    """The checkpoint with the most steps under a Ray Train run directory (a path or URI,
    as the worker's `resume_from` takes it), if any."""
    saved = saved_checkpoints(run_dir)
    return max(saved, key=lambda c: c.report["step"]).path if saved else None


def finished_before(
    tcfg: TrainConfig, run_dir: Path | str, model_dir: Path, seconds: float
) -> TrainResult:
    """The result of a resumed run from its checkpoints on storage (local or `s3://`): the
    best of them all, and the latest. Ray's own list holds only this fit's when the stopped
    run's snapshot was lost, so its best could miss one from before; and a run that had
    already trained its last step (or stopped early) reports nothing in this fit."""
    saved = saved_checkpoints(run_dir)
    if not saved:
        raise RaysysError(
            f"the run in {str(run_dir)!r} reported no checkpoint; delete it and rerun"
        )
    sign = 1.0 if tcfg.best_mode == "max" else -1.0
    best = max(saved, key=lambda c: sign * c.report.get(tcfg.best_metric, -sign * math.inf))
    latest = max(saved, key=lambda c: c.report["step"])
    export_model(checkpoint_at(best.path), model_dir)
    return TrainResult(tcfg.objective, model_dir, latest.report, latest.history, seconds)


def worker_bundle(scaling_config: ScalingConfig) -> dict[str, float]:
    """What each Train worker of a scaling plan reserves, as Ray Train fills it in: `use_gpu`
    without a "GPU" amount is a whole GPU, a plan with no resources one CPU."""
    bundle = {k: float(v) for k, v in (scaling_config.resources_per_worker or {}).items() if v}
    if scaling_config.use_gpu:
        bundle.setdefault("GPU", 1.0)
    return bundle or {"CPU": 1.0}


def stream_settings(
    tcfg: TrainConfig,
    source: PairSource,
    worker: dict[str, float] | None = None,
    running: int | None = None,
    refuse: str | None = None,
) -> dict[str, Any]:
    """The loop settings of a train split that streams, its pair view built (once, then
    reused); {} when the workers hold their shards in memory.

    `worker` (what each Train worker reserves) and `running` (how many run at once in the
    cluster: a sweep's concurrent trials times their workers) size the host-memory budget of
    the workers that share a node. With `refuse`, a split that would stream is a ConfigError
    of that message instead (before any view is built)."""
    rows = source.count("train")
    dims, row_bytes = stream.pair_row(source)
    width = dims[0] + 2 * dims[1]
    reason = stream.stream_reason(
        tcfg.data_on_device,
        rows,
        width,
        tcfg.num_workers,
        worker=worker,
        running=running,
        bytes_per_value=row_bytes / width,  # averaged over a row's three columns
    )
    if reason is None:
        return {}
    if refuse:
        raise ConfigError(f"{refuse} (it would stream: {reason})")
    short = stream.windows_reason(
        tcfg.batch_size // tcfg.num_workers,
        rows,
        row_bytes,
        tcfg.num_workers,
        worker=worker,
        running=running,
    )
    if short:
        raise ConfigError(
            f"the train split streams ({reason}), but {short}; lower train.batch_size, or "
            "run fewer workers per node"
        )
    view = stream.write_pair_view(source, "train", rows)
    return {"stream_rows": rows, "stream_reason": reason, "dims": dims, "stream_view": view}


def train(
    cfg: Config,
    source: PairSource,
    out_dir: Path,
    name: str,
    resume: bool = False,
    storage_uri: str | None = None,
    callbacks: list[Any] | None = None,
    scaling_plan: tuple[ScalingConfig, int] | None = None,
    tensorboard_uri: str | None = None,
    trials_at_once: int = 1,
) -> TrainResult:
    """Fit one JAM model with Ray Train; returns the exported best model and its history.

    With `storage_uri` (e.g. s3://bucket/run/ray) Ray Train keeps its checkpoints there,
    else under `<out_dir>/ray`. With `resume`, training continues from the newest checkpoint
    of `<name>` there (a run stopped by Ctrl-C or a lost driver, on any machine); a finished
    run returns at once.
    A sweep trial passes Tune's report callback, its packed `(ScalingConfig, threads)` and
    `trials_at_once` (its packing's concurrent trials, whose workers share the nodes' host
    memory), and with `tensorboard_uri` rank 0 uploads its event files there at the end.
    """
    init_ray(cfg.ray)
    scaling_config, threads = scaling_plan or scaling(cfg.train)
    out_dir = out_dir.resolve()
    started = time.perf_counter()
    streaming = planned_stream(cfg.train, source, scaling_config, trials_at_once)
    run_dir = storage.join(storage_uri or out_dir / "ray", name)  # Ray Train's, for `name`
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "cfg": to_dict(cfg),
            "source": asdict(source),
            "threads": threads,
            "tensorboard_dir": str(out_dir / "tensorboard" / name),
            "tensorboard_uri": tensorboard_uri,
            # A packed trial's worker owns only its fraction of the GPU's memory.
            "gpu_share": (scaling_config.resources_per_worker or {}).get("GPU", 1.0) or 1.0,
            "resume_from": latest_checkpoint(run_dir) if resume else None,
            **streaming,
        },
        scaling_config=scaling_config,
        run_config=run_config(cfg.train, out_dir, name, storage_uri, callbacks),
    )
    result = fit(trainer)
    seconds = time.perf_counter() - started
    model_dir = out_dir / "models" / name
    tcfg = cfg.train
    if resume:
        return finished_before(tcfg, run_dir, model_dir, seconds)
    best = result.get_best_checkpoint(tcfg.best_metric, tcfg.best_mode) or result.checkpoint
    export_model(best, model_dir)
    with result.checkpoint.as_directory() as ckpt:
        history = json.loads((Path(ckpt) / HISTORY_FILE).read_text())
    return TrainResult(tcfg.objective, model_dir, result.metrics, history, seconds)


def planned_stream(
    tcfg: TrainConfig,
    source: PairSource,
    scaling_config: ScalingConfig,
    trials_at_once: int,
    refuse: str | None = None,
) -> dict[str, Any]:
    """`stream_settings` for a scaling plan whose ranks never share a GPU (checked first)."""
    worker = worker_bundle(scaling_config)
    check_whole_gpus(
        scaling_config.num_workers,
        worker.get("GPU", 0.0),
        "this Ray Train scaling plan",
        "give each worker a whole GPU, or use one worker",
    )
    running = scaling_config.num_workers * trials_at_once
    return stream_settings(tcfg, source, worker, running, refuse)


def fit(trainer: TorchTrainer) -> Any:
    """`trainer.fit()`; a bad cache found by a worker (e.g. NaN rows in its shard) is the
    user's error: its message is raised, not Ray's wrapped traceback."""
    try:
        return trainer.fit()
    except Exception as err:
        for failure in getattr(err, "worker_failures", {}).values():
            cause = _user_error(failure)
            if cause is not None:
                raise cause from None
        raise


def run_config(
    tcfg: TrainConfig,
    out_dir: Path,
    name: str,
    storage_uri: str | None,
    callbacks: list[Any] | None,
    by_metric: bool = True,
) -> RunConfig:
    """Checkpoints kept by the best validation metric (`by_metric`; else the latest), under
    `out_dir/ray` or the URI."""
    storage_fs, storage_path = None, str(out_dir / "ray")
    if storage_uri:
        storage_fs, storage_path = storage.pyarrow_fs(storage_uri)
    return RunConfig(
        name=name,
        storage_path=storage_path,
        storage_filesystem=storage_fs,
        checkpoint_config=CheckpointConfig(
            num_to_keep=tcfg.keep_checkpoints,
            checkpoint_score_attribute=tcfg.best_metric if by_metric else "step",
            checkpoint_score_order=tcfg.best_mode if by_metric else "max",
        ),
        failure_config=FailureConfig(max_failures=tcfg.max_failures),
        # Ray Train logs every report at INFO; the validation summaries are what users read.
        logging_config=LoggingConfig(log_level="WARNING"),
        callbacks=callbacks,
    )


def export_model(checkpoint: Checkpoint, model_dir: Path) -> None:
    """A checkpoint's model as a plain model directory (`JAM.load` reads it)."""
    with checkpoint.as_directory() as ckpt:
        JAM.load(Path(ckpt) / MODEL_DIR).save(model_dir)
