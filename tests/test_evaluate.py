"""score_model and score_raw: the scores, each with an honest interval over the right test items
(unique images for image->text and zero-shot, pairs resampled by image for the rest, halves of
the images for the set-level alignment metrics), hard negatives per kind, zero-shot accuracy,
and the outlier clamp before the alignment metrics."""

from __future__ import annotations

import dataclasses
import json
import sys
import warnings

import numpy as np
import pytest
import torch

from raysys import config, evaluate, metrics
from raysys.data.pairs import Pairs
from raysys.errors import ConfigError, CorpusError
from raysys.evaluate import (
    alignment,
    alignment_metrics,
    capped_val,
    clamped,
    encode,
    half_samples,
    metric_rows,
    sample_rows,
    score_model,
    score_raw,
    val_rows,
)
from raysys.jam import JAM, JAMConfig
from raysys.report.schema import (
    ALIGNMENT,
    extra_metric_columns,
    interval_columns,
    interval_names,
    metric_names,
)

KS = (1, 5, 10)
SOURCES = ["exact:colour", "exact:shape", "generated:swap_colours", "none", "corpus"]


def _pairs(n_images: int = 40, captions: int = 3, seed: int = 0) -> Pairs:
    """`captions` captions per image, each a noisy copy of its image's embedding, and hard
    negatives noisier still: through `_model` retrieval is neither hopeless nor perfect."""
    rng = np.random.default_rng(seed)
    image_ids = np.repeat([f"img{i:03d}" for i in range(n_images)], captions)
    image = np.repeat(rng.standard_normal((n_images, 12)), captions, axis=0)
    text = image + 0.8 * rng.standard_normal(image.shape)
    negative = image + 1.2 * rng.standard_normal(image.shape)
    pair_ids = np.array([f"p{i}" for i in range(len(image_ids))])
    arrays = (a.astype(np.float16) for a in (image, text, negative))
    return Pairs(pair_ids, image_ids, pair_ids, *arrays)


def _model() -> JAM:
    """An untrained JAM whose text encoder is a copy of its image encoder: a shared space."""
    torch.manual_seed(0)
    model = JAM(JAMConfig(d_image=12, d_text=12, hidden=(16,), latent=10, dropout=0.0))
    model.text.load_state_dict(model.image.state_dict())
    return model


def test_score_model_adds_intervals_around_unchanged_scores() -> None:
    pairs, model, cfg = _pairs(), _model(), config.EvalConfig()
    scores = score_model(model, pairs, cfg)
    fixed = metric_names(KS) + interval_columns(KS)
    assert list(scores)[: len(fixed)] == fixed
    # Every headline metric has an interval now: the set-level ones after the fixed columns.
    intervals = [f"{m}_{e}" for m in ALIGNMENT for e in ("lo", "hi")]
    assert list(scores)[len(fixed) :] == [*intervals, "n_metric_images"]
    assert (scores["n_images"], scores["n_captions"], scores["n_metric_images"]) == (40, 120, 40)
    # The per-item scores, recomputed from the latents by the plain metric functions.
    z = encode(model, pairs)
    first, owner = pairs.image_index()
    want = metrics.retrieval(z["zi"][first], z["zt"], owner, ks=KS)
    want["hardneg_acc"] = metrics.hard_negative_accuracy(z["zi"], z["zt"], z["zn"])
    assert {k: scores[k] for k in want} == want
    assert 0 < scores["i2t_r1"] < 1 and 0 < scores["hardneg_acc"] < 1
    for metric in [n.removesuffix("_lo") for n in interval_names(KS)[::2]] + ALIGNMENT:
        assert scores[f"{metric}_lo"] <= scores[metric] <= scores[f"{metric}_hi"], metric
    assert scores["i2t_r1_lo"] < scores["i2t_r1_hi"]
    plain = score_model(model, pairs, cfg, with_intervals=False)
    assert plain == {k: scores[k] for k in metric_names(KS)}


def _looser(
    boot: tuple[float, float], hits: torch.Tensor, groups: np.ndarray | None, level: float = 0.95
) -> tuple[float, float]:
    """A 0/1 rate's interval: the bootstrap's, widened to the exact one where that is wider
    (`test_one_miss_never_narrows_…` checks the exact one against scipy's beta); any other
    metric's: the bootstrap's."""
    exact = evaluate._exact(hits.double().numpy(), groups, level)
    return boot if exact is None else (min(boot[0], exact[0]), max(boot[1], exact[1]))


def test_each_metric_resamples_its_own_items() -> None:
    """i2t_r1's interval is the bootstrap over the 40 unique images; t2i's and recon_mse's
    (each pair's image + caption error) over the 120 pairs, drawn by image: the cluster
    bootstrap with each caption's image as its group."""
    pairs, model, cfg = _pairs(), _model(), config.EvalConfig(bootstrap=500, interval=0.9)
    scores = score_model(model, pairs, cfg)
    z = encode(model, pairs)
    first, owner = pairs.image_index()
    i2t, t2i = metrics.retrieval_hits(z["zi"][first], z["zt"], owner, ks=KS)
    assert len(i2t) == 40 and len(t2i) == 120

    def interval(values: torch.Tensor, groups: np.ndarray | None = None) -> tuple[float, float]:
        boot = metrics.bootstrap_interval(values.double().numpy(), 500, 0.9, 0, groups=groups)
        return _looser(boot, values, groups, 0.9)

    assert (scores["i2t_r1_lo"], scores["i2t_r1_hi"]) == pytest.approx(interval(i2t[:, 0]))
    assert (scores["t2i_r5_lo"], scores["t2i_r5_hi"]) == pytest.approx(interval(t2i[:, 1], owner))
    n = len(pairs)
    per_pair = (z["sq"][:n] + z["sq"][n:]) / 2  # one batch: image errors, then caption errors
    assert per_pair.mean().item() == pytest.approx(scores["recon_mse"], rel=1e-6)
    want = interval(per_pair, owner)
    assert (scores["recon_mse_lo"], scores["recon_mse_hi"]) == pytest.approx(want)
    assert want != pytest.approx(interval(per_pair))  # not the per-caption bootstrap
    off = config.EvalConfig(bootstrap=0)  # no intervals; the scores do not depend on them
    assert score_model(model, pairs, off) == {k: scores[k] for k in metric_names(KS)}


@pytest.fixture
def one_thread():
    """The reference recomputes 30 halves of tiny matrices: on one torch thread, as
    `evaluate` scores them (torch's pool only adds overhead there)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_set_level_intervals_are_half_samples_of_the_images(one_thread) -> None:
    """The alignment metrics' bounds: min(eval.bootstrap, 50) seeded halves of the unique
    images (one caption each, clamped), deterministic; raw rows get them too."""
    pairs, cfg = _pairs(), config.EvalConfig(bootstrap=30)
    assert half_samples(cfg) == 30 and half_samples(config.EvalConfig()) == 50
    raw = score_raw(pairs, cfg)
    assert list(raw) == [*ALIGNMENT, *(f"{m}_{e}" for m in ALIGNMENT for e in ("lo", "hi"))] + [
        "n_images",
        "n_metric_images",
    ]
    first, _ = pairs.image_index()
    a, b = clamped(pairs.image[first], pairs.text[first], cfg)
    full = alignment(pairs.image[first], pairs.text[first], cfg)
    assert {m: raw[m] for m in ALIGNMENT} == full

    def on_half(rows: np.ndarray) -> list[float]:
        return list(alignment_metrics(a[rows], b[rows], cfg).values())

    lo, hi = metrics.half_sample_interval(on_half, 40, list(full.values()), 30, 0.95, seed=0)
    for j, m in enumerate(ALIGNMENT):
        assert (raw[f"{m}_lo"], raw[f"{m}_hi"]) == pytest.approx((lo[j], hi[j]))
        assert raw[f"{m}_lo"] < raw[m] < raw[f"{m}_hi"]
    assert score_raw(pairs, cfg) == raw
    assert score_raw(pairs, cfg, with_intervals=False) == full
    assert score_raw(pairs, config.EvalConfig(bootstrap=0)) == full
    # 20 images: a half of 10 cannot hold k = 10 neighbours, so no interval at all.
    few = pairs.take(np.flatnonzero(np.isin(pairs.image_ids, np.unique(pairs.image_ids)[:20])))
    assert not any(k.endswith(("_lo", "_hi")) for k in score_raw(few, cfg))
    # Nor when a half cannot hold SVCCA's dimensions: halves of 10 rows, 12-d, dimension 12
    # (the halves would score SVCCA at 9); at 9 the halves and the full sample agree.
    wide = config.EvalConfig(bootstrap=30, knn_k=5, svcca_dim=12)
    assert not any(k.endswith(("_lo", "_hi")) for k in score_raw(few, wide))
    assert "svcca_lo" in score_raw(few, dataclasses.replace(wide, svcca_dim=9))


def test_outlier_clamp_keeps_one_huge_dimension_from_dominating() -> None:
    """Text = a noisy view of the image signal plus one outlier dimension 200 times louder
    and unrelated to it. Unclamped (`outlier_q=1`), the outlier decides every inner product
    and CKA falls to about 0; clamped at the 0.95 quantile, most of the signal is back."""
    rng = np.random.default_rng(3)
    signal = rng.standard_normal((120, 24))
    image = signal + 0.3 * rng.standard_normal(signal.shape)
    text = np.hstack([signal + 0.3 * rng.standard_normal(signal.shape), np.zeros((120, 1))])
    text[:, -1] = 200 * rng.standard_normal(120)
    on = alignment(image, text, config.EvalConfig(outlier_q=0.95))
    off = alignment(image, text, config.EvalConfig(outlier_q=1))
    assert off["cka"] < 0.1 < 0.5 < on["cka"]  # without the outlier column: 0.86
    assert off["unbiased_cka"] < 0.1 < 0.5 < on["unbiased_cka"]
    assert on["mutual_knn"] > 1.5 * off["mutual_knn"]
    # Each is exactly the metrics on (un)clamped inputs.
    clipped = metrics.clamp_outliers(text, 0.95)
    assert on["cka"] == pytest.approx(metrics.cka(metrics.clamp_outliers(image, 0.95), clipped))
    assert off["cka"] == pytest.approx(metrics.cka(image, text))
    assert float(clipped[:, -1].abs().max()) < 3  # the outlier is clipped to a typical value


def _annotated(n_images: int = 40, captions: int = 3) -> Pairs:
    """`_pairs` with negative sources cycling over SOURCES and zero-shot labels: task `side`
    (class `left`/`right` by the sign of the image's first feature) for every image, task
    `even` (`yes`/`no`) only for the first 30 images."""
    pairs = _pairs(n_images, captions)
    pairs.negative_sources = np.array([SOURCES[i % len(SOURCES)] for i in range(len(pairs))])
    labels = []
    for row, image in enumerate(pairs.image):
        number = row // captions
        label = {"side": "left" if image[0] < 0 else "right"}
        if number < 30:
            label["even"] = "yes" if number % 2 == 0 else "no"
        labels.append(json.dumps(label))
    pairs.labels = np.array(labels)
    return pairs


def test_hard_negatives_by_kind_without_the_pairs_that_have_none() -> None:
    pairs, model, cfg = _annotated(), _model(), config.EvalConfig(bootstrap=300)
    scores = score_model(model, pairs, cfg)
    z = encode(model, pairs)
    _, owner = pairs.image_index()
    kinds = np.array([s.partition(":")[2] or s for s in pairs.negative_sources])
    real = pairs.negative_sources != "none"
    want = metrics.hard_negative_accuracy(z["zi"][real], z["zt"][real], z["zn"][real])
    assert scores["hardneg_acc"] == pytest.approx(want)
    wins = metrics.hard_negative_wins(z["zi"], z["zt"], z["zn"]).double()
    lo_hi = metrics.bootstrap_interval(wins[real].numpy(), 300, groups=owner[real])
    lo_hi = _looser(lo_hi, wins[real], owner[real])
    assert (scores["hardneg_acc_lo"], scores["hardneg_acc_hi"]) == pytest.approx(lo_hi)
    for kind in ("colour", "shape", "swap_colours", "corpus"):
        rows = kinds == kind
        name = f"hardneg_acc_{kind}"
        assert scores[name] == pytest.approx(wins[rows].mean().item()), kind
        want = metrics.bootstrap_interval(wins[rows].numpy(), 300, groups=owner[rows])
        want = _looser(want, wins[rows], owner[rows])
        assert (scores[f"{name}_lo"], scores[f"{name}_hi"]) == pytest.approx(want), kind
        assert scores[f"n_hardneg_{kind}"] == int(rows.sum()) == 24
    assert not any("none" in k for k in scores)
    assert "n_hardneg_" not in score_model(model, pairs, cfg, with_intervals=False)
    # Without recorded sources (None), no per-kind columns, and every pair counts.
    pairs.negative_sources = None
    plain = score_model(model, pairs, cfg)
    assert not any(k.startswith(("hardneg_acc_c", "n_hardneg")) for k in plain)
    assert plain["hardneg_acc"] == pytest.approx(wins.mean().item())


def _prompts(model: JAM, pairs: Pairs) -> dict[str, tuple[list[str], np.ndarray]]:
    """Two templates per class, each a noisy mean of that class's text embeddings."""
    rng = np.random.default_rng(7)
    first, _ = pairs.image_index()
    side = pairs.image[first, 0] < 0

    def raw(members: list[np.ndarray]) -> np.ndarray:
        means = [pairs.text[first][m].astype(np.float64).mean(0) for m in members]
        return np.stack([[m + 0.3 * rng.standard_normal(12) for _ in range(2)] for m in means])

    even = np.arange(len(first)) % 2 == 0
    return {
        "side": (["left", "right", "up"], raw([side, ~side, np.ones_like(side)])),
        "even": (["yes", "no"], raw([even, ~even])),
    }


def test_zeroshot_accuracy_per_task_with_chance_and_interval() -> None:
    pairs, model, cfg = _annotated(), _model(), config.EvalConfig(bootstrap=300)
    prompts = _prompts(model, pairs)
    scores = score_model(model, pairs, cfg, prompts=prompts)
    z = encode(model, pairs)
    first, _ = pairs.image_index()
    labels = [json.loads(x) for x in pairs.labels[first]]
    for task, (names, raw) in prompts.items():
        # CLIP's ensembling, spelled out: each template's latent normalised, averaged, again.
        with torch.no_grad():
            per_template = [
                [
                    torch.nn.functional.normalize(model.encode_text(torch.tensor(t)), dim=0)
                    for t in c
                ]
                for c in raw
            ]
        classes = torch.stack([torch.stack(c).mean(0) for c in per_template])
        rows = [i for i, lab in enumerate(labels) if task in lab]
        target = [names.index(labels[i][task]) for i in rows]
        want = metrics.zeroshot_accuracy(z["zi"][first][rows], classes, target)
        assert scores[f"zeroshot_{task}"] == pytest.approx(want), task
        assert scores[f"n_zeroshot_{task}"] == len(rows)
        assert scores[f"zeroshot_{task}_chance"] == pytest.approx(
            np.bincount(target).max() / len(rows)
        )
        hits = metrics.zeroshot_hits(z["zi"][first][rows], classes, target).double().numpy()
        lo_hi = _looser(metrics.bootstrap_interval(hits, 300), torch.tensor(hits), None)
        assert (scores[f"zeroshot_{task}_lo"], scores[f"zeroshot_{task}_hi"]) == pytest.approx(
            lo_hi
        )
    assert scores["n_zeroshot_side"] == 40 and scores["n_zeroshot_even"] == 30
    assert scores["zeroshot_even_chance"] == 0.5
    assert scores["zeroshot_side_chance"] == pytest.approx(24 / 40)  # the majority class: 24 of 40
    assert 0 < scores["zeroshot_side"] < 1 and 0 < scores["zeroshot_even"] < 1
    # Validation-style scoring: the accuracies and chance levels, no intervals or counts.
    cheap = score_model(model, pairs, cfg, with_intervals=False, prompts=prompts)
    assert cheap == {k: v for k, v in scores.items() if k in cheap}
    assert not any(k.endswith(("_lo", "_hi")) or k.startswith("n_") for k in cheap)
    assert "zeroshot_side" in cheap and "zeroshot_side_chance" in cheap
    # The raw row has no shared space: no zero-shot.
    assert not any(k.startswith("zeroshot") for k in score_raw(pairs, cfg))
    # A label outside the task's classes is an error, not a silent miss.
    names, raw = prompts["side"]
    with pytest.raises(CorpusError, match="'right' is not one of its classes"):
        score_model(model, pairs, cfg, prompts={"side": (["left", "up", "down"], raw)})


def test_results_columns_order_the_dynamic_scores() -> None:
    """extra_metric_columns places every score that is not a fixed column: set-level
    intervals, per-kind hard negatives, zero-shot groups, then their counts."""
    pairs, model = _annotated(), _model()
    scores = score_model(
        model, pairs, config.EvalConfig(bootstrap=50), prompts=_prompts(model, pairs)
    )
    fixed = metric_names(KS) + interval_columns(KS)
    extra = extra_metric_columns(set(scores) - set(fixed))
    assert sorted(extra) == sorted(set(scores) - set(fixed))
    kinds = ["colour", "corpus", "shape", "swap_colours"]
    assert extra == (
        [f"{m}_{e}" for m in ALIGNMENT for e in ("lo", "hi")]
        + ["n_metric_images"]
        + [f"hardneg_acc_{k}{e}" for k in kinds for e in ("", "_lo", "_hi")]
        + [f"zeroshot_{t}{e}" for t in ("even", "side") for e in ("", "_lo", "_hi", "_chance")]
        + [f"n_hardneg_{k}" for k in kinds]
        + ["n_zeroshot_even", "n_zeroshot_side"]
    )
    assert extra_metric_columns({"trial", "train_s", "lr"}) == []


def test_a_perfect_score_gets_the_exact_bound_not_a_zero_width_interval() -> None:
    cfg = config.EvalConfig(bootstrap=200)
    hits = {"acc": torch.ones(40), "miss": torch.zeros(40), "mixed": torch.tensor([0.0, 1.0] * 20)}
    out = evaluate.intervals(hits, cfg)
    assert out["acc_hi"] == 1.0 and out["acc_lo"] == pytest.approx(0.025 ** (1 / 40))
    assert out["miss_lo"] == 0.0 and out["miss_hi"] == pytest.approx(1 - 0.025 ** (1 / 40))
    assert 0.3 < out["mixed_lo"] < 0.5 < out["mixed_hi"] < 0.7  # the bootstrap's, as before
    # Clustered: 40 captions of 8 images are 8 independent units, a wider bound.
    grouped = evaluate.intervals({"acc": torch.ones(40)}, cfg, groups=np.repeat(np.arange(8), 5))
    assert grouped["acc_lo"] == pytest.approx(0.025 ** (1 / 8))


def test_one_miss_never_narrows_the_interval_below_the_exact_one() -> None:
    """The percentile bootstrap gave 26 hits of 27 a lower bound of 0.889, above the 0.872 of
    27 of 27; every 0/1 rate now gets at least the Clopper-Pearson interval."""
    from scipy import stats

    cfg = config.EvalConfig(bootstrap=500)
    lows = {}
    for hits in (27, 26, 20):
        out = evaluate.intervals({"acc": torch.tensor([1.0] * hits + [0.0] * (27 - hits))}, cfg)
        lows[hits] = out["acc_lo"]
        exact = stats.beta.ppf(0.025, hits, 27 - hits + 1)
        assert out["acc_lo"] <= exact + 1e-12 and out["acc_hi"] >= out["acc_lo"]
    assert lows[27] > lows[26] > lows[20]
    assert lows[26] == pytest.approx(stats.beta.ppf(0.025, 26, 2))  # 0.81, not 0.889
    # Not 0/1 (an error, a distance): the bootstrap's alone.
    mse = evaluate.intervals({"mse": torch.linspace(0.1, 0.5, 27)}, cfg)
    assert 0.25 < mse["mse_lo"] < 0.3 < mse["mse_hi"] < 0.35


def test_clustered_rates_count_their_effective_number_of_items() -> None:
    """Captions of one image that always agree are one item (200 images, not 1,000
    captions); captions that vary independently count nearly each (the interval is then
    close to the unclustered one)."""
    cfg = config.EvalConfig(bootstrap=500)
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(200), 5)
    images = (rng.random(200) < 0.5).astype(float)
    same = evaluate.intervals({"r": torch.tensor(np.repeat(images, 5))}, cfg, groups=groups)
    alone = evaluate.intervals({"r": torch.tensor(images)}, cfg)
    assert same["r_lo"] == pytest.approx(alone["r_lo"], abs=0.01)
    assert same["r_hi"] == pytest.approx(alone["r_hi"], abs=0.01)
    captions = torch.tensor((rng.random(1000) < 0.5).astype(float))
    mixed = evaluate.intervals({"r": captions}, cfg, groups=groups)
    flat = evaluate.intervals({"r": captions}, cfg)
    width = same["r_hi"] - same["r_lo"]
    assert mixed["r_hi"] - mixed["r_lo"] < 0.6 * width
    assert mixed["r_hi"] - mixed["r_lo"] == pytest.approx(flat["r_hi"] - flat["r_lo"], rel=0.15)
    # Each image right as often as the others (one of its two captions): no spread between
    # clusters, so every caption counts, without a division by zero.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        half = evaluate._exact(np.array([1.0, 0.0] * 20), np.repeat(np.arange(20), 2), 0.95)
    assert half == pytest.approx(evaluate._exact(np.array([1.0, 0.0] * 20), None, 0.95))


def test_without_scipy_rates_keep_the_bootstrap_interval(monkeypatch) -> None:
    """`raysys bench eval` runs where only torch may be installed: it times the scoring."""
    hits = {"acc": torch.tensor([1.0] * 26 + [0.0])}
    monkeypatch.setitem(sys.modules, "scipy", None)  # `import scipy` now raises ImportError
    out = evaluate.intervals(hits, config.EvalConfig(bootstrap=200))
    assert out["acc_hi"] == 1.0 and out["acc_lo"] > 0.85  # the bootstrap's own, narrower


def test_sample_rows_are_seeded_nested_and_none_without_a_cap() -> None:
    rows = sample_rows(1000, 100, seed=3)
    assert rows is not None and len(rows) == 100 and np.all(np.diff(rows) > 0)
    assert np.array_equal(rows, sample_rows(1000, 100, seed=3))  # reproducible
    assert not np.array_equal(rows, sample_rows(1000, 100, seed=4))  # another seed, another one
    assert set(sample_rows(1000, 30, seed=3)) < set(rows)  # a smaller sample lies inside
    assert sample_rows(1000, 0, seed=3) is None and sample_rows(1000, 1000, seed=3) is None
    cfg = config.EvalConfig(val_pairs=50, sample_seed=3)
    assert np.array_equal(val_rows(1000, cfg), sample_rows(1000, 50, 3))
    pairs = _pairs()
    capped = capped_val(pairs, cfg)
    assert len(capped) == 50 and capped_val(capped, cfg) is capped
    assert capped_val(pairs, config.EvalConfig(val_pairs=0)) is pairs


def test_alignment_metrics_on_a_seeded_sample_of_images(one_thread) -> None:
    """metric_pairs=24 of 40 images: the same 24 (one caption each) for the raw row and the
    model, the metrics exactly those of that sample, reproducible for a seed and another
    sample for another seed; at metric_pairs >= N the sample is every image."""
    pairs, model = _pairs(), _model()
    cfg = config.EvalConfig(metric_pairs=24, bootstrap=20, sample_seed=5)
    first, _ = pairs.image_index()
    rows = metric_rows(first, cfg)
    assert len(rows) == 24 and set(rows) <= set(first)
    raw = score_raw(pairs, cfg)
    assert raw["n_metric_images"] == 24 and raw["n_images"] == 40
    assert {m: raw[m] for m in ALIGNMENT} == alignment(pairs.image[rows], pairs.text[rows], cfg)
    assert score_raw(pairs, cfg) == raw
    other = score_raw(pairs, config.EvalConfig(metric_pairs=24, bootstrap=20, sample_seed=6))
    assert other["mutual_knn"] != raw["mutual_knn"] or other["cka"] != raw["cka"]
    scores = score_model(model, pairs, cfg)
    z = encode(model, pairs)
    assert {m: scores[m] for m in ALIGNMENT} == alignment(z["zi"][rows], z["zt"][rows], cfg)
    assert scores["n_metric_images"] == 24 and scores["n_images"] == 40
    # Retrieval stays over all 40 images.
    assert scores["i2t_r1"] == score_model(model, pairs, config.EvalConfig())["i2t_r1"]
    everything = config.EvalConfig(bootstrap=20)
    for size in (40, 1000, 0):
        at = config.EvalConfig(metric_pairs=size, bootstrap=20)
        assert score_raw(pairs, at) == score_raw(pairs, everything)
        assert score_model(model, pairs, at) == score_model(model, pairs, everything)


def test_alignment_at_several_sample_sizes() -> None:
    """`eval.metric_sizes`: `<metric>_n<size>` for each size below the image count, the
    metrics of the nested seeded sample of that many images; no column at or above it."""
    pairs, model = _pairs(), _model()
    cfg = config.EvalConfig(metric_pairs=30, metric_sizes=[12, 20, 40], bootstrap=0)
    first, _ = pairs.image_index()
    raw = score_raw(pairs, cfg)
    for size in (12, 20):
        rows = metric_rows(first, cfg, size)
        assert set(rows) < set(metric_rows(first, cfg))  # nested in the headline sample
        want = alignment(pairs.image[rows], pairs.text[rows], cfg)
        assert {m: raw[f"{m}_n{size}"] for m in ALIGNMENT} == want
    assert not any(k.endswith("_n40") for k in raw)
    scores = score_model(model, pairs, cfg)
    assert {k for k in scores if "_n" in k} == {f"{m}_n{s}" for m in ALIGNMENT for s in (12, 20)}
    assert extra_metric_columns(set(scores) - set(metric_names(KS))) == [
        f"{m}_n{s}" for m in ALIGNMENT for s in (12, 20)
    ]
    # Validation-style scoring stays cheap: no sized columns.
    assert not any("_n1" in k for k in score_model(model, pairs, cfg, with_intervals=False))
    for bad in ({"metric_pairs": 5}, {"metric_sizes": [4]}, {"val_pairs": -1}):
        with pytest.raises(ConfigError):
            score_raw(pairs, config.EvalConfig(**bad))
