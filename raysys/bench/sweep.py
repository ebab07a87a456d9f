"""`raysys bench sweep`: does packing small trials onto shared devices pay?

T identical small trials (they differ only in `train.seed`) run twice through the real sweep:
one at a time, then packed as `raysys sweep` packs them. With `slots` trials at once the ideal
packed wall time is `serial × ceil(T / slots) / T` (= serial / slots when slots divides T);
efficiency is that ideal over the measured packed time (1.0 = perfect packing). Only Tune's
run of the trials is timed: the extraction is cached and the report is written after.
"""

from __future__ import annotations

import dataclasses
import math
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
    """Run `trials` seed-only variants of the configured trial serially, then packed; print
    both wall times and the packing efficiency, write `out/bench.json` and return what it
    holds. The extraction runs first, outside both timings, so only Tune's work compares."""

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
    if slots < 2:
        print(f"[bench] the cluster fits {slots} trial at a time: nothing to pack", flush=True)
    print(f"[bench] sweep: {trials} identical trials, serial then {slots} at a time", flush=True)
    serial_cfg = dataclasses.replace(base, sweep=dataclasses.replace(base.sweep, max_concurrent=1))
    serial_s, serial_rows = _timed_sweep(serial_cfg, out / "serial")
    packed_s, packed_rows = _timed_sweep(base, out / "packed")
    result = summary(serial_s, packed_s, slots, serial_rows, packed_rows)
    result |= {
        "packing": dataclasses.asdict(pack),
        "config": {"train": config.to_dict(base.train), "corpus": config.to_dict(base.corpus)},
    }
    result = write_result(out, result)  # `host` (cpus, python, …) comes from common.host_info
    serial_each = ", ".join(f"{t:.0f}" for t in result["serial_trial_s"])
    packed_each = ", ".join(f"{t:.0f}" for t in result["packed_trial_s"])
    print(
        f"[bench] serial: {serial_s:.1f} s (trials {serial_each} s)\n"
        f"[bench] packed: {packed_s:.1f} s ({slots} at a time; trials {packed_each} s)\n"
        f"[bench] ideal packed (serial x ceil(T/slots) / T): {result['ideal_packed_s']:.1f} s\n"
        f"[bench] packing efficiency {result['efficiency']:.3f} (goal >= 0.8)",
        flush=True,
    )
    return result


def summary(
    serial_s: float,
    packed_s: float,
    slots: int,
    serial_rows: list[dict[str, Any]],
    packed_rows: list[dict[str, Any]],
) -> dict[str, Any]:
    """The bench's figures; every trial must have finished in both runs, or the times
    compare different work."""
    trials = len(serial_rows)
    if trials < 1 or len(packed_rows) != trials:
        raise RaysysError(
            f"bench sweep: {len(serial_rows)} serial and {len(packed_rows)} packed trials "
            "finished; both runs must finish every trial"
        )
    # Packed, T trials take ceil(T / slots) rounds of one trial each, at best.
    ideal = serial_s * math.ceil(trials / slots) / trials
    return {
        "stage": "sweep",
        "trials": trials,
        "slots": slots,
        "serial_s": round(serial_s, 2),
        "packed_s": round(packed_s, 2),
        "ideal_packed_s": round(ideal, 2),
        "efficiency": round(ideal / packed_s, 3),
        "serial_trial_s": [r["train_s"] for r in serial_rows],
        "packed_trial_s": [r["train_s"] for r in packed_rows],
    }


def run(args: Any, cfg: Config, out: Path) -> None:
    """`raysys bench sweep --trials T` (at least two, or there is nothing to pack)."""
    if args.trials < 2:
        raise ConfigError(f"--trials must be >= 2, got {args.trials}")
    bench_sweep(cfg, out, args.trials)
