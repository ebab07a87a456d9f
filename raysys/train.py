"""Train: one JAM run over cached embeddings, as a Ray Train `TorchTrainer` (DDP).

The compute lives in `Trainer`, a plain class that runs one training step or a validation on
one process with or without torch.distributed; `train_loop` is the thin Ray Train wrapper
around it (data loading, reporting, checkpoints, TensorBoard on rank 0). Every rank takes an
equal slice of each global batch and contrastive terms see the whole global batch through
`gather_with_grad`, so N workers × B/N train the same objective as 1 worker × B.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raysys import cache
from raysys.config import Config, EvalConfig, TrainConfig, from_dict, to_dict
from raysys.evaluate import score_model
from raysys.jam import JAM, JAMConfig, losses
from raysys.jam.dist import gather_with_grad

STATE_FILE = "train_state.pt"
MODEL_DIR = "model"


@dataclass
class Paths:
    """The cache directories a run reads (plain strings: they cross process boundaries)."""

    corpus_dir: str
    image_dir: str
    text_dir: str
    image_layer: str
    text_layer: str

    def load(self, split: str) -> cache.Pairs:
        return cache.load_pairs(
            Path(self.corpus_dir),
            Path(self.image_dir),
            Path(self.text_dir),
            self.image_layer,
            self.text_layer,
            split,
        )


def jam_config(tcfg: TrainConfig, d_image: int, d_text: int) -> JAMConfig:
    return JAMConfig(
        d_image=d_image,
        d_text=d_text,
        hidden=tuple(tcfg.hidden),
        latent=tcfg.latent,
        dropout=tcfg.dropout,
        logit_scale=tcfg.logit_scale,
        learn_logit_scale=tcfg.learn_logit_scale,
    )


def alignment_loss(
    tcfg: TrainConfig, zi: torch.Tensor, zt: torch.Tensor, zn: torch.Tensor, s: torch.Tensor
) -> torch.Tensor:
    if tcfg.objective == "con":
        return losses.con(zi, zt, s)
    if tcfg.objective == "negcon":
        return losses.negcon(zi, zt, zn, s)
    return losses.spread(zi, zt, zn, s, alpha=tcfg.alpha, k=tcfg.k)


class Trainer:
    """One process's share of JAM training: optimiser, schedules and the step itself."""

    def __init__(self, model: torch.nn.Module, tcfg: TrainConfig, total_steps: int) -> None:
        self.model = model  # JAM, or JAM wrapped in DistributedDataParallel
        self.jam: JAM = getattr(model, "module", model)
        self.tcfg = tcfg
        self.total_steps = total_steps
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.step = 0

    def _lr_factor(self, step: int) -> float:
        """Linear warm-up, then cosine decay to zero over the remaining steps. Warm-up is
        capped at a tenth of the run so a short run is not all warm-up."""
        warmup = min(self.tcfg.warmup_steps, max(1, self.total_steps // 10))
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, self.total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    def train_step(
        self, image: torch.Tensor, text: torch.Tensor, negative: torch.Tensor
    ) -> dict[str, float]:
        """One optimisation step on this rank's slice of the global batch."""
        self.model.train()
        b = len(text)
        out = self.model(image, torch.cat([text, negative]), cross=self.tcfg.cross_reconstruction)
        zi = gather_with_grad(out["zi"])
        zt = gather_with_grad(out["zt"][:b])
        zn = gather_with_grad(out["zt"][b:])
        scale = self.jam.logit_scale()
        align = alignment_loss(self.tcfg, zi, zt, zn, scale)
        rec = losses.reconstruction(out["image_target"], out["image_hat"]) + losses.reconstruction(
            out["text_target"], out["text_hat"]
        )
        if self.tcfg.cross_reconstruction:
            rec = rec + losses.reconstruction(out["text_target"][:b], out["text_from_image"][:b])
            rec = rec + losses.reconstruction(out["image_target"], out["image_from_text"][:b])
        lam = losses.lambda_schedule(
            self.step, self.total_steps, self.tcfg.lambda_start, self.tcfg.lambda_end
        )
        loss = align + lam * rec
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.tcfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tcfg.grad_clip)
        self.optimizer.step()
        lr = self.scheduler.get_last_lr()[0]  # the rate this step used
        self.scheduler.step()
        self.step += 1
        return {
            "loss": float(loss.detach()),
            "align": float(align.detach()),
            "rec": float(rec.detach()),
            "lambda": lam,
            "lr": lr,
            "logit_scale": float(scale.detach()),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]


def global_batches(n: int, batch_size: int, epoch: int, seed: int) -> list[np.ndarray]:
    """The epoch's global batches, identical on every rank (same seed), last partial dropped
    so every rank always contributes an equal slice to the gather."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return [order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker entry point."""
    import ray.train
    import ray.train.torch

    # Ray Train logs every report at INFO on the root logger and also routes print() there;
    # at WARNING, only our one-line epoch summaries (and real warnings) reach the driver.
    logging.getLogger().setLevel(logging.WARNING)
    cfg = from_dict(config["cfg"])
    tcfg = cfg.train
    paths = Paths(**config["paths"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = config.get("threads", 1)
    torch.set_num_threads(max(1, threads))
    torch.manual_seed(tcfg.seed)
    device = ray.train.torch.get_device()

    data = paths.load("train")
    val = paths.load("val") if rank == 0 else None
    if len(data) < tcfg.batch_size:
        raise ValueError(
            f"train split has {len(data)} pairs, fewer than train.batch_size={tcfg.batch_size}"
        )
    per_rank = tcfg.batch_size // world
    steps_per_epoch = len(data) // tcfg.batch_size
    total_steps = steps_per_epoch * tcfg.epochs

    model = JAM(jam_config(tcfg, data.image.shape[1], data.text.shape[1]))
    model.fit_input_stats(torch.as_tensor(data.image), torch.as_tensor(data.text))
    trainer = Trainer(ray.train.torch.prepare_model(model), tcfg, total_steps)
    torch.manual_seed(tcfg.seed + rank)  # same initial weights, independent dropout per rank
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt:
            trainer.jam.load_state_dict(JAM.load(Path(ckpt) / MODEL_DIR).state_dict())
            state = torch.load(Path(ckpt) / STATE_FILE, weights_only=True)
            trainer.load_state_dict(state["trainer"])
            start_epoch = state["epoch"] + 1

    # Embeddings stay float16 in memory (half the footprint); the model casts per batch.
    tensors = [torch.as_tensor(a).to(device) for a in (data.image, data.text, data.negative)]
    writer = None
    if rank == 0 and config.get("tensorboard_dir"):
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(config["tensorboard_dir"])

    for epoch in range(start_epoch, tcfg.epochs):
        started = time.perf_counter()
        sums: dict[str, float] = {}
        for batch in global_batches(len(data), tcfg.batch_size, epoch, tcfg.seed):
            mine = torch.as_tensor(batch[rank * per_rank : (rank + 1) * per_rank], device=device)
            stats = trainer.train_step(*(t[mine] for t in tensors))
            for key, value in stats.items():
                sums[key] = sums.get(key, 0.0) + value
                if writer:
                    writer.add_scalar(f"train/{key}", value, trainer.step)
        elapsed = time.perf_counter() - started
        report = {f"train/{k}": v / steps_per_epoch for k, v in sums.items()}
        report |= {"epoch": epoch, "step": trainer.step}
        report["train/samples_per_s"] = steps_per_epoch * tcfg.batch_size / elapsed
        validate = (epoch + 1) % tcfg.eval_every == 0 or epoch + 1 == tcfg.epochs
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0 and validate:
                assert val is not None
                scores = score_model(trainer.jam, val, cfg.eval)
                report |= {f"val/{k}": v for k, v in scores.items()}
                print(
                    f"[train] {tcfg.objective} epoch {epoch + 1}/{tcfg.epochs} "
                    f"loss {report['train/loss']:.3f} val i2t_r1 {scores['i2t_r1']:.3f} "
                    f"t2i_r1 {scores['t2i_r1']:.3f} mutual_knn {scores['mutual_knn']:.3f} "
                    f"{report['train/samples_per_s']:.0f} samples/s",
                    flush=True,
                )
                trainer.jam.save(Path(tmp) / MODEL_DIR)
                torch.save(
                    {"trainer": trainer.state_dict(), "epoch": epoch}, Path(tmp) / STATE_FILE
                )
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            if writer:
                for key, value in report.items():
                    if key.startswith("val/") or key == "train/samples_per_s":
                        writer.add_scalar(key, value, trainer.step)
                writer.flush()
            ray.train.report(report, checkpoint=ckpt)
    if writer:
        writer.close()


@dataclass
class TrainResult:
    objective: str
    model_dir: Path
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    seconds: float


def scaling(tcfg: TrainConfig) -> tuple[Any, int]:
    """Ray Train scaling, leaving CPU headroom: workers that reserve every core starve the
    Ray tasks that feed them (ENV-NOTES: that deadlocks silently on 2 cores)."""
    from ray.train import ScalingConfig

    from raysys.runtime import cluster_resources

    res = cluster_resources()
    if tcfg.use_gpu and res.gpus < tcfg.num_workers:
        from raysys.errors import ConfigError

        raise ConfigError(
            f"train.use_gpu with train.num_workers={tcfg.num_workers} needs that many GPUs; "
            f"the cluster has {res.gpus:g}"
        )
    cpus = tcfg.cpus_per_worker or max(0.1, min(1.0, (res.cpus - 1) / tcfg.num_workers))
    threads = max(1, int(res.cpus // tcfg.num_workers)) if not tcfg.use_gpu else 2
    return (
        ScalingConfig(
            num_workers=tcfg.num_workers,
            use_gpu=tcfg.use_gpu,
            resources_per_worker={"CPU": cpus},
        ),
        threads,
    )


def train(cfg: Config, paths: Paths, out_dir: Path, name: str) -> TrainResult:
    """Fit one JAM model with Ray Train; returns the exported model and its history."""
    from ray.train import CheckpointConfig, LoggingConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from raysys.runtime import init_ray

    init_ray(cfg.ray)
    scaling_config, threads = scaling(cfg.train)
    out_dir = out_dir.resolve()
    started = time.perf_counter()
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "cfg": to_dict(cfg),
            "paths": dataclasses.asdict(paths),
            "threads": threads,
            "tensorboard_dir": str(out_dir / "tensorboard" / name),
        },
        scaling_config=scaling_config,
        run_config=RunConfig(
            name=name,
            storage_path=str(out_dir / "ray"),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # Ray Train logs every report at INFO; the epoch summaries are what users read.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    result = trainer.fit()
    seconds = time.perf_counter() - started
    model_dir = out_dir / "models" / name
    with result.checkpoint.as_directory() as ckpt:
        JAM.load(Path(ckpt) / MODEL_DIR).save(model_dir)
    history = []
    if result.metrics_dataframe is not None:
        history = result.metrics_dataframe.to_dict(orient="records")
    return TrainResult(cfg.train.objective, model_dir, result.metrics, history, seconds)


def evaluate_split(model_dir: Path, paths: Paths, ecfg: EvalConfig, split: str) -> dict:
    return score_model(JAM.load(model_dir), paths.load(split), ecfg)
