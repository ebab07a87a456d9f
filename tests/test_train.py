"""The training step without Ray: schedules, batching and that a step actually learns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raysys import config
from raysys.jam import JAM
from raysys.train import Trainer, alignment_loss, global_batches, jam_config


def test_global_batches_are_equal_sized_disjoint_and_seeded() -> None:
    batches = global_batches(103, 20, epoch=0, seed=0)
    assert len(batches) == 5 and all(len(b) == 20 for b in batches)
    flat = np.concatenate(batches)
    assert len(set(flat.tolist())) == 100  # no repeats; the 3 left over are dropped
    again = global_batches(103, 20, epoch=0, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again, strict=True))
    other = global_batches(103, 20, epoch=1, seed=0)
    assert not np.array_equal(batches[0], other[0])


def _toy(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, 8, generator=g)
    image = latent @ torch.randn(8, 24, generator=g)
    text = latent @ torch.randn(8, 16, generator=g)
    negative = torch.randn(n, 8, generator=g) @ torch.randn(8, 16, generator=g)
    return image, text, negative


@pytest.mark.parametrize("objective", ["con", "negcon", "spread"])
def test_training_steps_reduce_the_loss(objective: str) -> None:
    torch.manual_seed(0)
    cfg = config.load(
        None,
        [
            f"train.objective={objective}",
            "train.hidden=32",
            "train.latent=8",
            "train.dropout=0",
            "train.warmup_steps=1",
        ],
    )
    image, text, negative = _toy()
    model = JAM(jam_config(cfg.train, 24, 16))
    model.fit_input_stats(image, text)
    trainer = Trainer(model, cfg.train, total_steps=60)
    first = trainer.train_step(image, text, negative)
    for _ in range(59):
        last = trainer.train_step(image, text, negative)
    assert last["align"] < 0.5 * first["align"]
    assert last["rec"] < first["rec"]
    assert first["lambda"] == pytest.approx(1.0) and last["lambda"] == pytest.approx(0.1)
    assert trainer.step == 60 and last["lr"] < first["lr"]


def test_lr_warms_up_then_decays_to_zero() -> None:
    cfg = config.load(None, ["train.warmup_steps=5", "train.lr=1.0"])
    trainer = Trainer(JAM(jam_config(cfg.train, 4, 4)), cfg.train, total_steps=100)
    factors = [trainer._lr_factor(s) for s in range(101)]
    assert factors[0] == pytest.approx(0.2) and factors[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:], strict=False))
    assert factors[100] == pytest.approx(0.0, abs=1e-9)


def test_alignment_loss_dispatches_on_objective() -> None:
    from raysys.jam import losses

    torch.manual_seed(1)
    zi, zt, zn = torch.randn(3, 6, 5).unbind(0)
    s = torch.tensor(10.0)
    cfg = config.load(None, ["train.alpha=0.3", "train.k=1"])
    tcfg = cfg.train
    for objective, want in (
        ("con", losses.con(zi, zt, s)),
        ("negcon", losses.negcon(zi, zt, zn, s)),
        ("spread", losses.spread(zi, zt, zn, s, alpha=0.3, k=1)),
    ):
        tcfg.objective = objective
        torch.testing.assert_close(alignment_loss(tcfg, zi, zt, zn, s), want)
