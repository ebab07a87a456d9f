"""Grouping a sweep's trials into populations, their size, and ASHA's rungs (no Ray)."""

from __future__ import annotations

import pytest
from test_sweep import _cfg, _prepared

from raysys.sweep.asha import Rungs
from raysys.sweep.plan import Packing, plan_trials
from raysys.sweep.populations import group_trials, member_bytes, population_size

CPU = Packing(concurrent=2, workers=1, cpus_per_worker=1.0, gpus_per_worker=0.0, threads=1)
GPU = Packing(concurrent=4, workers=1, cpus_per_worker=1.0, gpus_per_worker=0.25, threads=2)


def _trials(*overrides: str):
    cfg = _cfg("objectives=con,negcon,spread", *overrides)
    prepared = [_prepared("efficientnet-lite0", 4_600_000, [0.5, 1.0])]
    prepared.append(_prepared("efficientnet-lite1", 5_400_000, [0.5, 1.0]))
    return cfg, plan_trials(cfg, prepared)


def test_members_share_a_model_pair_and_the_shared_settings() -> None:
    cfg, trials = _trials(
        "sweep.params.train.batch_size=[16,32]", "sweep.params.train.lr=[1e-3,3e-4]"
    )
    populations = group_trials(cfg, trials, size=100)
    # batch size is shared (two groups per model pair); lr, objective and layers are members'
    assert len(populations) == 2 * 2
    assert sum(len(p.trials) for p in populations) == len(trials) == 48
    for p in populations:
        assert len({t.vision for t in p.trials}) == 1
        assert len({t.params["train.batch_size"] for t in p.trials}) == 1
        assert len({t.objective for t in p.trials}) == 3
        assert len({t.layer.vision_layer for t in p.trials}) == 2
    assert len({p.id for p in populations}) == len(populations)
    assert group_trials(cfg, trials, size=100) == populations  # resume plans the same


def test_groups_are_cut_evenly_at_the_size() -> None:
    cfg, trials = _trials()  # 12 trials, 6 per model pair
    sizes = [len(p.trials) for p in group_trials(cfg, trials, size=4)]
    assert sizes == [3, 3, 3, 3]
    assert [len(p.trials) for p in group_trials(cfg, trials, size=1)] == [1] * 12


def test_a_streamed_split_groups_by_layer_pair() -> None:
    cfg, trials = _trials("train.data_on_device=stream")
    populations = group_trials(cfg, trials, size=100)
    assert len(populations) == 4
    assert all(len({t.layer.vision_layer for t in p.trials}) == 1 for p in populations)


def test_population_size_fills_the_slots_and_the_gpu_memory() -> None:
    cfg, trials = _trials()
    assert population_size(cfg, trials, CPU) == 6  # 12 trials over 2 slots
    big = member_bytes(cfg, 1536, 4096)
    assert big > member_bytes(cfg, 256, 384)
    # 80 GiB x a quarter GPU x 0.8 over a member's bound
    expect = min(3, int(80 * 2**30 * 0.25 * 0.8 // big))
    assert population_size(cfg, trials, GPU, [(1536, 4096)]) == expect
    cfg, _ = _trials("sweep.population=5")
    assert population_size(cfg, trials, CPU) == 5


def test_rungs_stop_a_member_below_the_cutoff() -> None:
    rungs = Rungs(grace=1, reduction_factor=2)
    assert rungs.milestones[:4] == [1, 2, 4, 8]
    assert not rungs.stop("a", 1, 0.5)  # the first at a rung always continues
    assert rungs.stop("b", 1, 0.1)  # below the median of [0.5]
    assert not rungs.stop("c", 1, 0.9)
    assert not rungs.stop("a", 1, 0.0)  # a rung counts once per member
    assert not rungs.stop("a", 2, 0.7) and rungs.stop("c", 3, 0.2)  # c at rung 2: below 0.7
    with pytest.raises(ZeroDivisionError):
        Rungs(grace=1, reduction_factor=1)


def test_fewer_populations_than_slots_widen_each() -> None:
    from raysys.sweep.populations import widened

    one = widened(CPU, 1)  # one population on two one-core slots: it takes both cores
    assert (one.concurrent, one.cpus_per_worker, one.threads) == (1, 2.0, 2)
    assert widened(CPU, 2) == CPU and widened(CPU, 5) == CPU
    gpu = widened(GPU, 1)  # four quarter-GPU slots: one population gets the whole GPU
    assert (gpu.concurrent, gpu.gpus_per_worker) == (1, 1.0)
    assert widened(GPU, 2).gpus_per_worker == 0.5
    # Slots that span several nodes: 16 one-core slots on four 4-core nodes, grown for 2
    # populations, would ask 8 cores of one node and wait for ever.
    assert widened(CPU, 1, several_nodes=True) == CPU


def test_a_plan_remembers_the_size_it_was_grouped_by() -> None:
    """A resume regroups by the saved size: the default size follows the slots, which the
    machine that resumes may not have."""
    from raysys.sweep.populations import PopulationPlan

    cfg, trials = _trials()
    plans = group_trials(cfg, trials, size=4)
    again = [PopulationPlan.from_dict(p.to_dict()) for p in plans]
    assert again == plans and {p.size for p in again} == {4}
    assert group_trials(cfg, trials, again[0].size) == plans


def test_each_seed_trains_in_populations_of_its_own() -> None:
    """The population's batch plan is seeded by its config (its first member's seed), so a
    member of another seed would train on that seed's batches: seeds are never grouped."""
    cfg, trials = _trials("sweep.seeds=3")  # 12 trials, each repeated with seeds 0, 1, 2
    populations = group_trials(cfg, trials, size=100)
    seeds = [{t.params["train.seed"] for t in p.trials} for p in populations]
    assert all(len(s) == 1 for s in seeds)
    assert sorted(s.pop() for s in seeds) == [0, 0, 1, 1, 2, 2]  # per model pair and seed
    assert sum(len(p.trials) for p in populations) == len(trials) == 36
