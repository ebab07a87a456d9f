"""`raysys bench step`: the training step on its own — no Ray, no cache — at a chosen scale.

What a Ray Train worker does per step once its shard is on the device (index the global
batch, forward both autoencoders, gather, loss, backward, clip, AdamW, schedules), timed over
random float16 embeddings held on the device: the ceiling `raysys train` can reach on that
device, and a check that a GPU is used well (bf16 autocast there). The default scale is that of
a large-model sweep (200k pairs, 1024-d vision, 4096-d text); a 2-core CPU wants far less
(`--pairs 20000 --dims 384,384`).

Runs where Ray cannot be installed: it imports torch, numpy, PyYAML and safetensors only.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from raysys.bench.common import host_info, resolve_device, sync, write_result
from raysys.config import Config, to_dict
from raysys.data.batches import batch_plan
from raysys.errors import ConfigError
from raysys.jam import JAM
from raysys.train.step import Trainer, jam_config


@dataclass
class StepBench:
    """The scale to time at: `--pairs`, `--dims`, `--steps`, `--device`."""

    pairs: int = 200_000
    d_image: int = 1024
    d_text: int = 4096
    steps: int = 50
    warmup_steps: int = 5
    device: str = "auto"  # auto = cuda when available


def bench_step(cfg: Config, out_dir: Path, bench: StepBench) -> dict[str, Any]:
    """Time `bench.steps` training steps after `bench.warmup_steps`; print and write
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
    model = JAM(jam_config(tcfg, bench.d_image, bench.d_text)).to(device)
    sample = slice(0, min(bench.pairs, 20_000))
    model.fit_input_stats(data["image"][sample], data["text"][sample])
    plan = batch_plan(tcfg, bench.pairs)
    trainer = Trainer(model, tcfg, total_steps=bench.warmup_steps + bench.steps)
    setup_s = time.perf_counter() - started

    def timed(steps: int) -> float:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            index = torch.as_tensor(plan.worker_batch(trainer.step, 0, 1), device=device)
            trainer.train_step(data["image"][index], data["text"][index], data["negative"][index])
        sync(device)
        return time.perf_counter() - t0

    timed(bench.warmup_steps)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(bench.steps)
    rate = bench.steps * tcfg.batch_size / seconds
    host = host_info()
    result: dict[str, Any] = {
        "stage": "step",
        "samples_per_s": rate,
        "step_ms": 1000 * seconds / bench.steps,
        "setup_s": setup_s,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda"
        else None,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "torch": host["torch"],
        "machine": host["machine"],
        "settings": {**asdict(bench), "device": str(device), "train": to_dict(tcfg)},
        "host": host,
    }
    print(
        f"[bench step] {bench.pairs:,} pairs of {bench.d_image}/{bench.d_text}-d on "
        f"{result['device']}: {rate:,.0f} samples/s ({result['step_ms']:.1f} ms per step of "
        f"{tcfg.batch_size})",
        flush=True,
    )
    return write_result(out_dir, result)


def run(args: Any, cfg: Config, out: Path) -> None:
    """`raysys bench step --pairs N --dims I,T --steps S --device D`."""
    try:
        d_image, d_text = (int(d) for d in args.dims.split(","))
    except ValueError:
        raise ConfigError(f"--dims {args.dims!r} must be two widths, e.g. 1024,4096") from None
    if min(args.pairs, args.steps, d_image, d_text) < 1 or args.pairs < cfg.train.batch_size:
        raise ConfigError(
            f"--pairs ({args.pairs}) must hold a global batch (train.batch_size="
            f"{cfg.train.batch_size}); --steps and --dims must be positive"
        )
    bench = StepBench(args.pairs, d_image, d_text, steps=args.steps, device=args.device)
    bench_step(cfg, out, bench)
