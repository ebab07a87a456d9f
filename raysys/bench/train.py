"""`raysys bench train`: what Ray Train costs over a bare PyTorch loop for the same JAM fit.

The same model, cached embeddings, global batch, number of steps and torch thread count are
trained twice: once through `raysys.train.driver.train` (a Ray Train `TorchTrainer` with 1 worker,
exactly what `raysys train` runs) and once by a `Trainer` driven in this process over in-memory
tensors. Two numbers answer "is Ray worth it here":

- **steady-state throughput** of each path (samples/s) and their ratio. Both paths are cut into
  the same windows (one per validation, every `train.eval_every` steps) and rated per window;
  the steady rate is the median of the windows after the first, which holds the warm-up (first
  allocations, lazy init). The median, not the mean, because a shared machine's stalls land in
  single windows.
- **Ray's fixed overhead** (`startup_s`): time spent neither in training steps nor in
  validations, i.e. from calling `train()` to the first step, plus from the end of the last
  validation until `train()` returns (worker-group teardown, model export). The first part
  includes the worker loading the cache and building the model, which any trainer does; the
  bare loop's time for that same work is reported beside it (`startup.bare_setup_s`).

The pipeline's rate includes what its worker does per step beyond the bare loop (per-step
bookkeeping; not the TensorBoard scalars, which a window writes after its clock stops):
that is part of what the ratio measures. The bare loop runs
first, in this process (Ray up and idle), then the Ray run; as the two run one after the
other, anything else loading the machine skews the ratio, so the 1-minute load averages are
recorded and a warning is printed when they are well above the CPU count.

Where the rest of the Ray run's time goes comes from the worker itself: its reported samples/s
per window give each window's training seconds exactly, and its per-step TensorBoard events give
the wall clock (same machine, same clock as the driver) at which each window ended; so the time
before the first window, between windows (validations: scoring, checkpoint, `ray.train.report`)
and after the last one is measured, not guessed. The decomposition is exact:

    wall_s = startup_s + steps * B / pipeline_per_s + excess_train_s + validation_s

`excess_train_s` is training time above the steady rate (first-window warm-up, stalls), which
the bare loop pays too, so it is not counted as Ray's. The naive "wall - steps * B / steady -
validations" is `startup_s + excess_train_s`. The last validation, which no window follows, is
taken as the mean of the others. Starting Ray itself (`ray_init_s`) is reported apart and not
counted: one Ray instance serves every run of a session. If the events cannot be read, each
validation is taken as long as the bare loop's same work (scoring the val split, saving model
and optimiser state) and `startup.source` says "estimate".

The bench runs the configured `train.epochs` and `train.batch_size` (defaults: 8 epochs of
1,600 train pairs in batches of 256 = 48 steps; about 80 s in all on 2 CPU cores once the
embedding cache exists) with `train.eval_every` overridden to give `WINDOWS` windows,
`train.num_workers` set to 1 and early stopping off, so both paths run the same steps.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from raysys.bench.common import BENCH_FILE, host_info, load_average, sync, write_result
from raysys.checks import check_split_sizes
from raysys.commands import trained_source
from raysys.config import Config, to_dict
from raysys.data.batches import batch_plan
from raysys.data.source import PairSource
from raysys.evaluate import score_model
from raysys.extract import extract
from raysys.jam import JAM
from raysys.runtime import init_ray
from raysys.train.driver import scaling, train
from raysys.train.step import Trainer, jam_config

WINDOWS = 6  # throughput windows per path; the first is warm-up, the median of the rest counts
RUN_NAME = "bench"
RAY_RUN_DIR = "ray-run"  # under out_dir; replaced on every bench
STEP_TAG = "train/loss"  # a scalar the worker writes at every step


def window_bounds(total_steps: int, eval_every: int) -> list[int]:
    """The step count at the end of each window, as the Ray worker validates (every
    `eval_every` steps and once more at the end)."""
    bounds = list(range(eval_every, total_steps, eval_every))
    return [*bounds, total_steps]


def steady_rate(rates: list[float]) -> float:
    """Median samples/s of the windows after the first (the first holds the warm-up)."""
    if not rates:
        raise ValueError("no throughput windows")
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


@dataclass
class Timeline:
    """Where the wall time of one Ray Train run went (seconds; see the module docstring)."""

    wall_s: float
    startup_s: float  # to_first_step_s + shutdown_s (NaN parts when only estimated)
    to_first_step_s: float
    shutdown_s: float
    train_s: float  # steps * B / steady rate
    excess_train_s: float
    validation_s: float
    source: str  # "tensorboard" (measured) or "estimate"


def ray_timeline(
    t_call: float,
    t_return: float,
    window_seconds: list[float],
    bound_walls: list[float] | None,
    total_steps: int,
    batch_size: int,
    rate: float,
    validation_estimate: float,
) -> Timeline:
    """Split `train()`'s wall time into start-up, training, validations and shutdown.

    `window_seconds` are the worker's own timings of each window's training steps (from its
    reported samples/s). `bound_walls[k]` is the wall clock (time.time()) at which the last
    step of window k finished, from the worker's TensorBoard events. A window therefore
    started at `bound_walls[k] - window_seconds[k]`; the time from the end of one window to
    the start of the next is one validation (scoring, checkpoint, `ray.train.report`). The
    last validation, after which no window starts, is taken as the mean of the measured ones
    (or `validation_estimate` when there are none). Without `bound_walls`, every validation
    is `validation_estimate`, start-up and shutdown cannot be told apart, and their sum is
    what remains of the wall time.
    """
    wall = t_return - t_call
    train_s = total_steps * batch_size / rate
    measured_train = sum(window_seconds)
    excess = measured_train - train_s
    if bound_walls is None:
        validation = validation_estimate * len(window_seconds)
        startup = wall - measured_train - validation
        return Timeline(wall, startup, math.nan, math.nan, train_s, excess, validation, "estimate")
    starts = [end - seconds for end, seconds in zip(bound_walls, window_seconds, strict=True)]
    gaps = [nxt - end for end, nxt in zip(bound_walls[:-1], starts[1:], strict=True)]
    last_validation = statistics.mean(gaps) if gaps else validation_estimate
    validation = sum(gaps) + last_validation
    to_first_step = starts[0] - t_call
    shutdown = t_return - bound_walls[-1] - last_validation
    return Timeline(
        wall_s=wall,
        startup_s=to_first_step + shutdown,
        to_first_step_s=to_first_step,
        shutdown_s=shutdown,
        train_s=train_s,
        excess_train_s=excess,
        validation_s=validation,
        source="tensorboard",
    )


def read_step_walls(log_dir: Path, tag: str = STEP_TAG) -> dict[int, float]:
    """Wall time of each step's `tag` scalar in a TensorBoard log dir ({} if unreadable)."""
    if not Path(log_dir).is_dir():  # TensorBoard raises its own error for a missing dir
        return {}
    try:
        acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
        acc.Reload()
        return {e.step: e.wall_time for e in acc.Scalars(tag)}
    except (KeyError, OSError):
        return {}


@dataclass
class BareRun:
    """The bare loop's measurements."""

    window_per_s: list[float]  # training steps only, per window
    validation_s: list[float]  # each validation's scoring + checkpoint writing
    setup_s: float  # loading train/val from the cache, building the model: what the worker
    # also does before its first step, so this much of Ray's start-up is not Ray's
    d_image: int
    d_text: int


def bare_loop(
    cfg: Config, source: PairSource, bounds: list[int], threads: int, device: torch.device
) -> BareRun:
    """Train JAM as the Ray worker does, minus Ray: same data, model, batches and schedule.

    Validations do the work rank 0 does (score the val split, write model and optimiser
    state); their time only stands in for Ray's when its step times are unavailable.
    """
    tcfg = cfg.train
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        started = time.perf_counter()
        index = source.index("train")
        plan = batch_plan(tcfg, len(index), index.buckets)  # one worker: all its shards
        train_data = source.load_index(index, select=plan.worker_rows(0, 1))
        val_data = source.load("val")
        torch.manual_seed(tcfg.seed)
        model = JAM(jam_config(tcfg, train_data.image.shape[1], train_data.text.shape[1]))
        model.fit_input_stats(torch.as_tensor(train_data.image), torch.as_tensor(train_data.text))
        trainer = Trainer(model.to(device), tcfg, bounds[-1])
        model.seed_dropout(tcfg.seed, device)  # rank 0's dropout seed, as in the worker
        arrays = (train_data.image, train_data.text, train_data.negative, train_data.image_keys())
        tensors = [torch.as_tensor(a).to(device) for a in arrays]
        setup_s = time.perf_counter() - started
        rates, validations = [], []
        for end in bounds:
            start_step = trainer.step
            started = time.perf_counter()
            while trainer.step < end:
                index = torch.as_tensor(plan.worker_batch(trainer.step, 0, 1), device=device)
                trainer.train_step(*(t[index] for t in tensors))
            sync(device)
            elapsed = time.perf_counter() - started
            rates.append((trainer.step - start_step) * tcfg.batch_size / elapsed)
            started = time.perf_counter()
            score_model(trainer.jam, val_data, cfg.eval, with_intervals=False)
            with tempfile.TemporaryDirectory() as tmp:
                trainer.jam.save(Path(tmp) / "model")
                torch.save({"trainer": trainer.state_dict()}, Path(tmp) / "state.pt")
            validations.append(time.perf_counter() - started)
        d_image, d_text = train_data.image.shape[1], train_data.text.shape[1]
        return BareRun(rates, validations, setup_s, d_image, d_text)
    finally:
        torch.set_num_threads(previous_threads)


@dataclass
class Workload:
    """What both paths run: the same cache, config, steps, windows, threads and device."""

    cfg: Config  # the user's config with one worker, `eval_every` per window, no early stop
    source: PairSource
    train_pairs: int
    total_steps: int
    bounds: list[int]
    threads: int
    device: torch.device


@dataclass
class RayRun:
    """The Ray Train run as its driver and worker saw it."""

    window_per_s: list[float]  # the worker's samples/s over each window's training steps
    t_call: float  # wall clock (time.time()) when `train()` was called
    t_return: float  # and when it returned
    log_dir: Path  # the worker's TensorBoard events, one scalar per step

    @property
    def steady_per_s(self) -> float:
        """The pipeline's rate once warmed up (see `steady_rate`)."""
        return steady_rate(self.window_per_s)


def bench_train(cfg: Config, out_dir: Path) -> dict[str, Any]:
    """Benchmark `raysys train` (Ray Train, 1 worker) against a bare PyTorch loop.

    Prints one line per path, the ratio and Ray's fixed overhead; writes `out_dir/bench.json`
    (throughputs, ratio, start-up breakdown, per-window rates, load averages, the settings and
    the host) and returns the same dict. `out_dir/ray-run` holds the Ray run's outputs and is
    replaced on every call.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ray_init_s = _start_ray(cfg)
    work = _workload(cfg)
    tcfg = work.cfg.train
    print(
        f"[bench] {work.total_steps} steps of batch {tcfg.batch_size} ({tcfg.epochs} epochs of "
        f"{work.train_pairs} pairs), {len(work.bounds)} windows, {work.threads} torch threads, "
        f"{work.device}",
        flush=True,
    )
    load = {"before_bare": load_average()}
    bare = bare_loop(work.cfg, work.source, work.bounds, work.threads, work.device)
    print(
        f"[bench] bare torch loop      : {steady_rate(bare.window_per_s):8.0f} samples/s",
        flush=True,
    )
    ray_run = _ray_run(work, out_dir, load)
    timeline = _decompose(work, ray_run, bare)
    report = write_result(out_dir, _report(work, bare, ray_run, timeline, ray_init_s, load))
    _print_summary(report, timeline, bare, out_dir / BENCH_FILE)
    return report


def _start_ray(cfg: Config) -> float:
    """Seconds `ray.init` took, 0 when Ray was already up: one Ray serves a whole session, so
    its start is reported apart from the run's start-up."""

    started = time.perf_counter()
    was_running = ray.is_initialized()
    init_ray(cfg.ray)
    return 0.0 if was_running else time.perf_counter() - started


def _workload(cfg: Config) -> Workload:
    """The cache (extracted if missing) and the config both paths run: one worker, a window per
    `eval_every` steps and no early stop, so both paths take the same steps."""

    source: PairSource = trained_source(cfg, extract(cfg))
    # Fail here, clearly, on a cache too small for one batch or for validation.
    train = source.index("train")
    sizes = {"train": len(train)} | {s: len(source.index(s)) for s in ("val", "test")}
    check_split_sizes(cfg, sizes)
    one = dataclasses.replace(cfg.train, num_workers=1, early_stop_patience=0)
    # Steps as the worker counts them: by-bucket shards give an epoch what the smallest fills.
    total_steps = batch_plan(one, len(train), train.buckets).steps_per_epoch * cfg.train.epochs
    eval_every = max(1, math.ceil(total_steps / WINDOWS))
    run_cfg = dataclasses.replace(cfg, train=dataclasses.replace(one, eval_every=eval_every))
    _, threads = scaling(run_cfg.train)
    use_cuda = run_cfg.train.use_gpu and torch.cuda.is_available()
    return Workload(
        cfg=run_cfg,
        source=source,
        train_pairs=sizes["train"],
        total_steps=total_steps,
        bounds=window_bounds(total_steps, eval_every),
        threads=threads,
        device=torch.device("cuda" if use_cuda else "cpu"),
    )


def _ray_run(work: Workload, out_dir: Path, load: dict[str, float | None]) -> RayRun:
    """Run `raysys train`'s Ray Train path into `out_dir/ray-run`, recording the load average
    before and after in `load`; it must validate where the bare loop's windows end."""

    run_dir = out_dir.resolve() / RAY_RUN_DIR
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a leftover run would be resumed and its events mixed in
    load["before_ray"] = load_average()
    t_call = time.time()
    result = train(work.cfg, work.source, run_dir, RUN_NAME)
    t_return = time.time()
    load["after_ray"] = load_average()
    steps = [int(h["step"]) for h in result.history]
    if steps != work.bounds:
        raise RuntimeError(f"the Ray run validated at steps {steps}, expected {work.bounds}")
    rates = [float(h["train/samples_per_s"]) for h in result.history]
    return RayRun(rates, t_call, t_return, run_dir / "tensorboard" / RUN_NAME)


def _decompose(work: Workload, ray_run: RayRun, bare: BareRun) -> Timeline:
    """Where the Ray run's wall time went, from the worker's own window timings and step
    events; the bare loop's validations stand in when the events cannot be read."""
    batch_size = work.cfg.train.batch_size
    window_steps = np.diff([0, *work.bounds]).tolist()
    window_seconds = [
        k * batch_size / r for k, r in zip(window_steps, ray_run.window_per_s, strict=True)
    ]
    walls = read_step_walls(ray_run.log_dir)
    bounds = work.bounds
    bound_walls = [walls[b] for b in bounds] if all(b in walls for b in bounds) else None
    return ray_timeline(
        ray_run.t_call,
        ray_run.t_return,
        window_seconds,
        bound_walls,
        work.total_steps,
        batch_size,
        ray_run.steady_per_s,
        statistics.mean(bare.validation_s),
    )


def _report(
    work: Workload,
    bare: BareRun,
    ray_run: RayRun,
    timeline: Timeline,
    ray_init_s: float,
    load: dict[str, float | None],
) -> dict[str, Any]:
    """The figures `bench.json` holds (see the module docstring for what each one means)."""
    pipeline_per_s, bare_per_s = ray_run.steady_per_s, steady_rate(bare.window_per_s)
    host = host_info()
    return {
        "pipeline_per_s": pipeline_per_s,
        "bare_per_s": bare_per_s,
        "ratio": pipeline_per_s / bare_per_s,
        "startup_s": timeline.startup_s,
        "startup": {
            "to_first_step_s": timeline.to_first_step_s,
            "shutdown_s": timeline.shutdown_s,
            "bare_setup_s": bare.setup_s,
            "source": timeline.source,
        },
        "ray_run": {
            "wall_s": timeline.wall_s,
            "train_s": timeline.train_s,
            "excess_train_s": timeline.excess_train_s,
            "validation_s": timeline.validation_s,
            "validations": len(work.bounds),
            "ray_init_s": ray_init_s,
            "window_per_s": ray_run.window_per_s,
        },
        "bare": {"window_per_s": bare.window_per_s, "validation_s": bare.validation_s},
        "load_average": load,
        "settings": _settings(work, bare, host),
        "host": host,
    }


def _settings(work: Workload, bare: BareRun, host: dict[str, Any]) -> dict[str, Any]:
    """What was run and where: enough to tell whether two `bench.json` compare alike."""

    cfg, tcfg = work.cfg, work.cfg.train
    model = JAM(jam_config(tcfg, bare.d_image, bare.d_text))
    return {
        "objective": tcfg.objective,
        "model": {
            "d_image": model.cfg.d_image,
            "d_text": model.cfg.d_text,
            "hidden": list(tcfg.hidden),
            "latent": tcfg.latent,
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "vision": cfg.extract.vision,
        "text": cfg.extract.text,
        "image_layer": work.source.image_layer,
        "text_layer": work.source.text_layer,
        "train_pairs": work.train_pairs,
        "batch_size": tcfg.batch_size,
        "epochs": tcfg.epochs,
        "steps": work.total_steps,
        "eval_every": tcfg.eval_every,
        "window_ends": work.bounds,
        "workers": tcfg.num_workers,
        "torch_threads": work.threads,
        "device": str(work.device),
        "torch": host["torch"],
        "ray": ray.__version__,
        "python": host["python"],
        "cpu_count": host["cpus"],
        "ray_cpus": float(ray.cluster_resources().get("CPU", 0.0)),
        "train": to_dict(tcfg),
    }


def _print_summary(report: dict[str, Any], timeline: Timeline, bare: BareRun, path: Path) -> None:
    """The Ray path's rate, the ratio against the goals, and a warning when other processes
    loaded the machine during the runs."""
    print(f"[bench] ray train, 1 worker  : {report['pipeline_per_s']:8.0f} samples/s", flush=True)
    first = (
        f"{timeline.to_first_step_s:.1f} s to the first step (of which {bare.setup_s:.1f} s "
        f"loading data and building the model) + {timeline.shutdown_s:.1f} s shutdown"
        if timeline.source == "tensorboard"
        else "estimated"
    )
    print(
        f"[bench] ratio {report['ratio']:.3f} (goal >= 0.9); Ray start-up "
        f"{timeline.startup_s:.1f} s (goal <= 10 s): {first}; {timeline.validation_s:.1f} s in "
        f"{report['ray_run']['validations']} validations -> {path}",
        flush=True,
    )
    # The bench itself keeps about `threads` (= the CPUs) busy; well above that, others were.
    cpus = report["settings"]["cpu_count"]
    busy = [v for v in report["load_average"].values() if v is not None and v > 1.5 * cpus]
    if busy:
        print(
            f"[bench] warning: load average up to {max(busy):.1f} on {cpus} CPUs; other "
            "processes competed for the CPUs and the rates above are not reliable",
            flush=True,
        )


def run(args: Any, cfg: Config, out: Path) -> None:
    """`raysys bench train` (no arguments of its own)."""
    bench_train(cfg, out)
