"""The sweep's plan: its axes, its trials and how they share the cluster; no Ray, no data
(but `packing`, which on a joined cluster first makes sure one trial fits on it).

Axes are objective x model pair x layer pair x any `train.*` hyper-parameter x seed. Everything
here is checked before any extraction, so a typo costs seconds, not hours of embedding.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from raysys import config, runtime
from raysys.backbones import Backbone, configured_backbone, select_layers
from raysys.checks import check_best_metric, check_sweep_gpus
from raysys.config import Config
from raysys.errors import ConfigError
from raysys.report.schema import RAW, model_row, sweep_axes
from raysys.runtime import Resources

SPREAD_ONLY = ("train.alpha", "train.k")  # Spread's own knobs: other objectives ignore them
# Set by the sweep for every trial alike (packing, checkpoints), so not sweepable.
FIXED_KEYS = ("train.use_gpu", "train.cpus_per_worker", "train.keep_checkpoints")
AXIS_KEYS = ("train.objective", "train.vision_layer", "train.text_layer", "train.num_workers")
SEED_KEY = "train.seed"  # what `sweep.seeds` varies: a swept param of its own, last in each trial


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
    if cfg.sweep.seeds > 1 and SEED_KEY in params:
        raise ConfigError(
            f"sweep.seeds={cfg.sweep.seeds} repeats every trial over {SEED_KEY} (its value "
            f"+ 0..{cfg.sweep.seeds - 1}); sweeping {SEED_KEY} in sweep.params as well would "
            f"repeat the repeats: drop one (sweep.seeds=1, or sweep.params.{SEED_KEY})"
        )
    for key, values in params.items():
        if not key.startswith("train.") or key in AXIS_KEYS + FIXED_KEYS:
            raise ConfigError(
                f"sweep.params key {key!r}: sweep any train.* hyper-parameter except "
                f"{', '.join(AXIS_KEYS + FIXED_KEYS)} (objectives, layers and workers are axes "
                "of their own; devices and checkpoints are set once for the whole sweep)"
            )
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep.params.{key} must be a non-empty list of values")
        set_values = swept_values(key, values)  # a bad key or value fails now, clearly
        repeated = [v for i, v in enumerate(set_values) if v in set_values[:i]]
        if repeated:  # 1e-3 and 0.001 alike: the same trial twice, under two ids
            raise ConfigError(
                f"sweep.params.{key}={values} repeats {repeated[0]!r}: each value trains "
                "once; to repeat trials over seeds, use sweep.seeds"
            )
    keys = [k for k in params if objective == "spread" or k not in SPREAD_ONLY]
    return [
        dict(zip(keys, combo, strict=True))
        for combo in itertools.product(*(params[k] for k in keys))
    ]


def swept_values(key: str, values: list[Any]) -> list[Any]:
    """A swept key's values as the config holds them once set (YAML gives `1e-3` as text;
    the config makes it 0.001), each checked as an override would be."""
    coerced = []
    for value in values:
        probe = Config()
        config.set_key(probe, key, value)
        coerced.append(config.get_key(probe, key))
    return coerced


def seed_values(cfg: Config) -> list[int]:
    """The seeds `sweep.seeds` repeats each trial with: `train.seed` + 0..N-1; none for one
    seed, so a one-seed plan (and the trial ids of a sweep started before seeds) is
    unchanged."""
    if cfg.sweep.seeds <= 1:
        return []
    return [cfg.train.seed + i for i in range(cfg.sweep.seeds)]


def depth_of(side: Side, layer: int, n: int) -> float:
    """A layer pair side's depth column: the relative depth that was asked for (0.5 stays
    0.5 even where it lands on layer 11 of 22), or the realised fraction layer / last layer
    of `n` hidden states when the side was a layer index."""
    if isinstance(side, float):
        return side
    return round(layer / max(1, n - 1), 4)


def trial_config(base: Config, objective: str, params: dict[str, Any]) -> Config:
    """The config one trial trains with: the base plus its objective, params and workers."""
    cfg = config.from_dict(config.to_dict(base))
    config.set_key(cfg, "train.objective", objective)
    config.set_key(cfg, "train.num_workers", base.sweep.workers_per_trial)
    config.set_key(cfg, "train.keep_checkpoints", base.sweep.keep_checkpoints)
    for key, value in params.items():
        config.set_key(cfg, key, value)
    return cfg.validate()


def _short(name: str) -> str:
    tail = re.split(r"[/:]", name.rstrip("/"))[-1] or name
    return _slug(tail)[:24]


def _slug(value: Any) -> str:
    """Safe in a directory name, an S3 key and a Ray Train run name."""
    return re.sub(r"[^A-Za-z0-9.-]+", "-", str(value)).strip("-")


def check_plan(cfg: Config, new: bool = True) -> None:
    """Every trial's config is valid, the search is well set and no two ranks of a trial can
    share a GPU: checked before any extraction, so a typo costs seconds, not hours of
    embedding."""
    check_best_metric(cfg)
    check_sweep_gpus(cfg)
    if cfg.sweep.search == "random" and not cfg.sweep.num_samples:
        raise ConfigError("sweep.search=random needs sweep.num_samples (how many trials to draw)")
    if new and cfg.sweep.search == "grid" and cfg.sweep.num_samples:
        raise ConfigError(
            f"sweep.search=grid runs every trial; sweep.num_samples={cfg.sweep.num_samples} "
            "would quietly run a sample: set sweep.search=random (or asha) to sample"
        )
    for objective in cfg.objectives:
        for params in param_grid(cfg, objective):
            try:
                trial_config(cfg, objective, params)
            except ConfigError as err:
                what = params or "the base config"
                raise ConfigError(f"a {objective} trial with {what}: {err}") from None


# A model pair's names, its backbones by modality (all layers) and its layer pairs' ids.
Resolved = tuple[str, str, dict[str, Backbone], list[tuple[int, int]]]


def check_sweep(cfg: Config, resume: bool = False) -> list[Resolved]:
    """Every check a sweep can make without data (trial configs, search, model ids, layer
    specs against each model's depth); returns the resolved layer pairs `prepare` extracts.
    A resumed sweep keeps its own search, as it was accepted when it started."""
    check_plan(cfg, new=not resume)
    return resolve_layers(cfg)


def resolve_layers(cfg: Config) -> list[Resolved]:
    """Per model pair: its backbones (all layers) and the hidden-state ids of each layer
    pair. Every pair is checked (model ids, layer ranges) before anything is extracted."""
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


# --- typed records ---------------------------------------------------------------------------


@dataclass
class LayerPair:
    """One layer pair of one model pair: hidden-state ids, relative depths, the pair source
    (a `PairSource` as a dict: it travels to Tune trials) and the raw test scores.

    The depths are the axis as asked (`depth_of`): a relative depth asked for stays itself
    even where a model's layers round it (0.5 of EfficientNet-Lite1's 22 is layer 11, 0.52),
    so model pairs share the axis and rows group by it; `vision_layer` / `text_layer` are
    the layers it landed on. A side given as an index has its realised fraction. Records of
    older sweeps hold realised fractions throughout and still load."""

    vision_layer: int
    text_layer: int
    vision_depth: float
    text_depth: float
    source: dict[str, str]
    raw: dict[str, float]


@dataclass
class Prepared:
    """One model pair's extraction and the per-layer-pair facts trials need."""

    vision: str
    text: str
    vision_params: int
    text_params: int
    layers: list[LayerPair]


@dataclass
class Trial:
    """One trial: an objective on one layer pair of one model pair, with swept params."""

    id: str
    objective: str
    vision: str
    text: str
    vision_params: int
    text_params: int
    layer: LayerPair
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain values, as Tune's search space and experiment state hold them."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Trial:
        if "layer" not in d:  # a sweep started before trials were records: flat, `paths`
            keys = ("vision_layer", "text_layer", "vision_depth", "text_depth", "raw")
            layer = {k: d[k] for k in keys} | {"source": d["paths"]}
            d = {k: d[k] for k in ("id", "objective", "vision", "text", "params")} | {
                "vision_params": d["vision_params"],
                "text_params": d["text_params"],
                "layer": layer,
            }
        return cls(**{**d, "layer": LayerPair(**d["layer"])})


def raw_sweep_rows(prepared: list[Prepared]) -> list[dict[str, Any]]:
    """One `raw` row per (model pair, layer pair): the unaligned baseline."""
    return [
        {"trial": ""}
        | model_row(
            RAW,
            pair.vision,
            pair.text,
            layer.vision_layer,
            layer.text_layer,
            layer.raw,
            **sweep_axes(
                pair.vision_params, pair.text_params, layer.vision_depth, layer.text_depth
            ),
        )
        for pair in prepared
        for layer in pair.layers
    ]


def trial_row(
    trial: Trial, scores: dict[str, float], seconds: float, params: dict[str, Any]
) -> dict[str, Any]:
    """A finished trial's row: its axes, test scores, the same layers' raw scores, params
    (the trial's own, its seed included, then `params`: every swept key's value)."""
    layer = trial.layer
    params = {**trial.params, **params}
    return {"trial": trial.id} | model_row(
        trial.objective,
        trial.vision,
        trial.text,
        layer.vision_layer,
        layer.text_layer,
        scores,
        **sweep_axes(trial.vision_params, trial.text_params, layer.vision_depth, layer.text_depth),
        **{f"raw_{k}": v for k, v in layer.raw.items()},
        train_s=round(seconds, 1),
        **params,
    )


def with_planned_depths(rows: list[dict[str, Any]], trials: list[Trial]) -> list[dict[str, Any]]:
    """Rows with each trial's depth columns as this plan has them: a sweep started before
    depths were kept as asked stored realised fractions (0.52) in its trials, and resuming
    it reports them beside raw rows at the asked 0.5. Trial ids name the layer indices,
    which are the same under both, so the ids still match."""
    planned = {t.id: t.layer for t in trials}
    out = []
    for row in rows:
        layer = planned.get(row.get("trial") or "")
        if layer is not None:
            row = row | {"vision_depth": layer.vision_depth, "text_depth": layer.text_depth}
        out.append(row)
    return out


def plan_trials(cfg: Config, prepared: list[Prepared]) -> list[Trial]:
    """Every trial (objective x models x layers x params), then the `random` sample if asked,
    then each repeated over `sweep.seeds` (a sample draws configurations, and every drawn
    one runs with every seed, so the report can average over seeds)."""
    combos = [
        (objective, pair, layer, params)
        for objective in cfg.objectives
        for pair in prepared
        for layer in pair.layers
        for params in param_grid(cfg, objective)
    ]
    n = cfg.sweep.num_samples
    if cfg.sweep.search == "random" and not n:
        raise ConfigError("sweep.search=random needs sweep.num_samples (how many trials to draw)")
    if n and n < len(combos):
        keep = sorted(random.Random(cfg.sweep.seed).sample(range(len(combos)), n))
        combos = [combos[i] for i in keep]
    seeds = seed_values(cfg)
    if seeds:
        combos = [(o, p, ly, {**ps, SEED_KEY: seed}) for o, p, ly, ps in combos for seed in seeds]
    trials = []
    for i, (objective, pair, layer, params) in enumerate(combos):
        extra = "".join(f"-{k.split('.')[-1]}{_slug(v)}" for k, v in params.items())
        trial_id = (
            f"t{i:03d}-{objective}-{_short(pair.vision)}-{_short(pair.text)}"
            f"-v{layer.vision_layer}-t{layer.text_layer}{extra}"
        )
        trials.append(
            Trial(
                trial_id,
                objective,
                pair.vision,
                pair.text,
                pair.vision_params,
                pair.text_params,
                layer,
                params,
            )
        )
    return trials


# --- packing ---------------------------------------------------------------------------------


@dataclass
class Packing:
    """How trials share the cluster: each trial's workers and what each worker reserves."""

    concurrent: int
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    threads: int
    in_trial: bool = False  # a one-worker population trains in its Tune trial's process

    def describe(self) -> str:
        device = f"{self.gpus_per_worker:g} GPU + " if self.gpus_per_worker else ""
        return (
            f"{self.concurrent} at a time, each {self.workers} worker(s) of "
            f"{device}{self.cpus_per_worker:g} CPU"
        )


def packing(cfg: Config, res: Resources) -> Packing:
    """Fractional GPUs per trial on a GPU cluster, whole cores on CPU; `max_concurrent_trials`
    is what fits, so Tune never starts a trial whose workers would wait for resources. A
    fraction of a GPU is for one-worker trials only: ranks of one trial never share a GPU.

    `res` is what the cluster has now. On a joined cluster (RAY_ADDRESS) one trial's workers are
    first checked node by node and, where they do not fit yet, requested from the autoscaler
    (`runtime.ensure_resources`); the trials are then packed onto what arrived. A private local
    Ray is packed as given, so this stays a pure function in tests. There, `sweep.max_concurrent`
    caps the trials at what fits; on a joined cluster it is taken as asked, so an autoscaling
    cluster grows to run that many at once.
    """
    s, tcfg = cfg.sweep, cfg.train
    check_sweep_gpus(cfg)  # a fraction of a GPU per worker is for one-worker trials only
    workers = s.workers_per_trial
    cpus = tcfg.cpus_per_worker or 1.0
    gpus = 1.0 / s.trials_per_gpu if tcfg.use_gpu else 0.0
    if runtime.joined_cluster():
        worker = {"CPU": cpus, "GPU": gpus} if gpus else {"CPU": cpus}
        res = runtime.ensure_resources(
            [worker] * workers,
            "one sweep trial's workers",
            hint="lower sweep.workers_per_trial or train.cpus_per_worker",
        )
    if tcfg.use_gpu:
        if res.gpus <= 0:
            raise ConfigError("train.use_gpu is set but the cluster has no GPU")
        fits = min(int(res.gpus * s.trials_per_gpu) // workers, int(res.cpus // (cpus * workers)))
    else:
        fits = int(res.cpus // (cpus * workers))
    if fits < 1:
        raise ConfigError(
            f"one trial needs {workers} worker(s) of {cpus:g} CPU"
            + (f" and {gpus:g} GPU" if gpus else "")
            + f"; the cluster has {res.cpus:g} CPU and {res.gpus:g} GPU: lower "
            "sweep.workers_per_trial or train.cpus_per_worker"
        )
    if s.max_concurrent and runtime.joined_cluster():
        # Trials past what is up now wait in Tune as pending placement groups, which the
        # autoscaler answers with nodes (up to each node type's max_workers).
        concurrent = s.max_concurrent
    else:
        concurrent = min(s.max_concurrent, fits) if s.max_concurrent else fits
    in_trial = s.train_in_trial and workers == 1
    return Packing(concurrent, workers, cpus, gpus, max(1, int(cpus)), in_trial)
