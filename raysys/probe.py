"""The passive-metric probe (`raysys probe`): the paper's first experiment (Section 2, Fig. 1).

Question: do passive alignment metrics (CCA, CKA, SVCCA, CKNNA, mutual kNN) see fine-grained
alignment? Each metric scores three kinds of image-caption pairings of the same images:

* `matching`: image i with its own caption;
* `easy`: image i with the caption of a random *other* image (a derangement of the captions);
* `hard`: image i with its hard-negative caption (`Pairs.negative`, a minimal edit).

The paper finds that every metric separates matching from easy pairs, but scores hard pairs
almost like matching ones: a set-level metric compares the geometry of two point clouds, and a
minimal edit of every caption barely moves the text cloud. That is JAM's motivation; the same
probe on JAM latents shows whether training changed it.

Preparation follows platonic-rep: `metrics.clamp_outliers(x, eval.outlier_q)` on each matrix,
then each modality's sample is reduced on its own to `probe.dim` dimensions (`linear` PCA or
`rbf` kernel PCA); the metrics L2-normalise rows themselves. `probe.resamples` seeded draws of
`probe.pairs` images give each value a mean and a percentile interval (`eval.interval`); raw
and JAM stages use the same draws, so their rows are paired.

Everything above the `# --- the command` line is pure numpy/torch/sklearn (no Ray, no cache).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy import stats
from sklearn.decomposition import PCA, KernelPCA

from raysys import metrics
from raysys.config import Config, EvalConfig, ProbeConfig

if TYPE_CHECKING:
    from raysys.data.pairs import Pairs
    from raysys.jam import JAM

STAGES = ("raw", "jam")
PAIR_TYPES = ("matching", "easy", "hard")
REDUCTIONS = ("linear", "rbf")
METRICS = ("cca", "cka", "cka_rbf", "unbiased_cka", "cknna", "svcca", "mutual_knn")
COLUMNS = (
    "stage",
    "model",
    "vision",
    "text",
    "vision_layer",
    "text_layer",
    "reduction",
    "metric",
    "pair_type",
    "value",
    "lo",
    "hi",
    "n",
)
ALIGNMENT_COLUMNS = ("vision", "text", "vision_layer", "text_layer", "metric", "value", "n")
PROBE_CSV = "probe.csv"
ALIGNMENT_CSV = "alignment.csv"
PROBE_MD = "probe.md"  # the report (raysys.report.report.PROBE_MD) includes it
SUBSET = 0.8  # the share of images each draw takes when the split has too few for `pairs`
MIN_ROWS = 5  # unbiased HSIC needs N >= 4 and kNN needs k < N


# --- reductions -----------------------------------------------------------------------------


def rbf_gamma(x: np.ndarray) -> float:
    """The RBF kernel's gamma for `x`: 1 / median squared distance between distinct rows (the
    median heuristic), so the kernel neither saturates nor collapses whatever the layer's
    scale; 1.0 if every row is identical."""
    x = np.asarray(x, dtype=np.float64)
    sq = (x * x).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0)
    off = d2[np.triu_indices(len(x), k=1)]
    off = off[off > 0]
    return 1.0 / float(np.median(off)) if len(off) else 1.0


def reduced_dim(dim: int, n: int, width: int) -> int:
    """`dim` capped at N - 1 (the rank of N centred rows) and the input width."""
    return max(1, min(dim, n - 1, width))


def reduce(x: np.ndarray | torch.Tensor, method: str, dim: int) -> np.ndarray:
    """One modality's sample `[N, D]` reduced to `reduced_dim(dim)` columns, float64.

    `linear`: PCA scores (exact SVD). `rbf`: kernel PCA with an RBF kernel, gamma by
    `rbf_gamma` (1 / median squared distance), exact eigendecomposition of the centred Gram
    matrix; the scores are its top eigenvectors scaled by sqrt(eigenvalue)."""
    a = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    k = reduced_dim(dim, a.shape[0], a.shape[1])
    if method == "linear":
        return PCA(n_components=k, svd_solver="full").fit_transform(a)
    if method == "rbf":
        kpca = KernelPCA(n_components=k, kernel="rbf", gamma=rbf_gamma(a), eigen_solver="dense")
        return kpca.fit_transform(a)
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {method!r}")


# --- metrics --------------------------------------------------------------------------------


def canonical_correlations(a: np.ndarray, b: np.ndarray, rtol: float = 1e-10) -> np.ndarray:
    """All canonical correlations of `a` [N, p] and `b` [N, q], descending, exactly.

    With Qa, Qb orthonormal bases of the centred column spaces (thin SVD, dropping directions
    whose singular value is below `rtol` times the largest: the exact-rank guard in place of a
    ridge), the canonical correlations are the singular values of Qa^T Qb (the cosines of the
    principal angles between the two column spaces)."""

    def basis(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        u, s, _ = np.linalg.svd(x - x.mean(0), full_matrices=False)
        return u[:, s > rtol * (s[0] if len(s) and s[0] > 0 else 1.0)]

    qa, qb = basis(a), basis(b)
    if qa.shape[1] == 0 or qb.shape[1] == 0:
        return np.zeros(0)
    return np.clip(np.linalg.svd(qa.T @ qb, compute_uv=False), 0.0, 1.0)


def cca(a: np.ndarray, b: np.ndarray, dim: int = 50) -> float:
    """Mean of the top min(dim, rank a, rank b) canonical correlations, rows L2-normalised
    first as for every other probe metric (platonic-rep's preparation)."""
    xa, xb = _unit_rows(a), _unit_rows(b)
    rho = canonical_correlations(xa, xb)
    return float(rho[:dim].mean()) if len(rho) else math.nan


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def metric_value(name: str, a: np.ndarray, b: np.ndarray, dim: int, ecfg: EvalConfig) -> float:
    """One probe metric on two reduced samples of the same N rows (`raysys.metrics` for all
    but CCA). kNN k and SVCCA's dim are `eval.knn_k` / `eval.svcca_dim`, capped for small N."""
    n = len(a)
    k = max(2, min(ecfg.knn_k, n - 1))
    if name == "cca":
        return cca(a, b, dim)
    if name == "cka":
        return metrics.cka(a, b)
    if name == "cka_rbf":
        return metrics.cka(a, b, kernel="rbf")
    if name == "unbiased_cka":
        return metrics.unbiased_cka(a, b)
    if name == "cknna":
        return metrics.cknna(a, b, k=k)
    if name == "svcca":
        return metrics.svcca(a, b, dim=min(ecfg.svcca_dim, n - 1, a.shape[1], b.shape[1]))
    if name == "mutual_knn":
        return metrics.mutual_knn(a, b, k=k)
    raise ValueError(f"metric must be one of {METRICS}, got {name!r}")


# --- sampling -------------------------------------------------------------------------------


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random permutation of range(n) with no fixed point (rejection sampling:
    about e tries), so no image is ever paired with its own caption; n >= 2."""
    if n < 2:
        raise ValueError(f"a derangement needs n >= 2, got {n}")
    while True:
        perm = rng.permutation(n)
        if not (perm == np.arange(n)).any():
            return perm


def draws(n_images: int, pairs: int, resamples: int, seed: int) -> list[np.ndarray]:
    """`resamples` seeded draws of image positions, each without replacement: `pairs` of them,
    or, when the split holds no more than `pairs` images, a random `SUBSET` (80%) of them, so
    that draws still differ and the interval says something."""
    if n_images < MIN_ROWS:
        raise ValueError(f"the probe needs at least {MIN_ROWS} images, got {n_images}")
    size = pairs if n_images > pairs else max(MIN_ROWS, int(round(SUBSET * n_images)))
    if resamples <= 1 and n_images <= pairs:
        size = n_images
    rng = np.random.default_rng(seed)
    return [np.sort(rng.choice(n_images, size=size, replace=False)) for _ in range(resamples)]


def easy_permutation(n: int, seed: int, draw: int) -> np.ndarray:
    """The easy pairing of draw `draw`: caption of image perm[i] beside image i (seeded)."""
    return derangement(n, np.random.default_rng([seed, draw]))


def pair_sample(
    image: np.ndarray, text: np.ndarray, negative: np.ndarray, rows: np.ndarray, perm: np.ndarray
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The three pair types over one draw `rows` (positions into one-caption-per-image
    arrays), `perm` its `easy_permutation`: each type's (image, text) matrices, row i always
    image `rows[i]`. `probe_arrays` builds the same pairings after the reduction."""
    img, txt = image[rows], text[rows]
    return {"matching": (img, txt), "easy": (img, txt[perm]), "hard": (img, negative[rows])}


def interval(
    values: Sequence[float], level: float, drawn: int = 0, population: int = 0
) -> tuple[float, float, float]:
    """Mean over the draws and a `level` interval for the value of one sample of `drawn`
    images: mean ± t(R−1)·sd·c. Draws of m images without replacement from the same N share
    rows, so their spread is only the finite-population part σ·sqrt(1/m − 1/N);
    c = sqrt(N/(N−m)) scales it to a size-m sample's σ/sqrt(m) (c = sqrt(5) for the 80%
    subsets of a small split, about 1 for 1,024 of a large one). A t quantile rather than
    percentiles, whose 2.5/97.5% tails over 10 draws would be nearly the min and max."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return math.nan, math.nan, math.nan
    mean = float(v.mean())
    if len(v) < 2 or (population and drawn >= population):
        return mean, mean, mean  # one sample (or every image): no spread to show
    c = math.sqrt(population / (population - drawn)) if population else 1.0
    arm = float(stats.t.ppf((1 + level) / 2, len(v) - 1)) * float(v.std(ddof=1)) * c
    return mean, mean - arm, mean + arm


# --- the probe of one sample ----------------------------------------------------------------


def _np(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def probe_arrays(
    image: np.ndarray | torch.Tensor,
    text: np.ndarray | torch.Tensor,
    negative: np.ndarray | torch.Tensor,
    pcfg: ProbeConfig,
    ecfg: EvalConfig,
    /,
    **labels: Any,
) -> list[dict[str, Any]]:
    """probe.csv rows for one sample: row i of the three matrices is one image, its caption
    and its hard negative (one caption per image). `labels` fill the stage/model/layer
    columns.

    Per draw every matrix is clamped and reduced once; the easy pairing reuses the reduced
    captions, permuted (PCA and kernel PCA commute with a permutation of the rows, and so does
    the clamp, whose threshold is a mean over rows)."""
    image, text, negative = _np(image), _np(text), _np(negative)
    values: dict[tuple[str, str, str], list[float]] = {}
    chosen = draws(len(image), pcfg.pairs, pcfg.resamples, pcfg.seed)
    for d, rows in enumerate(chosen):
        perm = easy_permutation(len(rows), pcfg.seed, d)
        clamped = {
            name: metrics.clamp_outliers(m[rows], ecfg.outlier_q).numpy()
            for name, m in (("image", image), ("text", text), ("negative", negative))
        }
        for reduction in pcfg.reductions:
            r = {name: reduce(m, reduction, pcfg.dim) for name, m in clamped.items()}
            sides = {
                "matching": r["text"],
                "easy": r["text"][perm],
                "hard": r["negative"],
            }
            for metric in pcfg.metrics:
                for pair_type, other in sides.items():
                    value = metric_value(metric, r["image"], other, pcfg.dim, ecfg)
                    values.setdefault((reduction, metric, pair_type), []).append(value)
    base = {c: labels.get(c, "") for c in COLUMNS[:6]}
    out = []
    for (reduction, metric, pair_type), vals in values.items():
        mean, lo, hi = interval(vals, ecfg.interval, len(chosen[0]), len(image))
        out.append(
            base
            | {
                "reduction": reduction,
                "metric": metric,
                "pair_type": pair_type,
                "value": mean,
                "lo": lo,
                "hi": hi,
                "n": len(chosen[0]),
            }
        )
    return out


def one_per_image(pairs: Pairs) -> Pairs:
    """The first caption of each image: the probe's (and platonic-rep's) unit is an image."""
    first, _ = pairs.image_index()
    return pairs.take(np.sort(first))


def probe_pairs(pairs: Pairs, cfg: Config, /, **labels: Any) -> list[dict[str, Any]]:
    """The raw backbone embeddings of a split (`stage` raw)."""
    p = one_per_image(pairs)
    return probe_arrays(p.image, p.text, p.negative, cfg.probe, cfg.eval, stage="raw", **labels)


@torch.no_grad()
def probe_model(model: JAM, pairs: Pairs, cfg: Config, /, **labels: Any) -> list[dict[str, Any]]:
    """A trained model's latents of the same images (`stage` jam): image, caption and hard
    negative encoded as `raysys.evaluate.encode` does (eval mode)."""
    from raysys.evaluate import encode

    z = encode(model, one_per_image(pairs))
    return probe_arrays(z["zi"], z["zt"], z["zn"], cfg.probe, cfg.eval, stage="jam", **labels)


# --- the raw layer-pair alignment matrix ----------------------------------------------------


@dataclass
class LayerSample:
    """One model pair's matching pairs at every cached layer: rows are the same images (one
    caption each) in every matrix; keys are hidden-state numbers."""

    vision: str
    text: str
    images: dict[int, np.ndarray]
    texts: dict[int, np.ndarray]


def raw_alignment(samples: Iterable[LayerSample], ecfg: EvalConfig) -> list[dict[str, Any]]:
    """platonic-rep's `compute_alignment` matrix: mutual kNN (k = `eval.knn_k`) of matching
    pairs over every (vision layer, text layer), clamped, not reduced; alignment.csv rows."""
    out = []
    for s in samples:
        imgs = {i: metrics.clamp_outliers(_np(m), ecfg.outlier_q) for i, m in s.images.items()}
        txts = {t: metrics.clamp_outliers(_np(m), ecfg.outlier_q) for t, m in s.texts.items()}
        for i, a in sorted(imgs.items()):
            for t, b in sorted(txts.items()):
                k = max(1, min(ecfg.knn_k, len(a) - 1))
                out.append(
                    {
                        "vision": s.vision,
                        "text": s.text,
                        "vision_layer": i,
                        "text_layer": t,
                        "metric": "mutual_knn",
                        "value": metrics.mutual_knn(a, b, k=k),
                        "n": len(a),
                    }
                )
    return out


# --- files and the report section -----------------------------------------------------------


def write_csv(path: Path, rows: list[dict[str, Any]], columns: Sequence[str]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: _cell(row.get(c, "")) for c in columns})
    return path


def _cell(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) and math.isfinite(v) else v


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _f(row: dict[str, Any], key: str) -> float:
    try:
        return float(row[key])
    except (KeyError, TypeError, ValueError):
        return math.nan


def _groups(rows: list[dict[str, Any]]) -> dict[tuple, dict[str, dict[str, Any]]]:
    """Rows by (stage, model, vision, text, layers, reduction, metric) -> pair type -> row."""
    out: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in rows:
        key = tuple(str(r.get(c, "")) for c in COLUMNS[:8])
        out.setdefault(key, {})[str(r["pair_type"])] = r
    return out


def probe_section(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown: per stage, metric and reduction the gaps matching−easy and matching−hard
    (means over the stage's layer pairs or models; the gap's interval is the conservative
    [m_lo − x_hi, m_hi − x_lo]), how often the two pair types' intervals do not overlap, and
    one sentence per stage on whether hard non-matching pairs are told from matches."""
    lines = ["## Do passive metrics see hard negatives? (probe)", ""]
    groups = {k: v for k, v in _groups(rows).items() if set(PAIR_TYPES) <= set(v)}
    if not groups:
        return lines + ["No probe rows."]
    n = {int(_f(r, "n")) for g in groups.values() for r in g.values() if math.isfinite(_f(r, "n"))}
    lines += [
        f"Matching, easy (another image's caption) and hard (its hard negative) pairs of "
        f"{'/'.join(map(str, sorted(n)))} images per draw; gaps are matching minus the other "
        "pair type, with intervals; *separated* counts the configurations (layer pairs or "
        "models) where the two pair types' intervals do not overlap. The easy column is each "
        "metric's floor at this sample size (CCA's grows with components per image).",
        "",
    ]
    for stage in STAGES:
        mine = {k: v for k, v in groups.items() if k[0] == stage}
        if not mine:
            continue
        configs = {k[:6] for k in mine}
        lines += [
            f"**{stage}** ({len(configs)} configuration(s))",
            "",
            "| metric | reduction | matching | easy | hard | matching−easy | separated | "
            "matching−hard | separated |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        count = {"easy": 0, "hard": 0, "all": 0}
        gaps: dict[str, list[float]] = {"easy": [], "hard": []}
        by_cell: dict[tuple[str, str], list[dict[str, dict[str, Any]]]] = {}
        for k, g in mine.items():
            by_cell.setdefault((k[7], k[6]), []).append(g)
        for (metric, reduction), gs in sorted(by_cell.items(), key=_cell_order):
            m = [_f(g["matching"], "value") for g in gs]
            cells = [f"| {metric} | {reduction} | {np.mean(m):.3f}"]
            for other in ("easy", "hard"):
                cells.append(f"{np.mean([_f(g[other], 'value') for g in gs]):.3f}")
            for other in ("easy", "hard"):
                each = [_f(g["matching"], "value") - _f(g[other], "value") for g in gs]
                lo = np.mean([_f(g["matching"], "lo") - _f(g[other], "hi") for g in gs])
                hi = np.mean([_f(g["matching"], "hi") - _f(g[other], "lo") for g in gs])
                sep = sum(_separated(g["matching"], g[other]) for g in gs)
                cells += [f"{np.mean(each):+.3f} [{lo:+.3f}, {hi:+.3f}]", f"{sep}/{len(gs)}"]
                count[other] += sep
                gaps[other] += each
            count["all"] += len(gs)
            lines.append(" | ".join(cells) + " |")
        lines += ["", _verdict(stage, count, gaps), ""]
    return lines


def _cell_order(item: tuple[tuple[str, str], Any]) -> tuple[int, int]:
    (metric, reduction), _ = item
    m = METRICS.index(metric) if metric in METRICS else len(METRICS)
    r = REDUCTIONS.index(reduction) if reduction in REDUCTIONS else len(REDUCTIONS)
    return m, r


def _separated(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """The two values' intervals do not overlap (in either direction)."""
    return _f(a, "lo") > _f(b, "hi") or _f(b, "lo") > _f(a, "hi")


def _verdict(stage: str, count: dict[str, int], gaps: dict[str, list[float]]) -> str:
    """One sentence: how often each pair type is told from matches, and how the hard gap
    compares with the easy one (the paper's point is the ratio, not only significance)."""
    what = "raw backbone embeddings" if stage == "raw" else "JAM latents"
    easy, hard = float(np.nanmean(gaps["easy"])), float(np.nanmean(gaps["hard"]))
    ratio = hard / easy if easy > 0 else math.nan
    if not math.isfinite(ratio):
        how = "matches are not even told from easy pairs"
    elif ratio < 0.1:
        how = "hard pairs score almost like matches"
    elif ratio < 0.5:
        how = "hard pairs score much closer to matches than easy ones do"
    else:
        how = "hard pairs are told from matches about as clearly as easy ones"
    return (
        f"On {what}, easy non-matching pairs are separated from matches (intervals that do "
        f"not overlap) in {count['easy']} of {count['all']} (metric, reduction, configuration) "
        f"cases and hard ones in {count['hard']} of {count['all']}; the mean matching−hard gap "
        f"is {hard:+.3f} against {easy:+.3f} for easy pairs ({ratio:.0%} of it): {how}."
    )


# --- the command -----------------------------------------------------------------------------


@dataclass
class ModelSpec:
    """An exported model and what it was trained on: layers are hidden-state numbers."""

    path: Path
    label: str
    vision: str
    text: str
    vision_layer: int
    text_layer: int


PROVENANCE = "provenance.json"  # beside a run's exported model: what it was trained on


def trained_on(path: Path, trials: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """What the exported model at `path` was trained on: a run's provenance.json beside it
    (the cache's layer names as `image_layer`/`text_layer`), else its sweep trial's row in
    `trials` (rows by trial id; layer positions as `vision_layer`/`text_layer`); None when
    neither is there."""
    prov = path / PROVENANCE
    if prov.is_file():
        return json.loads(prov.read_text())
    return trials.get(path.name)


def find_models(root: Path | str, results: list[dict[str, Any]] | None = None) -> list[ModelSpec]:
    """Every exported model under a finished run (`models/<objective>/` with its
    provenance.json) or sweep (`models/<trial>/`, its axes from its `trial` row in `results`,
    by default the run's results.csv: a sweep still running passes its rows). Models with
    neither are skipped with a message. `label` is the objective, with `#<trial>`
    appended where several trials share an objective and layer pair (seeds, swept params)."""
    from raysys import storage
    from raysys.errors import ConfigError

    if storage.is_remote(root):
        raise ConfigError(f"probe.models must be a local run directory, got {root!r}")
    root = Path(root)
    models_dir = root / "models"
    if not models_dir.is_dir():
        raise ConfigError(f"probe.models={str(root)!r} holds no models/ directory")
    if results is None:
        csv_path = root / "results.csv"
        results = read_csv(csv_path) if csv_path.is_file() else []
    trials = {str(r.get("trial") or ""): r for r in results}
    found: list[tuple[ModelSpec, str]] = []
    for path in sorted(p for p in models_dir.iterdir() if p.is_dir()):
        r = trained_on(path, trials)
        if r is not None and "image_layer" in r:  # a run's provenance.json
            spec = ModelSpec(
                path,
                r.get("objective", path.name),
                r["vision"],
                r["text"],
                _layer_number(r["image_layer"]),
                _layer_number(r["text_layer"]),
            )
        elif r is not None:  # a sweep trial's results row
            spec = ModelSpec(
                path,
                r["objective"],
                r["vision"],
                r["text"],
                int(r["vision_layer"]),
                int(r["text_layer"]),
            )
        else:
            print(f"[probe] skipping {path}: no provenance.json and no results.csv row", flush=True)
            continue
        found.append((spec, path.name))
    keys = [(s.label, s.vision, s.text, s.vision_layer, s.text_layer) for s, _ in found]
    for (spec, name), key in zip(found, keys, strict=True):
        if keys.count(key) > 1:  # seeds or swept params share an objective and layer pair
            twins = [trials.get(n, {}) for (_, n), k in zip(found, keys, strict=True) if k == key]
            spec.label = f"{spec.label}{_setting(trials.get(name, {}), twins)}#{name}"
    return [s for s, _ in found]


def _setting(row: dict[str, Any], twins: list[dict[str, Any]]) -> str:
    """The swept settings (not the seed) that tell a trial from its twins, e.g. ` alpha=0.9
    k=8`: the plot averages a label's seeds (the part before `#`), never two settings."""
    varying = sorted(
        c
        for c in row
        if c.startswith("train.")
        and c != "train.seed"
        and len({str(t.get(c, "")) for t in twins}) > 1
    )
    return "".join(f" {c.removeprefix('train.')}={row[c]}" for c in varying)


def _layer_number(column: str) -> int:
    """A cache column name (`L08`) to its hidden-state number."""
    return int(str(column).removeprefix("neg_").removeprefix("L"))


def _layer_pairs(cfg: Config) -> list[tuple[str, str, list[tuple[int, int]]]]:
    """`probe.layers` (as `sweep.layers`; empty: the train pair) of every model pair of
    `sweep.models` (empty: the extract pair), resolved to hidden-state numbers by the sweep's
    own resolver, so the probe covers the pairs a sweep of the same config trains on."""
    from raysys import config as config_mod
    from raysys.sweep.plan import resolve_layers

    c = config_mod.from_dict(config_mod.to_dict(cfg))
    c.sweep.layers = list(cfg.probe.layers)
    c.sweep.vision_depths, c.sweep.text_depths = [], []
    return [(v, t, ids) for v, t, _, ids in resolve_layers(c)]


def _extract_pair(cfg: Config, vision: str, text: str, vids: list[int], tids: list[int]):
    """Extract (or reuse) one model pair with at least these layers, as the sweep does."""
    from raysys.backbones import configured_backbone
    from raysys.extract import extract
    from raysys.sweep.prepare import needed_layers

    ecfg = dataclasses.replace(cfg.extract, vision=vision, text=text)
    totals = {m: len(configured_backbone(ecfg, m).layer_ids) for m in ("image", "text")}
    ecfg = dataclasses.replace(
        ecfg,
        vision_layers=needed_layers(cfg.extract.vision_layers, vids, totals["image"]),
        text_layers=needed_layers(cfg.extract.text_layers, tids, totals["text"]),
    )
    return extract(dataclasses.replace(cfg, extract=ecfg))


def _first_captions(source: Any, split: str) -> Pairs:
    """A split's first caption of each image, read without the others' embeddings."""
    index = source.index(split)
    _, first = np.unique(index.image_ids, return_index=True)
    return source.load_index(index, select=np.sort(first))


def _layer_sample(cfg: Config, ext: Any, vision: str, text: str) -> LayerSample:
    """Matching pairs of one seeded draw of the split's images at every cached layer."""
    from raysys.data import cache

    iml, txl = ext.image_manifest["layers"], ext.text_manifest["layers"]
    index = cache.pair_index(
        ext.corpus_dir, ext.image_dir, ext.text_dir, iml[0], txl[0], cfg.probe.split
    )
    _, first = np.unique(index.image_ids, return_index=True)
    rows = np.sort(first)
    rows = rows[draws(len(rows), cfg.probe.pairs, 1, cfg.probe.seed)[0]]
    index = index.take(rows)
    images = cache.read_rows(ext.image_dir, list(iml), index.image_ids)
    texts = cache.read_rows(ext.text_dir, list(txl), index.pair_ids)
    return LayerSample(
        vision,
        text,
        {_layer_number(c): images[c] for c in iml},
        {_layer_number(c): texts[c] for c in txl},
    )


def probe(cfg: Config, out: Path | str, results: list[dict[str, Any]] | None = None) -> Path:
    """`raysys probe`: the raw probe of `probe.layers` of each model pair (`sweep.models`, else
    the extract pair) and of every model's own layer pair, the JAM probe of each model in
    `probe.models`, and each model pair's raw layer-pair alignment matrix; writes probe.csv,
    alignment.csv, probe.png, alignment.png and probe.md into `out` (a local directory; its
    config.yaml is written unless one is there) and returns it. Caches are reused, extracted
    only where missing (which starts Ray). `results`: the sweep's rows, for `find_models`."""
    from raysys import config as config_mod
    from raysys.backbones import layer_name
    from raysys.checks import check_corpus
    from raysys.data.source import pair_source
    from raysys.jam import JAM
    from raysys.rundir import CONFIG_FILE
    from raysys.train.step import check_dims

    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    check_corpus(cfg)
    models = find_models(cfg.probe.models, results) if cfg.probe.models else []
    wanted: dict[tuple[str, str], set[tuple[int, int]]] = {}
    for vision, text, ids in _layer_pairs(cfg):
        wanted.setdefault((vision, text), set()).update(ids)
    for m in models:
        wanted.setdefault((m.vision, m.text), set()).add((m.vision_layer, m.text_layer))
    if not (out / CONFIG_FILE).exists():  # inside a run directory, the run's own stays
        config_mod.dump(cfg, out / CONFIG_FILE)
    rows: list[dict[str, Any]] = []
    samples: list[LayerSample] = []
    for (vision, text), layer_ids in wanted.items():
        ids = sorted(layer_ids)
        ext = _extract_pair(cfg, vision, text, [v for v, _ in ids], [t for _, t in ids])
        loaded: dict[tuple[int, int], Pairs] = {}
        for vid, tid in ids:
            source = pair_source(ext, layer_name(vid), layer_name(tid))
            pairs = loaded[(vid, tid)] = _first_captions(source, cfg.probe.split)
            axes = {"vision": vision, "text": text, "vision_layer": vid, "text_layer": tid}
            t0 = time.perf_counter()
            rows += probe_pairs(pairs, cfg, **axes)
            print(
                f"[probe] raw {vision}+{text} L{vid}:L{tid}: {_headline(rows, 'raw', '', axes)} "
                f"({time.perf_counter() - t0:.1f}s)",
                flush=True,
            )
        for m in (m for m in models if (m.vision, m.text) == (vision, text)):
            pairs = loaded[(m.vision_layer, m.text_layer)]
            model = JAM.load(m.path)
            check_dims(model, pairs.image.shape[1], pairs.text.shape[1], f"model {m.path}")
            axes = {"vision": vision, "text": text}
            axes |= {"vision_layer": m.vision_layer, "text_layer": m.text_layer}
            t0 = time.perf_counter()
            rows += probe_model(model, pairs, cfg, model=m.label, **axes)
            print(
                f"[probe] jam {m.label} {vision}+{text} L{m.vision_layer}:L{m.text_layer}: "
                f"{_headline(rows, 'jam', m.label, axes)} ({time.perf_counter() - t0:.1f}s)",
                flush=True,
            )
        samples.append(_layer_sample(cfg, ext, vision, text))
    t0 = time.perf_counter()
    alignment = raw_alignment(samples, cfg.eval)
    print(
        f"[probe] raw layer-pair alignment: {len(alignment)} layer pairs "
        f"({time.perf_counter() - t0:.1f}s)",
        flush=True,
    )
    write_outputs(out, rows, alignment)
    print(f"[probe] {len(rows)} rows in {time.perf_counter() - started:.0f}s -> {out}", flush=True)
    return out


def write_outputs(out: Path, rows: list[dict[str, Any]], alignment: list[dict[str, Any]]) -> None:
    """probe.csv, alignment.csv, the two PNGs and probe.md (the section plus the plots)."""
    from raysys.report.probe_plot import write_probe_plots

    write_csv(out / PROBE_CSV, rows, COLUMNS)
    write_csv(out / ALIGNMENT_CSV, alignment, ALIGNMENT_COLUMNS)
    drawn = write_probe_plots(out, rows, alignment)
    md = probe_section(rows) + [""] + [f"![{p.stem}]({p.name})" for p in drawn]
    (out / PROBE_MD).write_text("\n".join(md) + "\n")


def _headline(rows: list[dict[str, Any]], stage: str, model: str, axes: dict[str, Any]) -> str:
    """`metric m/e/h` for linear-PCA CKA and mutual kNN of the configuration just probed."""
    parts = []
    for metric in ("cka", "mutual_knn"):
        v = {
            r["pair_type"]: r["value"]
            for r in rows
            if r["stage"] == stage
            and r["model"] == model
            and r["metric"] == metric
            and r["reduction"] == "linear"
            and all(r[k] == v for k, v in axes.items())
        }
        if len(v) == 3:
            parts.append(
                f"{metric} matching/easy/hard {v['matching']:.3f}/{v['easy']:.3f}/{v['hard']:.3f}"
            )
    return "; ".join(parts) or "done"
