"""A population member trains exactly as it would alone (no Ray: the stacked model and step)."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch

from raysys.config import Config, EvalConfig, TrainConfig
from raysys.data.pairs import Pairs
from raysys.errors import ConfigError
from raysys.evaluate import score_model
from raysys.jam import JAM, JAMConfig
from raysys.jam.population import Population
from raysys.sweep import asha
from raysys.train.population import PopulationTrainer, build_members
from raysys.train.population_loop import (
    BestWeights,
    Member,
    PopulationProgress,
    Validation,
    _validate_and_report,
    export_members,
    load_population,
    run_population,
)
from raysys.train.step import Trainer, fit_global_input_stats

STEPS, BATCH = 12, 24
# Two "layer pairs" of one model pair: different widths, so members are padded.
WIDTHS = [(20, 12), (12, 16)]


def _data(n: int, seed: int) -> list[Pairs]:
    """The same pairs at each layer pair's widths (one shared latent, per-layer projections)."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n, 6)).astype(np.float32)
    other = latent + rng.standard_normal((n, 6)).astype(np.float32)
    ids = np.array([f"p{i}" for i in range(n)])
    image_ids = np.array([f"i{i // 2}" for i in range(n)])  # two captions per image
    out = []
    for d_image, d_text in WIDTHS:
        proj = np.random.default_rng(d_image * 100 + d_text)
        mi = proj.standard_normal((6, d_image)).astype(np.float32)
        mt = proj.standard_normal((6, d_text)).astype(np.float32)
        image = latent[np.arange(n) // 2 * 2] @ mi  # captions of one image share its embedding
        out.append(Pairs(ids, image_ids, ids, image.astype(np.float16), (latent @ mt), other @ mt))
    return out


MEMBERS = [  # (TrainConfig overrides, layer pair)
    (dict(objective="con", lr=1e-3, seed=0, weight_decay=1e-4, grad_clip=0.5), 0),
    (dict(objective="negcon", lr=3e-4, seed=1, weight_decay=1e-2, lambda_start=0.5), 1),
    (
        dict(objective="spread", lr=2e-3, seed=2, alpha=0.6, k=3, warmup_steps=2,
             cross_reconstruction=True, logit_scale=10.0),
        0,
    ),
]  # fmt: skip


def _tcfg(overrides: dict) -> TrainConfig:
    base = dict(hidden=[32, 32], latent=8, dropout=0.0, batch_size=BATCH, warmup_steps=4)
    return TrainConfig(**(base | overrides))


def _batch(data: Pairs, step: int) -> tuple[torch.Tensor, ...]:
    rows = (np.arange(BATCH) + step * 7) % len(data)
    keys = torch.as_tensor(data.take(rows).image_keys())
    take = data.take(rows)
    return (*(torch.as_tensor(x) for x in (take.image, take.text, take.negative)), keys)


def _padded(x: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(x.float(), (0, width - x.shape[-1]))


@pytest.mark.parametrize(("learn_scale", "dropout"), [(False, 0.0), (True, 0.0), (True, 0.1)])
def test_three_members_train_as_they_would_alone(learn_scale: bool, dropout: float) -> None:
    """With dropout too: each member draws its masks from its own seeded generator, alone
    and stacked, so its result does not depend on the members it trains beside."""
    train, val = _data(96, seed=0), _data(40, seed=1)
    tcfgs = [_tcfg(o | {"learn_logit_scale": learn_scale, "dropout": dropout}) for o, _ in MEMBERS]
    layers = [layer for _, layer in MEMBERS]
    dims = [WIDTHS[layer] for layer in layers]

    alone = []
    for tcfg, layer, dim in zip(tcfgs, layers, dims, strict=True):
        (model,) = build_members([tcfg], [dim])
        fit_global_input_stats(model, train[layer].image, train[layer].text)
        model.seed_dropout(tcfg.seed)
        trainer = Trainer(model, tcfg, STEPS)
        for step in range(STEPS):
            trainer.train_step(*_batch(train[layer], step))
        alone.append(model)

    members = build_members(tcfgs, dims)
    for model, layer in zip(members, layers, strict=True):
        fit_global_input_stats(model, train[layer].image, train[layer].text)
    population = Population.from_members(members)
    population.seed_dropout([t.seed for t in tcfgs])
    torch.manual_seed(1234)  # the global generator is not what a member's masks come from
    trainer = PopulationTrainer(population, tcfgs, STEPS)
    d_image, d_text = population.d_image, population.d_text
    for step in range(STEPS):
        per_layer = [_batch(d, step) for d in train]
        stacked = [
            torch.stack([_padded(per_layer[layer][i], width) for layer in layers])
            for i, width in ((0, d_image), (1, d_text), (2, d_text))
        ]
        stats = trainer.train_step(*stacked, per_layer[0][3])
    assert stats["align"].shape == (3,)

    ecfg = EvalConfig(bootstrap=0)
    for m, (model, layer) in enumerate(zip(alone, layers, strict=True)):
        member = population.member(m)
        assert member.cfg == model.cfg
        for name, value in model.state_dict().items():
            torch.testing.assert_close(member.state_dict()[name], value, atol=2e-5, rtol=1e-4)
        moved = max((member.state_dict()[k] - members[m].state_dict()[k]).abs().max() for k in
                    ("image.encoder.0.linear.weight",))  # fmt: skip
        assert moved > 1e-4  # the member did train
        ours = score_model(member, val[layer], ecfg, with_intervals=False)
        theirs = score_model(model, val[layer], ecfg, with_intervals=False)
        for key, value in theirs.items():
            assert ours[key] == pytest.approx(value, abs=1e-4), key


def test_a_frozen_member_does_not_move_while_the_others_train() -> None:
    train = _data(64, seed=3)
    tcfgs = [_tcfg(dict(seed=s)) for s in (0, 1)]
    members = build_members(tcfgs, [WIDTHS[0]] * 2)
    population = Population.from_members(members)
    trainer = PopulationTrainer(population, tcfgs, 4)
    trainer.freeze(1)
    before = population.member(1).state_dict()
    for step in range(4):
        trainer.train_step(*_batch(train[0], step))  # [b, d]: shared by every member
    after = population.member(1).state_dict()
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    assert not torch.equal(population.member(0).state_dict()["text.decoder.0.linear.weight"],
                           members[0].state_dict()["text.decoder.0.linear.weight"])  # fmt: skip


def test_members_must_share_the_architecture() -> None:
    a = JAMConfig(d_image=8, d_text=8, hidden=(16,))
    with pytest.raises(ConfigError, match="hidden"):
        Population([a, dataclasses.replace(a, hidden=(32,))])


def test_member_round_trips_through_a_population() -> None:
    torch.manual_seed(0)
    small = JAM(JAMConfig(d_image=6, d_text=10, hidden=(16,), latent=4))
    big = JAM(JAMConfig(d_image=12, d_text=10, hidden=(16,), latent=4))
    fit_global_input_stats(small, torch.randn(30, 6) * 3 + 1, torch.randn(30, 10))
    population = Population.from_members([big, small])
    back = population.member(1)
    for name, value in small.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name
    x_image, x_text = torch.randn(5, 6), torch.randn(5, 10)
    small.eval(), population.eval()  # no dropout
    out = population(
        torch.stack([_padded(torch.randn(5, 12), 12), _padded(x_image, 12)]),
        torch.stack([x_text, x_text]),
    )
    alone = small(x_image, x_text)
    torch.testing.assert_close(out["zi"][1], alone["zi"])
    torch.testing.assert_close(out["image_hat"][1, :, :6], alone["image_hat"])


# --- DDP: each member sees its own global batch (gloo, two ranks) -----------------------------

DDP_STEPS = 4


def _ddp_members() -> tuple[list[TrainConfig], Population]:
    tcfgs = [_tcfg(o) for o, _ in MEMBERS]
    members = build_members(tcfgs, [WIDTHS[0]] * len(tcfgs))
    data = _data(96, seed=0)[0]
    for model in members:  # not all-reduced: every rank holds the whole split here
        model.fit_input_stats(torch.as_tensor(data.image), torch.as_tensor(data.text))
    return tcfgs, Population.from_members(members)


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    from datetime import timedelta

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
        timeout=timedelta(seconds=60),
    )  # fmt: skip
    try:
        tcfgs, population = _ddp_members()
        trainer = PopulationTrainer(DDP(population), tcfgs, DDP_STEPS)
        data = _data(96, seed=0)[0]
        half = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
        for step in range(DDP_STEPS):
            trainer.train_step(*(x[half] for x in _batch(data, step)))
        torch.save(population.state_dict(), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_train_each_member_on_its_global_batch(tmp_path, monkeypatch) -> None:
    import socket

    import torch.multiprocessing as mp

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(
        _ddp_worker, args=(port, str(tmp_path)), nprocs=2, join=True, start_method="spawn"
    )
    tcfgs, population = _ddp_members()
    start = {k: v.clone() for k, v in population.state_dict().items()}
    trainer = PopulationTrainer(population, tcfgs, DDP_STEPS)
    data = _data(96, seed=0)[0]
    for step in range(DDP_STEPS):
        trainer.train_step(*_batch(data, step))
    key = "params.text__encoder__0__linear__weight"
    assert (population.state_dict()[key] - start[key]).abs().max() > 1e-4
    for rank in range(2):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        for name, value in population.state_dict().items():
            torch.testing.assert_close(saved[name], value, atol=2e-5, rtol=1e-4, msg=name)


# --- the loop without Ray: each member's own validation, patience and ASHA stop --------------


class _Batches:
    def __init__(self, data: Pairs) -> None:
        self.data = data

    def get(self, step: int) -> tuple[torch.Tensor, ...]:
        return _batch(self.data, step)


def test_the_loop_stops_members_on_their_own(tmp_path) -> None:
    from raysys.train.loop import read_state

    cfg = Config()
    cfg.train = _tcfg(dict(eval_every=2, best_metric="val/recon_mse", best_mode="min"))
    tcfgs = [
        _tcfg(dict(lr=1e-2, seed=0, best_metric="val/recon_mse", best_mode="min")),
        _tcfg(dict(lr=1e-12, seed=1, early_stop_patience=1, best_metric="val/recon_mse",
                   best_mode="min")),  # never improves: stopped at its second validation
        _tcfg(dict(lr=1e-2, seed=2, best_metric="val/recon_mse", best_mode="min")),
    ]  # fmt: skip
    train, val = _data(96, seed=0)[0], _data(40, seed=1)[0]
    members = build_members(tcfgs, [WIDTHS[0]] * 3)
    for model in members:
        fit_global_input_stats(model, train.image, train.text)
    population = Population.from_members(members)
    trainer = PopulationTrainer(population, tcfgs, 8)
    ids = ["a", "b", "c"]
    progress = PopulationProgress([Member(i) for i in ids], best=BestWeights(population))
    asked: list[tuple[str, int, float]] = []

    def rungs(member: str, t: int, score: float) -> bool:
        asked.append((member, t, score))
        return member == "c" and t == 3  # ASHA stops c at its third validation

    reports: list[dict] = []

    reloaded: list[PopulationProgress] = []

    def report(summary: dict, ckpt) -> None:
        reports.append(summary)
        if summary["step"] == 4:  # b stopped at this validation: its checkpoint says so
            assert read_state(ckpt, "cpu")["trainer"]["active"].tolist() == [True, False, True]
        if summary["step"] == 8:  # final: best weights and progress only
            assert not (ckpt / "population.safetensors").exists()
            shutil.copytree(ckpt, tmp_path / "ray" / "p" / "checkpoint_000000008")
            export_members(ckpt, [tmp_path / i for i in ids])
            again = PopulationTrainer(Population(population.cfgs), tcfgs, 8)
            reloaded.append(load_population(ckpt, again, torch.device("cpu")))
            assert again.step == 8 and again.active.tolist() == [True, False, False]

    run_population(cfg, trainer, _Batches(train), Validation([val], [0, 0, 0]), progress, 4,
                   torch.device("cpu"), report, rungs=rungs)  # fmt: skip
    a, b, c = progress.members
    assert (b.stopped, b.stopped_step) == ("early stop", 4)
    assert (c.stopped, c.stopped_step) == ("asha", 6) and not a.stopped
    assert [r["step"] for r in reports] == [2, 4, 6, 8] and trainer.step == 8
    assert "b/val/recon_mse" in reports[1] and "b/val/recon_mse" not in reports[2]
    asked_at = [(m, t) for m, t, _ in asked]
    assert ("b", 3) not in asked_at and ("a", 4) not in asked_at  # the last asks no rung
    # A resumed sweep's new rungs actor gets every score the checkpoint says was given, and
    # its rungs then hold what the old actor's did.
    given = asha.asked_before([str(tmp_path / "ray" / "p")])
    assert sorted(given) == sorted(asked) and len(asked) == 7  # a: 1-3, b: 1, c: 1-3
    live, replayed = asha.Rungs(reduction_factor=2), asha.Rungs(reduction_factor=2)
    for call in asked:
        live.stop(*call)
    assert replayed.replay(given) == 7 and replayed.recorded == live.recorded
    assert reports[-1]["members/active"] == 1
    # Each member's export is its own best weights, whatever step the others peaked at.
    best = Population(population.cfgs)
    best.load_state_dict(progress.best.state)
    for m, i in enumerate(ids):
        exported = JAM.load(tmp_path / i).state_dict()
        assert all(torch.equal(exported[k], v) for k, v in best.member(m).state_dict().items())
    assert [m.stopped for m in reloaded[0].members] == ["", "early stop", "asha"]
    # A member stopped after its best validation keeps exporting that best (b: its first).
    assert b.best_step == 2


# --- what a member computes at the edges: bf16 dropout, the logit-scale cap ----------------


def test_dropout_scales_bf16_activations_as_a_jam_alone() -> None:
    """In bf16, `1 - 0.1` is 0.8984375: scaled by it, every kept unit was 0.18% larger."""
    cfg = JAMConfig(d_image=8, d_text=8, hidden=(64,), latent=4, dropout=0.1)
    jam = JAM(cfg)
    population = Population.from_members([JAM(dataclasses.replace(cfg, dropout=0.3)), jam])
    jam.seed_dropout(5)
    population.seed_dropout([7, 5])
    jam.train(), population.train()
    x = torch.randn(2, 256, 64).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        alone = jam.image.encoder[0].drop(x[1])
        stacked = population._dropout(x)
    assert stacked.dtype == torch.bfloat16
    assert torch.equal(stacked[1], alone)  # the same mask, the same scale
    kept = alone != 0
    ratio = alone[kept].float() / x[1][kept].float()
    assert (ratio - 1 / 0.9).abs().max() < 2**-8  # within bf16 rounding of 1/0.9, not 1/0.898


def test_the_logit_scale_cap_passes_no_gradient_as_a_jam_alone() -> None:
    """At the cap itself `clamp(max=)` passes no gradient; `torch.minimum` passed half."""
    capped = JAMConfig(d_image=4, d_text=4, hidden=(8,), latent=4, logit_scale=100.0,
                       learn_logit_scale=True, max_logit_scale=100.0)  # fmt: skip
    below = dataclasses.replace(capped, logit_scale=20.0)
    members = [JAM(capped), JAM(below)]
    population = Population.from_members(members)
    population.logit_scale().sum().backward()
    grad = population.params["log_logit_scale"].grad
    for m, jam in enumerate(members):
        jam.logit_scale().backward()
        assert grad[m] == jam.log_logit_scale.grad, m
    assert grad.tolist() == [0.0, pytest.approx(20.0)]


BY_MSE = dict(best_metric="val/recon_mse", best_mode="min")


def _loop_population(tcfgs: list[TrainConfig], train: Pairs) -> Population:
    members = build_members(tcfgs, [WIDTHS[0]] * len(tcfgs))
    for model in members:
        fit_global_input_stats(model, train.image, train.text)
    return Population.from_members(members)


class _Diverging(_Batches):
    """Batches that first set a member's weights to `value` (NaN; or huge but finite, so that
    only its latents overflow) at given steps (step -> member)."""

    def __init__(
        self, data: Pairs, population: Population, at: dict[int, int], value: float
    ) -> None:
        super().__init__(data)
        self.population, self.at, self.value = population, at, value

    def get(self, step: int) -> tuple[torch.Tensor, ...]:
        if step in self.at:
            with torch.no_grad():
                for param in self.population.params.values():
                    param[self.at[step]] = self.value
        return super().get(step)


def test_a_diverged_member_stops_while_the_others_train_on(tmp_path) -> None:
    """Scoring a member with NaN weights raised, failing every member; now it is frozen as
    diverged, with its best weights (if any) exported, and the others train as without it."""
    from raysys.sweep.tune import DIVERGED, unscored_note

    cfg = Config()
    cfg.train = _tcfg(dict(eval_every=2) | BY_MSE)
    tcfgs = [_tcfg(dict(lr=1e-2, seed=s) | BY_MSE) for s in range(3)]
    train, val = _data(96, seed=0)[0], _data(40, seed=1)[0]

    def run(
        ids: str, diverge: dict[int, int], value: float = float("nan")
    ) -> tuple[Population, list[Member], list[dict]]:
        population = _loop_population([tcfgs["abc".index(i)] for i in ids], train)
        trainer = PopulationTrainer(population, [tcfgs["abc".index(i)] for i in ids], 6)
        progress = PopulationProgress([Member(i) for i in ids], best=BestWeights(population))
        reports: list[dict] = []

        def report(summary: dict, ckpt) -> None:
            reports.append(summary)
            if summary["step"] == 6:
                export_members(ckpt, [tmp_path / ids / i for i in ids])

        batches = _Diverging(train, population, diverge, value)
        run_population(cfg, trainer, batches, Validation([val], [0] * len(ids)), progress, 4,
                       torch.device("cpu"), report)  # fmt: skip
        assert trainer.step == 6 and [r["step"] for r in reports] == [2, 4, 6]
        return population, progress.members, reports

    # b diverges before its first step, c after its first validation (step 2).
    population, (a, b, c), reports = run("abc", {0: 1, 3: 2})
    assert (a.stopped, b.stopped, c.stopped) == ("", "diverged", "diverged")
    assert (b.stopped_step, b.best) == (2, None)
    assert (c.stopped_step, c.best_step) == (4, 2)
    assert "b/val/recon_mse" not in reports[0] and "c/val/recon_mse" not in reports[1]
    assert [r["members/active"] for r in reports] == [2, 1, 1]
    # a trains exactly as in a population without them.
    alone, (a_alone,), _ = run("a", {})
    assert a.best == pytest.approx(a_alone.best)
    for name, value in alone.member(0).state_dict().items():
        torch.testing.assert_close(population.member(0).state_dict()[name], value, msg=name)
    # b has no finite weights to export; c exports its best (finite) weights, unscored.
    assert not (tmp_path / "abc" / "b").exists()
    exported = JAM.load(tmp_path / "abc" / "c").state_dict()
    assert all(bool(torch.isfinite(v).all()) for v in exported.values())
    assert unscored_note("t-a", a) is None
    key, note = unscored_note("t-b", b)
    assert key == DIVERGED and note.startswith("t-b diverged at step 2") and "no model" in note
    assert "best model, of step 2, exported unscored" in unscored_note("t-c", c)[1]
    # Finite weights whose latents overflow (scoring raised on them too) diverge alike; a
    # training step would turn them to NaN first, so the validation is called on them.
    population = _loop_population(tcfgs[:2], train)
    trainer = PopulationTrainer(population, tcfgs[:2], 6)
    with torch.no_grad():
        population.params["image__encoder__0__linear__weight"][1] = 1e30
    progress = PopulationProgress([Member("a"), Member("b")], best=BestWeights(population))
    summary = {"train/samples_per_s": 1.0}
    _validate_and_report(cfg, trainer, Validation([val], [0, 0]), progress, summary, None,
                         lambda *_: None, None, torch.device("cpu"))  # fmt: skip
    (a, b) = progress.members
    assert (a.stopped, a.validations, b.stopped, b.validations) == ("", 1, "diverged", 0)
    assert trainer.active.tolist() == [True, False]


class _NoBatches:
    def get(self, step: int) -> tuple[torch.Tensor, ...]:
        raise AssertionError(f"a population with no active member read step {step}")


def test_a_population_whose_members_all_stopped_resumes_to_nothing(tmp_path) -> None:
    """Its last checkpoint (final) says no member is active, and a resume trains no step."""

    cfg = Config()
    cfg.train = _tcfg(dict(eval_every=2) | BY_MSE)
    # Never improve: both stop at their second validation, step 4 of 8.
    tcfgs = [_tcfg(dict(lr=1e-12, seed=s, early_stop_patience=1) | BY_MSE) for s in (0, 1)]
    train, val = _data(96, seed=0)[0], _data(40, seed=1)[0]
    population = _loop_population(tcfgs, train)
    trainer = PopulationTrainer(population, tcfgs, 8)
    progress = PopulationProgress([Member("a"), Member("b")], best=BestWeights(population))
    saved = tmp_path / "ckpt"

    def report(summary: dict, ckpt) -> None:
        shutil.rmtree(saved, ignore_errors=True)
        shutil.copytree(ckpt, saved)

    run_population(cfg, trainer, _Batches(train), Validation([val], [0, 0]), progress, 4,
                   torch.device("cpu"), report)  # fmt: skip
    assert trainer.step == 4 and [m.stopped_step for m in progress.members] == [4, 4]
    again = PopulationTrainer(Population(population.cfgs), tcfgs, 8)
    resumed = load_population(saved, again, torch.device("cpu"))
    assert again.step == 4 and again.active.tolist() == [False, False]
    reports: list[dict] = []
    run_population(cfg, again, _NoBatches(), Validation([val], [0, 0]), resumed, 4,
                   torch.device("cpu"), lambda summary, ckpt: reports.append(summary))  # fmt: skip
    assert again.step == 4 and reports == []
