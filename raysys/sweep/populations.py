"""Which trials train together: the sweep's trials grouped into populations (no Ray, no data).

Trials are compatible when they read one model pair's cache and agree on every train setting a
population shares (batch size, epochs, seed, architecture, workers, devices …: all but
`population.MEMBER_KEYS`); a split that streams also needs one layer pair. Each compatible
group is cut into populations of at most `sweep.population` members, in plan order, so the
same config always plans the same populations (what `resume` relies on).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from typing import Any

from raysys import config
from raysys.config import Config
from raysys.sweep.plan import Packing, Trial, trial_config
from raysys.train.population import MEMBER_KEYS

MAX_GPU_MEMBERS = 128  # a GPU population's cap whatever the memory estimate says


@dataclass
class PopulationPlan:
    """One Tune trial: its id and its members (trials), in plan order."""

    id: str
    trials: list[Trial]
    size: int = 0  # the most members the sweep put in a population (what resume regroups by)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "trials": [t.to_dict() for t in self.trials], "size": self.size}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PopulationPlan:
        trials = [Trial.from_dict(t) for t in d["trials"]]
        return cls(d["id"], trials, d.get("size", len(trials)))


def shared_key(base: Config, trial: Trial, by_layer: bool) -> tuple:
    """What members of one population must share (the trial's train settings less its own)."""
    cfg = trial_config(base, trial.objective, trial.params)
    train = {k: v for k, v in asdict(cfg.train).items() if k not in MEMBER_KEYS}
    layer = (trial.layer.vision_layer, trial.layer.text_layer) if by_layer else None
    return (trial.vision, trial.text, layer, repr(sorted(train.items())))


def member_bytes(cfg: Config, d_image: int, d_text: int) -> float:
    """A rough upper bound of one member's GPU memory in training: weights, gradients and
    AdamW's two moments in float32, its activations at the batch size (the inputs, every
    hidden layer's outputs in both autoencoders, kept for backward) and the losses' [B, 2B]
    matrices. At 1024/4096-d and batch 4,096 it gives 1.7 GiB; an H200 measured 1.55 GiB per
    member (49.6 GiB for 32)."""
    tcfg = cfg.train
    hidden, latent = list(tcfg.hidden), tcfg.latent
    params = 0
    for d in (d_image, d_text):
        widths = [d, *hidden, latent, *reversed(hidden), d]
        params += sum(a * b for a, b in zip(widths, widths[1:], strict=False))
        params += sum(2 * h * h for h in hidden) * 2  # each block's SwiGLU projection
    per_row = 3 * (d_image + 3 * d_text) + 2 * 8 * (sum(hidden) + latent)
    batch = tcfg.batch_size
    # The losses' float32 [B, 2B] logits, masks and their saved softmax: about four of them.
    losses = 4 * 4.0 * batch * 2 * batch
    return 16.0 * params + 4.0 * batch * per_row + losses


def population_size(
    cfg: Config, trials: list[Trial], pack: Packing, widths: list[tuple[int, int]] | None = None
) -> int:
    """`sweep.population`, or when 0: the trials spread over the concurrent slots (one
    population per slot), on a GPU capped by what the slot's share of `gpu_memory_gib` holds
    of the widest layer pair's members (`widths`: each layer pair's image and text widths)."""
    if cfg.sweep.population:
        return cfg.sweep.population
    size = max(1, math.ceil(len(trials) / max(1, pack.concurrent)))
    if pack.gpus_per_worker:
        if widths:
            widest = max(member_bytes(cfg, *w) for w in widths)
            budget = cfg.sweep.gpu_memory_gib * 2**30 * pack.gpus_per_worker * 0.8
            size = min(size, max(1, int(budget // widest)))
        size = min(size, MAX_GPU_MEMBERS)
    return size


def group_trials(cfg: Config, trials: list[Trial], size: int) -> list[PopulationPlan]:
    """Trials in populations of at most `size` compatible members, each group split evenly."""
    by_layer = cfg.train.data_on_device == "stream"
    groups: dict[tuple, list[Trial]] = {}
    for trial in trials:
        groups.setdefault(shared_key(cfg, trial, by_layer), []).append(trial)
    plans: list[PopulationPlan] = []
    for members in groups.values():
        parts = math.ceil(len(members) / size)
        for k in range(parts):
            chunk = members[k * len(members) // parts : (k + 1) * len(members) // parts]
            # Its size and first member name it in logs, Tune's table and the bucket.
            name = f"p{len(plans):03d}-n{len(chunk)}-{chunk[0].id}"
            plans.append(PopulationPlan(name, chunk, size))
    return plans


def population_config(base: Config, plan: PopulationPlan) -> tuple[Config, list[Config]]:
    """The config the population runs with (its first member's: the shared settings are
    equal) and each member's own."""
    members = [trial_config(base, t.objective, t.params) for t in plan.trials]
    return config.from_dict(config.to_dict(members[0])), members


def widened(pack: Packing, populations: int, several_nodes: bool = False) -> Packing:
    """The packing with each population's share grown to fill slots no population uses:
    fewer populations than slots (one population of every trial, on 2 cores) would otherwise
    leave cores or GPU share idle. A worker never takes more than one GPU. Not across
    `several_nodes`: the slots are counted over them all, so a grown worker could need more
    than any one node holds and wait for ever."""
    k = max(1, pack.concurrent // max(1, populations))
    if k == 1 or several_nodes:
        return pack
    gpus = min(1.0, pack.gpus_per_worker * k) if pack.gpus_per_worker else 0.0
    return dataclasses.replace(
        pack,
        concurrent=min(pack.concurrent, populations),
        cpus_per_worker=pack.cpus_per_worker * k,
        gpus_per_worker=gpus,
        threads=pack.threads * k,
    )
