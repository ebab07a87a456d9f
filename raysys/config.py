"""Stage configs as dataclasses, loaded from YAML and overridden by dotted `key=value` pairs.

One dataclass per stage keeps each stage's knobs next to the code that reads them; the
resolved tree is written as `config.yaml` beside every run's outputs so a result can always be
traced back to the exact settings that produced it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raysys.errors import ConfigError

OBJECTIVES = ("con", "negcon", "spread")
SEARCHES = ("grid", "random", "asha")
PRECISIONS = ("auto", "float32", "bfloat16", "float16")
CACHE_DTYPES = ("auto", "float16", "float32")
# `raysys run`'s sweep: two vision scales against one text model, half and full depth.
RUN_MODELS = ("efficientnet-lite0+minilm-l6", "efficientnet-lite1+minilm-l6")
RUN_LAYERS = ("0.5:0.5", "1.0:1.0")


MAX_SHARDS = 64  # = raysys.data.pairs.BUCKETS (config imports nothing of the data layer)
INDEX_JOBS = ("auto", "ray", "local")  # who builds a corpus index (`corpus.index_job`)


@dataclass
class CorpusConfig:
    """Which image-text corpus to embed: `synthetic` (built in, offline, the default),
    `manifest` (a JSONL/CSV/Parquet table of images and captions) or `webdataset` (tar shards
    as img2dataset writes them).

    `path` is the manifest file, or the shards: a `.tar`, a directory of them, or a glob;
    local or `s3://`. The `*_key` fields name the manifest columns (or webdataset `.json`
    fields); a caption or negative value may be one string or a list (COCO style: several
    captions per image). Without a `split_key` column, each image's split is drawn from a hash
    of its id with `val_fraction` / `test_fraction`. `limit` keeps the first N images (a quick
    try on a big corpus). `size`, `image_size` and `captions_per_image` shape `synthetic` only.
    `label_key` names a manifest column with each image's class: the zero-shot task `label`,
    its classes prompted with `eval.zeroshot_templates` (the synthetic corpus brings three
    tasks of its own).
    `index_job` says who builds a manifest or webdataset corpus's index on the cache: `ray`
    (a Ray Data job: the driver never holds the pairs), `local` (this process, in memory) or
    `auto` (Ray Data for sources over 64 MiB, where its start-up cost pays off). A `limit` or
    inline image bytes are always indexed locally; `limit` then reads only the source's
    head: the rows up to the first row of image `limit + 1` (shards in name order).
    """

    name: str = "synthetic"
    path: str = ""
    image_key: str = "image"
    caption_key: str = "caption"
    negative_key: str = "negative"
    id_key: str = ""
    split_key: str = "split"
    limit: int = 0
    size: int = 2000
    seed: int = 0
    image_size: int = 224
    captions_per_image: int = 1
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    label_key: str = ""
    index_job: str = "auto"


@dataclass
class ExtractConfig:
    """Frozen backbones and how Ray Data runs them.

    Zero means "derive from the cluster" for `num_actors` and `cpus_per_actor`, so the same
    config neither deadlocks on a 2-core laptop nor idles a GPU node.
    `part_rows` rows make one cache file, written whole by one actor call: the unit a killed
    extraction resumes from (finished parts are kept, only missing ids are embedded).
    `image_size` is the vision input side in pixels (0 = the model's native resolution; set 0
    for real photos). 128 suits the synthetic scenes' flat shapes: on 2 cores it extracts
    about 3x faster than Lite0's native 224 with the same JAM retrieval. It keys the cache, so
    caches of different sizes never mix.
    `cache_dir` may be `s3://bucket/prefix`: the extraction actors write their parts there
    themselves and train workers read them from there, on whichever node they run, so on a
    cluster the bucket is the only storage the nodes need to share.
    `vision_layers` / `text_layers` pick the hidden states cached: `all`, explicit indices
    (`0,6,12`) or relative depths in (0, 1] (`0.25,0.5,1.0`, rounded to the nearest layer) so
    models of different depth share one sweep axis. `*_pooling` is `cls`, `mean` or `last`
    (empty = the family's default).
    """

    vision: str = "efficientnet-lite0"
    text: str = "minilm-l6"
    vision_layers: str = "all"
    text_layers: str = "all"
    vision_pooling: str = ""
    text_pooling: str = ""
    cache_dir: str = "runs/cache"
    batch_size: int = 64
    part_rows: int = 1024
    max_text_length: int = 64
    image_size: int = 128
    num_actors: int = 0
    num_gpus_per_actor: float = 0.0
    cpus_per_actor: float = 0.0
    max_reject_fraction: float = 0.01
    precision: str = "auto"
    cache_dtype: str = "auto"


@dataclass
class TrainConfig:
    """One JAM training run: model shape, objective, optimisation and Ray Train scaling.

    `eval_every` is in optimiser steps: each validation reports metrics and a checkpoint, the
    unit a resumed run restarts from. `best_metric` picks the exported model; early stopping
    (`early_stop_patience` validations without improvement; 0 = off) watches the same metric.
    `max_failures` lets Ray Train restart crashed workers from the last checkpoint.

    The train split is cut into `data_shards` fixed shards by bucket (0 = one per worker; at
    most 64, the buckets every pair belongs to by a hash of its image id: shard s holds the
    buckets b with b % data_shards == s, so shards differ a little in size and an epoch is
    what the smallest one fills); each global batch takes an equal part from every shard
    and each worker loads only its own shards' rows from the cache. Batches depend on
    `data_shards`, not on `num_workers`, so runs with the same shards see the same batches on
    any number of workers that divides them.
    `data_on_device`: auto keeps a worker's shard on its GPU when it fits in half the free
    memory and in host memory otherwise (gathered per batch into pinned buffers); true/false
    force either. When shards would not fit in host memory either (the shards of every Train
    worker a node holds at once, a sweep's packed trials included, over a quarter of its Ray
    memory), auto streams the split through Ray Data instead; `stream` forces that. Streamed
    batches are drawn by Ray Data (files shuffled per epoch, a local shuffle buffer), not by
    the fixed shards above.

    Spread's `alpha` and `k` default to the authors' context variant (α = 0.7, K = 8 nearest
    other captions in the context set): at α = 0.5 its two terms cancel in the context set and
    it is a re-weighted NegCon whatever `k`. The reconstruction term is ½(MSE(image) +
    MSE(positive caption)) in the standardised-feature space (hard negatives only align);
    `cross_reconstruction` adds the two cross-modal terms to that average (¼ of the four).
    """

    objective: str = "con"
    vision_layer: int = -1
    text_layer: int = -1
    hidden: list[int] = field(default_factory=lambda: [512, 512, 512])
    latent: int = 256
    dropout: float = 0.1
    logit_scale: float = 1 / 0.07
    learn_logit_scale: bool = False
    alpha: float = 0.7
    k: int = 8
    cross_reconstruction: bool = False
    lambda_start: float = 1.0
    lambda_end: float = 0.1
    epochs: int = 8
    eval_every: int = 30
    best_metric: str = "val/i2t_r1"
    best_mode: str = "max"
    early_stop_patience: int = 0
    keep_checkpoints: int = 3
    max_failures: int = 0
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    grad_clip: float = 1.0
    seed: int = 0
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 0.0
    data_shards: int = 0
    data_on_device: str = "auto"


@dataclass
class EvalConfig:
    """Metric settings shared by the raw-embedding baseline and every trained model.

    `bootstrap` resamples of the test items (0: none) give each per-item metric (retrieval,
    hard-negative accuracy, reconstruction) a percentile interval at level `interval`, seeded
    so reruns agree; set-level alignment metrics get a half-sampling interval (see
    `raysys.evaluate`). `outlier_q` clamps each matrix at that quantile of |x| before the
    alignment metrics, as platonic-rep does (1: off). `zeroshot_templates` prompt the classes
    of a corpus's `label_key` for zero-shot accuracy.

    Bounded cost at any split size: retrieval and hard negatives are exact over the whole split
    (computed in chunks); the alignment metrics, O(N^2) in memory, run on a seeded sample of at
    most `metric_pairs` images (one caption each, as platonic-rep's 1,024; 0: every image),
    and also at each smaller size of `metric_sizes` (`<metric>_n<size>` columns, to show how
    they move with N); periodic validation scores a seeded sample of at most `val_pairs` val
    pairs (0: all). `sample_seed` draws those samples: the same images for the raw row and
    every model scored on one split, whatever the model.
    """

    knn_k: int = 10
    svcca_dim: int = 10
    retrieval_ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    split: str = "test"
    bootstrap: int = 1000
    interval: float = 0.95
    outlier_q: float = 0.95
    zeroshot_templates: list[str] = field(
        default_factory=lambda: ["a photo of a {}.", "an image of a {}."]
    )
    metric_pairs: int = 1024
    metric_sizes: list[int] = field(default_factory=list)
    val_pairs: int = 2048
    sample_seed: int = 0

    def check(self) -> None:
        """Reject sample sizes the metrics cannot use (`Config.validate` calls this)."""
        least = max(8, self.knn_k + 2)  # CKNNA needs 4 rows, the kNN metrics k + 1 neighbours
        if self.metric_pairs != 0 and self.metric_pairs < least:
            raise ConfigError(
                f"eval.metric_pairs={self.metric_pairs} must be 0 (every image) or at least "
                f"{least} (eval.knn_k={self.knn_k} neighbours); platonic-rep uses 1024"
            )
        for size in self.metric_sizes:
            if isinstance(size, bool) or not isinstance(size, int) or size < least:
                raise ConfigError(
                    f"eval.metric_sizes entry {size!r} must be an image count of at least {least}"
                )
        if self.val_pairs < 0:
            raise ConfigError(f"eval.val_pairs={self.val_pairs} must be >= 0 (0: the whole split)")


@dataclass
class RayConfig:
    """A private local Ray: its CPUs and whether to run the dashboard (on 127.0.0.1; Ray
    Train's state API needs it). Set RAY_ADDRESS to join a running cluster instead.

    On a joined cluster that cannot yet hold the work (an autoscaling one whose GPU nodes start
    on demand, `cluster/gpu.yaml`), the extraction actors, a sweep trial's workers and
    `raysys train`'s workers are requested from the autoscaler, and raysys waits up to
    `scale_timeout_s` seconds for the nodes (a cloud GPU node takes minutes to boot) before
    failing with what was missing; 0 fails at once, as on a fixed-size cluster. A private
    local Ray never waits.
    """

    num_cpus: int | None = None
    dashboard: bool = True
    scale_timeout_s: float = 900.0


@dataclass
class SweepConfig:
    """A Ray Tune sweep over the paper's three axes (`raysys sweep`, and `raysys run`'s small one).

    Trials are the product of the top-level `objectives` × `models` × layer pairs × `params`.
    - `models`: (vision, text) pairs, each `VISION+TEXT` (or a two-item YAML list); empty = the
      `extract.vision` / `extract.text` pair.
    - `layers`: explicit pairs `V:T`, each side an index (`8`, `-1`) or a relative depth
      (`0.5`, `1.0`), so models of different depth share one axis; empty = the grid
      `vision_depths` × `text_depths`; all empty = `train.vision_layer:train.text_layer`.
    - `params`: any `train.*` key to a list of values, e.g. `{train.lr: [1e-3, 3e-4]}`;
      `train.alpha` and `train.k` only vary Spread trials (the others ignore them).
    `search`: `grid` runs every trial; `random` a seeded sample of `num_samples` of them; `asha`
    runs the grid (or the sample, with `num_samples`) under ASHA early stopping on
    `train.best_metric`. Trials are small, so several share a device: each has
    `workers_per_trial` Ray Train workers of `1/trials_per_gpu` GPU (or `cpus_per_worker` CPU,
    default 1), and `max_concurrent` (0 = what the cluster holds now; on an autoscaling cluster
    set it: trials past the nodes that are up ask the autoscaler for more) of them run at once.
    A trial of several workers needs whole GPUs (`trials_per_gpu: 1`): Ray may place two
    fractional-GPU ranks of one trial on one GPU, which NCCL refuses; the plan check says so.
    `seeds` repeats every trial with `train.seed` + 0..N-1 (under `random`, `num_samples`
    counts configurations, each run with every seed); the report then shows each
    configuration's mean over seeds with a t-interval and flags objective differences within
    noise.
    Trials train as populations (`raysys.jam.population`): trials with the same model pair and
    the same train settings but their own (objective, layer pair, lr, weight decay, warm-up,
    clipping, λ, dropout, logit scale, α, K, seed, patience) are stacked, at most `population`
    to a process, and each Tune trial is one population. `population` 0 sizes them so the
    trials fill the concurrent slots (CPU: one population per slot; GPU: also capped by
    what fits in `gpu_memory_gib` times the slot's share of the GPU); 1 trains each trial
    alone. Each population keeps its `keep_checkpoints` latest checkpoints (each holds every
    member's current and best weights; a stopped population resumes from the newest) and
    exports each member's best model. `train_in_trial` (the default) trains a one-worker
    population in its Tune trial's own process, without a Ray Train run of its own (a
    controller and a worker process: 10-12 s a population in `bench sweep` on 2 cores);
    false gives every population a Ray Train run, as populations of several workers have.
    """

    models: list[Any] = field(default_factory=list)
    layers: list[Any] = field(default_factory=list)
    vision_depths: list[float] = field(default_factory=list)
    text_depths: list[float] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    search: str = "grid"
    num_samples: int = 0
    seed: int = 0
    workers_per_trial: int = 1
    trials_per_gpu: int = 4
    keep_checkpoints: int = 1
    max_concurrent: int = 0
    seeds: int = 1
    population: int = 0
    gpu_memory_gib: float = 80.0
    train_in_trial: bool = True


@dataclass
class ProbeConfig:
    """The passive-metric study (`raysys probe`, the paper's Figure 1): matching, easy and hard
    non-matching image-caption pairs scored by each alignment metric after each reduction to
    `dim` dimensions, on `resamples` seeded draws of `pairs` test images (one caption each)
    for error bars. `layers` are `V:T` pairs as in `sweep.layers` (empty: `train.vision_layer`
    and `train.text_layer`); `models` a finished run or sweep directory whose exported models'
    JAM latents are probed beside the raw embeddings (`raysys run` sets it to its own)."""

    pairs: int = 1024
    resamples: int = 10
    dim: int = 50
    reductions: list[str] = field(default_factory=lambda: ["linear", "rbf"])
    metrics: list[str] = field(
        default_factory=lambda: [
            "cca",
            "cka",
            "cka_rbf",
            "unbiased_cka",
            "cknna",
            "svcca",
            "mutual_knn",
        ]
    )
    layers: list[Any] = field(default_factory=list)
    split: str = "test"
    seed: int = 0
    models: str = ""


@dataclass
class Config:
    """The whole pipeline; `objectives` is what `raysys run` trains one after another.

    `resume=<run dir>` continues a stopped `raysys run`/`train` from its last checkpoints,
    with the config saved in that directory.
    """

    name: str = ""
    resume: str = ""
    objectives: list[str] = field(default_factory=lambda: list(OBJECTIVES))
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    def validate(self) -> Config:
        """Reject values that would only fail deep inside a Ray worker."""
        if not self.objectives:
            raise ConfigError(f"objectives is empty; choose from {', '.join(OBJECTIVES)}")
        for objective in [*self.objectives, self.train.objective]:
            if objective not in OBJECTIVES:
                raise ConfigError(
                    f"unknown objective {objective!r}; choose from {', '.join(OBJECTIVES)}"
                )
        if self.corpus.size < 20:
            raise ConfigError(f"corpus.size={self.corpus.size} is too small; use at least 20")
        if self.eval.split not in ("train", "val", "test"):
            raise ConfigError(f"eval.split={self.eval.split!r} must be train, val or test")
        if self.eval.bootstrap < 0:
            raise ConfigError(
                f"eval.bootstrap={self.eval.bootstrap} must be >= 0 (0: no intervals)"
            )
        if not 0 < self.eval.interval < 1:
            raise ConfigError(
                f"eval.interval={self.eval.interval} must lie strictly between 0 and 1, e.g. 0.95"
            )
        if not 0 < self.eval.outlier_q <= 1:
            raise ConfigError(
                f"eval.outlier_q={self.eval.outlier_q} must lie in (0, 1]; 1 turns the clamp off"
            )
        for template in self.eval.zeroshot_templates:
            if str(template).count("{}") != 1:
                raise ConfigError(
                    f"eval.zeroshot_templates entry {template!r} must hold exactly one {{}} "
                    "(where the class name goes), e.g. 'a photo of a {}.'"
                )
        if self.sweep.seeds < 1:
            raise ConfigError(f"sweep.seeds={self.sweep.seeds} must be at least 1")
        if self.train.best_mode not in ("max", "min"):
            raise ConfigError(f"train.best_mode={self.train.best_mode!r} must be max or min")
        if not self.train.best_metric.startswith("val/"):
            raise ConfigError(
                f"train.best_metric={self.train.best_metric!r} must be a validation metric, "
                "e.g. val/mutual_knn, val/i2t_r1, val/recon_mse (with train.best_mode=min)"
            )
        if not 0.0 <= self.train.alpha <= 1.0:
            raise ConfigError(f"train.alpha={self.train.alpha} must lie in [0, 1]")
        if not 0.0 <= self.train.dropout < 1.0:  # 1 would drop every unit (and divide by 0)
            raise ConfigError(f"train.dropout={self.train.dropout} must lie in [0, 1)")
        positive = {
            "train.epochs": self.train.epochs,
            "train.eval_every": self.train.eval_every,
            "train.keep_checkpoints": self.train.keep_checkpoints,
            "train.batch_size": self.train.batch_size,
            "train.num_workers": self.train.num_workers,
            "train.latent": self.train.latent,
            "extract.batch_size": self.extract.batch_size,
        }
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"{key}={value} must be at least 1")
        if self.train.batch_size % self.train.num_workers:
            raise ConfigError(
                f"train.batch_size={self.train.batch_size} must divide evenly over "
                f"train.num_workers={self.train.num_workers} (each worker takes an equal slice "
                "of the global batch)"
            )
        shards = self.train.data_shards or self.train.num_workers
        if shards > MAX_SHARDS:
            raise ConfigError(
                f"{shards} data shards (train.data_shards, else train.num_workers) is more than "
                f"the {MAX_SHARDS} buckets the cache is laid out by; use at most {MAX_SHARDS}"
            )
        if shards < 0 or shards % self.train.num_workers or self.train.batch_size % shards:
            raise ConfigError(
                f"train.data_shards={self.train.data_shards} must be 0 (one per worker) or a "
                f"multiple of train.num_workers={self.train.num_workers} that divides "
                f"train.batch_size={self.train.batch_size}"
            )
        self.eval.check()
        if self.corpus.index_job not in INDEX_JOBS:
            raise ConfigError(
                f"corpus.index_job={self.corpus.index_job!r} must be auto, ray or local"
            )
        if self.sweep.search not in SEARCHES:
            raise ConfigError(
                f"sweep.search={self.sweep.search!r} must be one of {', '.join(SEARCHES)}"
            )
        for key in ("workers_per_trial", "trials_per_gpu", "keep_checkpoints"):
            if getattr(self.sweep, key) < 1:
                raise ConfigError(f"sweep.{key}={getattr(self.sweep, key)} must be at least 1")
        if self.sweep.num_samples < 0 or self.sweep.max_concurrent < 0:
            raise ConfigError("sweep.num_samples and sweep.max_concurrent must be >= 0")
        if self.sweep.population < 0:
            raise ConfigError(
                f"sweep.population={self.sweep.population} must be >= 0 (0: sized by cores "
                "or GPU memory; 1: each trial alone)"
            )
        if self.sweep.gpu_memory_gib <= 0:
            raise ConfigError(
                f"sweep.gpu_memory_gib={self.sweep.gpu_memory_gib} must be > 0 (each GPU's "
                "memory, which sizes populations there)"
            )
        if self.train.data_on_device not in ("auto", "true", "false", "stream"):
            raise ConfigError(
                f"train.data_on_device={self.train.data_on_device!r} must be auto, true, false "
                "or stream"
            )
        if self.extract.precision not in PRECISIONS:
            raise ConfigError(
                f"extract.precision={self.extract.precision!r} must be one of "
                f"{', '.join(PRECISIONS)}"
            )
        if self.extract.cache_dtype not in CACHE_DTYPES:
            raise ConfigError(
                f"extract.cache_dtype={self.extract.cache_dtype!r} must be one of "
                f"{', '.join(CACHE_DTYPES)}"
            )
        return self


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _valid_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            keys += _valid_keys(hint, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert a YAML-parsed value to the field's declared type, or say why it cannot be."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]  # `train.hidden=512` means a one-layer list
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} expects a list (e.g. {key}=a,b), got {value!r}")
        return [_coerce(v, args[0], key) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} expects a mapping, e.g. {key}.train.lr=[0.001,0.0003]")
        return {str(k): v for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} expects true or false, got {value!r}")
    if hint in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key} expects a number, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{key} expects a number, got {value!r}") from None
        if hint is int:
            if not number.is_integer():
                raise ConfigError(f"{key} expects a whole number, got {value!r}")
            return int(number)
        return number
    if hint is str:
        if isinstance(value, bool):  # YAML reads `auto|true|false` choices' true as a bool
            return "true" if value else "false"
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key} expects a string, got {value!r}")
        return str(value)
    return value


def _set(cfg: Any, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = cfg
    for i, part in enumerate(parts):
        names = {f.name for f in dataclasses.fields(node)}
        if part not in names:
            raise ConfigError(
                f"unknown config key {dotted!r}; valid keys are: " + ", ".join(_valid_keys(Config))
            )
        hint = typing.get_type_hints(type(node))[part]
        if typing.get_origin(hint) is dict and i < len(parts) - 1:
            # A mapping field takes dotted keys of its own: sweep.params.train.lr=[...]
            getattr(node, part)[".".join(parts[i + 1 :])] = value
            return
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(hint):
                if not isinstance(value, dict):
                    raise ConfigError(f"{dotted} is a section; set its keys, e.g. {dotted}.KEY=")
                for sub, subvalue in value.items():
                    _set(cfg, f"{dotted}.{sub}", subvalue)
            else:
                setattr(node, part, _coerce(value, hint, dotted))
            return
        if not dataclasses.is_dataclass(hint):
            raise ConfigError(f"{'.'.join(parts[: i + 1])} is not a section; cannot set {dotted}")
        node = getattr(node, part)


def set_key(cfg: Config, dotted: str, value: Any) -> None:
    """Set one dotted key to a Python value, coerced and checked as an override would be."""
    _set(cfg, dotted, value)


def get_key(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _mapping_keys(cls: type | None = None, prefix: str = "") -> set[str]:
    """Dotted names of mapping-valued fields (e.g. sweep.params): YAML gives them whole."""
    cls = cls or Config
    keys: set[str] = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            keys |= _mapping_keys(hint, f"{prefix}{f.name}.")
        elif typing.get_origin(hint) is dict:
            keys.add(prefix + f.name)
    return keys


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and prefix + key not in _mapping_keys():
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults ← YAML file ← `key=value` overrides, then validated."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys")
        for key, value in _flatten(tree).items():
            _set(cfg, key, value)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            problem = str(getattr(exc, "problem", "") or exc).strip()
            raise ConfigError(
                f"override {item!r}: its value is not valid YAML ({problem}); close its "
                "brackets and quotes, or quote the whole value as a YAML string"
            ) from None
        if isinstance(value, int) and ":" in raw:
            value = raw.strip()  # YAML 1.1 reads 8:6 as the base-60 number 486
        _set(cfg, key.strip(), value)
    return cfg.validate()


def given_keys(path: str | Path | None, overrides: list[str] | tuple[str, ...]) -> set[str]:
    """The dotted keys a user set, in the YAML file or as overrides (not the defaults)."""
    keys = {item.partition("=")[0].strip() for item in overrides}
    if path is not None:
        tree = yaml.safe_load(Path(path).read_text()) or {}
        flat = _flatten(tree) if isinstance(tree, dict) else {}
        # Every config.yaml a run writes holds train.objective at its default; that is not a
        # choice, so `raysys run --config runs/X/config.yaml` may repeat the run.
        if flat.get("train.objective") == TrainConfig().objective:
            del flat["train.objective"]
        keys |= set(flat)
    return keys


def from_dict(tree: dict[str, Any]) -> Config:
    """Rebuild a Config inside a Ray worker from its `to_dict` form."""
    cfg = Config()
    for key, value in _flatten(tree).items():
        _set(cfg, key, value)
    return cfg


def for_command(command: str, cfg: Config, given: set[str]) -> Config:
    """A command's config from the user's (`given` names the keys they set): keys the command
    cannot take are refused, and `raysys run`'s defaults fill what the user left unset."""
    if command in ("run", "sweep") and "train.objective" in given:
        raise ConfigError(
            f"{command} trains every entry of `objectives`; set objectives="
            f"{cfg.train.objective} instead of train.objective"
        )
    return run_defaults(cfg, given) if command == "run" else cfg


def run_defaults(cfg: Config, given: set[str]) -> Config:
    """`raysys run`'s small sweep, for whatever the user did not set: EfficientNet-Lite0 and
    Lite1 (two scales) against MiniLM, at half and full depth: 12 trials of the default JAM,
    trained as two populations (one per model pair)."""
    if not given & {"sweep.models", "extract.vision", "extract.text"}:
        cfg.sweep.models = list(RUN_MODELS)
    layer_keys = {"sweep.layers", "sweep.vision_depths", "sweep.text_depths"}
    if not given & (layer_keys | {"train.vision_layer", "train.text_layer"}):
        cfg.sweep.layers = list(RUN_LAYERS)
    return cfg
