"""`raysys bench sweep`: what do populations save over packing one trial per process?

T identical small trials (they differ only in `train.seed`) run four times through the real
sweep: packed one per process as before populations (`sweep.population=1
sweep.train_in_trial=false`: a Ray Train run of its own per trial, as many at once as the
cluster holds), packed as one-member populations each in its Tune trial's process
(`sweep.population=1`), as one population (`sweep.population=T`: one process, the members'
weights stacked, given every slot's cores), and as the sweep sizes populations by default
(`sweep.population=0`: one per slot). `speedup` = packed / one population, `in_trial_speedup`
= packed in trials / one population (what stacking adds once no trial starts Ray Train),
`auto_speedup` = packed / default. Only Tune's run of the trials is timed: the extraction is
cached and the report is written after.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

from raysys import config
from raysys.bench.common import write_result
from raysys.commands import sweep
from raysys.config import Config
from raysys.errors import ConfigError, RaysysError
from raysys.runtime import cluster_resources, init_ray
from raysys.sweep.plan import check_sweep, packing
from raysys.sweep.prepare import prepare


def _timed_sweep(cfg: Config, out: Path) -> tuple[float, list[dict[str, Any]]]:
    """Seconds Tune ran the trials (the cached-extraction check and the report excluded)."""

    shutil.rmtree(out, ignore_errors=True)
    timings: dict[str, float] = {}
    rows = sweep(cfg, out, timings=timings)
    return timings["fit_s"], [r for r in rows if r.get("trial")]


def bench_sweep(cfg: Config, out: Path, trials: int) -> dict[str, Any]:
    """Run `trials` seed-only variants of the configured trial packed one per process, then
    as one population; print both wall times and the speedup, write `out/bench.json` and
    return what it holds. The extraction runs first, outside both timings, so only Tune's
    work compares."""

    base = config.from_dict(config.to_dict(cfg))
    base.objectives = [cfg.train.objective]
    base.sweep = dataclasses.replace(
        cfg.sweep,
        models=[],
        layers=[],
        vision_depths=[],
        text_depths=[],
        search="grid",
        num_samples=0,
        params={"train.seed": list(range(trials))},
    )
    out.mkdir(parents=True, exist_ok=True)
    prepare(base, check_sweep(base))  # extraction (and raw scores) outside both timings
    init_ray(base.ray)
    pack = packing(base, cluster_resources())
    slots = pack.concurrent
    print(
        f"[bench] sweep: {trials} identical trials, packed one per process ({slots} at a "
        "time; with a Ray Train run each, then each in its Tune trial), then as one "
        "population, then as the sweep sizes populations",
        flush=True,
    )

    def sized(population: int, in_trial: bool = True) -> Config:
        sweep_cfg = dataclasses.replace(base.sweep, population=population, train_in_trial=in_trial)
        return dataclasses.replace(base, sweep=sweep_cfg)

    # The path before populations: every trial a Ray Train run of its own.
    packed_s, packed_rows = _timed_sweep(sized(1, in_trial=False), out / "packed")
    in_trial_s, in_trial_rows = _timed_sweep(sized(1), out / "packed_in_trial")
    population_s, population_rows = _timed_sweep(sized(trials), out / "population")
    # What `raysys sweep` does by default: populations sized to fill the slots.
    auto_s, auto_rows = _timed_sweep(sized(0), out / "auto")
    result = summary(packed_s, population_s, slots, packed_rows, population_rows)
    for name, rows in (("packed in trials", in_trial_rows), ("auto", auto_rows)):
        if len(rows) != trials:
            raise RaysysError(f"bench sweep: {len(rows)} of {trials} {name} trials finished")
    result |= {
        "packed_in_trial_s": round(in_trial_s, 2),
        "in_trial_speedup": round(in_trial_s / population_s, 3),
        "auto_s": round(auto_s, 2),
        "auto_speedup": round(packed_s / auto_s, 3),
    }
    result |= {
        "packing": dataclasses.asdict(pack),
        "config": {"train": config.to_dict(base.train), "corpus": config.to_dict(base.corpus)},
    }
    result = write_result(out, result)  # `host` (cpus, python, …) comes from common.host_info
    packed_each = ", ".join(f"{t:.0f}" for t in result["packed_trial_s"])
    print(
        f"[bench] packed: {packed_s:.1f} s ({slots} at a time, a Ray Train run each; trials "
        f"{packed_each} s)\n"
        f"[bench] packed in trials: {in_trial_s:.1f} s (one-member populations, each in its "
        "Tune trial's process)\n"
        f"[bench] population: {population_s:.1f} s (one process of {trials} members)\n"
        f"[bench] speedup {result['speedup']:.2f} (goal >= 3 for 12 trials on 2 cores); "
        f"over packed in trials {result['in_trial_speedup']:.2f}\n"
        f"[bench] sweep's own sizing (sweep.population=0, one population per slot): "
        f"{auto_s:.1f} s, speedup {result['auto_speedup']:.2f}",
        flush=True,
    )
    return result


def summary(
    packed_s: float,
    population_s: float,
    slots: int,
    packed_rows: list[dict[str, Any]],
    population_rows: list[dict[str, Any]],
) -> dict[str, Any]:
    """The bench's figures; every trial must have finished in both runs, or the times
    compare different work."""
    trials = len(packed_rows)
    if trials < 1 or len(population_rows) != trials:
        raise RaysysError(
            f"bench sweep: {len(packed_rows)} packed and {len(population_rows)} population "
            "trials finished; both runs must finish every trial"
        )
    return {
        "stage": "sweep",
        "trials": trials,
        "slots": slots,
        "packed_s": round(packed_s, 2),
        "population_s": round(population_s, 2),
        "speedup": round(packed_s / population_s, 3),
        "packed_trial_s": [r["train_s"] for r in packed_rows],
    }


def run(args: Any, cfg: Config, out: Path) -> None:
    """`raysys bench sweep --trials T` (at least two, or there is nothing to stack)."""
    if args.trials < 2:
        raise ConfigError(f"--trials must be >= 2, got {args.trials}")
    bench_sweep(cfg, out, args.trials)
