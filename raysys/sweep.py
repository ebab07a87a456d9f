"""Sweep: the paper's three questions (which objective, which layer depth, which model scale)
answered in one Ray Tune run.

Everything a trial reads is made before Tune starts: each (vision, text) pair is extracted
once, for every layer any trial needs, and the raw (unaligned) scores of every layer pair are
computed once. A trial is a Tune function in the Ray Train V2 pattern: it builds and fits its
own `TorchTrainer` (Train's reports reach Tune's schedulers through `TuneReportCallback`),
scores the exported best model on the test split and reports that results row last.
Trials are small, so several share a device: each asks Ray Train for `1/trials_per_gpu` of a
GPU (or a core per worker on CPU) and Tune runs as many at once as the cluster holds.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raysys import config, storage
from raysys.config import Config
from raysys.errors import ConfigError, RaysysError
from raysys.runtime import Resources

DRIVER_MEMORY = 512 * 2**20  # a trial function's process: torch, raysys, the test split
ASHA_MAX_T = 10**6  # reports (validations): far beyond any trial's
TUNE_DIR = "tune"  # Tune's experiment under the sweep directory (what resume restores)
ROW = "row"  # key of the results row in a trial's last Tune report
SPREAD_ONLY = ("train.alpha", "train.k")  # Spread's own knobs: other objectives ignore them
# `raysys run`'s sweep: two vision scales against one text model, half and full depth.
RUN_MODELS = ("efficientnet-lite0+minilm-l6", "efficientnet-lite1+minilm-l6")
RUN_LAYERS = ("0.5:0.5", "1.0:1.0")
RUN_HIDDEN = (256, 256)  # a fifth of the default JAM's compute: 12 trials fit in 10 minutes
# Set by the sweep for every trial alike (packing, checkpoints), so not sweepable.
FIXED_KEYS = ("train.use_gpu", "train.cpus_per_worker", "train.keep_checkpoints")
AXIS_KEYS = ("train.objective", "train.vision_layer", "train.text_layer", "train.num_workers")


class Interrupted(RaysysError):
    """A sweep stopped (Ctrl-C) with trials left; `resume=` runs only those."""


# --- the axes --------------------------------------------------------------------------


def model_pairs(cfg: Config) -> list[tuple[str, str]]:
    """`sweep.models` as (vision, text) pairs; the extract pair when none are given."""
    entries = cfg.sweep.models or [[cfg.extract.vision, cfg.extract.text]]
    pairs: list[tuple[str, str]] = []
    for entry in entries:
        if isinstance(entry, str):
            parts = entry.split("+")
        elif isinstance(entry, (list, tuple)):
            parts = list(entry)
        elif isinstance(entry, dict) and set(entry) == {"vision", "text"}:
            parts = [entry["vision"], entry["text"]]
        else:
            parts = []
        if len(parts) != 2 or not all(isinstance(p, str) and p.strip() for p in parts):
            raise ConfigError(
                f"sweep.models entry {entry!r} is not a (vision, text) pair; write "
                "VISION+TEXT (efficientnet-lite1+minilm-l6) or a two-item list"
            )
        pair = (parts[0].strip(), parts[1].strip())
        if pair in pairs:
            raise ConfigError(f"sweep.models lists {pair[0]}+{pair[1]} twice")
        pairs.append(pair)
    return pairs


Side = int | float  # a layer index, or a relative depth in (0, 1]


def _side(value: Any, entry: Any) -> Side:
    bad = ConfigError(
        f"sweep.layers entry {entry!r}: each side is a layer index (8, -1) or a relative "
        "depth in (0, 1] written with a point (0.5, 1.0)"
    )
    if isinstance(value, bool):
        raise bad
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(text) if ("." in text or "e" in text.lower()) else int(text)
        except ValueError:
            raise bad from None
    if isinstance(value, float) and not 0.0 < value <= 1.0:
        raise bad
    if not isinstance(value, (int, float)):
        raise bad
    return value


def layer_pairs(cfg: Config) -> list[tuple[Side, Side]]:
    """(vision, text) layer pairs: explicit `sweep.layers`, else the depth grid, else the
    train config's single pair."""
    s = cfg.sweep
    if s.layers:
        pairs = []
        for entry in s.layers:
            if isinstance(entry, int) and entry >= 60:
                raise ConfigError(
                    f"sweep.layers entry {entry!r} is a number: YAML reads an unquoted 8:6 as "
                    "base 60; quote the pair ('8:6') or write it as a list [8, 6]"
                )
            parts = entry.split(":") if isinstance(entry, str) else entry
            if not isinstance(parts, (list, tuple)) or len(parts) != 2:
                raise ConfigError(f"sweep.layers entry {entry!r} is not a V:T pair (e.g. 0.5:1.0)")
            pairs.append((_side(parts[0], entry), _side(parts[1], entry)))
    elif s.vision_depths or s.text_depths:
        if not (s.vision_depths and s.text_depths):
            raise ConfigError("set both sweep.vision_depths and sweep.text_depths for a depth grid")
        pairs = [
            (_side(float(v), v), _side(float(t), t))
            for v, t in itertools.product(s.vision_depths, s.text_depths)
        ]
    else:
        pairs = [(cfg.train.vision_layer, cfg.train.text_layer)]
    keys = [tuple((type(side).__name__, side) for side in pair) for pair in pairs]
    if len(set(keys)) != len(keys):  # 1 (layer one) and 1.0 (full depth) are different layers
        raise ConfigError(f"sweep layer pairs repeat: {pairs}")
    return pairs


def param_grid(cfg: Config, objective: str) -> list[dict[str, Any]]:
    """Every combination of `sweep.params` for one objective (Spread's knobs only for it)."""
    params = cfg.sweep.params
    for key, values in params.items():
        if not key.startswith("train.") or key in AXIS_KEYS + FIXED_KEYS:
            raise ConfigError(
                f"sweep.params key {key!r}: sweep any train.* hyper-parameter except "
                f"{', '.join(AXIS_KEYS + FIXED_KEYS)} (objectives, layers and workers are axes "
                "of their own; devices and checkpoints are set once for the whole sweep)"
            )
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep.params.{key} must be a non-empty list of values")
        for value in values:
            config.set_key(Config(), key, value)  # a bad key or value fails now, clearly
    keys = [k for k in params if objective == "spread" or k not in SPREAD_ONLY]
    return [
        dict(zip(keys, combo, strict=True))
        for combo in itertools.product(*(params[k] for k in keys))
    ]


def trial_config(base: Config, trial: dict[str, Any]) -> Config:
    """The config one trial trains with: the base plus its objective, params and workers."""
    cfg = config.from_dict(config.to_dict(base))
    config.set_key(cfg, "train.objective", trial["objective"])
    config.set_key(cfg, "train.num_workers", base.sweep.workers_per_trial)
    config.set_key(cfg, "train.keep_checkpoints", base.sweep.keep_checkpoints)
    for key, value in trial["params"].items():
        config.set_key(cfg, key, value)
    return cfg.validate()


# --- preparation: everything trials read ---------------------------------------------------


@dataclass
class Prepared:
    """One model pair's extraction and the per-layer-pair facts trials need."""

    vision: str
    text: str
    vision_params: int
    text_params: int
    layers: list[dict[str, Any]]  # per layer pair: ids, depths, Paths, raw test scores


def _short(name: str) -> str:
    tail = re.split(r"[/:]", name.rstrip("/"))[-1] or name
    return _slug(tail)[:24]


def _slug(value: Any) -> str:
    """Safe in a directory name, an S3 key and a Ray Train run name."""
    return re.sub(r"[^A-Za-z0-9.-]+", "-", str(value)).strip("-")


def _needed_layers(spec: str, ids: list[int], n: int) -> str:
    """The extract layer spec (over a model's `n` hidden states) widened to every layer the
    sweep trains on."""
    from raysys.backbones import select_layers

    if spec.strip().lower() in ("", "all"):
        return spec
    return ",".join(str(i) for i in sorted(set(select_layers(spec, n)) | set(ids)))


def check_plan(cfg: Config) -> None:
    """Every trial's config is valid, and the search is well set: checked before any
    extraction, so a typo costs seconds, not hours of embedding."""
    from raysys.pipeline import check_best_metric

    check_best_metric(cfg)
    if cfg.sweep.search == "random" and not cfg.sweep.num_samples:
        raise ConfigError("sweep.search=random needs sweep.num_samples (how many trials to draw)")
    for objective in cfg.objectives:
        for params in param_grid(cfg, objective):
            try:
                trial_config(cfg, {"objective": objective, "params": params})
            except ConfigError as err:
                what = params or "the base config"
                raise ConfigError(f"a {objective} trial with {what}: {err}") from None


def resolve_layers(cfg: Config) -> list[tuple[str, str, dict[str, Any], list[tuple[int, int]]]]:
    """Per model pair: its backbones (all layers) and the hidden-state ids of each layer
    pair. Every pair is checked (model ids, layer ranges) before anything is extracted."""
    from raysys.backbones import select_layers
    from raysys.extract import configured_backbone

    layer_axis = layer_pairs(cfg)
    resolved = []
    for vision, text in model_pairs(cfg):
        ecfg = dataclasses.replace(
            cfg.extract, vision=vision, text=text, vision_layers="all", text_layers="all"
        )
        full = {m: configured_backbone(ecfg, m) for m in ("image", "text")}
        for backbone in full.values():
            backbone.check()
        ids = []
        for v, t in layer_axis:
            pair = []
            for side, modality in ((v, "image"), (t, "text")):
                spec = repr(float(side)) if isinstance(side, float) else str(side)
                n = len(full[modality].layer_ids)
                pair.append(select_layers(spec, n, full[modality].name)[0])
            ids.append(tuple(pair))
        if len(set(ids)) != len(ids):
            same = [layer_axis[i] for i, x in enumerate(ids) if ids.count(x) > 1]
            raise ConfigError(
                f"sweep layer pairs {same} name the same layers of {vision} + {text} "
                f"({sorted(set(x for x in ids if ids.count(x) > 1))}); drop one"
            )
        resolved.append((vision, text, full, ids))
    return resolved


def prepare(cfg: Config) -> list[Prepared]:
    """Extract every model pair once (all layers any trial needs) and score the raw pairs."""
    from raysys.backbones import layer_name
    from raysys.evaluate import score_raw
    from raysys.extract import extract
    from raysys.pipeline import check_split_sizes
    from raysys.train import Paths

    check_plan(cfg)
    prepared, params_cache = [], {}
    for vision, text, full, ids in resolve_layers(cfg):
        totals = {m: len(b.layer_ids) for m, b in full.items()}
        ecfg = dataclasses.replace(
            cfg.extract,
            vision=vision,
            text=text,
            vision_layers=_needed_layers(
                cfg.extract.vision_layers, [i for i, _ in ids], totals["image"]
            ),
            text_layers=_needed_layers(
                cfg.extract.text_layers, [j for _, j in ids], totals["text"]
            ),
        )
        ext = extract(dataclasses.replace(cfg, extract=ecfg))
        for name, backbone in ((vision, full["image"]), (text, full["text"])):
            if name not in params_cache:
                params_cache[name] = backbone.param_count()
        layers = []
        for vid, tid in ids:
            paths = Paths(
                corpus_dir=str(ext.corpus_dir),
                image_dir=str(ext.image_dir),
                text_dir=str(ext.text_dir),
                image_layer=layer_name(vid),
                text_layer=layer_name(tid),
            )
            for manifest, column in ((ext.image_manifest, vid), (ext.text_manifest, tid)):
                if layer_name(column) not in manifest["layers"]:
                    raise ConfigError(f"layer {column} of {manifest['backbone']} is not cached")
            splits = {split: paths.load(split) for split in ("val", "test")}
            sizes = {"train": len(paths.index("train"))} | {k: len(v) for k, v in splits.items()}
            check_split_sizes(cfg, sizes)
            # The split the trials are scored on, read once.
            split = cfg.eval.split
            scored = splits[split] if split in splits else paths.load(split)
            layers.append(
                {
                    "vision_layer": vid,
                    "text_layer": tid,
                    "vision_depth": round(vid / max(1, totals["image"] - 1), 4),
                    "text_depth": round(tid / max(1, totals["text"] - 1), 4),
                    "paths": dataclasses.asdict(paths),
                    "raw": score_raw(scored, cfg.eval),
                }
            )
        prepared.append(Prepared(vision, text, params_cache[vision], params_cache[text], layers))
    return prepared


def plan_trials(cfg: Config, prepared: list[Prepared]) -> list[dict[str, Any]]:
    """Every trial (objective × models × layers × params), then the `random` sample if asked."""
    trials = []
    for objective in cfg.objectives:
        for pair in prepared:
            for layer in pair.layers:
                for params in param_grid(cfg, objective):
                    trials.append(
                        {
                            "objective": objective,
                            "vision": pair.vision,
                            "text": pair.text,
                            "vision_params": pair.vision_params,
                            "text_params": pair.text_params,
                            **{k: v for k, v in layer.items()},
                            "params": params,
                        }
                    )
    n = cfg.sweep.num_samples
    if cfg.sweep.search == "random" and not n:
        raise ConfigError("sweep.search=random needs sweep.num_samples (how many trials to draw)")
    if n and n < len(trials):
        keep = sorted(random.Random(cfg.sweep.seed).sample(range(len(trials)), n))
        trials = [trials[i] for i in keep]
    for i, trial in enumerate(trials):
        extra = "".join(f"-{k.split('.')[-1]}{_slug(v)}" for k, v in trial["params"].items())
        trial["id"] = (
            f"t{i:03d}-{trial['objective']}-{_short(trial['vision'])}-{_short(trial['text'])}"
            f"-v{trial['vision_layer']}-t{trial['text_layer']}{extra}"
        )
    return trials


# --- packing -----------------------------------------------------------------------------


@dataclass
class Packing:
    """How trials share the cluster: each trial's workers and what each worker reserves."""

    concurrent: int
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    threads: int

    def describe(self) -> str:
        device = f"{self.gpus_per_worker:g} GPU + " if self.gpus_per_worker else ""
        return (
            f"{self.concurrent} at a time, each {self.workers} worker(s) of "
            f"{device}{self.cpus_per_worker:g} CPU"
        )


def packing(cfg: Config, res: Resources | None = None) -> Packing:
    """Fractional GPUs per trial on a GPU cluster, whole cores on CPU; `max_concurrent_trials`
    is what fits, so Tune never starts a trial whose workers would wait for resources."""
    from raysys.runtime import cluster_resources

    res = res or cluster_resources()
    s, tcfg = cfg.sweep, cfg.train
    workers = s.workers_per_trial
    cpus = tcfg.cpus_per_worker or 1.0
    if tcfg.use_gpu:
        if res.gpus <= 0:
            raise ConfigError("train.use_gpu is set but the cluster has no GPU")
        gpus = 1.0 / s.trials_per_gpu
        fits = min(int(res.gpus * s.trials_per_gpu) // workers, int(res.cpus // (cpus * workers)))
    else:
        gpus = 0.0
        fits = int(res.cpus // (cpus * workers))
    if fits < 1:
        raise ConfigError(
            f"one trial needs {workers} worker(s) of {cpus:g} CPU"
            + (f" and {gpus:g} GPU" if gpus else "")
            + f"; the cluster has {res.cpus:g} CPU and {res.gpus:g} GPU: lower "
            "sweep.workers_per_trial or train.cpus_per_worker"
        )
    concurrent = min(s.max_concurrent, fits) if s.max_concurrent else fits
    return Packing(concurrent, workers, cpus, gpus, max(1, int(cpus)))


# --- one trial -----------------------------------------------------------------------------


def run_trial(
    config_: dict[str, Any], base: dict[str, Any], out_dir: str, pack: dict, uri: str | None
) -> None:
    """Tune entry point: fit this trial's TorchTrainer, score it on test, report the row.

    With `uri` (an s3:// sweep) checkpoints go to S3 through Ray Train and the trial uploads
    its model and TensorBoard files itself: it may run on a node that shares no disk."""
    import ray.tune
    from ray.train import ScalingConfig
    from ray.tune.integration.ray_train import TuneReportCallback

    from raysys.evaluate import score_model
    from raysys.jam import JAM
    from raysys.train import Paths, train

    trial = config_["trial"]
    cfg = trial_config(config.from_dict(base), trial)
    # Every swept key with this trial's value (Spread's knobs included for the others, as
    # set but unused), so all trials share one set of HParams columns.
    params = {key: config.get_key(cfg, key) for key in cfg.sweep.params}
    paths = Paths(**trial["paths"])
    p = Packing(**pack)
    resources = {"CPU": p.cpus_per_worker} | (
        {"GPU": p.gpus_per_worker} if p.gpus_per_worker else {}
    )
    scaling_plan = (
        ScalingConfig(
            num_workers=p.workers, use_gpu=bool(p.gpus_per_worker), resources_per_worker=resources
        ),
        p.threads,
    )
    name = trial["id"]
    out = Path(tempfile.mkdtemp(prefix="raysys-trial-")) if uri else Path(out_dir)
    # resume: a trial restarted by `Tuner.restore` continues from its latest checkpoint.
    result = train(
        cfg,
        paths,
        out,
        name,
        resume=uri is None,
        storage_uri=storage.join(uri, "ray") if uri else None,
        callbacks=[TuneReportCallback()],
        scaling_plan=scaling_plan,
        tensorboard_uri=storage.join(uri, "tensorboard", name) if uri else None,
    )
    model = JAM.load(result.model_dir)
    scores = score_model(model, paths.load(cfg.eval.split), cfg.eval)
    row = {
        "trial": trial["id"],
        "objective": trial["objective"],
        "vision": trial["vision"],
        "text": trial["text"],
        "vision_layer": trial["vision_layer"],
        "text_layer": trial["text_layer"],
        **scores,
        "vision_depth": trial["vision_depth"],
        "text_depth": trial["text_depth"],
        "vision_params": trial["vision_params"],
        "text_params": trial["text_params"],
        **{f"raw_{k}": v for k, v in trial["raw"].items()},
        "train_s": round(result.seconds, 1),
        **params,
    }
    write_trial_hparams(out / "tensorboard" / name, trial, params, scores)
    if uri:
        for part in ("models", "tensorboard"):
            storage.upload_dir(out / part / name, storage.join(uri, part, name))
        shutil.rmtree(out, ignore_errors=True)
    ray.tune.report({**result.metrics, **{f"test/{k}": v for k, v in scores.items()}, ROW: row})


HPARAM_AXES = (
    "objective",
    "vision",
    "text",
    "vision_layer",
    "text_layer",
    "vision_depth",
    "text_depth",
    "vision_params",
    "text_params",
)


def write_trial_hparams(
    log_dir: Path, trial: dict[str, Any], params: dict[str, Any], scores: dict[str, float]
) -> None:
    """One HParams session per trial, all with the same keys, so the tab compares them all."""
    from raysys.tensorboard import write_hparams

    hparams = {k: trial[k] for k in HPARAM_AXES} | params
    write_hparams(log_dir, hparams, {f"test/{k}": v for k, v in scores.items()})


# --- the sweep ---------------------------------------------------------------------------


def _tuner(
    cfg: Config,
    out_dir: Path,
    trials: list[dict[str, Any]],
    pack: Packing,
    restore: bool,
    uri: str | None,
):
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler

    trainable = ray.tune.with_parameters(
        run_trial,
        base=config.to_dict(cfg),
        out_dir=str(out_dir),
        pack=dataclasses.asdict(pack),
        uri=uri,
    )
    # The trial function only waits on its trainer, whose workers hold the CPUs and GPUs; it
    # reserves the memory its process takes (Tune refuses an empty request), no core.
    trainable = ray.tune.with_resources(trainable, {"CPU": 0, "memory": DRIVER_MEMORY})
    if restore:
        return ray.tune.Tuner.restore(
            str(out_dir / TUNE_DIR),
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=True,
        )
    storage_fs, storage_path = None, str(out_dir)
    if uri:  # Tune keeps its experiment state on S3 itself
        storage_fs, storage_path = storage.pyarrow_fs(uri)
    scheduler = None
    if cfg.sweep.search == "asha":
        # Rungs at 1, 4, 16, … validations; a trial that survives every rung runs to its end
        # (and its test row): no max_t cut-off, whatever the number of validations.
        scheduler = ASHAScheduler(
            metric=cfg.train.best_metric,
            mode=cfg.train.best_mode,
            grace_period=1,
            max_t=ASHA_MAX_T,
            stop_last_trials=False,
        )
    return ray.tune.Tuner(
        trainable,
        param_space={"trial": ray.tune.grid_search(trials)},
        tune_config=ray.tune.TuneConfig(
            max_concurrent_trials=pack.concurrent,
            scheduler=scheduler,
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
        ),
    )


def sweep(
    cfg: Config,
    out_dir: Path | str,
    resume: bool = False,
    timings: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Extract, run every trial under Tune (or the unfinished ones of a stopped sweep), then
    write the report; returns the results rows (raw baselines first). `timings` receives
    `fit_s`, the seconds Tune ran the trials (what `bench sweep` compares)."""
    from raysys.pipeline import prepare_out_dir
    from raysys.report import SWEEP_SHOWN, table, write_sweep_report
    from raysys.runtime import init_ray

    started = time.perf_counter()
    uri = None
    if storage.is_remote(out_dir):
        # Tune's state, checkpoints and each trial's files go straight to S3; the report is
        # written in a local stage and uploaded at the end.
        uri = str(out_dir)
        if resume:
            raise ConfigError(
                "resume= needs a local sweep directory; s3:// resume is not supported"
            )
        storage.check_writable(uri)
        if storage.exists(storage.join(uri, TUNE_DIR)):
            raise ConfigError(f"{uri!r} already holds a sweep; choose another --out")
        out_dir = Path(tempfile.mkdtemp(prefix="raysys-sweep-"))
    out_dir = Path(out_dir).resolve()
    if resume:
        if not (out_dir / TUNE_DIR).is_dir():
            raise ConfigError(f"{str(out_dir)!r} holds no sweep to resume (no {TUNE_DIR}/)")
    else:
        prepare_out_dir(out_dir)
        config.dump(cfg, out_dir / "config.yaml")
    init_ray(cfg.ray)
    pack = packing(cfg)  # a trial the cluster cannot hold fails before any extraction
    prepared = prepare(cfg)
    trials = plan_trials(cfg, prepared)
    if resume:
        started_ids = set(trial_status(out_dir)) - {t["id"] for t in trials}
        if started_ids:
            raise ConfigError(
                f"the sweep in {str(out_dir)!r} ran trials its config no longer plans "
                f"({sorted(started_ids)[:3]}); resume with the config it started with (no "
                "overrides of objectives, sweep.*, corpus.* or extract.*)"
            )
    axes = [
        f"{len(cfg.objectives)} objective(s)",
        f"{len(prepared)} model pair(s)",
        f"{len(prepared[0].layers)} layer pair(s)",
    ] + [f"{k} in {v}" for k, v in cfg.sweep.params.items()]
    print(f"[sweep] {len(trials)} trials: {' x '.join(axes)}; {pack.describe()}", flush=True)
    tuner = _tuner(cfg, out_dir, trials, pack, restore=resume, uri=uri)
    fit_started = time.perf_counter()
    grid = tuner.fit()
    if timings is not None:
        timings["fit_s"] = time.perf_counter() - fit_started
    status = trial_status(uri or out_dir)
    rows, problems = [], []
    for result in grid:
        name = (result.config or {}).get("trial", {}).get("id", "?")
        row = (result.metrics or {}).get(ROW)
        if status.get(name) == "TERMINATED" and row is not None:
            rows.append(row)
        elif status.get(name) == "TERMINATED":
            problems.append(f"trial {name} was stopped early by ASHA (no test scores)")
        elif result.error is not None:
            problems.append(f"trial {name} failed: {str(result.error).strip().splitlines()[-1]}")
    rows.sort(key=lambda r: r["trial"])
    # Tune creates trials lazily: one never started is in no status at all.
    unfinished = sum(status.get(t["id"]) not in ("TERMINATED", "ERROR") for t in trials)
    raw = raw_rows(prepared)
    wall = time.perf_counter() - started
    notes = [f"{len(rows)} of {len(trials)} trials finished; wall time {wall:.0f}s."]
    if unfinished:
        notes.append(f"Interrupted: {unfinished} trials unfinished (resume to run them).")
    if rows:
        write_sweep_report(out_dir, raw + rows, notes=notes + problems, location=uri)
        print("\n" + table(raw + rows, SWEEP_SHOWN) + "\n", flush=True)
    for problem in problems:
        print(f"[sweep] {problem}", flush=True)
    if uri:
        storage.upload_dir(out_dir, uri)
        shutil.rmtree(out_dir, ignore_errors=True)
    if unfinished:
        how = (
            f"they are on {uri}; an s3:// sweep cannot be resumed yet"
            if uri
            else f"resume with: raysys sweep resume={out_dir}"
        )
        raise Interrupted(
            f"the sweep stopped with {unfinished} of {len(trials)} trials unfinished; "
            f"finished trials are kept: {how}"
        )
    return raw + rows


def trial_status(out_dir: Path | str) -> dict[str, str]:
    """Each trial's Tune status (TERMINATED, ERROR, PENDING, …) from the saved experiment."""
    from ray.tune import ExperimentAnalysis

    if storage.is_remote(out_dir):
        fs, path = storage.pyarrow_fs(storage.join(out_dir, TUNE_DIR))
        analysis = ExperimentAnalysis(path, storage_filesystem=fs)
    else:
        analysis = ExperimentAnalysis(str(Path(out_dir) / TUNE_DIR))
    return {t.config["trial"]["id"]: t.status for t in analysis.trials}


def raw_rows(prepared: list[Prepared]) -> list[dict[str, Any]]:
    """One `raw` row per (model pair, layer pair): the unaligned baseline."""
    rows = []
    for pair in prepared:
        for layer in pair.layers:
            rows.append(
                {
                    "trial": "",
                    "objective": "raw",
                    "vision": pair.vision,
                    "text": pair.text,
                    "vision_layer": layer["vision_layer"],
                    "text_layer": layer["text_layer"],
                    **layer["raw"],
                    "vision_depth": layer["vision_depth"],
                    "text_depth": layer["text_depth"],
                    "vision_params": pair.vision_params,
                    "text_params": pair.text_params,
                }
            )
    return rows
