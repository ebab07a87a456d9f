"""Evaluate: score raw backbone embeddings and JAM latents on the same split, same metrics.

The raw row is the paper's baseline: how aligned two independently trained models already are.
Retrieval, hard-negative and zero-shot accuracy need one shared space, so the raw row leaves
them empty. The alignment metrics take one caption per image (its first in the split), as
platonic-rep does: with COCO's five captions, repeated images would otherwise count as each
other's nearest neighbours; and both sides first go through platonic-rep's outlier clamp
(`metrics.clamp_outliers` at `eval.outlier_q`; 1 turns it off), which keeps a language model's
few huge outlier dimensions from dominating every inner product.

Every headline metric gets a 95% (`eval.interval`) interval, `<metric>_lo` / `<metric>_hi`:
- Per-item metrics: a seeded percentile bootstrap of the mean over the test items it
  averages. Image->text recall and zero-shot accuracy are over unique images; text->image
  recall, hard-negative accuracy (overall and per kind) and reconstruction are over pairs,
  resampled by image (all captions of a drawn image together: captions of one image are not
  independent, and a per-caption bootstrap would be too narrow on multi-caption corpora).
- Set-level alignment metrics (kNN graphs, Gram matrices): a with-replacement resample repeats
  rows, which become each other's nearest neighbours, so they get a half-sampling interval
  instead (`metrics.half_sample_interval`): `half_samples(cfg)` seeded random halves of the
  images without replacement, the metric on each, centred on the halves' mean and put around
  the full-sample value.

Evaluation is bounded at any split size. Retrieval and hard negatives are exact over the whole
split, the similarity matrix computed a chunk of queries at a time (`metrics.retrieval_hits`).
The alignment metrics build several N x N matrices, so they run on a seeded sample of at most
`eval.metric_pairs` images (`metric_rows`; platonic-rep scores 1,024), drawn from
`eval.sample_seed` and the split alone: the raw row and every model scored on one split see the
same images. `eval.metric_sizes` adds the metrics at smaller (nested) samples,
`<metric>_n<size>`, to show how they move with N; `n_metric_images` records the sample used.
Periodic validation scores a seeded sample of `eval.val_pairs` val pairs (`val_rows`).

Hard negatives are also scored per kind (`hardneg_acc_<kind>`, the kind being the part of the
pair's negative source after `:`), and pairs whose source is `none` are left out of every
hard-negative score. Zero-shot classification (`zeroshot_<task>`) ranks class-prompt
embeddings mapped through the text encoder.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from raysys import metrics
from raysys.config import EvalConfig
from raysys.errors import CorpusError
from raysys.jam import JAM
from raysys.report.schema import MAX_HALF_SAMPLES  # the report's legend counts them too

if TYPE_CHECKING:
    from raysys.data.pairs import Pairs


def alignment(
    image: np.ndarray | torch.Tensor,
    text: np.ndarray | torch.Tensor,
    cfg: EvalConfig,
    with_intervals: bool = False,
) -> dict[str, float]:
    """The representation-similarity metrics of the Platonic Representation Hypothesis, on
    both sides' outlier-clamped rows (platonic-rep's `prepare_features`), then with
    `with_intervals` their half-sample intervals (`alignment_intervals`)."""
    a, b = clamped(image, text, cfg)
    scores = alignment_metrics(a, b, cfg)
    if with_intervals:
        scores |= alignment_intervals(a, b, scores, cfg)
    return scores


def clamped(
    image: np.ndarray | torch.Tensor, text: np.ndarray | torch.Tensor, cfg: EvalConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sides as float32 tensors, clipped at their `cfg.outlier_q` threshold."""
    a = torch.as_tensor(image, dtype=torch.float32)
    b = torch.as_tensor(text, dtype=torch.float32)
    return metrics.clamp_outliers(a, cfg.outlier_q), metrics.clamp_outliers(b, cfg.outlier_q)


def alignment_metrics(a: torch.Tensor, b: torch.Tensor, cfg: EvalConfig) -> dict[str, float]:
    """The metrics on already prepared rows; k and the SVCCA dimension shrink to what N allows
    (a half-sample has half the rows)."""
    k = min(cfg.knn_k, len(a) - 1)
    return {
        "mutual_knn": metrics.mutual_knn(a, b, k=k),
        "cka": metrics.cka(a, b),
        "unbiased_cka": metrics.cka(a, b, unbiased=True),
        "cknna": metrics.cknna(a, b, k=k),
        "svcca": metrics.svcca(a, b, dim=min(cfg.svcca_dim, len(a) - 1, a.shape[1], b.shape[1])),
    }


# The fewest images a half-sample interval is drawn for: halves of 4 rows, what CKNNA needs.
MIN_HALF_SAMPLE_ROWS = 8


def half_samples(cfg: EvalConfig) -> int:
    """How many halves bound the set-level metrics: min(`eval.bootstrap`, 50). Each costs an
    evaluation on half the rows (the kernel metrics are O(N^2): 50 halves cost about 12 full
    evaluations); percentile tails from 50 values are rough but honest about the spread, and
    `eval.bootstrap=0` turns these intervals off with the rest."""
    return min(cfg.bootstrap, MAX_HALF_SAMPLES)


# Halves of at most this many rows are scored on one CPU thread (see `_one_thread`).
SMALL_HALF = 512


@contextlib.contextmanager
def _one_thread(active: bool) -> Iterator[None]:
    """torch on one intra-op thread while active, then as before. Tens of small-matrix metric
    calls gain nothing from torch's thread pool and lose a lot to it on a busy machine
    (measured on 2 loaded cores: 100-row halves 15 ms on one thread, 280 ms on two)."""
    threads = torch.get_num_threads()
    if active:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def alignment_intervals(
    a: torch.Tensor, b: torch.Tensor, full: dict[str, float], cfg: EvalConfig
) -> dict[str, float]:
    """`<metric>_lo` / `<metric>_hi` of each alignment metric by half-sampling the rows
    (`metrics.half_sample_interval`) of already prepared (`clamped`) `a`, `b`; `full` are the
    metrics on all rows (the clamp's threshold is the full sample's, so halves differ only in
    their rows). None when there are fewer than 2 halves or 8 rows, or when a half has too
    few rows for `eval.knn_k` neighbours or `eval.svcca_dim` dimensions (the metrics would
    then cap k or the dimension below the full sample's, measure something else, and claim
    a zero-width interval)."""
    n, rounds = len(a), half_samples(cfg)
    dim = min(cfg.svcca_dim, a.shape[1], b.shape[1])  # what SVCCA uses on the full sample
    if rounds < 2 or n < max(MIN_HALF_SAMPLE_ROWS, 2 * (max(cfg.knn_k, dim) + 1)):
        return {}

    def on_half(rows: np.ndarray) -> list[float]:
        at = torch.as_tensor(rows, device=a.device)
        return list(alignment_metrics(a[at], b[at], cfg).values())

    values = [full[m] for m in full]
    with _one_thread(a.device.type == "cpu" and n // 2 <= SMALL_HALF):
        lo, hi = metrics.half_sample_interval(on_half, n, values, rounds, cfg.interval, seed=0)
    out: dict[str, float] = {}
    for name, low, high in zip(full, lo, hi, strict=True):
        out |= {f"{name}_lo": float(low), f"{name}_hi": float(high)}
    return out


def per_item(
    image: torch.Tensor,
    text: torch.Tensor,
    negative: torch.Tensor,
    index: tuple[np.ndarray, np.ndarray],
    cfg: EvalConfig,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The 0/1 outcomes behind each shared-space metric, grouped by the items they are over:
    unique images (image->text queries) and pairs (caption queries, hard negatives). `index`
    is the split's `Pairs.image_index()`."""
    first, text_to_image = index
    ks = tuple(cfg.retrieval_ks)
    i2t, t2i = metrics.retrieval_hits(image[first], text, text_to_image, ks=ks)
    by_image = {f"i2t_r{k}": i2t[:, j] for j, k in enumerate(ks)}
    by_pair = {f"t2i_r{k}": t2i[:, j] for j, k in enumerate(ks)}
    by_pair["hardneg_acc"] = metrics.hard_negative_wins(image, text, negative)
    return by_image, by_pair


def means(outcomes: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each metric as the mean of its per-item outcomes (recall@k, accuracy), in float32 as
    `metrics.retrieval` and `metrics.hard_negative_accuracy` compute them; NaN over no items."""
    return {
        k: v.to(torch.float32).mean().item() if len(v) else float("nan")
        for k, v in outcomes.items()
    }


def intervals(
    outcomes: dict[str, torch.Tensor], cfg: EvalConfig, groups: np.ndarray | None = None
) -> dict[str, float]:
    """`<metric>_lo` / `<metric>_hi`: the `cfg.interval` percentile bootstrap interval of each
    metric's mean over its items (all of one group resampled together; with `groups`, e.g.
    each caption's image, whole groups are drawn), or none when `cfg.bootstrap` is 0 or there
    are no items."""
    if not outcomes or cfg.bootstrap < 1 or not len(next(iter(outcomes.values()))):
        return {}
    matrix = torch.stack([v.detach().double().cpu() for v in outcomes.values()], dim=1)
    lo, hi = metrics.bootstrap_interval(
        matrix.numpy(), cfg.bootstrap, cfg.interval, seed=0, groups=groups
    )
    out: dict[str, float] = {}
    for j, (name, low, high) in enumerate(zip(outcomes, lo, hi, strict=True)):
        exact = _exact(matrix[:, j].numpy(), groups, cfg.interval)
        if exact is not None:  # 0/1 outcomes: never narrower than the exact bound
            low, high = min(low, exact[0]), max(high, exact[1])
        out |= {f"{name}_lo": float(low), f"{name}_hi": float(high)}
    return out


def _exact(
    values: np.ndarray, groups: np.ndarray | None, level: float
) -> tuple[float, float] | None:
    """The exact (Clopper-Pearson) interval of a rate of 0/1 outcomes; None for others.

    Near 0 or 1 a percentile bootstrap is too narrow: with every item a hit it resamples
    nothing but ones and claims [1, 1], and with one miss in 27 its lower bound (0.889) sat
    above the all-hit one (0.872). Clustered outcomes (`groups`, e.g. captions of one image)
    count as their effective number of independent items (Kish's: the binomial variance over
    the cluster-robust one, between the number of clusters and of items; the clusters
    themselves when the rate is 0 or 1), as Korn and Graubard do for survey proportions."""
    if not len(values) or not np.isin(values, (0.0, 1.0)).all():
        return None
    try:  # here: `raysys bench eval` runs where only torch may be (it times, not reports)
        from scipy import stats
    except ImportError:
        return None

    items, rate = len(values), float(values.mean())
    n = float(items)
    if groups is not None:
        _, cluster = np.unique(groups, return_inverse=True)
        clusters = int(cluster.max()) + 1
        n = float(clusters)
        if 0.0 < rate < 1.0 and clusters > 1:
            sums = np.bincount(cluster, weights=values - rate)  # each cluster's residual sum
            robust = (sums**2).sum() / items**2 * clusters / (clusters - 1)
            # No spread between clusters (each image as often right): as good as every item.
            n = float(
                items if robust == 0 else np.clip(rate * (1 - rate) / robust, clusters, items)
            )
    k, tail = rate * n, (1 - level) / 2
    low = 0.0 if k <= 0 else float(stats.beta.ppf(tail, k, n - k + 1))
    high = 1.0 if k >= n else float(stats.beta.ppf(1 - tail, k + 1, n - k))
    return low, high


NO_NEGATIVE = "none"  # the negative source of a pair that has no real hard negative


def negative_kind(source: str) -> str:
    """`exact:colour` -> `colour`, `generated:swap_colours` -> `swap_colours`, `corpus` ->
    `corpus`: the part after the first `:`, or the whole source without one."""
    return source.partition(":")[2] or source


def hardneg_rows(sources: np.ndarray | None, n: int) -> dict[str, np.ndarray]:
    """The pair rows behind each hard-negative score: `hardneg_acc` over every pair with a real
    negative, `hardneg_acc_<kind>` over each kind's (kinds sorted); sources `none` in neither.
    Without sources (an index that does not record them), `hardneg_acc` over all rows only."""
    if sources is None:
        return {"hardneg_acc": np.arange(n)}
    values, inverse = np.unique(np.asarray(sources, dtype=str), return_inverse=True)
    kinds = np.array([negative_kind(v) if v != NO_NEGATIVE else "" for v in values])
    kind_of_row = kinds[inverse.reshape(-1)]
    rows = {"hardneg_acc": np.flatnonzero(kind_of_row != "")}
    for kind in sorted(set(kinds) - {""}):
        if kind in ("lo", "hi"):  # hardneg_acc_lo is hardneg_acc's interval bound
            raise CorpusError(f"negative source kind {kind!r} is reserved; rename it")
        rows[f"hardneg_acc_{kind}"] = np.flatnonzero(kind_of_row == kind)
    return rows


# Mixed with `eval.sample_seed`, so the evaluation samples never coincide with another seeded
# draw of the same seed (the bootstrap's, a probe's).
SAMPLE_SALT = 0x5A3


def sample_rows(n: int, size: int, seed: int) -> np.ndarray | None:
    """Sorted positions of a seeded sample of `size` of `n` rows, drawn without replacement;
    None when no cap is needed (`size` 0, or at least `n`). The sample is the first `size` of
    one seeded permutation of the `n`, so with one seed a smaller sample lies inside a larger
    one (alignment at several sizes compares nested samples), and it depends only on
    (`n`, `size`, `seed`): the same rows for every model scored on the same split."""
    if n < 0 or size < 0:
        raise ValueError(f"n and size must be >= 0, got n={n}, size={size}")
    if size == 0 or size >= n:
        return None
    order = np.random.default_rng([SAMPLE_SALT, seed]).permutation(n)
    return np.sort(order[:size])


def metric_rows(first: np.ndarray, cfg: EvalConfig, size: int | None = None) -> np.ndarray:
    """The pair rows the alignment metrics score: the first caption (`first`, one row per
    unique image from `Pairs.image_index`) of a seeded sample of at most `size` (default
    `eval.metric_pairs`) images."""
    size = cfg.metric_pairs if size is None else size
    pick = sample_rows(len(first), size, cfg.sample_seed)
    return first if pick is None else first[pick]


def val_rows(n: int, cfg: EvalConfig) -> np.ndarray | None:
    """The val rows periodic validation scores: a seeded sample of at most `eval.val_pairs` of
    the split's `n` pairs (sorted positions), or None for all of them. The worker loads only
    these rows (`source.load("val", select=rows)`)."""
    return sample_rows(n, cfg.val_pairs, cfg.sample_seed)


def capped_val(val: Pairs, cfg: EvalConfig) -> Pairs:
    """`val` cut to its `val_rows` sample; unchanged when it already holds no more (e.g. the
    worker loaded only the sample)."""
    rows = val_rows(len(val), cfg)
    return val if rows is None else val.take(rows)


def metric_sizes(n_images: int, cfg: EvalConfig) -> list[int]:
    """The `eval.metric_sizes` a split can sample: those below its image count (at or above
    it, the sample would be every image, what `metric_pairs=0` scores)."""
    return sorted({s for s in cfg.metric_sizes if s < n_images})


def alignment_by_size(
    image: np.ndarray | torch.Tensor,
    text: np.ndarray | torch.Tensor,
    first: np.ndarray,
    cfg: EvalConfig,
) -> dict[str, float]:
    """`<metric>_n<size>`: each alignment metric on the nested seeded sample of `size` images
    (one caption each, clamped on its own, as a `metric_pairs=size` run would score it) for
    each of `metric_sizes`; point values only."""
    out: dict[str, float] = {}
    for size in metric_sizes(len(first), cfg):
        rows = metric_rows(first, cfg, size)
        at = torch.as_tensor(rows, device=image.device) if torch.is_tensor(image) else rows
        scores = alignment(image[at], text[at], cfg)
        out |= {f"{name}_n{size}": value for name, value in scores.items()}
    return out


def score_raw(pairs: Pairs, cfg: EvalConfig, with_intervals: bool = True) -> dict[str, float]:
    """The alignment metrics of the frozen backbones on one caption per image of the seeded
    `metric_rows` sample, then (unless `with_intervals=False`) each `metric_sizes` value, and
    (unless also `cfg.bootstrap=0`) their half-sample intervals, `n_images` and
    `n_metric_images`."""
    cfg.check()
    first, _ = pairs.image_index()
    rows = metric_rows(first, cfg)
    full = with_intervals and cfg.bootstrap > 0
    scores = alignment(pairs.image[rows], pairs.text[rows], cfg, full)
    if with_intervals:
        scores |= alignment_by_size(pairs.image, pairs.text, first, cfg)
    return scores | {"n_images": len(first), "n_metric_images": len(rows)} if full else scores


# A zero-shot task's prompts: class names and their raw text-backbone embeddings
# [n_classes, n_templates, d_text] at the model's text layer.
Prompts = dict[str, tuple[list[str], np.ndarray]]


@torch.no_grad()
def class_embeddings(model: JAM, raw: np.ndarray | torch.Tensor) -> torch.Tensor:
    """[n_classes, latent] unit vectors: each prompt through the text encoder (standardised as
    captions are), L2-normalised, averaged over the templates and normalised again (CLIP's
    prompt ensembling)."""
    device = next(model.parameters()).device
    x = torch.as_tensor(raw)
    if x.ndim != 3:
        raise ValueError(f"prompt embeddings must be [classes, templates, d], got {tuple(x.shape)}")
    c, t, d = x.shape
    z = F.normalize(model.encode_text(x.reshape(c * t, d).to(device)).float(), dim=1)
    return F.normalize(z.reshape(c, t, -1).mean(dim=1), dim=1)


def image_labels(labels: np.ndarray | None) -> list[dict[str, str]]:
    """Each row's `{task: class}` from its JSON (`{}` for "" or no labels column)."""
    if labels is None:
        return []
    out = []
    for text in labels:
        try:
            value = json.loads(text) if text else {}
        except (TypeError, json.JSONDecodeError) as e:
            raise CorpusError(f"labels {text!r} are not JSON ({e}); write {{task: class}}") from e
        if not isinstance(value, dict):
            raise CorpusError(f"labels {text!r} must be a JSON object {{task: class}}")
        out.append(value)
    return out


def zeroshot(
    model: JAM, image_latents: torch.Tensor, labels: list[dict[str, str]], prompts: Prompts
) -> dict[str, tuple[torch.Tensor, float]]:
    """Per task: the 0/1 hit of each labelled image (`metrics.zeroshot_hits`; images without
    the task's label left out) and the chance level, the majority class's rate among those
    images (what always answering the commonest class scores: on unbalanced labels 1/n_classes
    would flatter the model)."""
    out = {}
    for task, (names, raw) in prompts.items():
        if len(names) != len(raw):
            raise ValueError(f"zero-shot task {task!r}: {len(names)} names, {len(raw)} classes")
        position = {str(name): j for j, name in enumerate(names)}
        rows, target = [], []
        for i, image in enumerate(labels):
            if task not in image:
                continue
            label = str(image[task])
            if label not in position:
                raise CorpusError(
                    f"zero-shot task {task!r}: label {label!r} is not one of its classes "
                    f"{sorted(position)}; add it to the class list or fix the corpus labels"
                )
            rows.append(i)
            target.append(position[label])
        if not rows:
            empty = torch.zeros(0, dtype=torch.bool, device=image_latents.device)
            out[task] = (empty, float("nan"))
            continue
        classes = class_embeddings(model, raw).to(image_latents.device)
        at = torch.as_tensor(rows, device=image_latents.device)
        hits = metrics.zeroshot_hits(image_latents[at], classes, torch.as_tensor(target))
        out[task] = (hits, float(np.bincount(target).max() / len(target)))
    return out


@torch.no_grad()
def encode(model: JAM, pairs: Pairs, batch_size: int = 1024) -> dict[str, torch.Tensor]:
    """Latents and reconstruction error of a split, in eval mode (no dropout), left on the
    model's device: a training worker on a GPU scores there rather than on its CPU."""
    model.eval()
    device = next(model.parameters()).device
    out: dict[str, list[torch.Tensor]] = {"zi": [], "zt": [], "zn": [], "sq": [], "sq_pair": []}
    for start in range(0, len(pairs), batch_size):
        sl = slice(start, start + batch_size)
        image = torch.as_tensor(pairs.image[sl]).to(device)
        text = torch.as_tensor(pairs.text[sl]).to(device)
        res = model(image, text)
        out["zi"].append(res["zi"].float())
        out["zt"].append(res["zt"].float())
        out["zn"].append(model.encode_text(torch.as_tensor(pairs.negative[sl]).to(device)).float())
        sq_image = (res["image_hat"] - res["image_target"]).pow(2).mean(1).float()
        sq_text = (res["text_hat"] - res["text_target"]).pow(2).mean(1).float()
        out["sq"].append(torch.cat([sq_image, sq_text]))
        out["sq_pair"].append((sq_image + sq_text) / 2)  # per pair, for its interval
    return {k: torch.cat(v) for k, v in out.items()}


# The kernel metrics hold about this many N x N float64 matrices at once (CKNNA the most).
KERNEL_MATRICES = 10


def metric_device(n: int, device: torch.device) -> torch.device:
    """Where the metrics run: on the GPU the latents are on when the alignment metrics' N x N
    matrices (`n`: the largest sample they score, not the split) fit in half its free memory
    (packed trials and a shard held there share it), else the CPU. Retrieval's chunks are
    small beside them."""
    if device.type != "cuda":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    return device if KERNEL_MATRICES * 8 * n * n < free // 2 else torch.device("cpu")


def score_model(
    model: JAM,
    pairs: Pairs,
    cfg: EvalConfig,
    with_intervals: bool = True,
    prompts: Prompts | None = None,
) -> dict[str, float]:
    """Every results.csv metric for a trained model on one split (per-kind hard-negative
    accuracy when the split records negative sources, zero-shot accuracy for each `prompts`
    task; the alignment metrics on the seeded `metric_rows` sample and, unless
    `with_intervals=False`, at each `metric_sizes` size), then every metric's interval and the
    item counts behind them (`n_images`, `n_captions`, `n_metric_images`, `n_hardneg_<kind>`,
    `n_zeroshot_<task>`); `with_intervals=False` or `cfg.bootstrap=0` skips those (e.g.
    periodic validation, which stays as cheap as the point scores)."""
    cfg.check()
    index = pairs.image_index()
    first, owner = index
    rows = metric_rows(first, cfg)
    sizes = metric_sizes(len(first), cfg) if with_intervals else []
    z = encode(model, pairs)
    where = metric_device(max([len(rows), *sizes]), z["zi"].device)
    z = {k: v.to(where) for k, v in z.items()}
    by_image, by_pair = per_item(z["zi"], z["zt"], z["zn"], index, cfg)
    wins = by_pair.pop("hardneg_acc")
    # Each hard-negative score's outcomes and the image of each (its bootstrap clusters).
    hardneg = {
        name: (wins[torch.as_tensor(rows, device=where)], owner[rows])
        for name, rows in hardneg_rows(pairs.negative_sources, len(pairs)).items()
    }
    shots = {}
    if prompts:
        labels = None if pairs.labels is None else pairs.labels[first]
        shots = zeroshot(model, z["zi"][first], image_labels(labels), prompts)

    scores = means(by_image | by_pair | {"hardneg_acc": hardneg["hardneg_acc"][0]})
    at = torch.as_tensor(rows, device=where)
    a, b = clamped(z["zi"][at], z["zt"][at], cfg)
    aligned = alignment_metrics(a, b, cfg)
    scores |= aligned
    # Mean over both modalities of the per-feature MSE, in the standardised input space.
    scores["recon_mse"] = float(z["sq"].mean())
    kinds = {name: v for name, v in hardneg.items() if name != "hardneg_acc"}
    scores |= means({name: w for name, (w, _) in kinds.items()})
    for task, (hits, chance) in shots.items():
        scores |= means({f"zeroshot_{task}": hits}) | {f"zeroshot_{task}_chance": chance}
    if sizes:
        scores |= alignment_by_size(z["zi"], z["zt"], first, cfg)
    if not (with_intervals and cfg.bootstrap > 0):
        return scores

    scores |= intervals(by_image, cfg) | intervals(by_pair, cfg, groups=owner)
    scores |= intervals({"hardneg_acc": hardneg["hardneg_acc"][0]}, cfg, hardneg["hardneg_acc"][1])
    scores |= intervals({"recon_mse": z["sq_pair"]}, cfg, groups=owner)
    scores |= {"n_images": len(first), "n_captions": len(pairs)}
    scores |= alignment_intervals(a, b, aligned, cfg) | {"n_metric_images": len(rows)}
    for name, (w, groups) in kinds.items():
        scores |= intervals({name: w}, cfg, groups=groups)
    for task, (hits, _) in shots.items():
        scores |= intervals({f"zeroshot_{task}": hits}, cfg)
    scores |= {
        f"n_hardneg_{name.removeprefix('hardneg_acc_')}": len(w) for name, (w, _) in kinds.items()
    }
    scores |= {f"n_zeroshot_{task}": len(hits) for task, (hits, _) in shots.items()}
    return scores
