"""The training step, in plain torch: runs on one process with or without torch.distributed.

Contrastive terms see the whole global batch through `gather_with_grad`, so N workers x B/N
train the same objective as one worker x B. Nothing here imports Ray or pyarrow (`raysys
bench step` runs it on a torch-only GPU machine).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from raysys.config import TrainConfig
from raysys.errors import CacheError
from raysys.jam import JAM, JAMConfig, losses
from raysys.jam.dist import collective_device, gather_keys, gather_with_grad, in_group

STATS_CHUNK_BYTES = 256 << 20  # float64 bytes per chunk of the moments (rows = this / 8d)


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


def check_dims(model: JAM, d_image: int, d_text: int, what: str) -> None:
    """A model only encodes embeddings of the widths it was trained on; say so plainly."""
    if (model.cfg.d_image, model.cfg.d_text) != (d_image, d_text):
        raise CacheError(
            f"{what} expects image/text embeddings of width {model.cfg.d_image}/"
            f"{model.cfg.d_text}, but the cached layers are {d_image}/{d_text} wide; use the "
            "backbones and layers it was trained on"
        )


def alignment_loss(
    tcfg: TrainConfig,
    zi: torch.Tensor,
    zt: torch.Tensor,
    zn: torch.Tensor,
    s: torch.Tensor,
    same: torch.Tensor | None = None,
) -> torch.Tensor:
    """The configured objective on global-batch latents; ``same`` (bool ``[B, B]``) marks rows
    of one image, which are never each other's negatives."""
    if tcfg.objective == "con":
        return losses.con(zi, zt, s, same=same)
    if tcfg.objective == "negcon":
        return losses.negcon(zi, zt, zn, s, same=same)
    return losses.spread(zi, zt, zn, s, alpha=tcfg.alpha, k=tcfg.k, same=same)


def reconstruction_loss(out: dict[str, torch.Tensor], cross: bool) -> torch.Tensor:
    """The authors' reconstruction term, in the standardised-feature space of `JAM.forward`.

    Own: ``½(MSE(image) + MSE(positive caption))``; hard negatives are not reconstructed (they
    would let even Con see them, and double the text term). With ``cross`` (the joint variant)
    the two cross-modal terms, each modality decoded from the other's latent, join the
    average: ``¼(MSE(image) + MSE(caption) + MSE(caption ← image) + MSE(image ← caption))``,
    i.e. ``½·own + ½·cross``, so λ weighs reconstruction the same either way.
    """
    terms = [
        losses.reconstruction(out["image_target"], out["image_hat"]),
        losses.reconstruction(out["text_target"], out["text_hat"]),
    ]
    if cross:
        terms.append(losses.reconstruction(out["text_target"], out["text_from_image"]))
        terms.append(losses.reconstruction(out["image_target"], out["image_from_text"]))
    return torch.stack(terms).mean()


def lr_factor(tcfg: TrainConfig, step: int, total_steps: int) -> float:
    """The learning rate's factor at `step`: linear warm-up, then cosine decay to zero over
    the remaining steps. Warm-up is capped at a tenth of the run so a short run is not all
    warm-up."""
    warmup = min(tcfg.warmup_steps, max(1, total_steps // 10))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class Trainer:
    """One process's share of JAM training: optimiser, schedules and the step itself."""

    def __init__(self, model: torch.nn.Module, tcfg: TrainConfig, total_steps: int) -> None:
        self.model = model  # JAM, or JAM wrapped in DistributedDataParallel
        self.jam: JAM = getattr(model, "module", model)
        self.tcfg = tcfg
        self.total_steps = total_steps
        params = [p for p in model.parameters() if p.requires_grad]
        # fused: one kernel over all parameters; 3x faster than the default per-tensor loop
        # for JAM's 10M parameters on one CPU thread (12 vs 35 ms a step), on GPU too.
        self.optimizer = torch.optim.AdamW(
            params, lr=tcfg.lr, weight_decay=tcfg.weight_decay, fused=True
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.step = 0

    def _lr_factor(self, step: int) -> float:
        return lr_factor(self.tcfg, step, self.total_steps)

    def train_step(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        negative: torch.Tensor,
        image_keys: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """One optimisation step on this rank's slice of the global batch.

        `image_keys` (int64 ``[b]``, equal for this rank's rows of one image; None = every row
        its own image) are gathered with the latents, so no caption of an image is a negative
        for another row of it anywhere in the global batch.

        Returns the step's statistics as device tensors (and the λ and learning rate it used
        as floats): reading a tensor on the host waits for the GPU's queue to drain, so
        `host_stats` reads a whole window of steps at once."""
        self.model.train()
        self.jam.dropout_step(self.step)
        cross = self.tcfg.cross_reconstruction
        same = None
        if image_keys is not None:
            keys = gather_keys(image_keys.to(image.device))
            same = keys[:, None] == keys[None, :]
        with self._autocast(image.device):
            out = self.model(image, text, cross=cross, negative=negative)
            zi = gather_with_grad(out["zi"])
            zt = gather_with_grad(out["zt"])
            zn = gather_with_grad(out["zn"])
            scale = self.jam.logit_scale()
            align = alignment_loss(self.tcfg, zi, zt, zn, scale, same)
            rec = reconstruction_loss(out, cross)
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
            "align": align.detach(),
            "rec": rec.detach(),
            "logit_scale": scale.detach().float(),
            "lambda": lam,
            "lr": lr,
        }

    @staticmethod
    def _autocast(device: torch.device):
        """bf16 matmuls on GPU (the losses upcast to fp32 themselves); plain fp32 on CPU."""
        if device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

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


def input_moments(
    image: np.ndarray | torch.Tensor,
    text: np.ndarray | torch.Tensor,
    device: torch.device | str = "cpu",
    chunk: int | None = None,
) -> torch.Tensor:
    """[count, Σx, Σx² of each modality] in float64 on `device`: additive over batches and
    ranks. Computed `chunk` rows at a time on the device (by default, as many as fill
    `STATS_CHUNK_BYTES` in float64), so a shard is never copied whole into float64 (for a COCO
    shard of DINOv2-g × Qwen-7B that copy was ~23 GB of host memory)."""
    device = torch.device(device)
    parts = [torch.tensor([float(len(image))], dtype=torch.float64, device=device)]
    for x in (image, text):
        rows_per = chunk or max(1, STATS_CHUNK_BYTES // (8 * x.shape[1]))
        total = torch.zeros(x.shape[1], dtype=torch.float64, device=device)
        squares = torch.zeros_like(total)
        for start in range(0, len(x), rows_per):
            rows = torch.as_tensor(x[start : start + rows_per]).to(device).double()
            total += rows.sum(0)
            squares += rows.square().sum(0)
            del rows
        parts += [total, squares]
    return torch.cat(parts)


def set_global_input_stats(model: JAM, moments: torch.Tensor) -> None:
    """Input standardisation from the moments of every worker's shard together, so all
    ranks (and a one-worker run on the same shards) standardise identically. The all-reduce
    runs where the process group's backend takes tensors (NCCL: the GPU), wherever the
    model is at this point (still on the CPU, before Ray Train moves it)."""
    flat = moments
    if in_group():
        flat = moments.to(collective_device(moments.device), copy=True)
        dist.all_reduce(flat)
    flat = flat.cpu()
    n, stats, offset = flat[0], [], 1
    for d in (model.image_mean.shape[-1], model.text_mean.shape[-1]):
        total, squares = flat[offset : offset + d], flat[offset + d : offset + 2 * d]
        offset += 2 * d
        mean = total / n
        var = (squares - n * mean * mean) / (n - 1)  # unbiased, as torch.std
        stats += [mean, var.clamp(min=0).sqrt()]
    model.set_input_stats(*(t.to(model.image_mean.device) for t in stats))


def fit_global_input_stats(
    model: JAM,
    image: np.ndarray | torch.Tensor,
    text: np.ndarray | torch.Tensor,
    device: torch.device | str = "cpu",
) -> None:
    """Standardisation from a whole in-memory shard; the GPU memory its chunks borrowed is
    handed back after, before the data placement (`keep_on_device`) reads the free memory.
    (A streamed split sums `input_moments` per batch and calls `set_global_input_stats`.)"""
    set_global_input_stats(model, input_moments(image, text, device))
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def host_stats(window: list[dict[str, Any]]) -> list[dict[str, float]]:
    """A window of `Trainer.train_step` statistics as floats, with one host read and one
    collective for the whole window. The alignment loss is already the global batch's; the
    reconstruction term is averaged over ranks here, so the logged loss is the global batch's
    whatever the number of workers. Every rank must call it at the same steps."""
    if not window:
        return []
    values = torch.stack(
        [torch.stack([s["align"].float(), s["rec"].float(), s["logit_scale"]]) for s in window]
    )
    if in_group():
        rec = values[:, 1].to(collective_device(values.device), copy=True)
        dist.all_reduce(rec)
        values[:, 1] = rec.to(values.device) / dist.get_world_size()
    rows = values.double().cpu().tolist()
    return [
        {
            "loss": align + s["lambda"] * rec,
            "align": align,
            "rec": rec,
            "lambda": s["lambda"],
            "lr": s["lr"],
            "logit_scale": scale,
        }
        for s, (align, rec, scale) in zip(window, rows, strict=True)
    ]


def all_agree(flag: bool, device: torch.device) -> bool:
    """Rank 0's decision, on every rank (early stopping must stop all DDP ranks together)."""
    if not in_group():
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=collective_device(device))
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())
