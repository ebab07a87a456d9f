"""A population's training step, in plain torch: `Trainer` for P stacked members at once.

Each member keeps everything a trial sets for itself: objective, Spread's α and K, learning
rate and warm-up, weight decay, gradient clipping, λ schedule, dropout and logit scale. The
optimiser is torch's fused AdamW kernel run on each member's slices of the stacked tensors, so
each member's moments, learning rate and weight decay are its own; clipping takes each
member's own norm. Each member's seed sets its initial weights and dropout masks, but a sweep
groups only trials of one seed (it is not in `MEMBER_KEYS`): the seed also orders the data
(shards, epoch order, a streamed view's order), which the population's one batch plan reads
from its shared config, and a trial's batches must not depend on the trials beside it.
A frozen member (stopped early, by ASHA, or diverged) takes no update at all. Nothing here
imports Ray or pyarrow (`raysys bench step --population` runs it on a torch-only GPU machine).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from raysys.config import TrainConfig
from raysys.jam import JAM, losses
from raysys.jam.dist import gather_keys, gather_with_grad
from raysys.jam.population import Population
from raysys.train.step import Trainer, jam_config, lr_factor

BETAS, EPS = (0.9, 0.999), 1e-8  # torch.optim.AdamW's defaults, which `Trainer` uses
# TrainConfig keys a member sets for itself; every other key is the population's (and must be
# equal across its members: `raysys.sweep.populations.shared_key`). Not `seed`: the batch plan
# is seeded by the population's, so members of other seeds would train on its batches.
MEMBER_KEYS = (
    "objective",
    "vision_layer",
    "text_layer",
    "dropout",
    "logit_scale",
    "alpha",
    "k",
    "cross_reconstruction",
    "lambda_start",
    "lambda_end",
    "lr",
    "weight_decay",
    "warmup_steps",
    "grad_clip",
    "early_stop_patience",
)


def build_members(tcfgs: list[TrainConfig], dims: list[tuple[int, int]]) -> list[JAM]:
    """Each member's initial JAM, seeded as a trial alone seeds it (`torch.manual_seed(seed)`
    before the model is built), so member m starts from the weights it would have alone."""
    members = []
    for tcfg, (d_image, d_text) in zip(tcfgs, dims, strict=True):
        torch.manual_seed(tcfg.seed)
        members.append(JAM(jam_config(tcfg, d_image, d_text)))
    return members


@dataclass
class _Group:
    """Members sharing one loss call: an objective (and, for Spread, a K)."""

    objective: str
    k: int
    index: torch.Tensor


class PopulationTrainer:
    """One process's share of a population's training: stacked AdamW, schedules, the step."""

    def __init__(self, model: torch.nn.Module, tcfgs: list[TrainConfig], total_steps: int) -> None:
        self.model = model  # Population, or Population wrapped in DistributedDataParallel
        self.population: Population = getattr(model, "module", model)
        self.tcfgs = tcfgs
        self.total_steps = total_steps
        self.step = 0
        p = self.population
        device = next(p.parameters()).device
        self.active = torch.ones(p.size, dtype=torch.bool, device=device)
        self.params = [q for q in p.parameters() if q.requires_grad]
        self.exp_avg = [torch.zeros_like(q) for q in self.params]
        self.exp_avg_sq = [torch.zeros_like(q) for q in self.params]
        self._per_member = {
            name: torch.tensor([float(getattr(t, name)) for t in tcfgs], device=device)
            for name in ("grad_clip", "alpha")
        }
        groups: dict[tuple[str, int], list[int]] = {}
        for m, t in enumerate(tcfgs):
            groups.setdefault((t.objective, t.k if t.objective == "spread" else 0), []).append(m)
        self.groups = [
            _Group(o, k, torch.tensor(ms, device=device)) for (o, k), ms in groups.items()
        ]
        self.cross = torch.tensor([t.cross_reconstruction for t in tcfgs], device=device)
        # Each member's slices of the stacked weights and moments (views, updated in place).
        self.member_views = [
            tuple([t[m] for t in ts] for ts in (self.params, self.exp_avg, self.exp_avg_sq))
            for m in range(p.size)
        ]

    # --- schedules: the same formulas as `Trainer` and `losses.lambda_schedule`, per member ----

    def rates(self, step: int) -> list[float]:
        """Each member's learning rate at `step`."""
        return [t.lr * lr_factor(t, step, self.total_steps) for t in self.tcfgs]

    def lambdas(self, step: int) -> list[float]:
        return [
            losses.lambda_schedule(step, self.total_steps, t.lambda_start, t.lambda_end)
            for t in self.tcfgs
        ]

    def freeze(self, m: int) -> None:
        """Stop member m for good: its weights and optimiser state stay as they are."""
        self.active[m] = False

    # --- the step --------------------------------------------------------------------------

    def alignment(
        self, zi: torch.Tensor, zt: torch.Tensor, zn: torch.Tensor, same: torch.Tensor | None
    ) -> torch.Tensor:
        """Each member's own objective on the global batch: ``[P]``."""
        scale = self.population.logit_scale()
        out = zi.new_zeros(self.population.size, dtype=torch.float32)
        for g in self.groups:
            i = g.index
            if g.objective == "con":
                value = losses.con(zi[i], zt[i], scale[i], same=same)
            elif g.objective == "negcon":
                value = losses.negcon(zi[i], zt[i], zn[i], scale[i], same=same)
            else:
                alpha = self._per_member["alpha"][i]
                value = losses.spread(zi[i], zt[i], zn[i], scale[i], alpha, g.k, same=same)
            out = out.index_put((i,), value.float())
        return out

    def reconstruction(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """`step.reconstruction_loss` per member: ½ own terms, or ¼ of four with cross."""
        p = self.population
        own = torch.stack(
            [
                p.reconstruction("image", out["image_target"], out["image_hat"]),
                p.reconstruction("text", out["text_target"], out["text_hat"]),
            ]
        ).mean(0)
        if "text_from_image" not in out:
            return own
        cross = torch.stack(
            [
                p.reconstruction("text", out["text_target"], out["text_from_image"]),
                p.reconstruction("image", out["image_target"], out["image_from_text"]),
            ]
        ).mean(0)
        return torch.where(self.cross, 0.5 * (own + cross), own)

    def train_step(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        negative: torch.Tensor,
        image_keys: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """One step of every member on this rank's slice of the global batch: inputs
        ``[P, b, d]`` (each member's own layers, zero-padded), or ``[b, d]`` when all members
        read the same layers. Returns per-member statistics as ``[P]`` device tensors."""
        self.model.train()
        p = self.population
        p.dropout_step(self.step)
        if image.dim() == 2:
            image, text, negative = (x.expand(p.size, *x.shape) for x in (image, text, negative))
        same = None
        if image_keys is not None:
            keys = gather_keys(image_keys.to(image.device))
            same = keys[:, None] == keys[None, :]
        cross = any(t.cross_reconstruction for t in self.tcfgs)  # host-side: no device read
        with Trainer._autocast(image.device):
            out = self.model(image, text, cross=cross, negative=negative)
            zi, zt, zn = (gather_with_grad(out[k], dim=1) for k in ("zi", "zt", "zn"))
            align = self.alignment(zi, zt, zn, same)
            rec = self.reconstruction(out)
        # A pageable host-to-device copy that does not wait for the GPU's queue.
        lam = torch.tensor(self.lambdas(self.step)).to(align.device, non_blocking=True)
        loss = (align + lam * rec) * self.active  # frozen members: no gradient
        for q in self.params:
            q.grad = None
        loss.sum().backward()
        lr = self.rates(self.step)
        self._adamw(lr)
        self.step += 1
        return {
            "align": align.detach(),
            "rec": rec.detach(),
            "logit_scale": p.logit_scale().detach().float(),
            "lambda": lam,
            "lr": lr,
        }

    @torch.no_grad()
    def _adamw(self, rates: list[float]) -> None:
        """torch.optim.AdamW's update on stacked tensors, each member with its own rate,
        weight decay and clipping; frozen members are left exactly as they are.

        Clipping is `clip_grad_norm_`'s (the norm of the per-tensor norms, taken per member);
        the update is the very kernel `Trainer`'s `AdamW(fused=True)` runs, called once per
        member on its slices of the stacked tensors (contiguous views, updated in place): one
        pass over weights, grads and moments, where an update written in stacked tensor ops
        takes a dozen (it cost more than the forward and backward together). A frozen member's
        call is skipped on the device (`found_inf`), so no host read of `active` is needed."""
        grads = [q.grad if q.grad is not None else torch.zeros_like(q) for q in self.params]
        clip = self._per_member["grad_clip"]
        norms = [torch.linalg.vector_norm(g.reshape(len(g), -1), dim=1) for g in grads]
        norm = torch.linalg.vector_norm(torch.stack(norms), dim=0)
        coef = torch.where(clip > 0, (clip / (norm + 1e-6)).clamp(max=1.0), torch.ones_like(clip))
        for g in grads:
            g.mul_(coef.view((-1,) + (1,) * (g.dim() - 1)).to(g.dtype))
        device = self.params[0].device
        skip = (~self.active).float()
        steps = [torch.full((), float(self.step + 1), device=device)] * len(self.params)
        b1, b2 = BETAS
        for m, (params, exp_avg, exp_avg_sq) in enumerate(self.member_views):
            torch._fused_adamw_(
                params,
                [g[m] for g in grads],
                exp_avg,
                exp_avg_sq,
                [],
                steps,
                lr=rates[m],
                beta1=b1,
                beta2=b2,
                weight_decay=self.tcfgs[m].weight_decay,
                eps=EPS,
                amsgrad=False,
                maximize=False,
                found_inf=skip[m : m + 1],
            )

    # --- state ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "exp_avg": [t.cpu() for t in self.exp_avg],
            "exp_avg_sq": [t.cpu() for t in self.exp_avg_sq],
            "active": self.active.cpu(),
            "step": self.step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for mine, saved in zip(
            self.exp_avg + self.exp_avg_sq, state["exp_avg"] + state["exp_avg_sq"], strict=True
        ):
            mine.copy_(saved)
        self.active.copy_(state["active"])
        self.step = state["step"]
