"""A real 2x2x2 sweep (objectives x model scales x layer depths) on local Ray, trained as four
populations of two trials: stopped with Ctrl-C part-way, resumed without rerunning the
finished populations' members (each command from the command line with its own Ray, which
leaves no process behind), then its report, plots and TensorBoard HParams read back; and a
population under ASHA losing one member."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import processes
import pytest
from parquet_encodings import dictionary_encoded
from PIL import Image

from raysys import config
from raysys.cli import main
from raysys.sweep.tune import TUNE_DIR, members_of, trial_status

OBJECTIVES = ["con", "spread"]
MODELS = [("efficientnet-lite0", "minilm-l6"), ("efficientnet-lite1", "minilm-l6")]
LAYERS = ["0.5:0.5", "1.0:1.0"]


def _overrides(cache_dir: Path) -> list[str]:
    return [
        "corpus.size=60",
        f"extract.cache_dir={cache_dir}",
        "train.batch_size=16",
        # 1,200 tiny steps: a population trains for about 6 s (its own time on a core), long
        # enough for the Ctrl-C below to land after one pair of populations and before the next.
        "train.epochs=400",
        "train.eval_every=300",
        "train.hidden=64",
        "train.latent=32",
        f"objectives={','.join(OBJECTIVES)}",
        "sweep.models=" + ",".join(f"{v}+{t}" for v, t in MODELS),
        f"sweep.layers={','.join(LAYERS)}",
        "sweep.population=2",  # 4 populations of two trials each
    ]


def _files(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file()}


def _any_finished(out: Path) -> bool:
    try:
        return "TERMINATED" in trial_status(out).values()
    except Exception:  # Tune has not written its experiment state yet
        return False


@pytest.fixture(scope="module")
def resumed_sweep(ray_cluster, small_cache, tmp_path_factory):
    """Start `raysys sweep` as a user would (its own process and private Ray), press Ctrl-C
    once a population has exported its members' models, then resume it the same way; returns
    the sweep dir and what was finished before. Neither command may leave a process behind
    (`tests/processes.py`)."""
    cfg, _ = small_cache
    out = tmp_path_factory.mktemp("sweep") / "s"
    args = ["sweep", "--out", str(out), *_overrides(Path(cfg.extract.cache_dir))]
    # Tune saves its experiment state (what `trial_status` reads) at most every 10 s by
    # default, and a population here finishes in about that: read it every second instead.
    first = processes.start(args, out.parent / "first.log", env={"TUNE_GLOBAL_CHECKPOINT_S": "1"})
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and first.proc.poll() is None:
            models = out / "models"
            if models.is_dir() and any(models.iterdir()):
                # Its models are exported; Ctrl-C once Tune has recorded it as finished.
                if _any_finished(out):
                    break
            time.sleep(0.5)
        assert first.proc.poll() is None, (
            "the sweep ended before it could be interrupted:\n" + first.log.read_text()[-3000:]
        )
        os.kill(first.proc.pid, signal.SIGINT)  # the driver's Ctrl-C
        code = first.wait(300)
        first_log = first.log.read_text()
        assert code == 130, first_log[-3000:]
        processes.assert_nothing_left(first)
    finally:
        first.kill_all()
    assert f"resume={out}" in first_log
    assert "Tuner.restore(" not in first_log  # Tune's own hint, which a user cannot follow
    status = trial_status(out)  # per population
    members = members_of(out)
    finished = {m for name, s in status.items() if s == "TERMINATED" for m in members[name]}
    before = {name: _files(out / "tensorboard" / name) for name in finished}
    before |= {f"model:{name}": _files(out / "models" / name) for name in finished}
    resumed = processes.start(["sweep", f"resume={out}"], out.parent / "resume.log")
    try:
        assert resumed.wait(600) == 0, resumed.log.read_text()[-3000:]
        processes.assert_nothing_left(resumed)  # a normal exit leaves nothing either
    finally:
        resumed.kill_all()
    return out, status, finished, before


def test_interrupted_sweep_resumes_and_runs_only_the_rest(resumed_sweep) -> None:
    out, status, finished, before = resumed_sweep
    assert 2 <= len(finished) < 8, status  # some populations finished, some left to resume
    for name in finished:  # finished members were not run again: their outputs are untouched
        assert _files(out / "tensorboard" / name) == before[name]
        assert _files(out / "models" / name) == before[f"model:{name}"]
    after = trial_status(out)
    assert len(after) == 4 and set(after.values()) == {"TERMINATED"}
    assert all(len(m) == 2 for m in members_of(out).values())
    assert len(list((out / "models").iterdir())) == 8


def test_results_have_a_row_per_trial_and_a_raw_row_per_layer_pair(resumed_sweep) -> None:
    out, *_ = resumed_sweep
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    trials = [r for r in rows if r["trial"]]
    raw = [r for r in rows if r["objective"] == "raw"]
    assert len(trials) == 8 and len(raw) == 4
    combos = {(r["objective"], r["vision"], r["vision_depth"], r["text_depth"]) for r in trials}
    assert len(combos) == 8
    assert {r["objective"] for r in trials} == set(OBJECTIVES)
    assert {r["vision"] for r in trials} == {v for v, _ in MODELS}
    for r in trials:
        for column in ("i2t_r1", "i2t_r10", "t2i_r5", "hardneg_acc", "mutual_knn", "cka"):
            assert 0.0 <= float(r[column]) <= 1.0 + 1e-6, (column, r[column])
        assert -1.0 <= float(r["cknna"]) <= 1.0  # unbiased: may dip below 0 on 6 test pairs
        assert float(r["recon_mse"]) > 0 and float(r["train_s"]) > 0
        assert 0.0 <= float(r["raw_mutual_knn"]) <= 1.0
        # Relative depth 0.5 of Lite0's 17 hidden states is layer 8, of Lite1's 22 layer 11.
        if r["vision_depth"] not in ("1", "1.0"):
            assert (r["vision"], r["vision_layer"]) in {
                ("efficientnet-lite0", "8"),
                ("efficientnet-lite1", "11"),
            }
    lite = {r["vision"]: int(r["vision_params"]) for r in trials}
    assert lite["efficientnet-lite0"] < lite["efficientnet-lite1"]  # the scale axis is real
    # The raw row of a layer pair carries the before-alignment scores its trials quote.
    for r in trials:
        [match] = [
            x
            for x in raw
            if (x["vision"], x["vision_layer"], x["text_layer"])
            == (r["vision"], r["vision_layer"], r["text_layer"])
        ]
        assert float(match["mutual_knn"]) == pytest.approx(float(r["raw_mutual_knn"]), abs=1e-5)


def test_report_embeds_every_plot_with_its_axes(resumed_sweep) -> None:
    out, *_ = resumed_sweep
    report = (out / "report.md").read_text()
    names = ["pareto_mutual_knn.png", "pareto_i2t_r1.png"]
    names += [f"{kind}_{o}.png" for kind in ("layers", "scale") for o in OBJECTIVES]
    for name in names:
        with Image.open(out / name) as image:
            image.verify()
        assert f"]({name})" in report, name
    for label in (
        "reconstruction MSE (test, lower is better)",
        "vision layer depth (relative)",
        "text layer depth (relative)",
        "vision model parameters (M)",
    ):
        assert label in report, label
    assert "Not drawn" not in report
    summary = report.split("## Objectives compared")[0]  # the results table
    assert summary.count("| spread") == 4 and summary.count("| raw") == 4
    understanding = report.split("## Understanding tasks")[1]
    assert "zeroshot_large_shape" in understanding and "hardneg_acc_swap_colours" in understanding


def test_report_command_rebuilds_the_sweep_report(resumed_sweep, capsys) -> None:
    """From the run's files alone, the report the sweep wrote: its table, intervals and notes
    (trials finished of planned, wall time), rounded alike."""
    out, *_ = resumed_sweep
    (out / "pareto_i2t_r1.png").unlink()
    before = (out / "results.csv").read_text()
    report = (out / "report.md").read_text()
    assert "trials finished; wall time" in report
    assert main(["report", str(out)]) == 0
    assert (out / "pareto_i2t_r1.png").is_file()
    assert (out / "results.csv").read_text() == before
    assert (out / "report.md").read_text() == report
    assert "vision_layer" in capsys.readouterr().out


def test_evaluate_scores_a_sweep_model_at_its_own_layers(resumed_sweep, tmp_path, capsys):
    """A sweep's models carry no provenance.json: `raysys evaluate` reads the trial's row in
    results.csv, so a half-depth trial is scored at its own layers, not the last ones, and
    a model of another backbone is refused rather than scored on the configured one's."""
    out, *_ = resumed_sweep
    with (out / "results.csv").open() as f:
        trials = [r for r in csv.DictReader(f) if r["trial"]]
    [row] = [
        r
        for r in trials
        if r["vision"] == "efficientnet-lite0" and r["vision_depth"] == "0.5"
        if r["objective"] == "con"
    ]
    cache_dir = config.load(out / "config.yaml").extract.cache_dir
    args = ["evaluate", str(out / "models" / row["trial"]), "corpus.size=60"]
    args += [f"extract.cache_dir={cache_dir}", "--out", str(tmp_path / "eval")]
    assert main(args) == 0
    with (tmp_path / "eval" / "results.csv").open() as f:
        rows = {r["objective"]: r for r in csv.DictReader(f)}
    assert rows["con"]["vision_layer"] == row["vision_layer"] == "8"
    assert rows["con"]["text_layer"] == row["text_layer"]
    for column in ("i2t_r1", "t2i_r5", "mutual_knn"):  # the sweep's own scores, recomputed
        assert float(rows["con"][column]) == pytest.approx(float(row[column]), abs=1e-6)
    assert float(rows["raw"]["mutual_knn"]) == pytest.approx(float(row["raw_mutual_knn"]))

    [other] = [r for r in trials if r["vision"] == "efficientnet-lite1"][:1]
    args = ["evaluate", str(out / "models" / other["trial"]), "corpus.size=60"]
    assert main([*args, f"extract.cache_dir={cache_dir}"]) == 2
    assert "add extract.vision=efficientnet-lite1" in capsys.readouterr().err


def test_config_yaml_holds_the_resolved_sweep(resumed_sweep) -> None:
    out, *_ = resumed_sweep
    saved = config.load(out / "config.yaml")
    assert saved.sweep.layers == LAYERS and saved.objectives == OBJECTIVES
    assert (out / TUNE_DIR).is_dir()


def test_hparams_tab_compares_every_trial(resumed_sweep) -> None:
    from tensorboard import context
    from tensorboard.backend.event_processing import plugin_event_multiplexer
    from tensorboard.backend.event_processing.data_provider import MultiplexerDataProvider
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import api_pb2, backend_context, list_session_groups

    out, *_ = resumed_sweep
    logdir = str(out / "tensorboard")
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(logdir)
    multiplexer.Reload()
    provider = MultiplexerDataProvider(multiplexer, logdir)
    tb_context = base_plugin.TBContext(
        data_provider=provider, multiplexer=multiplexer, logdir=logdir
    )
    request = api_pb2.ListSessionGroupsRequest(
        allowed_statuses=[api_pb2.STATUS_SUCCESS], start_index=0, slice_size=100
    )
    response = list_session_groups.Handler(
        context.RequestContext(), backend_context.Context(tb_context), "", request
    ).run()
    groups = list(response.session_groups)
    assert len(groups) == 8
    keys = {frozenset(g.hparams) for g in groups}
    assert keys == {
        frozenset(
            {
                "objective",
                "vision",
                "text",
                "vision_layer",
                "text_layer",
                "vision_depth",
                "text_depth",
                "vision_params",
                "text_params",
            }
        )
    }
    assert {g.hparams["objective"].string_value for g in groups} == set(OBJECTIVES)
    for group in groups:
        metrics = {m.name.tag: m.value for m in group.metric_values}
        assert 0.0 <= metrics["hparam/test/i2t_r1"] <= 1.0
    # Each trial's training curves live beside its HParams session.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    name = sorted((out / "tensorboard").iterdir())[0]
    acc = EventAccumulator(str(name))
    acc.Reload()
    assert "train/loss" in acc.Tags()["scalars"] and "val/i2t_r1" in acc.Tags()["scalars"]


def _tiny_sweep(cfg: config.Config, out: Path, *extra: str) -> list[str]:
    """`raysys sweep` arguments: tiny JAMs on the small cache, streaming their train split."""
    return [
        "sweep",
        "--out",
        str(out),
        f"extract.cache_dir={cfg.extract.cache_dir}",
        f"corpus.size={cfg.corpus.size}",
        "train.batch_size=16",
        "train.hidden=32",
        "train.latent=16",
        "train.data_on_device=stream",
        *extra,
    ]


@pytest.fixture(scope="module")
def streamed_sweeps(small_cache, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """Two sweeps that stream their train split from one pair view, each `(out, logs)`:
    `streamed`, a population of two members in its Tune trial's process, builds the view;
    `asha`, three members on two DDP workers (the sweep's Ray Train path) under ASHA, reuses
    it. In the second, the untrained member's first validation falls below the first's, so
    ASHA freezes it there, the third (learning rate 1e30) has NaN weights by then and is
    frozen as diverged, and the first trains to its last step."""
    from raysys.data import stream

    cfg, _ = small_cache
    # Another test's views. Listed first: deleting while `rglob` walks made it scan a
    # directory already gone (FileNotFoundError, seen 2026-12-01 with only two test files).
    for views in {done.parent.parent for done in Path(cfg.extract.cache_dir).rglob(stream.DONE)}:
        shutil.rmtree(views)
    root = tmp_path_factory.mktemp("streamed")
    sweeps = {
        "streamed": [
            *_tiny_sweep(cfg, root / "streamed", "objectives=con,spread", "train.epochs=2"),
            "train.eval_every=3",
            "sweep.population=2",
        ],
        "asha": [
            *_tiny_sweep(cfg, root / "asha", "objectives=con", "train.epochs=3"),
            "train.eval_every=2",
            "train.dropout=0",
            "train.best_metric=val/recon_mse",  # continuous: the untrained member is plainly worse
            "train.best_mode=min",
            "sweep.search=asha",
            "sweep.population=3",
            "sweep.workers_per_trial=2",
            "sweep.params.train.lr=[0.01,1e-9,1e30]",
        ],
    }
    runs = {}
    for name, args in sweeps.items():
        logs = io.StringIO()
        # A module fixture has no capfd. Ray prints its workers' forwarded lines to
        # `sys.stdout`/`sys.stderr` as they are at the time, so redirecting those catches them.
        with contextlib.redirect_stdout(logs), contextlib.redirect_stderr(logs):
            code = main(args)
        assert code == 0, logs.getvalue()[-3000:]
        runs[name] = (root / name, logs.getvalue())
    return runs


def test_a_streamed_population_trains_in_its_trial_from_the_sweeps_pair_view(
    small_cache, streamed_sweeps
) -> None:
    """A sweep whose split streams builds the pair view before Tune (Ray Data's tasks wait
    forever inside a trial) and its one-worker population reads it in the trial with pyarrow;
    the next sweep on the same cache reuses the view."""
    from raysys.data import stream

    cfg, _ = small_cache
    out, first = streamed_sweeps["streamed"]
    with (out / "results.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["trial"]]
    assert sorted(r["objective"] for r in rows) == ["con", "spread"]
    assert all(0 <= float(r["i2t_r1"]) <= 1 for r in rows)
    assert "1 of 1 population(s) stream their train split (train.data_on_device=stream)" in first
    assert "2 member(s) on 1 layer pair(s), 1 worker(s), streaming 48 pairs" in first, first[-3000:]
    assert "[train] pair view of 48 train pairs" in first, first[-3000:]
    assert "[train] pair view of" not in streamed_sweeps["asha"][1]  # built once, then reused
    views = list(Path(cfg.extract.cache_dir).rglob(stream.DONE))
    assert views, "no pair view was published"
    # Its layers are written without Parquet's dictionary (4-5x faster to decode), ids with one.
    first_file = views[0].parent / json.loads(views[0].read_text())["files"][0]
    encoded = dictionary_encoded(first_file)
    assert encoded["pair_id"] and not any(encoded[c] for c in stream.COLUMNS), encoded


def test_asha_stops_one_member_while_the_other_trains_on(streamed_sweeps) -> None:
    """Three members of one population under ASHA (`streamed_sweeps`' second): the worse one
    is frozen at its first validation, and a diverged one too (a NaN member used to fail the
    whole population), while the other trains on; each rank streams its half of the pair
    view."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, logs = streamed_sweeps["asha"]
    assert "1 of 1 population(s) stream their train split" in logs, logs[-3000:]
    assert (
        "3 member(s) on 1 layer pair(s), 2 worker(s), streaming 48 pairs from their pair view, "
        "24 per worker per epoch"
    ) in logs, logs[-3000:]
    with (out / "results.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["trial"]]
    [kept] = rows
    assert float(kept["train.lr"]) == pytest.approx(0.01)
    report = (out / "report.md").read_text()
    [stopped] = re.findall(r"trial (\S+) at step 2 was stopped early by ASHA", report)
    [diverged] = re.findall(
        r"trial (\S+) diverged at step 2 \(its weights or latents NaN or Inf; no test scores; "
        r"no model: it had no finite validation\)",
        report,
    )
    assert len({kept["trial"], stopped, diverged}) == 3
    assert sorted(p.name for p in (out / "models").iterdir()) == sorted([kept["trial"], stopped])

    def val_steps(name: str) -> list[int]:
        acc = EventAccumulator(str(out / "tensorboard" / name))
        acc.Reload()
        return [e.step for e in acc.Scalars("val/recon_mse")]

    assert val_steps(stopped) == [2]  # frozen after its first validation
    assert val_steps(kept["trial"])[-1] > 2  # the other trained on to its last step
