"""The worker's training loop without Ray: steps, validation, checkpoints and resume.

`raysys.train.worker` runs this inside Ray Train (its `report` is `ray.train.report`);
`raysys.train.selfcheck` runs the same code under a bare torch.distributed group on a GPU
machine that cannot install Ray. Nothing here imports Ray or pyarrow.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from raysys.config import Config
from raysys.errors import ConfigError
from raysys.evaluate import capped_val, score_model
from raysys.jam import JAM
from raysys.train.step import Trainer, all_agree, check_dims, host_stats

if TYPE_CHECKING:
    from raysys.data.pairs import Pairs

STATE_FILE = "train_state.pt"
HISTORY_FILE = "history.json"  # every report so far; the latest checkpoint holds all of it
MODEL_DIR = "model"

# Reports one validation: its metrics and, on rank 0, the checkpoint directory (valid only
# during the call; other ranks get None).
Report = Callable[[dict[str, Any], Path | None], None]


class Batches(Protocol):
    def get(self, step: int) -> tuple[torch.Tensor, ...]: ...


@dataclass
class Progress:
    """What a checkpoint carries besides the weights: best score, patience, history."""

    best: float | None = None
    stale: int = 0
    history: list[dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        self.history = self.history or []


def run_steps(
    cfg: Config,
    trainer: Trainer,
    batches: Batches,
    val: Pairs | None,
    progress: Progress,
    steps_per_epoch: int,
    device: torch.device,
    report: Report,
    writer: Any = None,
    publish: Callable[[], None] | None = None,
) -> None:
    """Train to the last step (or the early stop), validating and reporting every
    `eval_every` steps (and publishing the TensorBoard events after each, where `publish` is
    given). Step statistics stay on the device until a validation, when the window is read
    at once (`host_stats`).
    Validation scores a seeded sample of at most `eval.val_pairs` of `val`'s pairs
    (`evaluate.capped_val`; the same rows every time, and none dropped when the worker loaded
    only those rows)."""
    tcfg = cfg.train
    if 0 < tcfg.early_stop_patience <= progress.stale:
        return  # restored from the checkpoint where it stopped early: it is finished
    val = None if val is None else capped_val(val, cfg.eval)
    window: list[dict[str, Any]] = []
    window_start = time.perf_counter()
    while trainer.step < trainer.total_steps:
        window.append(trainer.train_step(*batches.get(trainer.step)))
        if trainer.step % tcfg.eval_every and trainer.step < trainer.total_steps:
            continue
        steps = host_stats(window)
        elapsed = time.perf_counter() - window_start
        first = trainer.step - len(steps) + 1
        if writer:
            for offset, stats in enumerate(steps):
                for key, value in stats.items():
                    writer.add_scalar(f"train/{key}", value, first + offset)
        summary = {f"train/{k}": sum(s[k] for s in steps) / len(steps) for k in steps[0]}
        summary["train/samples_per_s"] = len(steps) * tcfg.batch_size / elapsed
        summary |= {"step": trainer.step, "epoch": trainer.step / steps_per_epoch}
        stop = _report(cfg, trainer, val, progress, summary, writer, report)
        if publish:
            publish()
        if all_agree(stop, device):
            break
        window, window_start = [], time.perf_counter()


def _report(
    cfg: Config,
    trainer: Trainer,
    val: Pairs | None,
    progress: Progress,
    summary: dict[str, Any],
    writer: Any,
    report: Report,
) -> bool:
    """Validate (rank 0), checkpoint and report; returns rank 0's early-stopping decision."""
    stop = False
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if val is not None:  # rank 0
            stop = validate(cfg, trainer, val, progress, summary)
            ckpt = Path(tmp)
            save_checkpoint(ckpt, trainer, progress, summary)
            if writer:
                for key, value in summary.items():
                    if key.startswith("val/") or key == "train/samples_per_s":
                        writer.add_scalar(key, value, trainer.step)
                writer.flush()
        report(summary, ckpt)
    return stop


def validate(
    cfg: Config, trainer: Trainer, val: Pairs, progress: Progress, summary: dict[str, Any]
) -> bool:
    """Score the val split (already capped to `eval.val_pairs`) into `summary` on the model's
    device (other ranks wait for it), track the best score; True when patience ran out."""
    tcfg = cfg.train
    scores = score_model(trainer.jam, val, cfg.eval, with_intervals=False)
    summary |= {f"val/{k}": v for k, v in scores.items()}
    score = summary[tcfg.best_metric]
    best = progress.best
    improved = best is None or (score > best if tcfg.best_mode == "max" else score < best)
    progress.best, progress.stale = (score, 0) if improved else (best, progress.stale + 1)
    stop = 0 < tcfg.early_stop_patience <= progress.stale
    print(
        f"[train] {tcfg.objective} step {trainer.step}/{trainer.total_steps} "
        f"loss {summary['train/loss']:.3f} val i2t_r1 {scores['i2t_r1']:.3f} "
        f"t2i_r1 {scores['t2i_r1']:.3f} mutual_knn {scores['mutual_knn']:.3f} "
        f"{summary['train/samples_per_s']:.0f} samples/s" + (" (early stop)" if stop else ""),
        flush=True,
    )
    return stop


def check_same_epochs(history: list[dict[str, Any]], steps_per_epoch: int) -> None:
    """A resumed run must read its split as it did: with `train.data_on_device=auto` the
    choice between holding a shard in memory and streaming it is made again on the cluster
    that resumes, and the two cut an epoch into different steps (and batches), which would
    shift every later batch and the schedule. The checkpoint's last report says how many
    steps an epoch had (`step / epoch`)."""
    last = history[-1] if history else {}
    if not last.get("epoch"):
        return
    then = last["step"] / last["epoch"]
    if abs(then - steps_per_epoch) > 1e-6 * then:
        raise ConfigError(
            f"this run trained at {then:.0f} steps an epoch, and here its split would be read "
            f"at {steps_per_epoch}: with train.data_on_device=auto this cluster chose the "
            "other way to read it (streamed or held in memory). Resume with the setting it "
            "ran with (the run's log says whether it streamed): train.data_on_device=stream, "
            "or true/false"
        )


def save_checkpoint(
    directory: Path, trainer: Trainer, progress: Progress, summary: dict[str, Any]
) -> None:
    trainer.jam.save(directory / MODEL_DIR)
    torch.save(
        {"trainer": trainer.state_dict(), "best": progress.best, "stale": progress.stale},
        directory / STATE_FILE,
    )
    progress.history.append(summary)
    (directory / HISTORY_FILE).write_text(json.dumps(progress.history))


def read_state(directory: Path, device: torch.device | str) -> dict[str, Any]:
    """A checkpoint's optimiser state, loaded onto `device`: saved on another node's cuda:3,
    it would otherwise try to land on a cuda:3 this machine may not have."""
    return torch.load(directory / STATE_FILE, weights_only=True, map_location=device)


def load_checkpoint(directory: Path, trainer: Trainer, device: torch.device) -> Progress:
    """Weights, optimiser state and progress of a checkpoint into `trainer`."""
    saved = JAM.load(directory / MODEL_DIR, map_location=device)
    jam = trainer.jam
    check_dims(saved, jam.cfg.d_image, jam.cfg.d_text, "the checkpoint")
    jam.load_state_dict(saved.state_dict())
    state = read_state(directory, device)
    trainer.load_state_dict(state["trainer"])
    history = json.loads((directory / HISTORY_FILE).read_text())
    return Progress(state.get("best"), state.get("stale", 0), history)
