"""A population's training loop without Ray: steps, per-member validation, checkpoints.

What `raysys.train.loop` does for one model, for P members at once: every `eval_every` steps
each active member is validated on its own layers' val sample, tracks its own best score and
patience, and may be stopped (its patience ran out, the sweep's ASHA rungs say so, or its
weights are no longer finite: it diverged); a stopped member is frozen
(`PopulationTrainer.freeze`) while the others train on. A checkpoint
holds the population's current weights and each member's best weights so far, so each member
exports its own best model whatever step the others peaked at. Nothing here imports Ray.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from raysys.config import Config
from raysys.data.pairs import Pairs
from raysys.evaluate import capped_val, score_model
from raysys.jam import JAM, JAMConfig
from raysys.jam.population import Population
from raysys.metrics import NonFiniteError
from raysys.train.loop import HISTORY_FILE, STATE_FILE, Batches, read_state
from raysys.train.population import PopulationTrainer
from raysys.train.step import all_agree, host_stats

WEIGHTS, BEST = "population.safetensors", "best.safetensors"
MEMBERS_FILE = "members.json"  # each member's id and JAMConfig

# One validation's report: the population's metrics and, on rank 0, the checkpoint directory
# (valid only during the call).
Report = Callable[[dict[str, Any], Path | None], None]
# The sweep's ASHA: (member id, validations so far, score) -> whether to stop the member.
Rungs = Callable[[str, int, float], bool]


@dataclass
class Member:
    """A member's identity and bookkeeping: best score, patience, why it stopped."""

    id: str
    best: float | None = None
    best_step: int = 0
    stale: int = 0
    stopped: str = ""  # "", "early stop", "asha" or "diverged" (non-finite weights)
    stopped_step: int = 0
    validations: int = 0
    # Each [validations, signed score] it gave the sweep's ASHA rungs: a resumed sweep
    # replays them into its new rungs actor (`raysys.sweep.asha.asked_before`).
    asked: list[list[float]] = field(default_factory=list)


@dataclass
class PopulationProgress:
    members: list[Member]
    history: list[dict[str, Any]] = field(default_factory=list)
    best: BestWeights | None = None


class BestWeights:
    """Each member's weights at its best validation so far (a copy of the stacked state,
    whose slot m is overwritten when member m improves), for its export."""

    def __init__(self, population: Population) -> None:
        self.population = population
        self.state = {k: v.detach().clone() for k, v in population.state_dict().items()}

    @torch.no_grad()
    def keep(self, m: int) -> None:
        for key, value in self.population.state_dict().items():
            self.state[key][m] = value[m]


@dataclass
class Validation:
    """Each member's val sample (a member reads its own layer pair's)."""

    pairs: list[Pairs]  # per layer pair
    layer_of: list[int]  # per member

    def of(self, m: int) -> Pairs:
        return self.pairs[self.layer_of[m]]


def run_population(
    cfg: Config,
    trainer: PopulationTrainer,
    batches: Batches,
    val: Validation | None,
    progress: PopulationProgress,
    steps_per_epoch: int,
    device: torch.device,
    report: Report,
    writers: list[Any] | None = None,
    publish: Callable[[], None] | None = None,
    rungs: Rungs | None = None,
) -> None:
    """Train every member to the last step (or until all are stopped), validating, reporting
    and checkpointing every `eval_every` steps; `writers` are the members' TensorBoard
    writers (rank 0). Returns at once when no member is active (a resumed population whose
    members all stopped early: its last checkpoint is final)."""
    tcfg = cfg.train
    if not bool(trainer.active.any()):
        return
    if val is not None:
        val = Validation([capped_val(p, cfg.eval) for p in val.pairs], val.layer_of)
    window: list[dict[str, Any]] = []
    window_start = time.perf_counter()
    while trainer.step < trainer.total_steps:
        window.append(trainer.train_step(*batches.get(trainer.step)))
        if trainer.step % tcfg.eval_every and trainer.step < trainer.total_steps:
            continue
        elapsed = time.perf_counter() - window_start
        per_member = _member_stats(window)
        first = trainer.step - len(window) + 1
        summary: dict[str, Any] = {"step": trainer.step, "epoch": trainer.step / steps_per_epoch}
        summary["train/samples_per_s"] = len(window) * tcfg.batch_size / elapsed
        for m, member in enumerate(progress.members):
            steps = per_member[m]
            if writers:
                for offset, stats in enumerate(steps):
                    for key, value in stats.items():
                        writers[m].add_scalar(f"train/{key}", value, first + offset)
            summary |= {
                f"{member.id}/train/{k}": sum(s[k] for s in steps) / len(steps) for k in steps[0]
            }
        _validate_and_report(cfg, trainer, val, progress, summary, writers, report, rungs, device)
        if publish:
            publish()
        if not bool(trainer.active.any()):
            break
        window, window_start = [], time.perf_counter()


def _member_stats(window: list[dict[str, Any]]) -> list[list[dict[str, float]]]:
    """The window's `[P]` statistics as each member's list of per-step floats (one host read
    and one collective per member, as `host_stats` does for one model)."""
    size = window[0]["align"].shape[0]
    out = []
    for m in range(size):
        member = [
            {
                "align": s["align"][m],
                "rec": s["rec"][m],
                "logit_scale": s["logit_scale"][m],
                "lambda": float(s["lambda"][m]),
                "lr": s["lr"][m],
            }
            for s in window
        ]
        out.append(host_stats(member))
    return out


def _validate_and_report(
    cfg: Config,
    trainer: PopulationTrainer,
    val: Validation | None,
    progress: PopulationProgress,
    summary: dict[str, Any],
    writers: list[Any] | None,
    report: Report,
    rungs: Rungs | None,
    device: torch.device,
) -> None:
    """Rank 0: validate each active member and decide its stop; every rank: freeze the
    members just stopped (before the checkpoint, so its `active` agrees with them); rank 0:
    checkpoint; then report."""
    if val is not None:
        population = trainer.population
        for m, member in enumerate(progress.members):
            if member.stopped:
                continue
            jam = population.member(m)
            if not _finite(jam):  # scoring would raise; the others train on without it
                _diverged(trainer, m, member, "weights")
                continue
            jam = jam.to(next(population.parameters()).device)
            try:
                scores = score_model(jam, val.of(m), cfg.eval, with_intervals=False)
            except NonFiniteError:  # finite weights whose latents overflow
                _diverged(trainer, m, member, "latents")
                continue
            summary |= {f"{member.id}/val/{k}": v for k, v in scores.items()}
            _track(cfg, trainer, m, member, scores, rungs, progress.best)
            if writers:
                for key, value in scores.items():
                    writers[m].add_scalar(f"val/{key}", value, trainer.step)
                writers[m].add_scalar(
                    "train/samples_per_s", summary["train/samples_per_s"], trainer.step
                )
                writers[m].flush()
        summary["members/active"] = sum(not mb.stopped for mb in progress.members)
    for m in _agreed_stops(trainer, progress, device):
        trainer.freeze(m)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if val is not None:
            ckpt = Path(tmp)
            final = trainer.step >= trainer.total_steps or all(m.stopped for m in progress.members)
            save_population(ckpt, trainer, progress, summary, final)
        report(summary, ckpt)


def _track(
    cfg: Config,
    trainer: PopulationTrainer,
    m: int,
    member: Member,
    scores: dict[str, float],
    rungs: Rungs | None,
    best: BestWeights | None,
) -> None:
    """Best score (and best weights), patience and the stop decisions of one member."""
    tcfg = trainer.tcfgs[m]
    score = scores[tcfg.best_metric.removeprefix("val/")]
    improved = member.best is None or (
        score > member.best if tcfg.best_mode == "max" else score < member.best
    )
    member.validations += 1
    if improved:
        member.best, member.best_step, member.stale = score, trainer.step, 0
        if best is not None:
            best.keep(m)
    else:
        member.stale += 1
    name = f"{tcfg.objective} {member.id}"
    if 0 < tcfg.early_stop_patience <= member.stale:
        member.stopped, member.stopped_step = "early stop", trainer.step
    elif rungs is not None and trainer.step < trainer.total_steps:
        signed = score if tcfg.best_mode == "max" else -score
        member.asked.append([member.validations, signed])
        if rungs(member.id, member.validations, signed):
            member.stopped, member.stopped_step = "asha", trainer.step
    print(
        f"[train] {name} step {trainer.step}/{trainer.total_steps} "
        f"val i2t_r1 {scores['i2t_r1']:.3f} t2i_r1 {scores['t2i_r1']:.3f} "
        f"mutual_knn {scores['mutual_knn']:.3f}"
        + (f" (stopped: {member.stopped})" if member.stopped else ""),
        flush=True,
    )


def _finite(jam: JAM) -> bool:
    """Whether every weight of a member is finite (a diverged member's are NaN or Inf)."""
    return all(bool(torch.isfinite(v).all()) for v in jam.state_dict().values())


def _diverged(trainer: PopulationTrainer, m: int, member: Member, what: str) -> None:
    """Stop member m, whose weights (or the latents they give) are no longer finite; its best
    weights so far (from its last finite improvement) stay its export, and with none it has
    no model to export."""
    member.stopped, member.stopped_step = "diverged", trainer.step
    kept = f"its best of step {member.best_step} kept" if member.best is not None else "no model"
    print(
        f"[train] {trainer.tcfgs[m].objective} {member.id} step {trainer.step}/"
        f"{trainer.total_steps}: non-finite {what} (stopped: diverged; {kept})",
        flush=True,
    )


def _agreed_stops(
    trainer: PopulationTrainer, progress: PopulationProgress, device: torch.device
) -> list[int]:
    """Rank 0's newly stopped members, on every rank (DDP ranks freeze the same members)."""
    out = []
    for m, member in enumerate(progress.members):
        if bool(trainer.active[m]) and all_agree(bool(member.stopped), device):
            out.append(m)
    return out


# --- checkpoints -------------------------------------------------------------------------------


def save_population(
    directory: Path,
    trainer: PopulationTrainer,
    progress: PopulationProgress,
    summary: dict[str, Any],
    final: bool = False,
) -> None:
    """The population's weights, each member's best weights, optimiser state and progress.
    A `final` checkpoint (no step left to train) keeps only the best weights and the
    progress: the current weights and AdamW's two moments would triple its size (2 GB for
    twelve default members on 1280-d inputs) for a resume that has nothing left to do."""
    population = trainer.population
    if not final:
        state = {k: v.detach().contiguous().cpu() for k, v in population.state_dict().items()}
        save_file(state, str(directory / WEIGHTS))
    best = progress.best.state if progress.best else population.state_dict()
    save_file({k: v.contiguous().cpu() for k, v in best.items()}, str(directory / BEST))
    members = [
        {"member": asdict(mb), "config": cfg.to_dict()}
        for mb, cfg in zip(progress.members, population.cfgs, strict=True)
    ]
    (directory / MEMBERS_FILE).write_text(json.dumps(members, indent=1))
    trainer_state = trainer.state_dict()
    if final:
        trainer_state = {k: trainer_state[k] for k in ("active", "step")}
    torch.save({"trainer": trainer_state}, directory / STATE_FILE)
    progress.history.append(summary)
    (directory / HISTORY_FILE).write_text(json.dumps(progress.history))


def load_population(
    directory: Path, trainer: PopulationTrainer, device: torch.device
) -> PopulationProgress:
    """A checkpoint's weights, best weights, optimiser state and progress into `trainer` (a
    final checkpoint's best weights stand for its weights: nothing is left to train)."""
    population = trainer.population
    best = BestWeights(population)
    best.state = load_file(str(directory / BEST), device=str(device))
    weights = directory / WEIGHTS
    current = load_file(str(weights), device=str(device)) if weights.exists() else best.state
    population.load_state_dict(current)
    saved = read_state(directory, device)["trainer"]
    if "exp_avg" in saved:
        trainer.load_state_dict(saved)
    else:
        trainer.active.copy_(saved["active"])
        trainer.step = saved["step"]
    members = [Member(**m["member"]) for m in json.loads((directory / MEMBERS_FILE).read_text())]
    history = json.loads((directory / HISTORY_FILE).read_text())
    return PopulationProgress(members, history, best)


def read_members(directory: Path) -> list[tuple[Member, JAMConfig]]:
    saved = json.loads((directory / MEMBERS_FILE).read_text())
    return [(Member(**m["member"]), JAMConfig.from_dict(m["config"])) for m in saved]


def export_members(directory: Path, model_dirs: list[Path]) -> list[Member]:
    """Each member's best weights of a checkpoint as a plain model directory (`JAM.load`
    reads it); returns the members' bookkeeping. A member that diverged before its first
    validation has no best weights (its slot holds its initial ones): no directory."""
    members = read_members(directory)
    population = Population([cfg for _, cfg in members])
    population.load_state_dict(load_file(str(directory / BEST)))
    for m, path in enumerate(model_dirs):
        if members[m][0].best is None:
            continue
        jam: JAM = population.member(m)
        jam.save(path)
    return [member for member, _ in members]
