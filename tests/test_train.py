"""The training step without Ray: schedules, batching, that a step actually learns, its
reconstruction and same-image terms against hand computations, and NaN rows in a streamed
batch named by pair id."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from raysys import config
from raysys.data.batches import BatchPlan, keep_on_device
from raysys.data.pairs import buckets
from raysys.errors import ConfigError
from raysys.jam import JAM, losses
from raysys.train.loop import (
    Progress,
    check_same_epochs,
    read_state,
    run_steps,
    save_checkpoint,
)
from raysys.train.step import (
    Trainer,
    alignment_loss,
    fit_global_input_stats,
    host_stats,
    input_moments,
    jam_config,
)


def test_shards_are_equal_disjoint_and_fixed() -> None:
    plan = BatchPlan(n=103, batch_size=20, shards=4, seed=0)
    shards = [plan.shard_rows(s) for s in range(4)]
    assert all(len(s) == 25 for s in shards)  # 103 // 4; the 3 left over are never used
    flat = np.concatenate(shards)
    assert len(set(flat.tolist())) == 100 and flat.max() < 103
    again = BatchPlan(n=103, batch_size=20, shards=4, seed=0)
    assert all(np.array_equal(again.shard_rows(s), shards[s]) for s in range(4))


def test_an_epoch_uses_each_pair_at_most_once_and_epochs_differ() -> None:
    plan = BatchPlan(n=103, batch_size=20, shards=4, seed=0)
    assert plan.steps_per_epoch == 5
    epoch = [plan.global_batch(step) for step in range(5)]
    assert all(len(b) == 20 for b in epoch)
    flat = np.concatenate(epoch)
    assert len(set(flat.tolist())) == 100
    # Every batch is stratified: 5 pairs from each shard.
    for batch in epoch:
        for s in range(4):
            assert np.isin(batch, plan.shard_rows(s)).sum() == 5
    assert not np.array_equal(plan.global_batch(0), plan.global_batch(5))


@pytest.mark.parametrize("world", [1, 2, 4])
def test_worker_slices_make_the_same_global_batch_for_any_world_size(world: int) -> None:
    plan = BatchPlan(n=103, batch_size=20, shards=4, seed=3)
    for step in (0, 4, 7, 12):
        parts = [
            plan.worker_rows(rank, world)[plan.worker_batch(step, rank, world)]
            for rank in range(world)
        ]
        assert all(len(p) == 20 // world for p in parts)
        np.testing.assert_array_equal(np.concatenate(parts), plan.global_batch(step))
    # A worker holds only its own shards: a quarter of the split per shard it owns.
    assert len(plan.worker_rows(0, world)) == 25 * (4 // world)


def test_a_resumed_plan_gives_the_same_batches() -> None:
    a = BatchPlan(n=64, batch_size=8, shards=2, seed=1)
    [a.global_batch(step) for step in range(20)]
    b = BatchPlan(n=64, batch_size=8, shards=2, seed=1)
    np.testing.assert_array_equal(a.global_batch(13), b.global_batch(13))


def _bucketed(n: int = 400, batch_size: int = 24, shards: int = 4, seed: int = 3) -> BatchPlan:
    """A plan over `n` pairs of n // 2 images (two captions each), shards by image bucket."""
    image_ids = np.array([f"img{i // 2}" for i in range(n)])
    return BatchPlan(n, batch_size, shards, seed, buckets=buckets(image_ids))


def test_bucket_shards_hold_whole_buckets_and_an_epoch_is_the_smallest_shard() -> None:
    plan = _bucketed()
    bucket = plan.buckets
    for s in range(4):
        np.testing.assert_array_equal(plan.shard_rows(s), np.flatnonzero(bucket % 4 == s))
    assert sum(plan.sizes) == 400 and len(set(plan.sizes)) > 1  # unequal, nothing left out
    assert plan.steps_per_epoch == min(plan.sizes) // 6
    epoch = np.concatenate([plan.global_batch(step) for step in range(plan.steps_per_epoch)])
    assert len(np.unique(epoch)) == len(epoch) == plan.steps_per_epoch * 24  # each pair once
    for step in (0, plan.steps_per_epoch + 1):  # stratified: 6 pairs of every shard
        shard_of = bucket[plan.global_batch(step)] % 4
        np.testing.assert_array_equal(shard_of, np.repeat(np.arange(4), 6))
    # Another epoch draws other pairs of the larger shards.
    later = plan.global_batch(plan.steps_per_epoch)
    assert not np.array_equal(later, plan.global_batch(0))


@pytest.mark.parametrize("world", [1, 2, 4])
def test_bucket_shards_give_the_same_global_batch_for_any_world_size(world: int) -> None:
    plan = _bucketed()
    for step in (0, 5, plan.steps_per_epoch + 2, 3 * plan.steps_per_epoch):
        parts = [
            plan.worker_rows(rank, world)[plan.worker_batch(step, rank, world)]
            for rank in range(world)
        ]
        assert all(len(p) == 24 // world for p in parts)
        np.testing.assert_array_equal(np.concatenate(parts), plan.global_batch(step))
    # A worker holds exactly the pairs of its shards' buckets, and a resumed plan agrees.
    for rank in range(world):
        mine = plan.worker_rows(rank, world)
        assert set(np.unique(plan.buckets[mine] % 4)) == set(plan.worker_shards(rank, world))
    again = _bucketed()
    step = 2 * plan.steps_per_epoch + 1
    np.testing.assert_array_equal(again.global_batch(step), plan.global_batch(step))


def test_bucket_shards_beyond_the_buckets_or_the_split_fail_clearly() -> None:
    with pytest.raises(ConfigError, match="at most 64"):
        BatchPlan(200, 128, 128, 0, buckets=np.zeros(200, dtype=np.int16))
    tiny = _bucketed(n=40, batch_size=32, shards=8)
    with pytest.raises(ConfigError, match="lower train.batch_size or train.data_shards"):
        _ = tiny.steps_per_epoch


def test_input_stats_without_a_process_group_match_the_local_fit() -> None:
    image, text, _ = _toy()
    cfg = config.load(None, ["train.hidden=32", "train.latent=8"]).train
    local, global_ = (JAM(jam_config(cfg, 24, 16)) for _ in range(2))
    local.fit_input_stats(image, text)
    fit_global_input_stats(global_, image.half(), text.half())
    for name in ("image_mean", "image_std", "text_mean", "text_std"):
        torch.testing.assert_close(
            getattr(global_, name), getattr(local, name), atol=2e-3, rtol=2e-3
        )


def test_moments_in_chunks_equal_the_one_shot_moments() -> None:
    rng = np.random.default_rng(0)
    image = (rng.standard_normal((1000, 24)) * 30 + 5).astype(np.float16)
    text = (rng.standard_normal((1000, 16)) * 400).astype(np.float16)  # outlier-sized values
    one_shot = [torch.tensor([1000.0], dtype=torch.float64)]
    for x in (image, text):
        x64 = torch.from_numpy(x.astype(np.float64))
        one_shot += [x64.sum(0), (x64 * x64).sum(0)]
    want = torch.cat(one_shot)
    for chunk in (1, 7, 256, 5000):
        got = input_moments(image, text, "cpu", chunk=chunk)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-9)


def test_a_resumed_optimiser_state_lands_on_the_given_device(tmp_path) -> None:
    """Saved by a worker on one device, read for another: `map_location` decides, not the
    device the tensors were saved from (a cuda:3 that the resuming node may not have)."""
    cfg = config.load(None, ["train.hidden=16", "train.latent=8"])
    model = JAM(jam_config(cfg.train, 12, 10))
    model.fit_input_stats(torch.randn(32, 12), torch.randn(32, 10))
    trainer = Trainer(model, cfg.train, total_steps=4)
    trainer.train_step(torch.randn(8, 12), torch.randn(8, 10), torch.randn(8, 10))
    save_checkpoint(tmp_path, trainer, Progress(), {"step": 1})
    state = read_state(tmp_path, torch.device("meta"))
    moments = [v for s in state["trainer"]["optimizer"]["state"].values() for v in s.values()]
    assert moments and all(t.device.type == "meta" for t in moments)


def test_a_run_restored_where_it_stopped_early_trains_no_further() -> None:
    """Its checkpoint says patience ran out (a driver that died while scoring it, or a
    worker restart after the early stop): resumed, it reads no batch and reports nothing, so
    its best model stays the one the uninterrupted run exported."""
    cfg = config.load(None, ["train.hidden=16", "train.latent=8", "train.early_stop_patience=2"])
    model = JAM(jam_config(cfg.train, 12, 10))
    model.fit_input_stats(torch.randn(32, 12), torch.randn(32, 10))
    trainer = Trainer(model, cfg.train, total_steps=40)
    trainer.step = 12

    class NoBatches:
        def get(self, step: int) -> tuple[torch.Tensor, ...]:
            raise AssertionError(f"a finished run read step {step}")

    reports: list = []
    stopped = Progress(best=0.3, stale=2)
    run_steps(cfg, trainer, NoBatches(), None, stopped, 4, torch.device("cpu"),
              lambda summary, ckpt: reports.append(summary))  # fmt: skip
    assert trainer.step == 12 and reports == []
    with pytest.raises(AssertionError, match="read step 12"):  # patience left: it trains on
        run_steps(cfg, trainer, NoBatches(), None, Progress(best=0.3, stale=1), 4,
                  torch.device("cpu"), lambda summary, ckpt: None)  # fmt: skip


def test_a_resumed_run_must_cut_its_epochs_as_it_did() -> None:
    """With data_on_device=auto a resuming cluster may choose to stream a split the run held
    in memory (or the reverse), cutting an epoch into other steps: refused, not trained on
    shifted batches and schedule."""
    history = [{"step": 8, "epoch": 2.0}, {"step": 12, "epoch": 3.0}]
    check_same_epochs(history, 4)  # 4 steps an epoch, as before
    check_same_epochs([], 6)  # a fresh run
    with pytest.raises(ConfigError, match="trained at 4 steps an epoch.*read at 6"):
        check_same_epochs(history, 6)


def test_step_statistics_stay_on_the_device_until_a_window_is_read() -> None:
    cfg = config.load(None, ["train.hidden=16", "train.latent=8", "train.objective=negcon"])
    image, text, negative = _toy()
    model = JAM(jam_config(cfg.train, 24, 16))
    model.fit_input_stats(image, text)
    trainer = Trainer(model, cfg.train, total_steps=10)
    window = [trainer.train_step(image, text, negative) for _ in range(3)]
    assert all(isinstance(s["align"], torch.Tensor) for s in window)
    rows = host_stats(window)
    assert [r["lambda"] for r in rows] == [s["lambda"] for s in window]
    for row, step in zip(rows, window, strict=True):
        assert row["align"] == pytest.approx(float(step["align"]))
        assert row["loss"] == pytest.approx(
            float(step["align"]) + step["lambda"] * float(step["rec"])
        )


def test_the_cpu_device_always_holds_its_shard() -> None:
    assert keep_on_device("false", 10**9, 4096, torch.device("cpu"))[0]


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


def _exact_trainer(*overrides: str) -> tuple[Trainer, JAM]:
    """A deterministic trainer (no dropout, no clipping) and an untouched copy of its model."""
    torch.manual_seed(0)
    cfg = config.load(
        None,
        ["train.hidden=16", "train.latent=8", "train.dropout=0", "train.grad_clip=0", *overrides],
    )
    image, text, _ = _toy()
    model = JAM(jam_config(cfg.train, 24, 16))
    model.fit_input_stats(image, text)
    return Trainer(model, cfg.train, total_steps=10), copy.deepcopy(model)


def _mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((x - y) ** 2).mean()


def _by_hand(m: JAM, image: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
    """The four reconstruction errors in the standardised-feature space, from the model's
    public encode/decode/standardise methods."""
    x, y = m.standardize_image(image), m.standardize_text(text)
    zi, zt = m.encode_image(image), m.encode_text(text)
    return {
        "image": _mse(m.decode_image(zi), x),
        "text": _mse(m.decode_text(zt), y),
        "text_from_image": _mse(m.decode_text(zi), y),
        "image_from_text": _mse(m.decode_image(zt), x),
    }


def test_reconstruction_is_half_image_plus_positive_caption_only() -> None:
    image, text, negative = _toy()
    trainer, before = _exact_trainer("train.objective=negcon")
    step = trainer.train_step(image, text, negative)
    hand = _by_hand(before, image, text)
    want = 0.5 * (hand["image"] + hand["text"])
    torch.testing.assert_close(step["rec"], want.detach(), atol=1e-6, rtol=1e-5)
    # other hard negatives: another alignment loss, the same reconstruction
    again, _ = _exact_trainer("train.objective=negcon")
    other = again.train_step(image, text, negative.flip(0) * 2)
    torch.testing.assert_close(other["rec"], step["rec"], atol=0, rtol=0)
    assert abs(float(other["align"] - step["align"])) > 1e-3


def test_cross_reconstruction_step_has_the_joint_loss_and_its_gradients() -> None:
    image, text, negative = _toy()
    trainer, before = _exact_trainer("train.objective=negcon", "train.cross_reconstruction=true")
    step = trainer.train_step(image, text, negative)
    hand = _by_hand(before, image, text)
    rec = sum(hand.values()) / 4
    torch.testing.assert_close(step["rec"], rec.detach(), atol=1e-6, rtol=1e-5)
    # the whole step's loss by hand: its gradients are the ones the trainer stepped with
    zi, zt = before.encode_image(image), before.encode_text(text)
    align = losses.negcon(zi, zt, before.encode_text(negative), before.logit_scale())
    torch.testing.assert_close(step["align"], align.detach(), atol=1e-6, rtol=1e-5)
    (align + step["lambda"] * rec).backward()
    got = dict(trainer.jam.named_parameters())
    for name, p in before.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[name].grad, p.grad, atol=1e-6, rtol=1e-4, msg=name)
    # each decoder learns from the other modality's latent: a cross term alone reaches both
    # the other encoder and the decoder
    before.zero_grad()
    hand = _by_hand(before, image, text)
    (hand["text_from_image"] + hand["image_from_text"]).backward()
    for part in ("image.encoder", "text.decoder", "text.encoder", "image.decoder"):
        grads = [p.grad for n, p in before.named_parameters() if n.startswith(part)]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0, part


def test_image_keys_keep_captions_of_one_image_from_being_negatives() -> None:
    image, text, negative = _toy()
    keys = torch.arange(len(image)) // 2  # rows 2i and 2i+1 show one image
    for objective in ("con", "negcon", "spread"):
        trainer, before = _exact_trainer(f"train.objective={objective}")
        step = trainer.train_step(image, text, negative, image_keys=keys)
        zi, zt, zn = (
            before.encode_image(image),
            *before.encode_text(torch.stack([text, negative])),
        )
        same = keys[:, None] == keys[None, :]
        want = alignment_loss(trainer.tcfg, zi, zt, zn, before.logit_scale(), same).detach()
        torch.testing.assert_close(step["align"], want, atol=1e-6, rtol=1e-5)
        plain = alignment_loss(trainer.tcfg, zi, zt, zn, before.logit_scale()).detach()
        assert abs(float(plain - want)) > 1e-3, objective
        # distinct keys are today's behaviour (None)
        a, _ = _exact_trainer(f"train.objective={objective}")
        b, _ = _exact_trainer(f"train.objective={objective}")
        distinct = a.train_step(image, text, negative, image_keys=torch.arange(len(image)) + 7)
        torch.testing.assert_close(distinct["align"], b.train_step(image, text, negative)["align"])


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


def test_streamed_nan_rows_are_reported_by_pair_id() -> None:
    import numpy as np
    import pyarrow as pa

    from raysys.data import cache
    from raysys.data.view_shard import arrays
    from raysys.errors import CacheError

    image = np.ones((3, 4), np.float16)
    text = np.ones((3, 2), np.float16)
    batch = pa.table(
        {
            "pair_id": ["a", "b", "c"],
            "image": cache.list_array(image),
            "text": cache.list_array(text),
            "negative": cache.list_array(text),
            "image_id": ["x", "x", "y"],
        }
    )
    out = arrays(batch)
    assert out["image"].shape == (3, 4)
    keys = out["image_keys"].tolist()
    assert keys[0] == keys[1] != keys[2]
    text[1, 0] = np.inf
    bad = batch.set_column(2, "text", cache.list_array(text))
    with pytest.raises(CacheError, match=r"1 pair\(s\) have NaN or inf.*\['b'\]"):
        arrays(bad)


def _checkpoint(run_dir, name: str, step: int, r1: float, seed: int) -> None:
    """A checkpoint directory as the worker writes it: model, optimiser state, history."""
    import json

    from raysys.train.worker import HISTORY_FILE, MODEL_DIR, STATE_FILE

    torch.manual_seed(seed)
    ckpt = run_dir / name
    JAM(jam_config(config.load(None, ["train.hidden=8", "train.latent=4"]).train, 6, 6)).save(
        ckpt / MODEL_DIR
    )
    (ckpt / STATE_FILE).write_bytes(b"state")
    history = [{"step": s, "val/i2t_r1": 0.1} for s in range(10, step, 10)]
    (ckpt / HISTORY_FILE).write_text(json.dumps([*history, {"step": step, "val/i2t_r1": r1}]))


@pytest.mark.parametrize(("mode", "best"), [("max", "checkpoint_1"), ("min", "checkpoint_2")])
def test_a_run_resumed_after_its_last_step_exports_its_best_checkpoint(
    tmp_path, mode: str, best: str
) -> None:
    """Stopped after its final checkpoint, a resumed fit reports nothing: the best and the
    latest checkpoints on disk give its model and history (was: Ray's "No checkpoint")."""
    from raysys.train.driver import finished_before, latest_checkpoint
    from raysys.train.worker import MODEL_DIR

    run_dir = tmp_path / "ray" / "t000"
    _checkpoint(run_dir, "checkpoint_1", 20, 0.9, seed=1)
    _checkpoint(run_dir, "checkpoint_2", 30, 0.2, seed=2)
    _checkpoint(run_dir, "checkpoint_3", 10, 0.5, seed=3)
    (run_dir / "checkpoint_4").mkdir()  # unfinished: no state, no history
    assert latest_checkpoint(run_dir) == str(run_dir / "checkpoint_2")
    tcfg = config.load(None, [f"train.best_mode={mode}"]).train
    result = finished_before(tcfg, run_dir, tmp_path / "model", seconds=1.0)
    assert result.metrics == {"step": 30, "val/i2t_r1": 0.2}  # the latest report
    assert [r["step"] for r in result.history] == [10, 20, 30]
    exported, expected = JAM.load(tmp_path / "model"), JAM.load(run_dir / best / MODEL_DIR)
    got, want = exported.state_dict(), expected.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in got)
    other = JAM.load(run_dir / "checkpoint_3" / MODEL_DIR).state_dict()
    assert not all(torch.equal(got[k], other[k]) for k in got)  # the pick is visible
