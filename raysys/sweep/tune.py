"""The sweep's Ray Tune run: one Tune trial per population of trials.

A Tune trial is a function that fits its population (P stacked JAM trials in one process:
`raysys.train.population_driver`), scores each member's exported best model on `eval.split`
and reports the members' results rows last. A one-worker population (the default) trains in
the trial's own process, which holds the worker's `1/trials_per_gpu` of a GPU (or its cores
on CPU); a population of several workers (or any, with `sweep.train_in_trial=false`) fits its
own `TorchTrainer` from the trial, in the Ray Train V2 pattern. Populations are small, so
several share a device, and Tune runs as many at once as the cluster holds. ASHA stops
members, not populations: `raysys.sweep.asha` keeps the sweep's rungs in one actor.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray.tune
import torch
from ray.train import ScalingConfig
from ray.tune import ExperimentAnalysis

from raysys import config, storage
from raysys.checks import STREAMED_LAYER_PAIRS
from raysys.config import Config
from raysys.data.source import PairSource
from raysys.errors import ConfigError
from raysys.evaluate import score_model
from raysys.jam import JAM
from raysys.report.tensorboard import write_hparams
from raysys.rundir import RunDir
from raysys.sweep.asha import asked_before, start_rungs
from raysys.sweep.plan import Packing, Trial, trial_row
from raysys.sweep.populations import PopulationPlan, population_config
from raysys.train.driver import planned_stream
from raysys.train.population_driver import train_population
from raysys.train.population_loop import Member

DRIVER_MEMORY = 512 * 2**20  # a trial function's process: torch, raysys, the test split
TUNE_DIR = "tune"  # Tune's experiment under the sweep directory (what resume restores)
ROWS = "rows"  # key of the members' results rows in a population's last Tune report
STOPPED = "stopped"  # and of its members ASHA stopped
DIVERGED = "diverged"  # and of its members whose weights stopped being finite


def _not_tunes_resume_hint(record: logging.LogRecord) -> bool:
    """Tune's interrupt warning names `Tuner.restore(...)`, which a raysys user cannot call;
    the sweep prints its own `raysys sweep resume=…` instead (`commands._stop_if_unfinished`)."""
    return "Tuner.restore(" not in record.getMessage()


logging.getLogger("ray.tune.tune").addFilter(_not_tunes_resume_hint)


# --- one population ------------------------------------------------------------------------


def run_population(
    config_: dict[str, Any],
    base: dict[str, Any],
    out_dir: str,
    pack: dict,
    uri: str | None,
    rungs: Any = None,
    streams: dict[str, dict[str, Any]] | None = None,
) -> None:
    """Tune entry point: fit this population, score each member's best model, report the
    members' results rows last (`streams`: `plan_streams`'s answer).

    With `uri` (an s3:// sweep) checkpoints go to S3 and the population
    uploads its members' models and TensorBoard files itself: it may run on a node that shares
    no disk. Members stopped by ASHA get no row (as a stopped trial had none), nor do
    members that diverged (their training broke off; a best model, if any, is exported
    unscored); the report lists both."""
    packed = Packing(**pack)
    plan = PopulationPlan.from_dict(config_["population"])
    cfg, member_cfgs = population_config(config.from_dict(base), plan)
    sources: list[dict[str, str]] = []
    for trial in plan.trials:
        if trial.layer.source not in sources:
            sources.append(trial.layer.source)
    layer_of = [sources.index(t.layer.source) for t in plan.trials]
    out = Path(tempfile.mkdtemp(prefix="raysys-population-")) if uri else Path(out_dir)
    result = train_population(
        cfg,
        [c.train for c in member_cfgs],
        [t.id for t in plan.trials],
        [PairSource(**s) for s in sources],
        layer_of,
        out,
        plan.id,
        _scaling(packed),
        resume=True,
        storage_uri=storage.join(uri, "ray") if uri else None,
        tune=True,
        tensorboard_uri=storage.join(uri, "tensorboard") if uri else None,
        trials_at_once=packed.concurrent,
        rungs=rungs,
        here=packed.in_trial,
        streaming=(streams or {}).get(plan.id, {}),
    )
    rows, scored = [], []
    unscored: dict[str, list[str]] = {STOPPED: [], DIVERGED: []}
    for trial, member, member_cfg, model_dir, layer in zip(
        plan.trials, result.members, member_cfgs, result.model_dirs, layer_of, strict=True
    ):
        note = unscored_note(trial.id, member)
        if note is not None:
            unscored[note[0]].append(note[1])
        else:
            scored.append((trial, member_cfg, model_dir, layer))
    tests = {}  # each layer pair's test split and prompts, loaded once
    for layer in dict.fromkeys(layer for *_, layer in scored):
        source = PairSource(**sources[layer])
        tests[layer] = (source.load(cfg.eval.split), source.prompts())
    # Training is over: the cores its workers held are this process's to score with.
    jobs = [(model_dir, *tests[layer]) for _, _, model_dir, layer in scored]
    for (trial, member_cfg, _, _), scores in zip(
        scored, score_members(jobs, cfg, packed.threads), strict=True
    ):
        keys = dict.fromkeys([*member_cfg.sweep.params, *trial.params])
        params = {k: config.get_key(member_cfg, k) for k in keys}
        write_trial_hparams(out / "tensorboard" / trial.id, trial, params, scores)
        rows.append(trial_row(trial, scores, result.seconds, params))
    if uri:
        for trial in plan.trials:
            for part in ("models", "tensorboard"):
                local = out / part / trial.id
                if local.exists():
                    storage.upload_dir(local, storage.join(uri, part, trial.id))
        shutil.rmtree(out, ignore_errors=True)
    # As JSON text: Tune's own loggers would try to log a list as a metric (and warn).
    lists = {ROWS: rows, **unscored}
    ray.tune.report({"members": len(plan.trials), **{k: json.dumps(v) for k, v in lists.items()}})


def unscored_note(trial_id: str, member: Member) -> tuple[str, str] | None:
    """A member that gets no results row: the report key it is listed under and its note
    (`run_trials` words the problem); None for a member to score."""
    if member.stopped == "asha":
        return STOPPED, f"{trial_id} at step {member.stopped_step}"
    if member.stopped == "diverged":
        kept = (
            f"its best model, of step {member.best_step}, exported unscored"
            if member.best is not None
            else "no model: it had no finite validation"
        )
        return DIVERGED, (
            f"{trial_id} diverged at step {member.stopped_step} (its weights or latents NaN "
            f"or Inf; no test scores; {kept})"
        )
    return None


def score_members(
    jobs: list[tuple[Path, Any, Any]], cfg: Config, threads: int
) -> list[dict[str, float]]:
    """Each exported member's scores on its test split (`jobs`: model dir, split, prompts),
    `threads` members at a time on one torch thread each. A member's scoring is mostly
    small, single-threaded work (the half-sample intervals' SVDs), so members side by side
    use the cores where one member cannot: twelve members on 2 cores, 4.5 s -> 2.8 s, with
    the same scores as one after another on one thread."""

    def score(job: tuple[Path, Any, Any]) -> dict[str, float]:
        model_dir, test, prompts = job
        return score_model(JAM.load(model_dir), test, cfg.eval, prompts=prompts)

    workers = max(1, min(threads, len(jobs)))
    previous = torch.get_num_threads()
    torch.set_num_threads(1 if workers > 1 else max(1, threads))
    try:
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(score, jobs))
    finally:
        torch.set_num_threads(previous)


def plan_streams(
    cfg: Config, populations: list[PopulationPlan], pack: Packing
) -> dict[str, dict[str, Any]]:
    """Which populations stream their train split, each streamed view built now, before
    Tune: inside a Tune trial Ray Data's tasks wait forever for a core the trial's placement
    group holds, so the trials read the views with pyarrow (`raysys.data.view_shard`).
    Populations that hold their split in memory get {}."""
    scaling_config, _ = _scaling(pack)
    plans: dict[str, dict[str, Any]] = {}
    seen: dict[tuple, dict[str, Any]] = {}  # counting a split's pairs reads its index: once
    for population in populations:
        tcfg = population_config(cfg, population)[0].train
        sources = list(dict.fromkeys(json.dumps(t.layer.source) for t in population.trials))
        # The batch size sizes a streamed worker's windows (`stream.windows_reason`).
        key = (tuple(sources), tcfg.data_on_device, tcfg.num_workers, tcfg.batch_size)
        if key not in seen:
            source = PairSource(**json.loads(sources[0]))
            # Several layer pairs cannot stream: refused before any view is built.
            refuse = STREAMED_LAYER_PAIRS if len(sources) > 1 else None
            seen[key] = planned_stream(tcfg, source, scaling_config, pack.concurrent, refuse)
        plans[population.id] = seen[key]
    streamed = [p for p in populations if plans[p.id]]
    if streamed:
        settings = plans[streamed[0].id]
        print(
            f"[sweep] {len(streamed)} of {len(populations)} population(s) stream their train "
            f"split ({settings['stream_reason']}); their trials read the pair views with "
            "pyarrow",
            flush=True,
        )
    return plans


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


def trial_resources(p: Packing) -> dict[str, float]:
    """What a Tune trial reserves. A population trained in the trial's process
    (`Packing.in_trial`) holds its worker's share; otherwise the trial only waits on its
    trainer, whose workers hold the CPUs and GPUs, so it reserves the memory its process
    takes (Tune refuses an empty request) and no core."""
    if p.in_trial:
        gpu = {"GPU": p.gpus_per_worker} if p.gpus_per_worker else {}
        return {"CPU": p.cpus_per_worker, "memory": DRIVER_MEMORY} | gpu
    return {"CPU": 0, "memory": DRIVER_MEMORY}


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

    def failed_population(self, name: str, error: str, plans: list[PopulationPlan]) -> None:
        """Every trial of a failed population is a failed trial, named (it counted as one,
        its other members named nowhere)."""
        members = [t.id for p in plans if p.id == name for t in p.trials] or [name]
        self.problems.append(
            f"population {name} failed: {error} (its {len(members)} trial(s): {', '.join(members)})"
        )
        self.failed += members  # each a trial without a row


def run_trials(
    cfg: Config,
    run: RunDir,
    populations: list[PopulationPlan],
    pack: Packing,
    resume: bool,
    streams: dict[str, dict[str, Any]] | None = None,
) -> Outcome:
    """Run every population under Tune (or the unfinished ones of a stopped sweep);
    `streams` is `plan_streams`'s answer."""
    tuner = _tuner(cfg, run, populations, pack, restore=resume, streams=streams)
    started = time.perf_counter()
    grid = tuner.fit()
    outcome = Outcome(fit_s=time.perf_counter() - started)
    status = trial_status(run.uri or run.local)
    for result in grid:
        name = (result.config or {}).get("population", {}).get("id", "?")
        metrics = result.metrics or {}
        if status.get(name) == "TERMINATED" and ROWS in metrics:
            outcome.rows += json.loads(metrics[ROWS])
            outcome.problems += [
                f"trial {s} was stopped early by ASHA (no test scores)"
                for s in _listed(metrics.get(STOPPED))
            ]
            outcome.problems += [f"trial {s}" for s in _listed(metrics.get(DIVERGED))]
        elif result.error is not None:
            error = str(result.error).strip().splitlines()[-1]
            outcome.failed_population(name, error, populations)
    outcome.rows.sort(key=lambda r: r["trial"])
    # Tune creates trials lazily: one never started is in no status at all.
    outcome.unfinished = sum(
        len(p.trials) for p in populations if status.get(p.id) not in ("TERMINATED", "ERROR")
    )
    return outcome


def _listed(value: str | list[str] | None) -> list[str]:
    """A list a population reported as JSON text (a list itself before 2026-12-02)."""
    return json.loads(value) if isinstance(value, str) else list(value or [])


def _tuner(
    cfg: Config,
    run: RunDir,
    populations: list[PopulationPlan],
    pack: Packing,
    restore: bool,
    streams: dict[str, dict[str, Any]] | None = None,
) -> ray.tune.Tuner:
    rungs = None
    if cfg.sweep.search == "asha":  # per member, across populations (`raysys.sweep.asha`)
        rungs = start_rungs()
        if restore:
            ray_dir = storage.join(run.root, "ray")  # where each population's checkpoints are
            asked = asked_before(storage.join(ray_dir, p.id) for p in populations)
            replayed = ray.get(rungs.replay.remote(asked))
            print(f"[sweep] ASHA: {replayed} rung score(s) of the stopped sweep replayed")
    trainable = ray.tune.with_parameters(
        run_population,
        base=config.to_dict(cfg),
        out_dir=str(run.local),
        pack=asdict(pack),
        uri=run.uri,
        rungs=rungs,
        streams=streams or {},
    )
    trainable = ray.tune.with_resources(trainable, trial_resources(pack))
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
        param_space={"population": ray.tune.grid_search([p.to_dict() for p in populations])},
        tune_config=ray.tune.TuneConfig(
            max_concurrent_trials=pack.concurrent,
            trial_dirname_creator=lambda t: t.config["population"]["id"],
            trial_name_creator=lambda t: t.config["population"]["id"],
            # One trial process runs population after population: saves a Python + torch
            # start-up each.
            reuse_actors=True,
        ),
        run_config=ray.tune.RunConfig(
            name=TUNE_DIR,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            verbose=0,
            log_to_file=True,
            # A population whose process died with its node starts again and continues from
            # its latest checkpoint (run_population resumes); `train.max_failures` bounds both
            # this and Ray Train's restarts of its workers.
            failure_config=ray.tune.FailureConfig(max_failures=cfg.train.max_failures),
        ),
    )


def _analysis(out_dir: Path | str) -> ExperimentAnalysis:
    if storage.is_remote(out_dir):
        fs, path = storage.pyarrow_fs(storage.join(out_dir, TUNE_DIR))
        return ExperimentAnalysis(path, storage_filesystem=fs)
    return ExperimentAnalysis(str(Path(out_dir) / TUNE_DIR))


def trial_status(out_dir: Path | str) -> dict[str, str]:
    """Each population's Tune status (TERMINATED, ERROR, PENDING, …) from the saved
    experiment."""
    return {t.config["population"]["id"]: t.status for t in _analysis(out_dir).trials}


def planned_size(out_dir: Path | str) -> int | None:
    """The population size a stopped sweep was grouped by (None: no population started).
    Its default size follows the cluster's slots, which a resume elsewhere may not have."""
    sizes = [t.config.get("population", {}).get("size") for t in _analysis(out_dir).trials]
    return max((s for s in sizes if s), default=None)


def members_of(out_dir: Path | str) -> dict[str, list[str]]:
    """Each started population's member trial ids, from the saved experiment."""
    return {
        t.config["population"]["id"]: [m["id"] for m in t.config["population"]["trials"]]
        for t in _analysis(out_dir).trials
    }


def check_resumable(out_dir: Path | str) -> None:
    """A sweep to resume (a directory or `s3://` URI) holds Tune's experiment."""
    if not storage.exists(storage.join(out_dir, TUNE_DIR)):
        raise ConfigError(f"{str(out_dir)!r} holds no sweep to resume (no {TUNE_DIR}/)")


def check_same_plan(out_dir: Path | str, populations: list[PopulationPlan]) -> None:
    """A resumed sweep must plan the populations it started with."""
    try:
        started = set(trial_status(out_dir))
    except KeyError:  # a sweep started before populations: one Tune trial per trial
        raise ConfigError(
            f"the sweep in {str(out_dir)!r} was started before trials trained as populations "
            "and cannot be resumed by this version; start it again"
        ) from None
    started_ids = started - {p.id for p in populations}
    if started_ids:
        raise ConfigError(
            f"the sweep in {str(out_dir)!r} ran populations its config no longer plans "
            f"({sorted(started_ids)[:3]}): it was started by an older raysys that grouped "
            "trials otherwise (one with sweep.seeds > 1, before seeds were grouped apart); "
            "start it again"
        )
