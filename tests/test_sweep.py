"""The sweep's axes, trial plan and packing: pure functions, no Ray (the end-to-end sweep on a
real local Ray, its report and its resume are in test_sweep_ray.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from raysys import config
from raysys.errors import ConfigError
from raysys.runtime import Resources
from raysys.sweep.plan import (
    LayerPair,
    Prepared,
    layer_pairs,
    model_pairs,
    packing,
    param_grid,
    plan_trials,
    swept_values,
    trial_config,
)


def _cfg(*overrides: str) -> config.Config:
    return config.load(None, list(overrides))


def test_model_pairs_accept_plus_strings_lists_and_mappings(tmp_path) -> None:
    assert model_pairs(_cfg()) == [("efficientnet-lite0", "minilm-l6")]
    cfg = _cfg("sweep.models=efficientnet-lite0+minilm-l6,hf:facebook/dinov2-small+minilm-l6")
    assert model_pairs(cfg) == [
        ("efficientnet-lite0", "minilm-l6"),
        ("hf:facebook/dinov2-small", "minilm-l6"),
    ]
    path = tmp_path / "sweep.yaml"
    path.write_text(
        "sweep:\n  models:\n    - [open_clip:ViT-B-32:openai, hf:Qwen/Qwen2-0.5B]\n"
        "    - {vision: efficientnet-lite2, text: minilm-l6}\n"
    )
    assert model_pairs(config.load(path)) == [
        ("open_clip:ViT-B-32:openai", "hf:Qwen/Qwen2-0.5B"),
        ("efficientnet-lite2", "minilm-l6"),
    ]


@pytest.mark.parametrize(
    ("models", "match"),
    [("efficientnet-lite0", "not a \\(vision, text\\) pair"), ("a+b,a+b", "twice")],
)
def test_bad_model_pairs_are_refused(models: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        model_pairs(_cfg(f"sweep.models={models}"))


def test_layer_pairs_explicit_grid_and_default() -> None:
    cfg = _cfg("sweep.layers=0.5:0.5,-1:6,8:1.0")
    assert layer_pairs(cfg) == [(0.5, 0.5), (-1, 6), (8, 1.0)]
    assert isinstance(layer_pairs(cfg)[1][0], int) and isinstance(layer_pairs(cfg)[0][0], float)
    grid = _cfg("sweep.vision_depths=0.5,1.0", "sweep.text_depths=0.25,1.0")
    assert layer_pairs(grid) == [(0.5, 0.25), (0.5, 1.0), (1.0, 0.25), (1.0, 1.0)]
    assert layer_pairs(_cfg("train.vision_layer=3")) == [(3, -1)]


def test_a_single_index_pair_override_is_not_read_as_base_60() -> None:
    # YAML 1.1 reads 8:6 as 486; an override keeps what the user typed.
    assert layer_pairs(_cfg("sweep.layers=8:6")) == [(8, 6)]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["sweep.layers=0.5"], "not a V:T pair"),
        (["sweep.layers=1.5:1.0"], "relative depth in \\(0, 1\\]"),
        (["sweep.layers=a:1"], "layer index"),
        (["sweep.layers=1:1,1:1"], "repeat"),
        (["sweep.vision_depths=0.5"], "both"),
    ],
)
def test_bad_layer_pairs_are_refused(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        layer_pairs(_cfg(*overrides))


def test_unquoted_yaml_index_pair_gets_a_clear_error(tmp_path) -> None:
    path = tmp_path / "sweep.yaml"
    path.write_text("sweep:\n  layers:\n    - 8:6\n")
    with pytest.raises(ConfigError, match="base 60"):
        layer_pairs(config.load(path))


def test_params_grid_varies_spread_knobs_only_for_spread() -> None:
    cfg = _cfg("sweep.params.train.lr=[0.001,0.0003]", "sweep.params.train.alpha=[0.25,0.75]")
    assert cfg.sweep.params == {"train.lr": [0.001, 0.0003], "train.alpha": [0.25, 0.75]}
    assert param_grid(cfg, "con") == [{"train.lr": 0.001}, {"train.lr": 0.0003}]
    spread = param_grid(cfg, "spread")
    assert len(spread) == 4 and {"train.lr": 0.0003, "train.alpha": 0.75} in spread


def test_swept_values_are_read_as_the_config_holds_them() -> None:
    """YAML gives `1e3` as text: the batch-size check compares numbers, not strings."""
    assert swept_values("train.batch_size", ["64", "1e3", 16]) == [64, 1000, 16]
    with pytest.raises(ConfigError, match="whole number"):
        swept_values("train.batch_size", [2.5])


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("sweep.params.train.objective=[con]", "axes of their own"),
        ("sweep.params.corpus.size=[100]", "train.\\* hyper-parameter"),
        ("sweep.params.train.nope=[1]", "unknown config key"),
        ("sweep.params.train.epochs=[two]", "expects a number"),
        ("sweep.params.train.lr=0.1", "non-empty list"),
        ("sweep.params.train.lr=[0.001,1e-3]", r"repeats 0.001: each value trains once"),
        ("sweep.params.train.hidden=[[64],[64]]", r"repeats \[64\]"),
    ],
)
def test_bad_params_fail_before_any_trial(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        param_grid(_cfg(override), "con")


def _prepared(vision: str, params: int, depths: list[float]) -> Prepared:
    layers = [
        LayerPair(
            vision_layer=int(d * 16),
            text_layer=int(d * 6),
            vision_depth=d,
            text_depth=d,
            source={},
            raw={"mutual_knn": 0.5},
        )
        for d in depths
    ]
    return Prepared(vision, "minilm-l6", params, 22_700_000, layers)


def test_plan_is_the_full_product_with_unique_ids() -> None:
    cfg = _cfg("objectives=con,negcon,spread", "sweep.params.train.k=[0,2]")
    prepared = [_prepared("efficientnet-lite0", 4_600_000, [0.5, 1.0])]
    prepared.append(_prepared("efficientnet-lite1", 5_400_000, [0.5, 1.0]))
    trials = plan_trials(cfg, prepared)
    # con and negcon: 2 models x 2 layers; spread also x 2 values of k.
    assert len(trials) == 4 + 4 + 8
    assert len({t.id for t in trials}) == len(trials)
    assert {t.objective for t in trials} == {"con", "negcon", "spread"}
    spread = [t for t in trials if t.objective == "spread"]
    assert sorted(t.params["train.k"] for t in spread) == [0] * 4 + [2] * 4
    assert all(t.params == {} for t in trials if t.objective != "spread")
    assert trials[0].id.startswith("t000-con-efficientnet-lite0-minilm-l6-v8-t3")


def test_random_search_draws_a_seeded_subset() -> None:
    prepared = [_prepared("efficientnet-lite0", 4_600_000, [0.25, 0.5, 0.75, 1.0])]
    draw = ["sweep.search=random", "sweep.num_samples=5"]
    first = plan_trials(_cfg(*draw), prepared)
    again = plan_trials(_cfg(*draw), prepared)
    other = plan_trials(_cfg(*draw, "sweep.seed=1"), prepared)
    assert len(first) == 5 and first == again
    keys = [(t.objective, t.layer.vision_layer) for t in first]
    assert len(set(keys)) == 5  # without replacement
    assert keys != [(t.objective, t.layer.vision_layer) for t in other]
    with pytest.raises(ConfigError, match="num_samples"):
        plan_trials(_cfg("sweep.search=random"), prepared)


def test_trial_config_applies_the_trial_and_sweep_settings() -> None:
    base = _cfg("sweep.workers_per_trial=2", "train.batch_size=64", "sweep.keep_checkpoints=2")
    cfg = trial_config(base, "spread", {"train.alpha": 0.25, "train.lr": 0.01})
    assert (cfg.train.objective, cfg.train.alpha, cfg.train.lr) == ("spread", 0.25, 0.01)
    assert cfg.train.num_workers == 2 and cfg.train.keep_checkpoints == 2
    assert base.train.objective == "con"  # the base is not modified


def test_packing_by_cores_and_by_gpu_fractions() -> None:
    cpu = packing(_cfg(), Resources(cpus=2, gpus=0))
    assert (cpu.concurrent, cpu.workers, cpu.cpus_per_worker, cpu.gpus_per_worker) == (2, 1, 1, 0)
    assert packing(_cfg("sweep.max_concurrent=1"), Resources(cpus=2, gpus=0)).concurrent == 1
    assert packing(_cfg(), Resources(cpus=16, gpus=0)).concurrent == 16
    # 8 GPUs, 4 trials each, but 16 CPUs at 1 per worker: the CPUs bound it.
    gpu = packing(_cfg("train.use_gpu=true"), Resources(cpus=16, gpus=8))
    assert (gpu.concurrent, gpu.gpus_per_worker) == (16, 0.25)
    half = _cfg("train.use_gpu=true", "train.cpus_per_worker=0.5")
    assert packing(half, Resources(cpus=64, gpus=8)).concurrent == 32  # 8 GPUs x 4 trials
    # Two-worker trials get whole GPUs (trials_per_gpu=1): ranks never share a GPU.
    whole = _cfg("train.use_gpu=true", "sweep.workers_per_trial=2", "sweep.trials_per_gpu=1")
    assert packing(whole, Resources(cpus=64, gpus=8)).gpus_per_worker == 1.0
    assert packing(whole, Resources(cpus=64, gpus=8)).concurrent == 4
    with pytest.raises(ConfigError, match="lower sweep.workers_per_trial"):
        packing(_cfg("sweep.workers_per_trial=4"), Resources(cpus=2, gpus=0))
    with pytest.raises(ConfigError, match="no GPU"):
        packing(_cfg("train.use_gpu=true"), Resources(cpus=2, gpus=0))


def test_packing_refuses_ranks_of_one_trial_on_one_gpu() -> None:
    """Ray may put two quarter-GPU workers of one trial on the same GPU, which NCCL refuses
    ("Duplicate GPU detected"): packing says so instead, with the settings that avoid it."""
    shared = _cfg("train.use_gpu=true", "sweep.workers_per_trial=2", "sweep.trials_per_gpu=4")
    with pytest.raises(ConfigError, match=r"0.25 of a GPU.*sweep.trials_per_gpu=1"):
        packing(shared, Resources(cpus=64, gpus=8))
    cpu = _cfg("sweep.workers_per_trial=2", "sweep.trials_per_gpu=4")  # no GPU to share
    assert packing(cpu, Resources(cpus=4, gpus=0)).concurrent == 2


def test_an_autoscaling_cluster_runs_max_concurrent_trials(monkeypatch) -> None:
    """On a joined cluster, `sweep.max_concurrent` is taken as asked (waiting trials make the
    autoscaler add nodes); without it, or on a private Ray, what is up now bounds it."""
    from raysys import runtime

    up_now = Resources(cpus=8, gpus=1)  # one GPU node: 4 trials of a quarter GPU
    monkeypatch.setattr(runtime, "joined_cluster", lambda: True)
    monkeypatch.setattr(runtime, "ensure_resources", lambda *_a, **_k: up_now)
    gpu = ("train.use_gpu=true",)
    assert packing(_cfg(*gpu, "sweep.max_concurrent=16"), up_now).concurrent == 16
    assert packing(_cfg(*gpu), up_now).concurrent == 4
    monkeypatch.setattr(runtime, "joined_cluster", lambda: False)
    assert packing(_cfg(*gpu, "sweep.max_concurrent=16"), up_now).concurrent == 4


def test_yaml_list_layer_pairs(tmp_path) -> None:
    path = tmp_path / "sweep.yaml"
    path.write_text("sweep:\n  layers:\n    - [8, 6]\n    - [0.5, 1.0]\n    - '-1:-1'\n")
    assert layer_pairs(config.load(path)) == [(8, 6), (0.5, 1.0), (-1, -1)]


def test_a_narrow_extract_spec_is_widened_to_the_swept_layers() -> None:
    from raysys.sweep.prepare import needed_layers as _needed_layers

    assert _needed_layers("all", [3, 8], 17) == "all"
    assert _needed_layers("-1", [8], 17) == "8,16"  # -1 of 17 hidden states is 16
    assert _needed_layers("0.5,1.0", [8, 16], 17) == "8,16"
    assert _needed_layers("0,4", [11], 22) == "0,4,11"


def test_an_index_and_a_depth_are_different_layers_but_the_same_layer_twice_is_refused() -> None:
    from raysys.sweep.plan import resolve_layers

    assert layer_pairs(_cfg("sweep.layers=1:1,1.0:1.0")) == [(1, 1), (1.0, 1.0)]
    [(vision, text, _, ids)] = resolve_layers(_cfg("sweep.layers=1:1,1.0:1.0"))
    assert (vision, text, ids) == ("efficientnet-lite0", "minilm-l6", [(1, 1), (16, 6)])
    with pytest.raises(ConfigError, match="name the same layers"):
        resolve_layers(_cfg("sweep.layers=-1:-1,1.0:1.0"))  # both are the last layers


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["sweep.params.train.alpha=[0.5,1.5]", "objectives=spread"], "alpha=1.5"),
        (["sweep.workers_per_trial=3"], "divide evenly"),
        (["sweep.params.train.use_gpu=[true,false]"], "set once for the whole sweep"),
        (["sweep.search=random"], "num_samples"),
        (["sweep.num_samples=3"], "grid runs every trial"),  # it quietly sampled 3
        (["train.best_metric=val/nope"], "not a validation metric"),
        (["train.use_gpu=true", "sweep.workers_per_trial=2"], "Duplicate GPU detected"),
    ],
)
def test_the_plan_is_checked_before_any_extraction(overrides: list[str], match: str) -> None:
    from raysys.sweep.plan import check_plan

    with pytest.raises(ConfigError, match=match):
        check_plan(_cfg(*overrides))


def test_trial_ids_are_safe_in_paths_and_keys() -> None:
    cfg = _cfg("objectives=con", "sweep.params.train.hidden=[[512,512],[256]]")
    trials = plan_trials(cfg, [_prepared("hf:org/vit-base", 86_000_000, [1.0])])
    assert [t.id.rsplit("-hidden", 1)[1] for t in trials] == ["512-512", "256"]
    for trial in trials:
        assert all(c.isalnum() or c in ".-" for c in trial.id), trial.id


def test_a_sweep_with_failed_or_unfinished_trials_does_not_exit_cleanly() -> None:
    """A job that lost trials must not report success: failed trials are an error, stopped
    ones an interruption, each naming the command that reruns them."""
    from raysys.commands import _stop_if_unfinished
    from raysys.errors import Interrupted, RaysysError
    from raysys.rundir import RunDir
    from raysys.sweep.tune import Outcome

    run = RunDir(Path("/tmp/raysys-sweep"), "s3://bucket/sweep")
    _stop_if_unfinished(run, Outcome(rows=[{}, {}]), 2)  # all finished: returns
    with pytest.raises(
        RaysysError, match=r"1 of 3 trials failed \(t001;.*resume=s3://bucket/sweep"
    ):
        _stop_if_unfinished(run, Outcome(failed=["t001"]), 3)
    with pytest.raises(Interrupted, match="2 of 3 trials unfinished.*resume=s3://bucket/sweep"):
        _stop_if_unfinished(run, Outcome(unfinished=2), 3)
    # A failed population of three is three failed trials, each named.
    from raysys.sweep.populations import PopulationPlan

    lost = Outcome()
    trials = plan_trials(_cfg("objectives=con,negcon,spread"), [_prepared("hf:o/v", 1, [1.0])])
    lost.failed_population("p000-n3", "MemoryError", [PopulationPlan("p000-n3", trials, 3)])
    assert lost.failed == [t.id for t in trials]
    assert "its 3 trial(s): " + ", ".join(lost.failed) in lost.problems[0]
    with pytest.raises(RaysysError, match=r"3 of 4 trials failed"):
        _stop_if_unfinished(run, lost, 4)


def test_a_trial_reserves_its_packed_share_and_raysys_train_whole_gpus() -> None:
    """What each Train worker reserves, as Ray Train fills in a scaling plan: the memory
    budget counts workers of that shape on a node."""
    from raysys.sweep.plan import Packing
    from raysys.sweep.tune import _scaling
    from raysys.train.driver import worker_bundle

    plan, threads = _scaling(Packing(8, 1, 1.0, 0.25, 1))
    assert worker_bundle(plan) == {"CPU": 1.0, "GPU": 0.25} and threads == 1
    assert worker_bundle(_scaling(Packing(2, 2, 0.5, 0.0, 1))[0]) == {"CPU": 0.5}


def test_a_one_worker_population_trains_in_its_trial_which_holds_the_workers_share() -> None:
    """Trained in the Tune trial's process, the trial itself reserves the worker's CPU and
    GPU share; a population of two workers (or with `sweep.train_in_trial=false`) has a Ray
    Train run whose workers hold them, and its trial reserves no core."""
    from raysys.sweep.tune import DRIVER_MEMORY, trial_resources

    res = Resources(cpus=8, gpus=1)
    gpu = packing(_cfg("train.use_gpu=true"), res)
    assert gpu.in_trial
    assert trial_resources(gpu) == {"CPU": 1.0, "GPU": 0.25, "memory": DRIVER_MEMORY}
    for overrides in (["sweep.workers_per_trial=2"], ["sweep.train_in_trial=false"]):
        p = packing(_cfg(*overrides), res)
        assert not p.in_trial
        assert trial_resources(p) == {"CPU": 0, "memory": DRIVER_MEMORY}


def test_a_depth_asked_for_is_kept_beside_the_layer_it_lands_on() -> None:
    """Half depth of EfficientNet-Lite1's 22 hidden states is layer 11 (0.52 of the way): the
    row says 0.5, as asked, so lite0 and lite1 share the axis; an index keeps its fraction."""
    from raysys.sweep.plan import depth_of, resolve_layers

    cfg = _cfg("sweep.models=efficientnet-lite1+minilm-l6", "sweep.layers=0.5:0.5,8:-1")
    [(_, _, full, ids)] = resolve_layers(cfg)
    assert ids == [(11, 3), (8, 6)] and len(full["image"].layer_ids) == 22
    sides = layer_pairs(cfg)  # prepare zips these with the ids, in the same order
    depths = [
        (depth_of(v, vid, 22), depth_of(t, tid, 7))
        for (v, t), (vid, tid) in zip(sides, ids, strict=True)
    ]
    assert depths == [(0.5, 0.5), (round(8 / 21, 4), 1.0)]


def test_a_trial_stored_with_realised_depths_still_loads_and_reports_the_asked_one() -> None:
    """Tune restores a stopped sweep's stored trials: their layers hold the realised 0.52.
    Their ids name layer indices, the same under the new plan, so resume finds them, and
    `with_planned_depths` gives their rows the depth the plan asked for."""
    from raysys.sweep.plan import Trial, trial_row, with_planned_depths

    cfg = _cfg("objectives=con")
    [planned] = plan_trials(cfg, [_prepared("efficientnet-lite1", 5_400_000, [0.5])])
    old = planned.to_dict()
    old["layer"] |= {"vision_depth": 0.5238, "text_depth": 0.5}
    stored = Trial.from_dict(old)
    assert stored.id == planned.id and stored.layer.vision_depth == 0.5238
    row = trial_row(stored, {"i2t_r1": 0.5}, 1.0, {})
    [fixed] = with_planned_depths([row], [planned])
    assert fixed["vision_depth"] == 0.5 and fixed["vision_layer"] == planned.layer.vision_layer
    raw = {"trial": "", "vision_depth": 0.5}
    assert with_planned_depths([raw], [planned]) == [raw]


def test_seeds_repeat_every_trial_over_train_seed() -> None:
    prepared = [_prepared("efficientnet-lite0", 4_600_000, [0.5, 1.0])]
    one = plan_trials(_cfg("objectives=con,spread"), prepared)
    cfg = _cfg("objectives=con,spread", "sweep.seeds=3", "train.seed=5")
    trials = plan_trials(cfg, prepared)
    assert len(trials) == 3 * len(one) == 12 and len({t.id for t in trials}) == 12
    assert sorted(t.params["train.seed"] for t in trials) == [5] * 4 + [6] * 4 + [7] * 4
    # One seed plans what it did before seeds existed: same ids, no seed param.
    assert all("train.seed" not in t.params and "seed" not in t.id for t in one)
    assert [t.id.rsplit("-seed", 1)[0][4:] for t in trials[:3]] == [one[0].id[4:]] * 3
    assert trials[1].id.endswith("-seed6")
    # The seed reaches the trial's config and its row, as a swept param's value does.
    assert trial_config(cfg, "con", trials[1].params).train.seed == 6
    from raysys.sweep.plan import trial_row

    row = trial_row(trials[1], {"i2t_r1": 0.5}, 1.0, {})
    assert row["train.seed"] == 6


def test_a_random_sample_runs_every_drawn_configuration_with_every_seed() -> None:
    prepared = [_prepared("efficientnet-lite0", 4_600_000, [0.25, 0.5, 0.75, 1.0])]
    draw = ["sweep.search=random", "sweep.num_samples=4", "sweep.seeds=2"]
    trials = plan_trials(_cfg(*draw), prepared)
    configs = {(t.objective, t.layer.vision_layer) for t in trials}
    assert len(trials) == 8 and len(configs) == 4
    for objective, layer in configs:
        seeds = [
            t.params["train.seed"]
            for t in trials
            if (t.objective, t.layer.vision_layer) == (objective, layer)
        ]
        assert seeds == [0, 1]


def test_sweeping_train_seed_beside_seeds_is_refused() -> None:
    from raysys.sweep.plan import check_plan

    with pytest.raises(ConfigError, match="sweep.seeds=3 repeats every trial over train.seed"):
        check_plan(_cfg("sweep.seeds=3", "sweep.params.train.seed=[0,1]"))
    assert len(param_grid(_cfg("sweep.params.train.seed=[0,1]"), "con")) == 2  # one seed: fine


def test_members_scored_side_by_side_score_as_one_after_another(tmp_path) -> None:
    """`score_members` scores a population's members two at a time on one torch thread each:
    the scores are those of scoring them one by one, and torch's threads are given back."""
    import torch
    from test_evaluate import _pairs

    from raysys.evaluate import score_model
    from raysys.jam import JAM, JAMConfig
    from raysys.sweep.tune import score_members

    cfg = config.load(None, [])
    pairs = _pairs()
    dirs = []
    for seed in range(3):
        torch.manual_seed(seed)
        JAM(JAMConfig(d_image=12, d_text=12, hidden=(16,), latent=10)).save(tmp_path / str(seed))
        dirs.append(tmp_path / str(seed))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = [score_model(JAM.load(d), pairs, cfg.eval) for d in dirs]
    finally:
        torch.set_num_threads(threads)
    together = score_members([(d, pairs, None) for d in dirs], cfg, threads=2)
    assert torch.get_num_threads() == threads
    assert together == alone
    assert together[0] != together[1]  # the members differ, so the order is checked too


def test_a_resumed_grid_sweep_with_num_samples_keeps_its_sample() -> None:
    """Started by a version that accepted grid + num_samples, it resumes as it started: a
    resume cannot change its search, so refusing it would strand the sweep."""
    from raysys.sweep.plan import check_plan

    check_plan(_cfg("sweep.num_samples=3"), new=False)
