"""The sweep's Ray Tune run: one Tune trial per planned `Trial`, in the Ray Train V2 pattern.

A trial is a Tune function that builds and fits its own `TorchTrainer` (Train's reports reach
Tune's schedulers through `TuneReportCallback`), scores the exported best model on
`eval.split` and reports its results row last. Trials are small, so several share a device:
each asks Ray Train for `1/trials_per_gpu` of a GPU (or a core per worker on CPU) and Tune
runs as many at once as the cluster holds.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray.tune
from ray.train import ScalingConfig
from ray.tune import ExperimentAnalysis
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from raysys import config, storage
from raysys.config import Config
from raysys.data.source import PairSource
from raysys.errors import ConfigError
from raysys.evaluate import score_model
from raysys.jam import JAM
from raysys.report.tensorboard import write_hparams
from raysys.rundir import RunDir
from raysys.sweep.plan import Packing, Trial, trial_config, trial_row
from raysys.train.driver import train

DRIVER_MEMORY = 512 * 2**20  # a trial function's process: torch, raysys, the test split
ASHA_MAX_T = 10**6  # reports (validations): far beyond any trial's
TUNE_DIR = "tune"  # Tune's experiment under the sweep directory (what resume restores)
ROW = "row"  # key of the results row in a trial's last Tune report


# --- one trial -------------------------------------------------------------------------------


def run_trial(
    config_: dict[str, Any], base: dict[str, Any], out_dir: str, pack: dict, uri: str | None
) -> None:
    """Tune entry point: fit this trial's TorchTrainer, score it, report the results row.

    With `uri` (an s3:// sweep) checkpoints go to S3 through Ray Train and the trial uploads
    its model and TensorBoard files itself: it may run on a node that shares no disk."""
    trial = Trial.from_dict(config_["trial"])
    cfg = trial_config(config.from_dict(base), trial.objective, trial.params)
    # Every swept key with this trial's value (Spread's knobs included for the others, as
    # set but unused), so all trials share one set of HParams columns.
    keys = dict.fromkeys([*cfg.sweep.params, *trial.params])  # the seed too, when seeds > 1
    params = {key: config.get_key(cfg, key) for key in keys}
    source = PairSource(**trial.layer.source)
    packed = Packing(**pack)
    out = Path(tempfile.mkdtemp(prefix="raysys-trial-")) if uri else Path(out_dir)
    # resume: a trial restarted by `Tuner.restore` continues from its latest checkpoint,
    # under the sweep's directory or on its URI (read from whichever machine runs it now).
    result = train(
        cfg,
        source,
        out,
        trial.id,
        resume=True,
        storage_uri=storage.join(uri, "ray") if uri else None,
        callbacks=[TuneReportCallback()],
        scaling_plan=_scaling(packed),
        tensorboard_uri=storage.join(uri, "tensorboard", trial.id) if uri else None,
        # The other trials packed beside this one load their shards into the same nodes.
        trials_at_once=packed.concurrent,
    )
    test, model = source.load(cfg.eval.split), JAM.load(result.model_dir)
    scores = score_model(model, test, cfg.eval, prompts=source.prompts())
    write_trial_hparams(out / "tensorboard" / trial.id, trial, params, scores)
    if uri:
        for part in ("models", "tensorboard"):
            storage.upload_dir(out / part / trial.id, storage.join(uri, part, trial.id))
        shutil.rmtree(out, ignore_errors=True)
    row = trial_row(trial, scores, result.seconds, params)
    ray.tune.report({**result.metrics, **{f"test/{k}": v for k, v in scores.items()}, ROW: row})


def _scaling(p: Packing) -> tuple[ScalingConfig, int]:
    """A packed trial's Ray Train scaling and torch threads per worker."""
    resources = {"CPU": p.cpus_per_worker} | (
        {"GPU": p.gpus_per_worker} if p.gpus_per_worker else {}
    )
    use_gpu = bool(p.gpus_per_worker)
    return (
        ScalingConfig(num_workers=p.workers, use_gpu=use_gpu, resources_per_worker=resources),
        p.threads,
    )


def write_trial_hparams(
    log_dir: Path, trial: Trial, params: dict[str, Any], scores: dict[str, float]
) -> None:
    """One HParams session per trial, all with the same keys, so the tab compares them all."""
    layer = trial.layer
    hparams = {
        "objective": trial.objective,
        "vision": trial.vision,
        "text": trial.text,
        "vision_layer": layer.vision_layer,
        "text_layer": layer.text_layer,
        "vision_depth": layer.vision_depth,
        "text_depth": layer.text_depth,
        "vision_params": trial.vision_params,
        "text_params": trial.text_params,
    } | params
    write_hparams(log_dir, hparams, {f"test/{k}": v for k, v in scores.items()})


# --- the run -----------------------------------------------------------------------------


@dataclass
class Outcome:
    """What a Tune run left: finished rows, problems to report, trials still to run."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # trial ids that ended in an error
    unfinished: int = 0
    fit_s: float = 0.0


def run_trials(
    cfg: Config, run: RunDir, trials: list[Trial], pack: Packing, resume: bool
) -> Outcome:
    """Run every trial under Tune (or the unfinished ones of a stopped sweep)."""
    tuner = _tuner(cfg, run, trials, pack, restore=resume)
    started = time.perf_counter()
    grid = tuner.fit()
    outcome = Outcome(fit_s=time.perf_counter() - started)
    status = trial_status(run.uri or run.local)
    for result in grid:
        name = (result.config or {}).get("trial", {}).get("id", "?")
        row = (result.metrics or {}).get(ROW)
        if status.get(name) == "TERMINATED" and row is not None:
            outcome.rows.append(row)
        elif status.get(name) == "TERMINATED":
            outcome.problems.append(f"trial {name} was stopped early by ASHA (no test scores)")
        elif result.error is not None:
            error = str(result.error).strip().splitlines()[-1]
            outcome.problems.append(f"trial {name} failed: {error}")
            outcome.failed.append(name)
    outcome.rows.sort(key=lambda r: r["trial"])
    # Tune creates trials lazily: one never started is in no status at all.
    outcome.unfinished = sum(status.get(t.id) not in ("TERMINATED", "ERROR") for t in trials)
    return outcome


def _tuner(
    cfg: Config, run: RunDir, trials: list[Trial], pack: Packing, restore: bool
) -> ray.tune.Tuner:
    trainable = ray.tune.with_parameters(
        run_trial,
        base=config.to_dict(cfg),
        out_dir=str(run.local),
        pack=asdict(pack),
        uri=run.uri,
    )
    # The trial function only waits on its trainer, whose workers hold the CPUs and GPUs; it
    # reserves the memory its process takes (Tune refuses an empty request), no core.
    trainable = ray.tune.with_resources(trainable, {"CPU": 0, "memory": DRIVER_MEMORY})
    storage_fs, storage_path = None, str(run.local)
    if run.uri:  # Tune keeps its experiment state on S3 itself
        storage_fs, storage_path = storage.pyarrow_fs(run.uri)
    if restore:
        return ray.tune.Tuner.restore(
            storage.join(storage_path, TUNE_DIR),
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=storage_fs,
        )
    return ray.tune.Tuner(
        trainable,
        param_space={"trial": ray.tune.grid_search([t.to_dict() for t in trials])},
        tune_config=ray.tune.TuneConfig(
            max_concurrent_trials=pack.concurrent,
            scheduler=_scheduler(cfg),
            trial_dirname_creator=lambda t: t.config["trial"]["id"],
            trial_name_creator=lambda t: t.config["trial"]["id"],
            # One trial process runs trial after trial: saves a Python + torch start-up each.
            reuse_actors=True,
        ),
        run_config=ray.tune.RunConfig(
            name=TUNE_DIR,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            verbose=0,
            log_to_file=True,
            # A trial whose process died with its node starts again and continues from its
            # latest checkpoint (run_trial resumes); `train.max_failures` bounds both this and
            # Ray Train's restarts of a trial's workers.
            failure_config=ray.tune.FailureConfig(max_failures=cfg.train.max_failures),
        ),
    )


def _scheduler(cfg: Config) -> ASHAScheduler | None:
    if cfg.sweep.search != "asha":
        return None
    # Rungs at 1, 4, 16, … validations; a trial that survives every rung runs to its end
    # (and its test row): no max_t cut-off, whatever the number of validations.
    return ASHAScheduler(
        metric=cfg.train.best_metric,
        mode=cfg.train.best_mode,
        grace_period=1,
        max_t=ASHA_MAX_T,
        stop_last_trials=False,
    )


def trial_status(out_dir: Path | str) -> dict[str, str]:
    """Each trial's Tune status (TERMINATED, ERROR, PENDING, …) from the saved experiment."""
    if storage.is_remote(out_dir):
        fs, path = storage.pyarrow_fs(storage.join(out_dir, TUNE_DIR))
        analysis = ExperimentAnalysis(path, storage_filesystem=fs)
    else:
        analysis = ExperimentAnalysis(str(Path(out_dir) / TUNE_DIR))
    return {t.config["trial"]["id"]: t.status for t in analysis.trials}


def check_resumable(out_dir: Path | str) -> None:
    """A sweep to resume (a directory or `s3://` URI) holds Tune's experiment."""
    if not storage.exists(storage.join(out_dir, TUNE_DIR)):
        raise ConfigError(f"{str(out_dir)!r} holds no sweep to resume (no {TUNE_DIR}/)")


def check_same_plan(out_dir: Path | str, trials: list[Trial]) -> None:
    """A resumed sweep must plan the trials it started with."""
    started_ids = set(trial_status(out_dir)) - {t.id for t in trials}
    if started_ids:
        raise ConfigError(
            f"the sweep in {str(out_dir)!r} ran trials its config no longer plans "
            f"({sorted(started_ids)[:3]}); resume with the config it started with (no "
            "overrides of objectives, sweep.*, corpus.* or extract.*)"
        )
