"""The results schema: metric names, `results.csv` columns and the rows, built in one place.

`results.csv` is the contract between a run and its readers (the report, the plots,
`raysys report`, a user's notebook): one row per trained model plus `raw` rows, the fixed
columns first. Retrieval columns follow `eval.retrieval_ks`; the default is r1, r5, r10.
Then each per-item metric's bootstrap interval (`<metric>_lo`, `<metric>_hi`) and the item
counts it was drawn over. The columns whose presence depends on the run follow
(`extra_metric_columns`): the set-level alignment metrics' half-sample intervals, hard-negative
accuracy per negative kind, zero-shot accuracy per task with its chance level, and their item
counts (how each interval is drawn: `raysys.evaluate`), and the alignment metrics' sample:
`n_metric_images` and, with `eval.metric_sizes`, `<metric>_n<size>` (e.g. `mutual_knn_n256`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

DEFAULT_KS = (1, 5, 10)
AXES = ["objective", "vision", "text", "vision_layer", "text_layer"]
SHARED_SPACE = ["hardneg_acc"]  # needs one space: blank on raw rows, with retrieval
ALIGNMENT = ["mutual_knn", "cka", "unbiased_cka", "cknna", "svcca"]  # raw rows have these too
RECONSTRUCTION = ["recon_mse"]
RECALL = re.compile(r"i2t_r\d+")  # a recall column, not its `_lo` / `_hi` bound
RAW = "raw"  # the objective of a row that scores the frozen backbones before alignment

# A sweep's columns after the fixed ones, in this order; swept params follow, sorted.
SWEEP_COLUMNS = [
    "trial",
    "vision_depth",
    "text_depth",
    "vision_params",
    "text_params",
    *(f"raw_{m}" for m in ALIGNMENT),
    "train_s",
]


def retrieval_names(ks: Sequence[int] = DEFAULT_KS) -> list[str]:
    return [f"{direction}_r{k}" for direction in ("i2t", "t2i") for k in ks]


def metric_names(ks: Sequence[int] = DEFAULT_KS) -> list[str]:
    """Every metric a trained model is scored on (and validation reports as `val/<name>`)."""
    return retrieval_names(ks) + SHARED_SPACE + ALIGNMENT + RECONSTRUCTION


def interval_metrics(ks: Sequence[int] = DEFAULT_KS) -> list[str]:
    """The metrics that are means over test items, so a bootstrap over the items bounds them."""
    return retrieval_names(ks) + SHARED_SPACE + RECONSTRUCTION


def interval_names(ks: Sequence[int] = DEFAULT_KS) -> list[str]:
    """`<metric>_lo`, `<metric>_hi` of each per-item metric, in `interval_metrics` order."""
    return [f"{m}_{end}" for m in interval_metrics(ks) for end in ("lo", "hi")]


# The test items the intervals resample: unique images (image->text queries) and captions.
ITEM_COUNTS = ["n_images", "n_captions"]


def result_columns(ks: Sequence[int] = DEFAULT_KS) -> list[str]:
    """The headline columns: axes and metric values (results.csv starts with these)."""
    return AXES + metric_names(ks)


def interval_columns(ks: Sequence[int] = DEFAULT_KS) -> list[str]:
    """The columns that follow the headline ones: intervals and the item counts behind them."""
    return interval_names(ks) + ITEM_COUNTS


RESULT_COLUMNS = result_columns()

# The score groups whose names depend on the corpus: one per negative kind, one per task.
HARDNEG_KIND = "hardneg_acc_"
ZEROSHOT = "zeroshot_"
KIND_PARTS = ("lo", "hi")
TASK_PARTS = ("lo", "hi", "chance")


def _scores(keys: set[str], prefix: str, parts: tuple[str, ...]) -> list[str]:
    """Each `<prefix><name>` score in `keys`, sorted by name; a `_lo` / `_hi` / `_chance` key
    whose score is present is one of its parts, not a score of its own."""
    suffixes = tuple(f"_{p}" for p in parts)
    return sorted(
        k
        for k in keys
        if k.startswith(prefix)
        and not any(k.endswith(x) and k[: -len(x)] in keys for x in suffixes)
    )


def _groups(keys: set[str], prefix: str, parts: tuple[str, ...]) -> list[str]:
    """Each `_scores` score followed by those of its `<score>_<part>` columns present."""
    suffixes = tuple(f"_{p}" for p in parts)
    return [
        c
        for k in _scores(keys, prefix, parts)
        for c in (k, *(k + x for x in suffixes))
        if c in keys
    ]


def hardneg_kinds(keys: set[str]) -> list[str]:
    """The `hardneg_acc_<kind>` scores among `keys` (not `hardneg_acc`'s own bounds)."""
    return _scores(keys - {"hardneg_acc_lo", "hardneg_acc_hi"}, HARDNEG_KIND, KIND_PARTS)


def zeroshot_tasks(keys: set[str]) -> list[str]:
    """The `zeroshot_<task>` scores among `keys`."""
    return _scores(keys, ZEROSHOT, TASK_PARTS)


# The images the alignment metrics were computed on: a seeded sample of `eval.metric_pairs`.
METRIC_IMAGES = "n_metric_images"
# An alignment metric at one of `eval.metric_sizes`: `mutual_knn_n256` (256 sampled images).
SIZED = re.compile(rf"({'|'.join(ALIGNMENT)})_n(\d+)")


def sized_name(metric: str, size: int) -> str:
    """The column of `metric` on a sample of `size` images."""
    return f"{metric}_n{size}"


def sizes_of(keys: set[str] | Sequence[str]) -> list[int]:
    """The sample sizes of the `<metric>_n<size>` columns among `keys`, ascending."""
    return sorted({int(m.group(2)) for k in keys if (m := SIZED.fullmatch(k))})


def extra_metric_columns(keys: set[str]) -> list[str]:
    """The run-dependent metric columns among `keys`, in results.csv order (after the fixed
    interval columns): the alignment metrics' `_lo` / `_hi`, `n_metric_images` (the sample
    they were computed on), each alignment metric at each `eval.metric_sizes` size
    (`<metric>_n<size>`, metrics in `ALIGNMENT` order, sizes ascending), then each
    `hardneg_acc_<kind>` with its interval, then each `zeroshot_<task>` with its interval and
    `_chance`, then the counts `n_hardneg_<kind>` and `n_zeroshot_<task>`; kinds and tasks
    sorted. Other keys (a sweep's columns, swept params) are not included."""
    alignment = [f"{m}_{end}" for m in ALIGNMENT for end in ("lo", "hi")] + [METRIC_IMAGES]
    sizes = sizes_of(keys)
    alignment += [sized_name(m, n) for m in ALIGNMENT for n in sizes]
    hardneg = _groups(keys - {"hardneg_acc_lo", "hardneg_acc_hi"}, HARDNEG_KIND, KIND_PARTS)
    zeroshot = _groups(keys, ZEROSHOT, TASK_PARTS)
    counts = sorted(k for k in keys if k.startswith("n_hardneg_"))
    counts += sorted(k for k in keys if k.startswith("n_zeroshot_"))
    return [c for c in alignment if c in keys] + hardneg + zeroshot + counts


# The columns the printed tables show (all of them are in results.csv).
SHOWN = ["objective", "i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", *SHARED_SPACE]
SHOWN += ["mutual_knn", "cka", "cknna", "svcca", *RECONSTRUCTION]
SWEEP_SHOWN = [*AXES, "i2t_r1", "t2i_r1", *SHARED_SPACE, "mutual_knn", "cka", "cknna"]
SWEEP_SHOWN += RECONSTRUCTION


def ks_of(rows: list[dict[str, Any]]) -> list[int]:
    """The retrieval cut-offs of rows read back from a results.csv (every row has every
    column there); the default set when there are none."""
    found = (int(k[len("i2t_r") :]) for r in rows for k in r if RECALL.fullmatch(k))
    ks = list(dict.fromkeys(found))  # in the file's order: eval.retrieval_ks need not be sorted
    return ks or list(DEFAULT_KS)


def sweep_axes(
    vision_params: int, text_params: int, vision_depth: float, text_depth: float
) -> dict[str, Any]:
    """A sweep row's columns beside the axes: relative depths and model sizes."""
    return {
        "vision_depth": vision_depth,
        "text_depth": text_depth,
        "vision_params": vision_params,
        "text_params": text_params,
    }


def model_row(
    objective: str,
    vision: str,
    text: str,
    vision_layer: int,
    text_layer: int,
    scores: dict[str, float],
    **extra: Any,
) -> dict[str, Any]:
    """One results row: the axes, the scores, then any extra columns (`train_s`, …)."""
    axes = dict(zip(AXES, (objective, vision, text, vision_layer, text_layer), strict=True))
    return {**axes, **scores, **extra}


# --- seeds and intervals: shared by the report's tables and the plots -------------------------

SEED = "train.seed"  # the column `sweep.seeds` varies; rows differing only there are replicates
# Columns that describe a configuration besides the swept `a.b` params (the seed left out).
IDENTITY = [*AXES, "vision_depth", "text_depth", "vision_params", "text_params"]


def _key_value(value: Any) -> Any:
    """A cell comparable across rows: "0.001", "1e-3" and 0.001 are one value, "0.5" and
    0.5000000001 one depth."""
    text = "" if value is None else str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    return round(number, 9) if math.isfinite(number) else text


def config_key(row: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """What makes a trial's configuration: the axes, depths, sizes and swept params, not the
    seed. Rows with equal keys are seeds of one configuration, in the report's tables and in
    the plots alike. Blank cells are left out, so a missing column equals a blank one."""
    keys = IDENTITY + sorted(k for k in row if "." in k and k != SEED)
    pairs = ((k, _key_value(row.get(k))) for k in keys)
    return tuple((k, v) for k, v in pairs if v != "")


def t_quantile(level: float, dof: float) -> float:
    """The two-sided `level` Student-t quantile at `dof` degrees of freedom (any real `dof`,
    so Welch's too)."""
    from scipy.special import stdtrit  # lighter than scipy.stats; imported when needed

    return float(stdtrit(dof, (1 + level) / 2))


def t_half_width(values: Sequence[float], level: float = 0.95) -> float:
    """Half-width of the `level` t-interval of the mean of `values` (n − 1 degrees of
    freedom); NaN below two values. With 2-3 seeds it is honestly wide: the 95% quantile is
    12.7 at one degree of freedom and 4.3 at two."""
    n = len(values)
    if n < 2:
        return math.nan
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return t_quantile(level, n - 1) * sd / math.sqrt(n)


# Half-samples per set-level interval: at most this many (fewer when `eval.bootstrap` is lower;
# `raysys.evaluate` draws them, the report's legend says how many).
MAX_HALF_SAMPLES = 50


def half_sample_count(bootstrap: int) -> int:
    """How many halves bound the alignment metrics under `eval.bootstrap`: 0 below two (then
    `raysys.evaluate` draws none and the metrics have no interval)."""
    count = min(bootstrap, MAX_HALF_SAMPLES)
    return count if count >= 2 else 0
