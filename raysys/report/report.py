"""Report: the results table as printed text, `results.csv` and `report.md`.

`results.csv` is the contract (one row per trained model plus a `raw` row, columns fixed by
`raysys.report.schema`); the Markdown report is rebuilt from it, so `raysys report DIR` can
regenerate it after the fact without re-running anything. Tables show a per-item metric with
its bootstrap interval as `value ±arm` (the larger of the interval's two arms, so the printed
range contains the whole interval) to keep them narrow; results.csv holds the exact bounds.

A sweep's report groups layer pairs by the relative depth that was asked for, with the layer
it landed on beside it (`0.50 (L11)`). Over `sweep.seeds` it shows each configuration's mean
over seeds with a t-interval (the rows' own interval where the seeds agree or only one
finished, as the plots do; both group by `schema.config_key`), and for each model pair x
layer pair how far apart the objectives are, flagged "within noise" when the difference's
interval contains 0. The aggregation is pure (`mean_over_seeds`, `objective_differences`:
rows in, rows out).
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from raysys.config import EvalConfig
from raysys.errors import RaysysError
from raysys.report.plots import pooled, write_plots
from raysys.report.schema import (
    ALIGNMENT,
    DEFAULT_KS,
    METRIC_IMAGES,
    RAW,
    SEED,
    SHOWN,
    SWEEP_COLUMNS,
    SWEEP_SHOWN,
    config_key,
    extra_metric_columns,
    half_sample_count,
    hardneg_kinds,
    interval_columns,
    ks_of,
    result_columns,
    sized_name,
    sizes_of,
    t_half_width,
    t_quantile,
    zeroshot_tasks,
)

RESULTS = "results.csv"
REPORT = "report.md"
# The run's own notes (trials finished of planned, wall time, ASHA stops, failures) and where
# it lives (an s3:// run's URI): kept beside the report so `raysys report` rebuilds it with
# them; results.csv cannot say them.
NOTES = "report-notes.json"


def results_columns(rows: list[dict[str, Any]], ks: Sequence[int] = DEFAULT_KS) -> list[str]:
    """results.csv's column order: the fixed columns (retrieval at `eval.retrieval_ks`, then
    the intervals and item counts), then a sweep's columns, then every other column the rows
    carry (dynamic metric columns, swept params and `train.seed`), sorted, so no column is
    ever dropped.

    The dynamic metric columns (`hardneg_acc_<kind>`, `zeroshot_<task>`, the alignment
    metrics' intervals) come right after the fixed ones, in `extra_metric_columns` order."""
    fixed = result_columns(ks) + interval_columns(ks)
    keys = {k for r in rows for k in r} - set(fixed)
    metrics = extra_metric_columns(keys)
    keys -= set(metrics)
    extra = [c for c in SWEEP_COLUMNS if c in keys] + sorted(keys - set(SWEEP_COLUMNS))
    return fixed + metrics + extra


def write_results(
    out_dir: Path, rows: list[dict[str, Any]], ks: Sequence[int] = DEFAULT_KS
) -> Path:
    """results.csv in `results_columns` order; a row lacking a column leaves it blank."""
    path = out_dir / RESULTS
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=results_columns(rows, ks), restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(v) for k, v in row.items()})
    return path


def _csv_value(value: Any) -> Any:
    """A float in 6 significant digits that reads back as a float: `1.0`, not `1`, which a
    table would print as an integer (a layer index) where the run printed `1.000`."""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        text = f"{value:.6g}"
        return text if any(c in text for c in ".en") else f"{text}.0"
    return value


def as_written(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows with every float as results.csv holds it (6 significant digits), so a report
    printed now and one `raysys report` rebuilds from the CSV round alike: metrics over 200
    items land on exact ties such as 0.3875, which a last-bit difference rounds either way."""
    return [{k: _as_written(v) for k, v in row.items()} for row in rows]


def _as_written(value: Any) -> Any:
    return float(_csv_value(value)) if isinstance(value, float) and value == value else value


def read_results(run_dir: Path) -> list[dict[str, str]]:
    path = Path(run_dir) / RESULTS
    if not path.is_file():
        raise RaysysError(
            f"no {RESULTS} in {str(run_dir)!r}; point `raysys report` at a finished run directory"
        )
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


class Verbatim(str):
    """A table cell printed as it is (a swept value such as 0.0003, never rounded to 3
    places)."""


def _cell(value: Any, interval: tuple[float, float] | None = None) -> str:
    if value in ("", None):
        return "—"
    if isinstance(value, Verbatim):
        return str(value)
    integral = isinstance(value, int) or (isinstance(value, str) and value.lstrip("-").isdigit())
    if integral and interval is None:  # layer indices, parameter counts; a metric of exactly
        return str(value)  # 0 or 1 read back from results.csv has its interval
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if interval is None:
        return f"{number:.3f}"
    arm = max(interval[1] - number, number - interval[0], 0.0)
    return f"{number:.3f} ±{arm:.2g}"


def _interval(row: dict[str, Any], column: str) -> tuple[float, float] | None:
    """A column's bootstrap bounds in a row (floats in memory, strings read back), if any."""
    bounds = row.get(f"{column}_lo"), row.get(f"{column}_hi")
    try:
        return (float(bounds[0]), float(bounds[1])) if "" not in bounds else None
    except (TypeError, ValueError):
        return None


def table(rows: list[dict[str, Any]], columns: list[str] = SHOWN) -> str:
    """A Markdown table (also readable as plain text in a terminal); per-item metrics with
    their interval, `value ±arm`."""
    body = [[_cell(r.get(c), _interval(r, c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(columns)]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += [
        "| " + " | ".join(v.ljust(w) for v, w in zip(b, widths, strict=True)) + " |" for b in body
    ]
    return "\n".join(lines)


def _bootstrap_settings(run_dir: Path) -> tuple[float, int]:
    """`eval.interval` and `eval.bootstrap` from the run's config.yaml (defaults without it):
    the rows record the intervals, not how they were drawn."""
    cfg = EvalConfig()
    try:
        tree = yaml.safe_load((Path(run_dir) / "config.yaml").read_text()) or {}
        ev = tree.get("eval") or {}
        return float(ev.get("interval", cfg.interval)), int(ev.get("bootstrap", cfg.bootstrap))
    except (OSError, yaml.YAMLError, AttributeError, TypeError, ValueError):
        return cfg.interval, cfg.bootstrap


def _counts(rows: list[dict[str, Any]], column: str) -> str:
    found = sorted({int(float(r[column])) for r in rows if r.get(column) not in ("", None)})
    return f"{found[0]:,}" if len(found) == 1 else f"{found[0]:,}–{found[-1]:,}"


def interval_legend(
    run_dir: Path, rows: list[dict[str, Any]], compared: bool = False, seeds: bool = False
) -> list[str]:
    """How to read `±` in the table: what was resampled, and what overlap means (`compared`:
    the report tests the objectives' differences itself; `seeds`: the trained rows' `±` is
    over seeds, so this says where the bootstrap's shows). Empty when no row has intervals
    (a run without them, or an older results.csv)."""
    scored = [r for r in rows if r.get("n_captions") not in ("", None)]
    if not scored:
        return []
    level, resamples = _bootstrap_settings(run_dir)
    halves = half_sample_count(resamples)
    where = (
        "where it is not over seeds (*Understanding tasks*, a configuration whose seeds agree "
        "or with one seed)"
        if seeds
        else ""
    )
    if halves:
        alignment = (
            f"their interval comes from {halves} seeded random halves of the images drawn without "
            "replacement (a with-replacement resample repeats rows, which become each other's "
            "nearest neighbours), centred on the halves' mean and put around the full-sample "
            f"value; tails from {halves} halves are rough."
        )
    else:
        alignment = f"they have no interval (`eval.bootstrap` is {resamples}: no halves drawn)."
    return [
        f"- `±`{' ' + where if where else ''}: each per-item metric's {level * 100:g}% "
        "percentile bootstrap interval over the "
        f"{_counts(scored, 'n_images')} test images ({resamples:,} resamples, printed as its "
        "larger arm; the exact bounds are the `<metric>_lo` / `<metric>_hi` columns of "
        f"`{RESULTS}`). Text→image recall, hard-negative accuracy and `recon_mse` are means over "
        f"the {_counts(scored, 'n_captions')} captions, resampled image by image (all captions "
        "of a drawn image together: they are not independent). "
        + (
            "Whether two objectives differ is tested under *Objectives compared*."
            if compared
            else "Two objectives whose intervals overlap are not distinguished by this run."
        ),
        f"- The alignment metrics (`mutual_knn`, `cka`, `cknna`, …) are set-level: {alignment} "
        "They are computed after platonic-rep's outlier clamp (`eval.outlier_q`).",
        "- `hardneg_acc_<kind>`: hard-negative accuracy over the pairs whose negative was made by "
        "that edit; `zeroshot_<task>`: the share of test images whose nearest class prompt (mapped "
        "through JAM's text encoder) is their label, beside `zeroshot_<task>_chance`, the "
        "majority-class rate (what always answering the commonest class scores).",
    ]


def _eval_setting(run_dir: Path, key: str) -> Any:
    """One `eval.<key>` as the run's config.yaml recorded it; None when the file or the key is
    missing (a run from before the setting existed: its default would be a false claim)."""
    try:
        tree = yaml.safe_load((Path(run_dir) / "config.yaml").read_text()) or {}
        return (tree.get("eval") or {}).get(key)
    except (OSError, yaml.YAMLError, AttributeError):
        return None


def sample_lines(run_dir: Path, rows: list[dict[str, Any]]) -> list[str]:
    """What each score was computed over: retrieval, hard negatives and reconstruction over the
    whole test split (exact, in chunks), the alignment metrics over a seeded sample of
    `eval.metric_pairs` images, validation over at most `eval.val_pairs` val pairs. Each line
    only where the rows (counts) or config.yaml record it."""
    lines = []
    scored = [r for r in rows if r.get("n_captions") not in ("", None)]
    if scored:
        lines.append(
            f"- Retrieval, hard negatives and `recon_mse` are over the whole test split: "
            f"{_counts(scored, 'n_images')} images and {_counts(scored, 'n_captions')} "
            "captions, every caption ranked against every image (exact, computed a chunk of "
            "queries at a time)."
        )
    sampled = [r for r in rows if r.get(METRIC_IMAGES) not in ("", None)]
    if sampled:
        asked = _eval_setting(run_dir, "metric_pairs")
        setting = ""
        if asked is not None:
            setting = (
                f" (`eval.metric_pairs` = {int(asked):,}{': every image' if not asked else ''})"
            )
        images = _counts(sampled, METRIC_IMAGES)
        lines.append(
            f"- The alignment metrics are over a seeded sample of {images} test images"
            f"{setting}, one caption each, as platonic-rep scores them: the same images for "
            "the `raw` rows and every model, so their rows compare. They cost O(N²) and their "
            "values depend on N: compare them at one sample size."
        )
    val = _eval_setting(run_dir, "val_pairs")
    if val is not None:
        cap = f"a seeded sample of at most {int(val):,} val pairs" if int(val) else "every val pair"
        lines.append(
            "- Validation (every `train.eval_every` steps; it picks the exported checkpoint by "
            f"`train.best_metric`) scored {cap} (`eval.val_pairs`)."
        )
    return lines


def _row_label(row: dict[str, Any]) -> str:
    """A row in the by-size table: its trial name, or objective and layer pair."""
    if row.get("trial"):
        return str(row["trial"])
    return f"{row.get('objective', '?')} {side_label(row, 'vision')}:{side_label(row, 'text')}"


def by_size_section(rows: list[dict[str, Any]], metrics: Sequence[str] = ALIGNMENT) -> list[str]:
    """With `eval.metric_sizes`: each row's alignment metrics at each sample size beside the
    headline sample (`n_metric_images`), so a reader sees how they move with N before
    comparing numbers from runs of different sizes. Empty without sized columns."""
    sizes = sizes_of({k for r in rows for k in r if r.get(k) not in ("", None)})
    if not sizes:
        return []
    full = _counts(rows, METRIC_IMAGES) if any(r.get(METRIC_IMAGES) for r in rows) else "sample"
    columns = ["row", "metric", *(f"n={n:,}" for n in sizes), f"n={full}"]
    body = []
    for r in rows:
        for m in metrics:
            cells = [r.get(sized_name(m, n)) for n in sizes]
            if all(c in ("", None) for c in cells):
                continue
            values = dict(zip(columns[2:], [*cells, r.get(m)], strict=True))
            body.append({"row": _row_label(r), "metric": m} | values)
    if not body:
        return []
    return [
        "## Alignment by sample size",
        "",
        "Each alignment metric on nested seeded samples of the test images (`eval.metric_sizes`; "
        "the last column is the headline sample, `eval.metric_pairs`). Values that still move "
        "between the two largest sizes are not yet settled at this N.",
        "",
        table(body, columns),
        "",
    ]


def write_report(
    run_dir: Path, rows: list[dict[str, Any]], notes: list[str] = (), location: str | None = None
) -> Path:
    """report.md: what was run, the table, and how to read it. `location` is where the report
    will live when `run_dir` is only its staging copy (an `s3://` run)."""
    run_dir = Path(run_dir)
    rows = as_written(rows)
    where = location or str(run_dir)
    first = rows[0] if rows else {}
    lines = [
        f"# raysys report — {_run_name(where)}",
        "",
        f"Vision `{first.get('vision', '?')}` (layer {first.get('vision_layer', '?')}), "
        f"text `{first.get('text', '?')}` (layer {first.get('text_layer', '?')}); "
        "metrics on the test split.",
        "",
        table(rows),
        "",
        "- `raw`: the frozen backbones' embeddings before alignment. Retrieval and hard-negative "
        "accuracy need one shared space, so they are blank there.",
        *LEGEND,
        "- `mutual_knn`, `cka`, `cknna`, `svcca`: representational alignment of the image and "
        "text representations (Platonic Representation Hypothesis definitions).",
        *interval_legend(run_dir, rows),
        *sample_lines(run_dir, rows),
        "",
        *by_size_section(rows, [m for m in SHOWN if m in ALIGNMENT]),
        *understanding_section(rows),
        *probe_lines(run_dir),
        f"All columns: `{RESULTS}`. Training curves: {_tensorboard_hint(where, location)}",
    ]
    return _write(run_dir, lines, notes, location)


def _run_name(where: str) -> str:
    """A run's name in its report's title: the last part of its directory or URI."""
    return where.rstrip("/").rsplit("/", 1)[-1]


def _tensorboard_hint(where: str, location: str | None) -> str:
    """How to watch a run's curves; an `s3://` run's (`location`) are synced first."""
    hint = f"`tensorboard --logdir {where.rstrip('/')}/tensorboard`"
    return hint + (" (sync it to a local folder first)." if location else ".")


# How to read the metric columns, in every report.
LEGEND = [
    "- `i2t_rK` / `t2i_rK`: recall at K, image→text and text→image (fractions in [0, 1]).",
    "- `hardneg_acc`: fraction of images closer to their caption than to its hard negative.",
    "- `recon_mse`: autoencoder reconstruction error in standardised embedding units.",
]


def _write(
    run_dir: Path, lines: list[str], notes: Sequence[str], location: str | None = None
) -> Path:
    if notes:
        lines += ["", *(f"- {n}" for n in notes)]
    if notes or location:  # what `rebuild` cannot read from results.csv
        saved = {"notes": list(notes), "location": location}
        (run_dir / NOTES).write_text(json.dumps(saved, indent=1) + "\n")
    else:
        (run_dir / NOTES).unlink(missing_ok=True)  # an earlier report's notes are not this one's
    path = run_dir / REPORT
    path.write_text("\n".join(lines) + "\n")
    return path


def is_sweep(rows: list[dict[str, Any]]) -> bool:
    return any(r.get("trial") for r in rows)


# --- a sweep's axes as asked, seeds and comparisons ------------------------------------------

HEADLINE = ["i2t_r1", "t2i_r1", "hardneg_acc", "mutual_knn"]  # the metrics compared
# Spread's own knobs (`raysys.sweep.plan.SPREAD_ONLY`): they tell Spread variants apart, and
# the other objectives carry them as set but unused.
OBJECTIVE_PARAMS = ("train.alpha", "train.k")
NOISE = "within noise"
_LAYER_COLUMNS = ("vision_layer", "text_layer", "vision_depth", "text_depth")
# The metrics of the sweep table, averaged over seeds.
_SUMMARY_METRICS = [c for c in SWEEP_SHOWN if c not in ("objective", "vision", "text")]
_SUMMARY_METRICS = [c for c in _SUMMARY_METRICS if not c.endswith("_layer")]


def _num(value: Any) -> float | None:
    """A number from a row (floats in memory, strings read back); None for blank or NaN."""
    if value in ("", None):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _depth(row: dict[str, Any], side: str) -> float | None:
    depth = _num(row.get(f"{side}_depth"))
    return None if depth is None else round(depth, 4)  # "0.5" and 0.5000 are one depth


def _layer(row: dict[str, Any], side: str) -> str:
    layer = _num(row.get(f"{side}_layer"))
    return "" if layer is None else f"L{int(layer)}"


def side_label(row: dict[str, Any], side: str) -> str:
    """`0.50 (L11)`: a side's depth as asked with the layer it landed on (`L11` alone in a
    row without depths, e.g. an older results.csv)."""
    depth, layer = _depth(row, side), _layer(row, side)
    if depth is None:
        return layer or "—"
    return f"{depth:.2f} ({layer})" if layer else f"{depth:.2f}"


def depth_pair(row: dict[str, Any]) -> str:
    """The layer pair as asked, `0.50:0.50`: what rows group by across model pairs."""
    sides = [_depth(row, s) for s in ("vision", "text")]
    if None in sides:
        return f"{_layer(row, 'vision')}:{_layer(row, 'text')}"
    return f"{sides[0]:.2f}:{sides[1]:.2f}"


def describe_layer_pairs(rows: list[dict[str, Any]]) -> list[str]:
    """Each layer pair as asked with the layers it landed on: `0.50:0.50 (L8:L3)`, or per
    vision model where models of different depth land on different layers."""
    landed: dict[str, dict[str, None]] = {}
    for r in rows:
        realised = f"{_layer(r, 'vision')}:{_layer(r, 'text')}"
        landed.setdefault(depth_pair(r), {})[f"{realised} {r.get('vision', '')}"] = None
    out = []
    for pair in sorted(landed):
        found = list(landed[pair])
        if len({f.split(" ", 1)[0] for f in found}) == 1:
            found = [found[0].split(" ", 1)[0]]
        out.append(f"{pair} → {', '.join(f.replace(' ', ' on ', 1) for f in found)}")
    return out


def param_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The swept `train.*` columns of the rows, the seed left out."""
    return sorted({k for r in rows for k in r if k.startswith("train.") and k != SEED})


def _varying(rows: list[dict[str, Any]], columns: Sequence[str]) -> list[str]:
    return [c for c in columns if len({str(r.get(c, "")) for r in rows}) > 1]


def _present(rows: list[dict[str, Any]], metrics: Sequence[str]) -> list[str]:
    return [m for m in metrics if any(_num(r.get(m)) is not None for r in rows)]


def mean_over_seeds(
    rows: list[dict[str, Any]], metrics: Sequence[str], level: float = 0.95
) -> list[dict[str, Any]]:
    """One row per configuration (all but the seed) of the trial rows: its axes and params,
    `seeds` (how many rows), and per metric the mean over seeds with its `level` t-interval
    as `<metric>_lo` / `_hi`. That interval is over seeds only: every seed is scored on the
    same test items, so it measures training noise, not test-set noise. Where it cannot
    (one seed has the metric) or would be zero-wide (the seeds agree exactly, e.g. a score
    the seed does not enter), the rows' own bounds stand in, their arms averaged
    (`plots.pooled`), as in the plots' `seed_means`; blank when a row lacks them.
    Configurations (`schema.config_key`) keep the rows' order."""
    trials = [r for r in rows if r.get("trial")]
    params = param_columns(trials)
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in trials:
        groups.setdefault(config_key(r), []).append(r)
    out = []
    for group in groups.values():
        first = group[0]
        keep = ("objective", "vision", "text", *_LAYER_COLUMNS, "vision_params", "text_params")
        row = {k: first[k] for k in (*keep, *params) if k in first}
        row["seeds"] = len(group)
        for m in metrics:
            have = [r for r in group if _num(r.get(m)) is not None]
            values = [_num(r.get(m)) for r in have]
            if not values:
                continue
            mean = sum(values) / len(values)
            row[m] = mean
            if len(values) >= 2 and max(values) > min(values):
                half = t_half_width(values, level)
                lo, hi = mean - half, mean + half
            else:  # one seed, or seeds that agree: the rows' own (bootstrap / half-sample) bounds
                _, lo, hi = pooled(have, m)
            if not (math.isnan(lo) or math.isnan(hi)):
                row[f"{m}_lo"], row[f"{m}_hi"] = lo, hi
        out.append(row)
    return out


def _bootstrap_half(row: dict[str, Any], metric: str) -> float | None:
    """Half the width of a row's own test-set interval, None without one."""
    lo, hi = _num(row.get(f"{metric}_lo")), _num(row.get(f"{metric}_hi"))
    return None if lo is None or hi is None else (hi - lo) / 2


def difference(
    a: list[dict[str, Any]], b: list[dict[str, Any]], metric: str, level: float = 0.95
) -> tuple[float, float, str] | None:
    """Mean of `a` − mean of `b` in `metric`, the half-width of its `level` interval and the
    interval's basis, or None when a side has no value.

    - Two or more seeds on each side (`seeds`): Welch's t-interval, the seeds of the two
      objectives taken as independent samples (unpaired: a failed or sampled-out trial never
      mispairs them; pairing by seed could only narrow it).
    - One row on each side (`bootstrap`): the rows' per-item bootstrap intervals combined as
      the root-sum-of-squares of their half-widths, a normal approximation that treats the
      two rows' test-set noise as independent (both score the same items, so positively
      correlated errors make it conservative).
    - Seeds on both sides that all agree (a zero-wide Welch interval would call any gap
      real): as one row each, the sides' per-item half-widths averaged over their rows.
    - Otherwise (one side with a single seed, or no bounds): the difference, half-width NaN.
    """
    va = [v for v in (_num(r.get(metric)) for r in a) if v is not None]
    vb = [v for v in (_num(r.get(metric)) for r in b) if v is not None]
    if not va or not vb:
        return None
    diff = sum(va) / len(va) - sum(vb) / len(vb)
    if len(va) >= 2 and len(vb) >= 2:
        qa, qb = (_variance(v) / len(v) for v in (va, vb))
        se = math.sqrt(qa + qb)
        if se == 0:
            return _test_noise(diff, a, b, metric)
        dof = se**4 / (qa**2 / (len(va) - 1) + qb**2 / (len(vb) - 1))
        return diff, t_quantile(level, dof) * se, "seeds"
    if len(a) == 1 and len(b) == 1:
        return _test_noise(diff, a, b, metric)
    return diff, math.nan, ""


def _test_noise(
    diff: float, a: list[dict[str, Any]], b: list[dict[str, Any]], metric: str
) -> tuple[float, float, str]:
    """`diff` with the root-sum-of-squares of each side's per-item half-width (averaged over
    its rows); half-width NaN where a row has no bounds."""
    halves = [[_bootstrap_half(r, metric) for r in side] for side in (a, b)]
    if any(h is None for side in halves for h in side):
        return diff, math.nan, ""
    ha, hb = (sum(side) / len(side) for side in halves)
    return diff, math.hypot(ha, hb), "bootstrap"


def _variance(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / (len(values) - 1)


def _contender(row: dict[str, Any], own: Sequence[str]) -> str:
    """An objective, with the values of its own knobs where they vary (`spread α=0.9 k=0`)."""
    knobs = " ".join(f"{p.split('.')[-1]}={row.get(p)}" for p in own)
    return f"{row.get('objective')} {knobs}".strip()


def objective_differences(
    rows: list[dict[str, Any]], metrics: Sequence[str] = HEADLINE, level: float = 0.95
) -> list[dict[str, Any]]:
    """For each model pair x layer pair (x any other swept param), each pair of objectives'
    difference `a − b` in each metric: `<metric>` the difference, `<metric>_lo` / `_hi` its
    interval (`difference`), `<metric>_noise` True when the interval contains 0 (None
    without an interval), and `basis` (`seeds` or `bootstrap`). A Spread swept over its own
    knobs is one contender per setting. Metrics no row has are left out."""
    trials = [r for r in rows if r.get("trial")]
    metrics = _present(trials, metrics)
    params = param_columns(trials)
    shared = [p for p in params if p not in OBJECTIVE_PARAMS]
    settings: dict[tuple, list[dict[str, Any]]] = {}
    for r in trials:
        key = (r.get("vision"), r.get("text"), depth_pair(r), *(str(r.get(p)) for p in shared))
        settings.setdefault(key, []).append(r)
    own = {
        o: _varying([r for r in trials if r.get("objective") == o], OBJECTIVE_PARAMS)
        for o in dict.fromkeys(r.get("objective") for r in trials)
    }
    out = []
    for group in settings.values():
        contenders: dict[str, list[dict[str, Any]]] = {}
        for r in group:
            contenders.setdefault(_contender(r, own[r.get("objective")]), []).append(r)
        first = group[0]
        for a, b in itertools.combinations(contenders, 2):
            row = {k: first.get(k) for k in ("vision", "text", *_LAYER_COLUMNS)}
            row |= {p: first.get(p) for p in _varying(trials, shared)}
            row |= {"a": a, "b": b, "basis": ""}
            for m in metrics:
                found = difference(contenders[a], contenders[b], m, level)
                if found is None:
                    continue
                diff, half, basis = found
                row[m] = diff
                row["basis"] = row["basis"] or basis
                if math.isnan(half):
                    row[f"{m}_noise"] = None
                    continue
                row[f"{m}_lo"], row[f"{m}_hi"] = diff - half, diff + half
                row[f"{m}_noise"] = row[f"{m}_lo"] <= 0.0 <= row[f"{m}_hi"]
            out.append(row)
    return out


def _signed(value: float) -> str:
    return f"{value:+.3f}".replace("-", "−")


def differences_table(diffs: list[dict[str, Any]], metrics: Sequence[str] = HEADLINE) -> str:
    """The comparison as a Markdown table: one line per model pair x layer pair x objective
    pair, each metric's difference `+0.031 ±0.045`, and `(within noise)` where its interval
    contains 0."""
    metrics = [m for m in metrics if any(m in d for d in diffs)]
    models = len({(d.get("vision"), d.get("text")) for d in diffs}) > 1
    params = sorted({k for d in diffs for k in d if k.startswith("train.")})
    body = []
    for d in diffs:
        line = {"models": f"{d.get('vision')} + {d.get('text')}"} if models else {}
        line["layers"] = f"{side_label(d, 'vision')}:{side_label(d, 'text')}"
        line |= {p: Verbatim(d.get(p, "")) for p in params}
        line["a − b"] = f"{d['a']} − {d['b']}"
        for m in metrics:
            if m not in d:
                line[f"Δ {m}"] = "—"
                continue
            cell = _signed(d[m])
            if f"{m}_lo" in d:
                cell += f" ±{(d[f'{m}_hi'] - d[f'{m}_lo']) / 2:.3f}"
            if d.get(f"{m}_noise"):
                cell += f" ({NOISE})"
            line[f"Δ {m}"] = cell
        line["interval"] = d.get("basis") or "—"
        body.append(line)
    return table(body, list(body[0])) if body else ""


def summary_rows(rows: list[dict[str, Any]], level: float = 0.95) -> list[dict[str, Any]]:
    """What a sweep's main table shows: raw rows first, then each trial row, or with several
    seeds each configuration's `mean_over_seeds`; layer cells read `0.50 (L11)`."""
    raw = [r for r in rows if r.get("objective") == RAW]
    trials = [r for r in rows if r.get("trial")]
    if _seeds(trials) > 1:
        trials = mean_over_seeds(trials, _present(trials, _SUMMARY_METRICS), level)
    params = param_columns(trials)
    return [
        r
        | {f"{s}_layer": Verbatim(side_label(r, s)) for s in ("vision", "text")}
        | {p: Verbatim(_csv_value(r[p])) for p in params if r.get(p) not in ("", None)}
        for r in raw + trials
    ]


def _seeds(trials: list[dict[str, Any]]) -> int:
    """How many seeds the sweep ran (distinct `train.seed` values; 1 without the column)."""
    return max(1, len({str(r.get(SEED)) for r in trials if r.get(SEED) not in ("", None)}))


def summary_table(rows: list[dict[str, Any]], level: float = 0.95) -> str:
    """The sweep's main table (`summary_rows`): the swept params that vary (trials differing
    only in `train.lr` must not look alike) and, with several seeds, the number of seeds per
    configuration are shown too."""
    shown = summary_rows(rows, level)
    trials = [r for r in rows if r.get("trial")]
    params = _varying(trials, param_columns(trials))
    seeds = ["seeds"] if _seeds(trials) > 1 else []
    return table(shown, [*SWEEP_SHOWN[:5], *params, *seeds, *SWEEP_SHOWN[5:]])


def _seed_legend(trials: list[dict[str, Any]], level: float) -> list[str]:
    seeds = _seeds(trials)
    if seeds <= 1:
        return []
    values = sorted({int(float(r[SEED])) for r in trials if _num(r.get(SEED)) is not None})
    return [
        f"- Each trained row is the mean over {seeds} seeds (`{SEED}` {values[0]}–{values[-1]}; "
        f"each seed's row is in `{RESULTS}`) with `±` its {level * 100:g}% t-interval "
        "(n − 1 degrees of freedom) over seeds: with 2-3 seeds it is wide (the t quantile is "
        "12.7 at 2 seeds, 4.3 at 3), as it should be. The seeds share one test set, so it "
        "measures training noise. Where only one seed has a metric, or the seeds agree exactly, "
        "`±` is the rows' own interval instead (as in the plots). The `raw` rows hold only "
        "alignment metrics, with their half-sample intervals; each seed's own intervals are in "
        f"`{RESULTS}`.",
    ]


def comparison_section(rows: list[dict[str, Any]], level: float = 0.95) -> list[str]:
    """report.md's comparison of objectives, with how its intervals were made; empty with
    fewer than two objectives."""
    diffs = objective_differences(rows, HEADLINE, level)
    if not diffs:
        return []
    bases = {d["basis"] for d in diffs if d.get("basis")}
    how = []
    if "seeds" in bases:
        how.append(
            f"over seeds, Welch's {level * 100:g}% t-interval of the difference of the two "
            "objectives' seed means (training noise on one shared test set)"
        )
    if "bootstrap" in bases:
        how.append(
            f"with one seed (or seeds that agree exactly), the two rows' own {level * 100:g}% "
            "test-set intervals (per-item bootstrap, at least the exact binomial one for "
            "rates; half-sample for mutual kNN) combined as the root-sum-of-squares of their "
            "half-widths (a normal approximation that treats the two rows' test-set noise as "
            "independent, conservative since both score the same items)"
        )
    if not bases:
        how.append("no interval: the rows carry neither several seeds nor bootstrap bounds")
    return [
        "## Objectives compared",
        "",
        differences_table(diffs, HEADLINE),
        "",
        f"- `Δ metric` is objective a minus objective b, `±` half its interval: {'; '.join(how)}. "
        f"`{NOISE}` marks a difference whose interval contains 0: this sweep does not tell "
        "those two objectives apart on that metric.",
        "",
    ]


def _task_columns(rows: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """The zero-shot tasks' and hard-negative kinds' columns the rows carry."""
    keys = {k for r in rows for k in r if r.get(k) not in ("", None)}
    return zeroshot_tasks(keys), hardneg_kinds(keys)


def understanding_section(rows: list[dict[str, Any]]) -> list[str]:
    """Zero-shot classification and hard negatives by kind: one row per trained model, each
    score with its interval, the tasks' majority-class chance in the header row."""
    trained = [r for r in rows if r.get("objective") != RAW]
    tasks, kinds = _task_columns(trained)
    if not trained or not (tasks or kinds):
        return []
    columns = ["objective", "vision", "text", "vision_layer", "text_layer", *tasks, *kinds]
    shown = [r | {c: side_label(r, c.split("_")[0]) for c in columns[3:5]} for r in trained]
    if SEED in {k for r in trained for k in r}:
        columns.insert(5, SEED)
    chance = {"objective": "chance"} | {
        t: f"{mean:.3f}" for t in tasks if (mean := _mean_of(trained, f"{t}_chance")) is not None
    }
    lines = [
        "## Understanding tasks",
        "",
        "Zero-shot classification (`zeroshot_<task>`: each test image's nearest class prompt, "
        "through JAM's text encoder; the `chance` row is the majority-class rate) and "
        "hard-negative accuracy by the edit that made the negative (`hardneg_acc_<kind>`, "
        "chance 0.5).",
        "",
        table([chance, *shown], columns),
        "",
    ]
    return lines


def _mean_of(rows: list[dict[str, Any]], column: str) -> float | None:
    values = [v for r in rows if (v := _num(r.get(column))) is not None]
    return sum(values) / len(values) if values else None


PROBE_MD = "probe.md"  # written by `raysys.probe` beside probe.csv (the module needs torch)


def probe_lines(run_dir: Path) -> list[str]:
    """The probe's section (its tables, verdicts and plots), when the run was probed."""
    path = Path(run_dir) / PROBE_MD
    return [*path.read_text().rstrip("\n").splitlines(), ""] if path.is_file() else []


def write_sweep_report(
    run_dir: Path,
    rows: list[dict[str, Any]],
    notes: list[str] = (),
    location: str | None = None,
    ks: Sequence[int] = DEFAULT_KS,
) -> Path:
    """results.csv, the PNG plots and report.md of a sweep (rows: raw baselines and trials).
    `location` is where the report will live when `run_dir` is only its staging copy."""
    run_dir = Path(run_dir)
    rows = as_written(rows)
    where = location or str(run_dir)
    if not any(r.get("trial") for r in rows):
        raise RaysysError(f"no finished trial in {str(run_dir)!r}: nothing to report")
    write_results(run_dir, rows, ks)
    plots, skipped = write_plots(run_dir, rows)
    level = _bootstrap_settings(run_dir)[0]
    trials = [r for r in rows if r.get("trial")]
    axes = {
        "objectives": sorted({r["objective"] for r in trials}),
        "model pairs": sorted({f"{r['vision']} + {r['text']}" for r in trials}),
        "layer pairs (relative depth as asked → the layers it landed on)": (
            describe_layer_pairs(trials)
        ),
    }
    seeds = _seeds(trials)
    lines = [
        f"# raysys sweep — {_run_name(where)}",
        "",
        f"{len(trials)} trials over "
        + "; ".join(f"{len(v)} {k} ({', '.join(v)})" for k, v in axes.items())
        + (f"; {seeds} seeds" if seeds > 1 else "")
        + ". Metrics on the test split; `raw` rows are the frozen backbones before alignment.",
        "",
        summary_table(rows, level),
        "",
        *comparison_section(rows, level),
        *by_size_section(rows, ["mutual_knn", "cka"]),
        *understanding_section(rows),
        *probe_lines(run_dir),
    ]
    for plot in plots:
        lines += [
            f"## {plot.title}",
            "",
            f"![{plot.title}]({plot.path.name})",
            "",
            f"*x: {plot.xlabel}; y: {plot.ylabel}.*",
            "",
        ]
    for skip in skipped:
        lines += [f"- Not drawn, {skip.name}: {skip.reason}."]
    lines += [
        "",
        *LEGEND,
        "- `mutual_knn`, `cka`, `cknna`: alignment after JAM; `raw_*` columns in "
        f"`{RESULTS}` hold the same layer pair before alignment.",
        "- `vision_layer`, `text_layer`: the relative depth asked for (layer / last layer), "
        "with the hidden-state layer it landed on (0 = embeddings): `0.50 (L11)` is half depth "
        "of a 22-layer model. A side asked as an index shows its realised depth. "
        f"`{RESULTS}` holds both, as `*_depth` and `*_layer`.",
        *_seed_legend(trials, level),
        *interval_legend(run_dir, rows, compared=True, seeds=seeds > 1),
        *sample_lines(run_dir, rows),
        "",
        f"All columns: `{RESULTS}`. TensorBoard (curves of every trial; HParams compares them): "
        + _tensorboard_hint(where, location),
    ]
    return _write(run_dir, lines, notes, location)


def rebuild(run_dir: Path) -> Path:
    """`raysys report`: report.md (and a sweep's plots) again from a finished run's
    results.csv, with the table printed."""
    run_dir = Path(run_dir).resolve()  # as the run named itself (`open_run`)
    rows = read_results(run_dir)
    kept = run_dir / NOTES
    saved = json.loads(kept.read_text()) if kept.exists() else {}
    notes, location = saved.get("notes", []), saved.get("location")
    if is_sweep(rows):
        path = write_sweep_report(run_dir, rows, notes, location, ks=ks_of(rows))
        print(summary_table(rows, _bootstrap_settings(run_dir)[0]))
    else:
        path = write_report(run_dir, rows, notes, location)
        print(table(rows))
    print(f"\nreport: {path}")
    return path
