"""The train worker's own code on one machine without Ray: the GPU path's check.

`scripts/device-train.sh` runs this on a GPU machine that cannot install Ray (the borrowed
device): a real torch.distributed group (NCCL on CUDA, gloo on CPU) of `--world` processes,
each doing what a Ray Train worker does (`raysys.train.worker`): the input standardisation
all-reduced over ranks, `MemoryBatches` on the GPU or through pinned host buffers, the
training step with the global-batch gather under bf16 autocast, validation on the device,
checkpoints, and a resume from the middle checkpoint that must reach the same weights as the
uninterrupted run. Synthetic embeddings stand in for a cache (no pyarrow needed). Rank 0
writes `<out>/device-train.json` and the command fails when a check does.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from raysys import config
from raysys.data.batches import MemoryBatches, batch_plan
from raysys.data.pairs import Pairs, buckets
from raysys.jam import JAM
from raysys.train.loop import Progress, load_checkpoint, run_steps
from raysys.train.step import Trainer, fit_global_input_stats, jam_config

RESUME_TOL = 1e-4  # max |Δ weight| between the resumed and the uninterrupted run
LOSS_TOL, GRAD_TOL = 1e-4, 1e-3  # each loss under bf16 autocast vs float32 (relative)


@dataclass
class Check:
    """What to run: `--device`, `--world`, `--pairs`, `--dims`, `--steps`, `--batch`."""

    device: str = "auto"
    world: int = 1
    pairs: int = 20_000
    d_image: int = 256
    d_text: int = 384
    steps: int = 60
    batch: int = 512
    eval_every: int = 20
    val_pairs: int = 2048
    data_on_device: str = "auto"
    out: str = "runs/device-train"
    overrides: tuple[str, ...] = ()


@functools.lru_cache(maxsize=2)  # the full and the resumed run read the same data
def synthetic(n: int, d_image: int, d_text: int, seed: int) -> Pairs:
    """Pairs whose image and text embeddings share a 32-d latent (the same two projections
    for every split, so retrieval can be learnt), float16 as a cache stores them, with
    outlier-sized dimensions as LMs have; `seed` draws the split's latents."""
    projections = np.random.default_rng(12345)
    mix_i = projections.standard_normal((32, d_image), dtype=np.float32)
    mix_t = projections.standard_normal((32, d_text), dtype=np.float32)
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n, 32), dtype=np.float32)
    other = latent + 0.7 * rng.standard_normal((n, 32), dtype=np.float32)
    text = latent @ mix_t
    text[:, :4] *= 50.0  # outlier dimensions: the standardisation must handle them
    negative = other @ mix_t
    negative[:, :4] *= 50.0
    ids = np.array([f"p{i}" for i in range(n)])
    return Pairs(
        pair_ids=ids,
        image_ids=ids,
        captions=ids,
        image=(latent @ mix_i).astype(np.float16),
        text=text.astype(np.float16),
        negative=negative.astype(np.float16),
    )


def autocast_agreement(device: torch.device, b: int = 4096, d: int = 256) -> dict[str, float]:
    """Each loss's relative error under the device's bf16 autocast against float32 (loss and
    gradient), on nearly aligned latents at the scales where bf16 fails (14.3 and 100)."""
    from raysys.jam import losses

    g = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(b, d, generator=g)
    latents = [
        v,
        v + 0.05 * torch.randn(b, d, generator=g),
        v + 0.15 * torch.randn(b, d, generator=g),
    ]
    latents = [x.to(device) for x in latents]
    fns = {
        "con": lambda a, t, n, s: losses.con(a, t, s),
        "negcon": losses.negcon,
        "spread": lambda a, t, n, s: losses.spread(a, t, n, s, alpha=0.7, k=8),
    }
    errors = {}
    for name, fn in fns.items():
        for s in (14.3, 100.0):
            runs = []
            for enabled in (False, True):
                leaves = [x.clone().requires_grad_(True) for x in latents]
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled):
                    loss = fn(*leaves, s)
                loss.backward()
                grads = torch.cat([x.grad.flatten() for x in leaves if x.grad is not None])
                runs.append((loss.detach().double(), grads.double()))
            (l32, g32), (lac, gac) = runs
            errors[f"{name}@{s:g}/loss"] = float((lac - l32).abs() / l32.abs().clamp(min=1e-30))
            errors[f"{name}@{s:g}/grad"] = float((gac - g32).norm() / g32.norm().clamp(min=1e-30))
    return errors


def _device(check: Check, rank: int) -> torch.device:
    want = check.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        torch.cuda.set_device(rank)
        return torch.device("cuda", rank)
    return torch.device("cpu")


def _train(
    check: Check,
    cfg: config.Config,
    device: torch.device,
    rank: int,
    out: Path,
    resume: Path | None,
) -> tuple[Trainer, dict[str, Any], list[dict[str, Any]]]:
    """One worker's run, as `raysys.train.worker.train_loop` does it; returns its trainer,
    where its data lived and rank 0's reports (checkpoints copied under `out`)."""
    tcfg = cfg.train
    world = dist.get_world_size()
    data = synthetic(check.pairs, check.d_image, check.d_text, seed=0)
    val = synthetic(check.val_pairs, check.d_image, check.d_text, seed=1) if rank == 0 else None
    plan = batch_plan(tcfg, len(data), buckets(data.image_ids))  # shards by bucket, as a cache
    rows = plan.worker_rows(rank, world)
    mine = data.take(rows)
    torch.manual_seed(tcfg.seed)
    model = JAM(jam_config(tcfg, check.d_image, check.d_text))
    started = time.perf_counter()
    fit_global_input_stats(model, mine.image, mine.text, device)  # all-reduced on the device
    stats_s = time.perf_counter() - started
    model = model.to(device)
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )
    trainer = Trainer(ddp, tcfg, plan.steps_per_epoch * tcfg.epochs)
    progress = load_checkpoint(resume, trainer, device) if resume else Progress()
    model.seed_dropout(tcfg.seed + 1000 * rank, device)  # as the worker: reseeded at each step
    batches = MemoryBatches(mine, plan, tcfg.data_on_device, rank, world, device)
    reports: list[dict[str, Any]] = []

    def report(summary: dict[str, Any], ckpt: Path | None) -> None:
        reports.append(dict(summary))
        if ckpt is not None:
            shutil.copytree(ckpt, out / f"checkpoint-{summary['step']}", dirs_exist_ok=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    run_steps(cfg, trainer, batches, val, progress, plan.steps_per_epoch, device, report)
    where = {
        "where": batches.where,
        "seconds": time.perf_counter() - started,
        "stats_s": stats_s,
        "image_mean_error": float(
            (
                model.image_mean.double().cpu()
                - torch.from_numpy(mine.image.astype(np.float64)).mean(0)
            )
            .abs()
            .max()
        )
        if world == 1
        else None,
    }
    return trainer, where, reports


def _worker(rank: int, check: Check, port: int) -> None:
    device = _device(check, rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=check.world
    )
    try:
        _check(check, device, rank, backend)
        # No rank tears the group down while another still talks in it: once (2026-12-01,
        # fast tests on this box), rank 1 aborted at exit under gloo with "terminate called
        # without an active exception" after both runs had finished.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _check(check: Check, device: torch.device, rank: int, backend: str) -> None:
    overrides = [
        f"train.batch_size={check.batch}",
        f"train.eval_every={check.eval_every}",
        f"train.data_on_device={check.data_on_device}",
        f"train.num_workers={check.world}",
        "train.epochs=1000",
        *check.overrides,
    ]
    cfg = config.load(None, overrides)
    data = synthetic(check.pairs, check.d_image, check.d_text, seed=0)
    plan = batch_plan(cfg.train, check.pairs, buckets(data.image_ids))
    cfg.train.epochs = max(1, math.ceil(check.steps / plan.steps_per_epoch))
    out = Path(check.out)
    out.mkdir(parents=True, exist_ok=True)
    full, where, reports = _train(check, cfg, device, rank, out, resume=None)
    middle = reports[len(reports) // 2 - 1]["step"] if len(reports) > 1 else reports[0]["step"]
    resumed, _, after = _train(
        check, cfg, device, rank, out / "resumed", out / f"checkpoint-{middle}"
    )
    diff = max(
        float((a - b).abs().max())
        for a, b in zip(
            full.jam.state_dict().values(), resumed.jam.state_dict().values(), strict=True
        )
    )
    if rank != 0:
        return
    for done in [*out.glob("checkpoint-*"), out / "resumed"]:  # ~165 MB each at 1024/4096-d
        shutil.rmtree(done, ignore_errors=True)
    first, last = reports[0], reports[-1]
    result = {
        "backend": backend,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "world": check.world,
        "steps": full.step,
        "batch_size": cfg.train.batch_size,
        "samples_per_s": last["train/samples_per_s"],
        "train_seconds": where["seconds"],
        "input_stats_seconds": where["stats_s"],
        "image_mean_error": where["image_mean_error"],
        "data": where["where"],
        "loss_first": first["train/loss"],
        "loss_last": last["train/loss"],
        "val": {k.removeprefix("val/"): v for k, v in last.items() if k.startswith("val/")},
        "resumed_from_step": middle,
        "resumed_reports": len(after),
        "resume_max_abs_diff": diff,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda"
        else None,
        "torch": torch.__version__,
        "settings": asdict(check),
    }
    # On a GPU at the training batch it guards. On a CPU every error is 0 (the losses run
    # their own ops in float32), so there it only runs the code path: at 1,024, 2 s, not 25.
    batch = 4096 if device.type == "cuda" else 1024
    result["autocast_rel_error"] = autocast_agreement(device, b=batch)
    failures = [
        f"{key} under bf16 autocast is {err:.1e} off float32"
        for key, err in result["autocast_rel_error"].items()
        if err > (LOSS_TOL if key.endswith("/loss") else GRAD_TOL)
    ]
    if not all(math.isfinite(v) for v in result["val"].values()):
        failures.append("non-finite validation metric")
    if not result["loss_last"] < result["loss_first"]:
        failures.append("the loss did not fall")
    if not diff <= RESUME_TOL:
        failures.append(f"the resumed run ended {diff:.2e} away from the uninterrupted one")
    result["failures"] = failures
    (out / "device-train.json").write_text(json.dumps(result, indent=2))
    print(
        f"[device-train] {backend} on {result['device']} x{check.world}: {full.step} steps, "
        f"{result['samples_per_s']:,.0f} samples/s, loss {result['loss_first']:.3f} -> "
        f"{result['loss_last']:.3f}, val i2t_r1 {result['val']['i2t_r1']:.3f}, resume "
        f"|dw| {diff:.1e}, data {result['data']}",
        flush=True,
    )
    if failures:
        raise SystemExit("[device-train] FAILED: " + "; ".join(failures))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m raysys.train.selfcheck", description=__doc__)
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--world", type=int, default=1, help="processes (GPUs on CUDA)")
    parser.add_argument("--pairs", type=int, default=Check.pairs)
    parser.add_argument("--dims", default=f"{Check.d_image},{Check.d_text}")
    parser.add_argument("--steps", type=int, default=Check.steps)
    parser.add_argument("--batch", type=int, default=Check.batch)
    parser.add_argument("--eval-every", type=int, default=Check.eval_every)
    parser.add_argument("--val-pairs", type=int, default=Check.val_pairs)
    parser.add_argument("--data-on-device", default="auto", choices=["auto", "true", "false"])
    parser.add_argument("--out", default=Check.out)
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args(argv)
    d_image, d_text = (int(d) for d in args.dims.split(","))
    check = Check(
        args.device,
        args.world,
        args.pairs,
        d_image,
        d_text,
        args.steps,
        args.batch,
        args.eval_every,
        args.val_pairs,
        args.data_on_device,
        args.out,
        tuple(args.overrides),
    )
    on_cuda = check.device == "cuda" or (check.device == "auto" and torch.cuda.is_available())
    if on_cuda and check.world > torch.cuda.device_count():
        raise SystemExit(
            f"--world {check.world} needs {check.world} GPUs (NCCL refuses two ranks on one "
            f"GPU); this machine has {torch.cuda.device_count()}"
        )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    port = _free_port()
    if check.world == 1:
        _worker(0, check, port)
    else:
        torch.multiprocessing.spawn(_worker, args=(check, port), nprocs=check.world)


if __name__ == "__main__":
    main()
