"""The commands, each the story of one `raysys <command>` told top-down.

`run` and `sweep`: check -> extract (prepare) -> plan -> tune (train -> evaluate) -> report.
`train`: check -> extract -> train one objective -> evaluate -> report. Every check that needs
no data runs before Ray starts or anything is extracted.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from raysys import config, storage
from raysys.checks import (
    check_best_metric,
    check_corpus,
    check_train_layers,
    checked_eval_splits,
)
from raysys.config import Config
from raysys.data import stream
from raysys.data.cache import resolve_layer
from raysys.data.pairs import Pairs
from raysys.data.source import PairSource, pair_source
from raysys.errors import ConfigError, Interrupted, RaysysError
from raysys.evaluate import score_model, score_raw
from raysys.extract import Extracted, extract
from raysys.jam import JAM
from raysys.probe import PROVENANCE, probe, read_csv, trained_on
from raysys.report.report import (
    as_written,
    summary_table,
    table,
    write_report,
    write_results,
    write_sweep_report,
)
from raysys.report.schema import RAW, model_row
from raysys.report.tensorboard import projector_sample, write_run_summaries
from raysys.rundir import CONFIG_FILE, RunDir, open_run
from raysys.runtime import cluster_resources, init_ray, joined_cluster, node_resources
from raysys.sweep.plan import (
    Trial,
    check_sweep,
    packing,
    plan_trials,
    raw_sweep_rows,
    with_planned_depths,
)
from raysys.sweep.populations import PopulationPlan, group_trials, population_size, widened
from raysys.sweep.prepare import Prepared, prepare
from raysys.sweep.tune import (
    Outcome,
    check_resumable,
    check_same_plan,
    plan_streams,
    planned_size,
    run_trials,
)
from raysys.train.driver import train as fit
from raysys.train.step import check_dims

# --- sweep (and run) ---------------------------------------------------------------------------


def sweep(
    cfg: Config,
    out: Path | str,
    resume: bool = False,
    timings: dict[str, float] | None = None,
    with_probe: bool = False,
) -> list[dict[str, Any]]:
    """Extract, run every trial under Tune (or the unfinished ones of a stopped sweep), then
    (`with_probe`, as `raysys run` does) probe the raw and trained representations, then
    write the report; returns the results rows (raw baselines first). `timings` receives
    `fit_s`, the seconds Tune ran the trials (what `bench sweep` compares)."""
    started = time.perf_counter()
    check_corpus(cfg)
    resolved = check_sweep(cfg, resume)
    run = open_run(cfg, out, resume, kind="sweep")
    if resume:
        check_resumable(run.root)
    init_ray(cfg.ray)
    pack = packing(cfg, cluster_resources())  # one the cluster cannot hold fails now
    prepared = prepare(cfg, resolved)
    trials = plan_trials(cfg, prepared)
    # A resumed sweep regroups by the size it started with (its slots may differ here).
    size = (planned_size(run.root) if resume else None) or population_size(
        cfg, trials, pack, _layer_widths(prepared) if pack.gpus_per_worker else None
    )
    if resume and cfg.sweep.population not in (0, size):
        print(
            f"[sweep] sweep.population={cfg.sweep.population} is not applied: a resumed sweep "
            f"keeps the populations it started with (at most {size} members each)",
            flush=True,
        )
    populations = group_trials(cfg, trials, size)
    pack = widened(pack, len(populations), joined_cluster() and len(node_resources()) > 1)
    if resume:
        check_same_plan(run.root, populations)
    print(
        f"[sweep] {len(trials)} trials: {_describe_axes(cfg, prepared)}; "
        f"{len(populations)} population(s) of {_sizes(populations)} member(s) (at most {size} "
        f"each); {pack.describe()}",
        flush=True,
    )
    streams = plan_streams(cfg, populations, pack)  # any streamed view, built before Tune
    outcome = run_trials(cfg, run, populations, pack, resume, streams)
    if timings is not None:
        timings["fit_s"] = outcome.fit_s
    rows = with_planned_depths(raw_sweep_rows(prepared) + outcome.rows, trials)
    if with_probe and outcome.rows:
        try:
            _probe_run(cfg, run, rows)
        except (RaysysError, ValueError, OSError) as exc:  # the sweep's report still lands
            outcome.problems.append(f"probe skipped: {exc}")
    _sweep_report(cfg, run, rows, trials, outcome, time.perf_counter() - started)
    run.finish()
    _stop_if_unfinished(run, outcome, len(trials))
    return rows


def _probe_run(cfg: Config, run: RunDir, rows: list[dict[str, Any]]) -> None:
    """The passive-metric probe of a finished sweep, into its run directory: the raw
    embeddings and every trained model's latents on their own layer pairs. The models of a
    run on object storage are read back from there (trials upload them and keep no copy)."""
    pcfg = config.from_dict(config.to_dict(cfg))
    pcfg.probe.models = str(run.local)
    with tempfile.TemporaryDirectory(prefix="raysys-probe-") as tmp:
        if run.uri:
            storage.download_dir(storage.join(run.uri, "models"), Path(tmp) / "models")
            pcfg.probe.models = tmp
        probe(pcfg, run.local, results=rows)


def _stop_if_unfinished(run: RunDir, outcome: Outcome, trials: int) -> None:
    """A stopped sweep exits 130, and one with failed trials exits with an error (a job that
    lost trials must not report success), each with the command that resumes it (from any
    machine, for an s3:// sweep); the report of the finished trials is written first."""
    if outcome.unfinished:
        raise Interrupted(
            f"the sweep stopped with {outcome.unfinished} of {trials} trials unfinished; "
            f"finished trials are kept: resume with: raysys sweep resume={run.root}"
        )
    if outcome.failed:
        raise RaysysError(
            f"{len(outcome.failed)} of {trials} trials failed ({', '.join(outcome.failed[:3])}"
            f"{', …' if len(outcome.failed) > 3 else ''}; reasons above); the report holds the "
            f"others; rerun the failed ones with: raysys sweep resume={run.root}"
        )


def _layer_widths(prepared: list[Prepared]) -> list[tuple[int, int]]:
    """Each layer pair's image and text widths, read from the caches' schemas."""
    widths = []
    for pair in prepared:
        for layer in pair.layers:
            dims, _ = stream.pair_row(PairSource(**layer.source))
            widths.append((dims[0], dims[1]))
    return widths


def _sizes(populations: list[PopulationPlan]) -> str:
    """The populations' sizes as planned: `6`, or `4–5`."""
    sizes = [len(p.trials) for p in populations]
    return f"{min(sizes)}" if min(sizes) == max(sizes) else f"{min(sizes)}–{max(sizes)}"


def _describe_axes(cfg: Config, prepared: list[Prepared]) -> str:
    axes = [
        f"{len(cfg.objectives)} objective(s)",
        f"{len(prepared)} model pair(s)",
        f"{len(prepared[0].layers)} layer pair(s)",
    ] + [f"{k} in {v}" for k, v in cfg.sweep.params.items()]
    axes += [f"{cfg.sweep.seeds} seeds"] if cfg.sweep.seeds > 1 else []
    return " x ".join(axes)


def _sweep_report(
    cfg: Config,
    run: RunDir,
    rows: list[dict[str, Any]],
    trials: list[Trial],
    outcome: Outcome,
    wall: float,
) -> None:
    rows = as_written(rows)  # printed as report.md and a rebuild from results.csv show them
    notes = [f"{len(outcome.rows)} of {len(trials)} trials finished; wall time {wall:.0f}s."]
    if outcome.unfinished:
        notes.append(f"Interrupted: {outcome.unfinished} trials unfinished (resume to run them).")
    if outcome.rows:
        notes += outcome.problems
        write_sweep_report(run.local, rows, notes, location=run.uri, ks=cfg.eval.retrieval_ks)
        print("\n" + summary_table(rows) + "\n", flush=True)
    for problem in outcome.problems:
        print(f"[sweep] {problem}", flush=True)


# --- train -----------------------------------------------------------------------------------


def train(cfg: Config, out: Path | str, resume: bool = False) -> list[dict[str, Any]]:
    """One Ray Train run of `train.objective` beside the raw baseline; returns the rows.

    With `resume`, `out` is a stopped run: training continues from its latest checkpoint
    (a finished one returns at once)."""
    started = time.perf_counter()
    check_best_metric(cfg)
    check_corpus(cfg)
    check_train_layers(cfg)
    run = open_run(cfg, out, resume)
    ext = extract(cfg)
    source = trained_source(cfg, ext)
    test = checked_eval_splits(cfg, source)["test"]
    axes = _axes_of(cfg, ext, source)
    rows = [model_row(RAW, **axes, scores=score_raw(test, cfg.eval))]
    sampled = rows[0].get("n_metric_images")
    print(
        f"[evaluate] raw embeddings on {len(test)} test pairs: mutual_knn "
        f"{rows[0]['mutual_knn']:.3f}" + (f" (on a sample of {sampled} images)" if sampled else ""),
        flush=True,
    )
    rows.append(_fit_and_score(cfg, run, ext, source, test, axes, resume))
    _train_report(cfg, run, rows, test, time.perf_counter() - started)
    run.finish()
    return rows


def _fit_and_score(
    cfg: Config,
    run: RunDir,
    ext: Extracted,
    source: PairSource,
    test: Pairs,
    axes: dict[str, Any],
    resume: bool,
) -> dict[str, Any]:
    """Train `train.objective`, export the best model with its provenance, score it on the
    test split and write its TensorBoard summaries; returns its results row."""
    objective = cfg.train.objective
    print(
        f"[train] {objective}: {cfg.train.epochs} epochs, {cfg.train.num_workers} workers",
        flush=True,
    )
    result = fit(
        cfg,
        source,
        run.local,
        objective,
        resume,
        storage_uri=run.remote("ray"),
        # Rank 0 may run on a node that shares no disk with this driver: it uploads its own.
        tensorboard_uri=run.remote("tensorboard", objective),
    )
    provenance = {**axes, "objective": objective, "corpus_key": ext.image_manifest["corpus_key"]}
    provenance |= {"image_layer": source.image_layer, "text_layer": source.text_layer}
    (result.model_dir / PROVENANCE).write_text(json.dumps(provenance, indent=1))
    model = JAM.load(result.model_dir)
    scores = score_model(model, test, cfg.eval, prompts=source.prompts())
    sample = projector_sample(ext.corpus, test)
    write_run_summaries(run.local / "tensorboard" / objective, cfg, model, scores, sample)
    print(
        f"[train] {objective}: {result.seconds:.0f}s, test i2t_r1 {scores['i2t_r1']:.3f}, "
        f"mutual_knn {scores['mutual_knn']:.3f} -> {result.model_dir}",
        flush=True,
    )
    # history: Ray Train's checkpointed reports, i.e. one entry per validation.
    metrics_log = {objective: {"test": scores, "history": result.history}}
    (run.local / "metrics.json").write_text(json.dumps(metrics_log, indent=1, default=str))
    return model_row(objective, **axes, scores=scores, train_s=round(result.seconds, 1))


def trained_source(cfg: Config, ext: Extracted) -> PairSource:
    """The extraction at `train.vision_layer` / `train.text_layer`."""
    return pair_source(
        ext,
        resolve_layer(ext.image_manifest, cfg.train.vision_layer),
        resolve_layer(ext.text_manifest, cfg.train.text_layer),
    )


def _axes_of(cfg: Config, ext: Extracted, source: PairSource) -> dict[str, Any]:
    """A row's model and layer columns (layers as hidden-state positions in the cache)."""
    return {
        "vision": cfg.extract.vision,
        "text": cfg.extract.text,
        "vision_layer": ext.image_manifest["layers"].index(source.image_layer),
        "text_layer": ext.text_manifest["layers"].index(source.text_layer),
    }


def _train_report(
    cfg: Config, run: RunDir, rows: list[dict[str, Any]], test: Pairs, wall: float
) -> None:
    rows = as_written(rows)  # printed as report.md and a rebuild from results.csv show them
    write_results(run.local, rows, cfg.eval.retrieval_ks)
    images = len(np.unique(test.image_ids))
    notes = [
        f"Test split: {len(test)} pairs over {images} images; chance R@1 is {1 / images:.3f}.",
        f"Wall time {wall:.0f}s.",
    ]
    write_report(run.local, rows, notes=notes, location=run.uri)
    print("\n" + table(rows) + "\n", flush=True)


# --- evaluate, extract, report -----------------------------------------------------------------


def evaluate(cfg: Config, model_dir: Path, out: Path | None) -> list[dict[str, Any]]:
    """Score an exported model on any corpus's cache (`eval.split`), beside the raw row.

    The layers are those the model was trained on (`probe.trained_on`); the corpus comes from the
    config, so the same model can be scored on another corpus, and the backbones must be the
    model's own: a JAM reads one backbone's layer, and another's of the same width would be
    scored without a word."""
    if out is not None and storage.is_remote(out):
        raise ConfigError("evaluate writes a local --out directory")
    model = JAM.load(model_dir)
    results = model_dir.parent.parent / "results.csv"  # a sweep's: <sweep>/models/<trial>/
    rows = read_csv(results) if model_dir.parent.name == "models" and results.is_file() else []
    record = trained_on(model_dir, {r["trial"]: r for r in rows if r.get("trial")})
    if record is None:
        print(
            f"[evaluate] {model_dir} has no {PROVENANCE} and no row in its sweep's results.csv:"
            f" scoring at train.vision_layer={cfg.train.vision_layer}, "
            f"train.text_layer={cfg.train.text_layer} of {cfg.extract.vision}+"
            f"{cfg.extract.text}",
            flush=True,
        )
        record = {}
    theirs = (record.get("vision", cfg.extract.vision), record.get("text", cfg.extract.text))
    if theirs != (cfg.extract.vision, cfg.extract.text):
        raise ConfigError(
            f"model {str(model_dir)!r} was trained on {theirs[0]}+{theirs[1]}, not "
            f"{cfg.extract.vision}+{cfg.extract.text}: add extract.vision={theirs[0]} "
            f"extract.text={theirs[1]}"
        )
    ext = extract(cfg)
    source = trained_source(cfg, ext)
    if "image_layer" in record:  # a run's provenance.json: the cache's layer names
        source.image_layer, source.text_layer = record["image_layer"], record["text_layer"]
    elif "vision_layer" in record:  # a sweep's results row: positions in the cache
        source.image_layer = resolve_layer(ext.image_manifest, int(record["vision_layer"]))
        source.text_layer = resolve_layer(ext.text_manifest, int(record["text_layer"]))
    pairs = source.load(cfg.eval.split)
    check_dims(model, pairs.image.shape[1], pairs.text.shape[1], f"model {str(model_dir)!r}")
    axes = _axes_of(cfg, ext, source)
    name = record.get("objective", model_dir.name)
    rows = [
        model_row(RAW, **axes, scores=score_raw(pairs, cfg.eval)),
        model_row(
            name, **axes, scores=score_model(model, pairs, cfg.eval, prompts=source.prompts())
        ),
    ]
    rows = as_written(rows)  # printed as its report.md and results.csv show them
    print("\n" + table(rows) + "\n")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        config.dump(cfg, out / CONFIG_FILE)
        write_results(out, rows, cfg.eval.retrieval_ks)
        write_report(out, rows, notes=[f"Model {model_dir}, {cfg.eval.split} split."])
        print(f"outputs:     {out}/ (config.yaml, results.csv, report.md)")
    return rows


def extract_cache(cfg: Config, out: str | None) -> Extracted:
    """`raysys extract`: `--out` is the cache itself (a path or s3://)."""
    if out:
        cfg.extract.cache_dir = out
    ext = extract(cfg)
    print(f"cache: {ext.image_dir}\n       {ext.text_dir}")
    return ext
