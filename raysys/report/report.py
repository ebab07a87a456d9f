"""Report: the results table as printed text, `results.csv` and `report.md`.

`results.csv` is the contract (one row per trained model plus a `raw` row, columns fixed by
`raysys.report.schema`); the Markdown report is rebuilt from it, so `raysys report DIR` can
regenerate it after the fact without re-running anything. Tables show a per-item metric with
its bootstrap interval as `value ±arm` (the larger of the interval's two arms, so the printed
range contains the whole interval) to keep them narrow; results.csv holds the exact bounds.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from raysys.config import EvalConfig
from raysys.errors import RaysysError
from raysys.report.plots import write_plots
from raysys.report.schema import (
    DEFAULT_KS,
    SHOWN,
    SWEEP_COLUMNS,
    SWEEP_SHOWN,
    interval_columns,
    ks_of,
    result_columns,
)

RESULTS = "results.csv"
REPORT = "report.md"


def write_results(
    out_dir: Path, rows: list[dict[str, Any]], ks: Sequence[int] = DEFAULT_KS
) -> Path:
    """results.csv: the fixed columns (retrieval at `eval.retrieval_ks`, then the intervals
    and item counts), then a sweep's columns, then any other (swept params), sorted."""
    fixed = result_columns(ks) + interval_columns(ks)
    keys = {k for r in rows for k in r} - set(fixed)
    extra = [c for c in SWEEP_COLUMNS if c in keys] + sorted(keys - set(SWEEP_COLUMNS))
    path = out_dir / RESULTS
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fixed + extra, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(v) for k, v in row.items()})
    return path


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value


def read_results(run_dir: Path) -> list[dict[str, str]]:
    path = Path(run_dir) / RESULTS
    if not path.is_file():
        raise RaysysError(
            f"no {RESULTS} in {str(run_dir)!r}; point `raysys report` at a finished run directory"
        )
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _cell(value: Any, interval: tuple[float, float] | None = None) -> str:
    if value in ("", None):
        return "—"
    if isinstance(value, int) or (isinstance(value, str) and value.lstrip("-").isdigit()):
        return str(value)  # layer indices, parameter counts
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


def interval_legend(run_dir: Path, rows: list[dict[str, Any]]) -> list[str]:
    """How to read `±` in the table: what was resampled, and what overlap means. Empty when
    no row has intervals (a run without them, or an older results.csv)."""
    scored = [r for r in rows if r.get("n_images") not in ("", None)]
    if not scored:
        return []
    level, resamples = _bootstrap_settings(run_dir)
    return [
        f"- `±`: each per-item metric's {level * 100:g}% percentile bootstrap interval over test "
        f"items ({resamples:,} resamples of {_counts(scored, 'n_images')} images for "
        f"image→text recall and of {_counts(scored, 'n_captions')} captions for text→image "
        "recall, hard-negative accuracy and `recon_mse`), printed as its larger arm; the exact "
        f"bounds are the `<metric>_lo` / `<metric>_hi` columns of `{RESULTS}`. Two objectives "
        "whose intervals overlap are not distinguished by this run.",
        "- The alignment metrics have no interval: they are set-level (kNN graphs, Gram "
        "matrices), and a resample's repeated rows would be each other's nearest neighbours.",
    ]


def write_report(run_dir: Path, rows: list[dict[str, Any]], notes: list[str] = ()) -> Path:
    """report.md: what was run, the table, and how to read it."""
    run_dir = Path(run_dir)
    first = rows[0] if rows else {}
    lines = [
        f"# raysys report — {run_dir.name}",
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
        "",
        f"All columns: `{RESULTS}`. Training curves: `tensorboard --logdir "
        f"{run_dir / 'tensorboard'}`.",
    ]
    return _write(run_dir, lines, notes)


# How to read the metric columns, in every report.
LEGEND = [
    "- `i2t_rK` / `t2i_rK`: recall at K, image→text and text→image (fractions in [0, 1]).",
    "- `hardneg_acc`: fraction of images closer to their caption than to its hard negative.",
    "- `recon_mse`: autoencoder reconstruction error in standardised embedding units.",
]


def _write(run_dir: Path, lines: list[str], notes: list[str]) -> Path:
    if notes:
        lines += ["", *(f"- {n}" for n in notes)]
    path = run_dir / REPORT
    path.write_text("\n".join(lines) + "\n")
    return path


def is_sweep(rows: list[dict[str, Any]]) -> bool:
    return any(r.get("trial") for r in rows)


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
    where = location or str(run_dir)
    if not any(r.get("trial") for r in rows):
        raise RaysysError(f"no finished trial in {str(run_dir)!r}: nothing to report")
    write_results(run_dir, rows, ks)
    plots, skipped = write_plots(run_dir, rows)
    trials = [r for r in rows if r.get("trial")]
    axes = {
        "objectives": sorted({r["objective"] for r in trials}),
        "model pairs": sorted({f"{r['vision']} + {r['text']}" for r in trials}),
        "layer pairs (relative depth)": sorted(
            {f"{float(r['vision_depth']):.2f}:{float(r['text_depth']):.2f}" for r in trials}
        ),
    }
    lines = [
        f"# raysys sweep — {where.rstrip('/').rsplit('/', 1)[-1]}",
        "",
        f"{len(trials)} trials over "
        + "; ".join(f"{len(v)} {k} ({', '.join(v)})" for k, v in axes.items())
        + ". Metrics on the test split; `raw` rows are the frozen backbones before alignment.",
        "",
        table(rows, SWEEP_SHOWN),
        "",
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
        "- Layer indices are hidden-state numbers (0 = embeddings); depths in `results.csv` are "
        "relative (layer / last layer).",
        *interval_legend(run_dir, rows),
        "",
        f"All columns: `{RESULTS}`. TensorBoard (curves of every trial; HParams compares them): "
        f"`tensorboard --logdir {where.rstrip('/')}/tensorboard`"
        + (" (sync it to a local folder first)." if location else "."),
    ]
    return _write(run_dir, lines, notes)


def rebuild(run_dir: Path) -> Path:
    """`raysys report`: report.md (and a sweep's plots) again from a finished run's
    results.csv, with the table printed."""
    rows = read_results(run_dir)
    if is_sweep(rows):
        path = write_sweep_report(run_dir, rows, ks=ks_of(rows))
        print(table(rows, SWEEP_SHOWN))
    else:
        path = write_report(run_dir, rows)
        print(table(rows))
    print(f"\nreport: {path}")
    return path
