"""`raysys bench step`: the training step on its own — no Ray, no cache — at a chosen scale.

What a Ray Train worker does per step once its shard is on the device (index the global
batch, forward both autoencoders, gather, loss, backward, clip, AdamW, schedules), timed over
random float16 embeddings held on the device: the ceiling `raysys train` can reach on that
device, and a check that a GPU is used well (bf16 autocast there). The default scale is that of
a large-model sweep (200k pairs, 1024-d vision, 4096-d text); a 2-core CPU wants far less
(`--pairs 20000 --dims 384,384`).

`--population P` also times one step of P stacked members (`PopulationTrainer`) on the same
batches, device and batch size, and reports the ratio of member·samples/s (population) to
samples/s (one member): what stacking buys over P separate steps. Members get their own seeds
and the three objectives in turn, so the step's per-objective loss groups are all exercised;
the one-member figure is timed for each of those objectives and weighted as the population
mixes them (a Spread step costs more than a Con step), so the ratio compares like with like.

Runs where Ray cannot be installed: it imports torch, numpy, PyYAML and safetensors only.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raysys.bench.common import host_info, resolve_device, sync, write_result
from raysys.config import Config, TrainConfig, to_dict
from raysys.data.batches import batch_plan
from raysys.errors import ConfigError
from raysys.jam import JAM
from raysys.jam.population import Population
from raysys.sweep.populations import member_bytes
from raysys.train.population import PopulationTrainer
from raysys.train.step import Trainer, jam_config

OBJECTIVES = ("con", "negcon", "spread")
ROUNDS = 5  # timed rounds, taking turns between the paths


@dataclass
class StepBench:
    """The scale to time at: `--pairs`, `--dims`, `--steps`, `--device`, `--population`."""

    pairs: int = 200_000
    d_image: int = 1024
    d_text: int = 4096
    steps: int = 50
    warmup_steps: int = 5
    device: str = "auto"  # auto = cuda when available
    population: int = 0  # 0 = time one member only


def member_configs(tcfg: TrainConfig, size: int) -> list[TrainConfig]:
    """P members of one shape: seeds `seed + m`, objectives in turn from the configured one."""
    first = OBJECTIVES.index(tcfg.objective)
    return [
        dataclasses.replace(
            tcfg, seed=tcfg.seed + m, objective=OBJECTIVES[(first + m) % len(OBJECTIVES)]
        )
        for m in range(size)
    ]


def _warm(step: Callable[[int], Any], steps: int) -> None:
    for i in range(steps):
        step(i)


def _rounds(
    steps: dict[str, Callable[[int], Any]], bench: StepBench, device: torch.device
) -> dict[str, float]:
    """Seconds per step of each named step function over `bench.steps` timed steps, in rounds
    that take turns (a, b, …, a, b, …): the median round of each. Taking turns lets a busy
    machine's load slow every path alike, so their ratio holds when absolute figures do not."""
    rounds = min(bench.steps, ROUNDS)
    per_round = [bench.steps // rounds + (r < bench.steps % rounds) for r in range(rounds)]
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    done = bench.warmup_steps
    for n in per_round:
        for name, step in steps.items():
            sync(device)
            t0 = time.perf_counter()
            for i in range(n):
                step(done + i)
            sync(device)
            seconds[name].append((time.perf_counter() - t0) / n)
        done += n
    return {name: statistics.median(values) for name, values in seconds.items()}


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_step(cfg: Config, out_dir: Path, bench: StepBench) -> dict[str, Any]:
    """Time `bench.steps` training steps after `bench.warmup_steps` (of one member per
    objective the population mixes, and of the population, taking turns); print and write
    `out_dir/bench.json` (samples/s, step ms, peak device memory, the settings)."""
    tcfg = cfg.train
    device = resolve_device(bench.device)
    torch.manual_seed(tcfg.seed)
    started = time.perf_counter()
    # Random embeddings stand in for a cache: the step's cost does not depend on the values.
    shape = {"image": bench.d_image, "text": bench.d_text, "negative": bench.d_text}
    data = {
        k: torch.randn(bench.pairs, d, device=device, dtype=torch.float16) for k, d in shape.items()
    }
    total = bench.warmup_steps + bench.steps
    plan = batch_plan(tcfg, bench.pairs)
    # Every step's rows, on the device before the clock starts: a per-step host-to-device copy
    # of the index would wait for the GPU's queue and time the launch latency, not the step.
    index = torch.as_tensor(
        np.stack([plan.worker_batch(step, 0, 1) for step in range(total)]), device=device
    )

    def batch(step: int) -> tuple[torch.Tensor, ...]:
        rows = index[step]
        return data["image"][rows], data["text"][rows], data["negative"][rows]

    sample = slice(0, min(bench.pairs, 20_000))
    stats = JAM(jam_config(tcfg, bench.d_image, bench.d_text)).to(device)
    stats.fit_input_stats(data["image"][sample], data["text"][sample])

    def new_member(t: TrainConfig) -> JAM:
        torch.manual_seed(t.seed)
        with device:  # built where it runs: initialising 128 members on a CPU takes long
            model = JAM(jam_config(t, bench.d_image, bench.d_text))
        model.set_input_stats(stats.image_mean, stats.image_std, stats.text_mean, stats.text_std)
        model.seed_dropout(t.seed, device)  # its own masks, as a trial draws them
        return model

    members = member_configs(tcfg, bench.population or 1)
    mix = Counter(t.objective for t in members)
    steps: dict[str, Callable[[int], Any]] = {}
    for objective in mix:
        t = next(t for t in members if t.objective == objective)
        trainer = Trainer(new_member(t), t, total_steps=total)
        steps[objective] = lambda i, trainer=trainer: trainer.train_step(*batch(i))
    setup_s = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in steps.values():
        _warm(step, bench.warmup_steps)
    single_peak = _peak_gib(device)
    error, failure, population_peak, seconds = None, None, None, {}
    if bench.population:
        try:
            with device:  # the stacked tensors allocated where they run, not copied there
                population = Population.from_members([new_member(t) for t in members])
            # One mask launch per member and dropout layer: what a sweep's population pays.
            population.seed_dropout([t.seed for t in members], device)
            where = {t.device.type for t in (*population.parameters(), *population.buffers())}
            if where != {device.type}:
                raise RuntimeError(f"population built on {where}, not on {device}")
            trainer = PopulationTrainer(population, members, total_steps=total)
            steps["population"] = lambda i: trainer.train_step(*batch(i))
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _warm(steps["population"], bench.warmup_steps)
            seconds = _rounds(steps, bench, device)
            population_peak = _peak_gib(device)
        except Exception as e:  # recorded with the one-member figures; only OOM is no failure
            oom = isinstance(e, torch.OutOfMemoryError)
            error = ("out of memory: " if oom else f"{type(e).__name__}: ") + str(e)[:300]
            failure = None if oom else traceback.format_exc()
            population_peak = _peak_gib(device)
        finally:
            population = trainer = None
            steps.pop("population", None)
            _free(device)
    if not seconds:  # one member only, or the population did not fit
        seconds = _rounds(steps, bench, device)

    single = {
        objective: {"step_ms": 1000 * seconds[objective], "samples_per_s": tcfg.batch_size / s}
        for objective, s in seconds.items()
        if objective != "population"
    }
    # P separate steps of these members take the sum of their objectives' step times.
    step_ms = sum(single[t.objective]["step_ms"] for t in members) / len(members)
    rate = 1000 * tcfg.batch_size / step_ms
    host = host_info()
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result: dict[str, Any] = {
        "stage": "step",
        "samples_per_s": rate,
        "step_ms": step_ms,
        "setup_s": setup_s,
        "peak_memory_gib": single_peak,
        "single": single,
        "device": dev_name,
        "threads": torch.get_num_threads(),
        "torch": host["torch"],
        "machine": host["machine"],
        "settings": {**asdict(bench), "device": str(device), "train": to_dict(tcfg)},
        "host": host,
    }
    scale = f"{bench.pairs:,} pairs of {bench.d_image}/{bench.d_text}-d on {dev_name}"
    if not bench.population:
        print(
            f"[bench step] {scale}: {rate:,.0f} samples/s ({step_ms:.1f} ms per step of "
            f"{tcfg.batch_size})",
            flush=True,
        )
        return write_result(out_dir, result)

    size = bench.population
    result |= {
        "population": size,
        "objectives": dict(mix),
        "population_error": error,
        "population_peak_memory_gib": population_peak,
        "member_samples_per_s": None,
        "population_step_ms": None,
        "ratio": None,
    }
    head = f"[bench step] {scale}, batch {tcfg.batch_size}: population of {size}"
    one = f"one member {rate:,.0f} samples/s ({step_ms:.1f} ms)"
    if error is None:
        result["population_step_ms"] = 1000 * seconds["population"]
        result["member_samples_per_s"] = size * tcfg.batch_size / seconds["population"]
        result["ratio"] = result["member_samples_per_s"] / rate
        print(
            f"{head} {result['member_samples_per_s']:,.0f} member·samples/s "
            f"({result['population_step_ms']:.1f} ms per step) vs {one}: "
            f"ratio {result['ratio']:.2f}",
            flush=True,
        )
    else:
        print(f"{head}: {error}; {one}", flush=True)
    record = write_result(out_dir, result)
    if failure is not None:  # bench.json holds what was measured; the run still fails
        print(failure, file=sys.stderr, flush=True)
        raise RuntimeError(f"the population step failed: {error}")
    return record


def run(args: Any, cfg: Config, out: Path) -> None:
    """`raysys bench step --pairs N --dims I,T --steps S --device D [--population P]`."""
    try:
        d_image, d_text = (int(d) for d in args.dims.split(","))
    except ValueError:
        raise ConfigError(f"--dims {args.dims!r} must be two widths, e.g. 1024,4096") from None
    if min(args.pairs, args.steps, d_image, d_text) < 1 or args.pairs < cfg.train.batch_size:
        raise ConfigError(
            f"--pairs ({args.pairs}) must hold a global batch (train.batch_size="
            f"{cfg.train.batch_size}); --steps and --dims must be positive"
        )
    population = getattr(args, "population", 0) or 0
    if population < 0:
        raise ConfigError(
            f"--population ({population}) must be a number of members, or 0 (the default: "
            "time one member only)"
        )
    bench = StepBench(
        args.pairs,
        d_image,
        d_text,
        steps=args.steps,
        warmup_steps=min(5, args.steps),
        device=args.device,
        population=population,
    )
    check_fits_host(cfg, bench)
    bench_step(cfg, out, bench)


def check_fits_host(cfg: Config, bench: StepBench) -> None:
    """On a CPU, refuse a population the host cannot hold: the kernel would kill the bench
    minutes in, with nothing recorded (a GPU's out-of-memory is caught and recorded in
    bench.json, so a device run goes ahead). The estimate is `member_bytes`' upper bound for
    the P members and the one member per objective timed beside them, plus the embeddings."""
    if not bench.population or resolve_device(bench.device).type != "cpu":
        return
    members = bench.population + len(OBJECTIVES)
    need = members * member_bytes(cfg, bench.d_image, bench.d_text)
    need += 2.0 * bench.pairs * (bench.d_image + 2 * bench.d_text)  # float16 embeddings
    available = available_memory()
    if available is not None and need > 0.8 * available:
        raise ConfigError(
            f"--population {bench.population} would need about {need / 2**30:,.1f} GiB "
            f"({bench.d_image}/{bench.d_text}-d members at batch {cfg.train.batch_size}, an "
            f"upper bound), more than 80% of the {available / 2**30:.1f} GiB this machine has "
            "free: lower --population, --dims or train.batch_size"
        )


def available_memory() -> int | None:
    """Bytes the host can still give (Linux's MemAvailable); None where it cannot say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
