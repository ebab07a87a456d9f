"""The passive-metric probe against independent computations (no Ray, no cache)."""

from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest

from raysys import metrics
from raysys import probe as P
from raysys.config import Config, EvalConfig, ProbeConfig


def _same_up_to_sign(a: np.ndarray, b: np.ndarray, atol: float) -> None:
    """Columns equal up to a sign flip each (eigenvectors have no fixed sign)."""
    assert a.shape == b.shape
    signs = np.sign((a * b).sum(0))
    np.testing.assert_allclose(a, b * signs, atol=atol)


def test_linear_reduction_is_pca_by_svd():
    x = np.random.default_rng(0).normal(size=(40, 12)) @ np.diag(np.linspace(3, 0.1, 12))
    got = P.reduce(x, "linear", 5)
    c = x - x.mean(0)
    u, s, _ = np.linalg.svd(c, full_matrices=False)
    _same_up_to_sign(got, u[:, :5] * s[:5], atol=1e-8)


def test_rbf_reduction_is_the_centred_gram_eigenvectors():
    x = np.random.default_rng(1).normal(size=(30, 6))
    gamma = P.rbf_gamma(x)
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    assert gamma == pytest.approx(1 / np.median(d2[np.triu_indices(30, 1)]))
    h = np.eye(30) - 1 / 30
    kc = h @ np.exp(-gamma * d2) @ h
    vals, vecs = np.linalg.eigh(kc)
    top = np.argsort(vals)[::-1][:4]
    _same_up_to_sign(P.reduce(x, "rbf", 4), vecs[:, top] * np.sqrt(vals[top]), atol=1e-8)


def test_reduction_dim_is_capped_at_rows_and_width():
    x = np.random.default_rng(2).normal(size=(8, 5))
    assert P.reduce(x, "linear", 50).shape == (8, 5)
    assert P.reduce(np.random.default_rng(2).normal(size=(6, 20)), "rbf", 50).shape == (6, 5)
    with pytest.raises(ValueError, match="reduction"):
        P.reduce(x, "umap", 2)


def test_canonical_correlations_match_the_closed_form():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(200, 4))
    b = a[:, :3] @ rng.normal(size=(3, 5)) + rng.normal(size=(200, 5))
    got = P.canonical_correlations(a, b)
    ca, cb = a - a.mean(0), b - b.mean(0)
    saa, sbb, sab = ca.T @ ca, cb.T @ cb, ca.T @ cb
    m = np.linalg.solve(saa, sab) @ np.linalg.solve(sbb, sab.T)
    want = np.sqrt(np.clip(np.sort(np.linalg.eigvals(m).real)[::-1], 0, 1))
    np.testing.assert_allclose(got, want[: len(got)], atol=1e-9)
    assert len(got) == 4


def test_cca_recovers_constructed_canonical_correlations():
    """X = [z1, z2, noise], Y = [rho1 z1 + e1, rho2 z2 + e2, noise]: correlations rho1, rho2,
    then ~0; the mean over two components is (rho1 + rho2) / 2."""
    rng = np.random.default_rng(4)
    n, rho = 20000, np.array([0.9, 0.5])
    z = rng.normal(size=(n, 2))
    x = np.hstack([z, rng.normal(size=(n, 3))])
    y = np.hstack(
        [rho * z + np.sqrt(1 - rho**2) * rng.normal(size=(n, 2)), rng.normal(size=(n, 3))]
    )
    got = P.canonical_correlations(x, y)
    np.testing.assert_allclose(got[:2], rho, atol=0.02)
    assert got[2:].max() < 0.05
    # The metric normalises rows first (a rotation keeps row norms: still one space), then
    # averages the top `dim` correlations.
    rotation = np.linalg.qr(rng.normal(size=(5, 5)))[0]
    assert P.cca(x, x @ rotation, dim=3) == pytest.approx(1.0, abs=1e-9)
    ux, uy = (m / np.linalg.norm(m, axis=1, keepdims=True) for m in (x, y))
    assert P.cca(x, y, dim=2) == pytest.approx(P.canonical_correlations(ux, uy)[:2].mean())


def test_derangement_and_pair_types():
    rng = np.random.default_rng(5)
    for n in (2, 3, 10, 100):
        perm = P.derangement(n, rng)
        assert sorted(perm) == list(range(n)) and not (perm == np.arange(n)).any()
    image, text = rng.normal(size=(20, 3)), rng.normal(size=(20, 4))
    negative = rng.normal(size=(20, 4))
    rows = np.array([2, 5, 7, 11, 19])
    perm = P.easy_permutation(len(rows), 0, 0)
    pairs = P.pair_sample(image, text, negative, rows, perm)
    for kind in P.PAIR_TYPES:
        np.testing.assert_array_equal(pairs[kind][0], image[rows])
    np.testing.assert_array_equal(pairs["matching"][1], text[rows])
    np.testing.assert_array_equal(pairs["hard"][1], negative[rows])
    easy = pairs["easy"][1]
    for i in range(len(rows)):  # image rows[i] gets another image's caption, never its own
        j = int(np.flatnonzero((text[rows] == easy[i]).all(1))[0])
        assert j != i


def test_draws_differ_and_take_a_subset_of_a_small_split():
    big = P.draws(100, 30, 4, seed=0)
    assert all(len(d) == 30 and len(set(d)) == 30 for d in big)
    small = P.draws(50, 1024, 3, seed=0)
    assert all(len(d) == 40 for d in small)  # 80% of 50
    assert not np.array_equal(small[0], small[1])
    assert [d.tolist() for d in P.draws(50, 1024, 3, seed=0)] == [d.tolist() for d in small]


def test_interval_contains_the_mean():
    values = np.random.default_rng(6).normal(0.4, 0.05, size=10)
    mean, lo, hi = P.interval(values, 0.95)
    assert mean == pytest.approx(values.mean())
    assert lo < mean < hi and hi - mean == pytest.approx(mean - lo)


def test_subset_draws_get_intervals_that_cover_the_true_mean():
    """80% subsets of one small split barely differ; uncorrected, their spread would give a
    plain mean's interval ~53% coverage. Scaled to a size-m sample's spread, it covers."""
    rng = np.random.default_rng(0)
    covered = 0
    for trial in range(300):
        x = rng.normal(0.0, 1.0, size=200)
        chosen = P.draws(len(x), 1024, 10, seed=trial)
        mean, lo, hi = P.interval([x[c].mean() for c in chosen], 0.95, len(chosen[0]), len(x))
        covered += lo <= 0.0 <= hi
    assert 0.93 <= covered / 300 <= 1.0


def _embeddings(n: int, seed: int = 0, hard_noise: float = 0.05):
    """Images and captions share a latent scene z; a hard negative is its caption nudged a
    little (a minimal edit), so sets of captions and of negatives have the same geometry."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 16))
    image = z @ rng.normal(size=(16, 48)) + 0.3 * rng.normal(size=(n, 48))
    text = z @ rng.normal(size=(16, 32)) + 0.3 * rng.normal(size=(n, 32))
    negative = text + hard_noise * rng.normal(size=text.shape)
    return image.astype(np.float32), text.astype(np.float32), negative.astype(np.float32)


SMALL = ProbeConfig(pairs=60, resamples=6, dim=10)
EVAL = EvalConfig(knn_k=5, svcca_dim=5)


@pytest.fixture(scope="module")
def rows():
    image, text, negative = _embeddings(300)
    labels = {"stage": "raw", "vision": "v", "text": "t", "vision_layer": 3, "text_layer": 2}
    return P.probe_arrays(image, text, negative, SMALL, EVAL, **labels)


def test_raw_metrics_see_easy_but_not_hard_negatives(rows):
    """The paper's finding on constructed data: every metric puts easy pairs well below
    matching ones, and hard pairs within noise of matching ones."""
    assert len(rows) == len(SMALL.reductions) * len(SMALL.metrics) * 3
    by = {(r["reduction"], r["metric"], r["pair_type"]): r for r in rows}
    for reduction in SMALL.reductions:
        for metric in SMALL.metrics:
            m, e, h = (by[reduction, metric, t] for t in P.PAIR_TYPES)
            assert m["value"] - e["value"] > 0.15, (reduction, metric)
            assert abs(m["value"] - h["value"]) < 0.05, (reduction, metric)
            assert e["hi"] < m["lo"], (reduction, metric)  # easy: separated
            assert h["hi"] >= m["lo"] and m["hi"] >= h["lo"], (reduction, metric)  # hard: not
            for r in (m, e, h):
                assert r["lo"] <= r["value"] <= r["hi"] and r["n"] == 60
    section = "\n".join(P.probe_section(rows))
    assert (
        "in 14 of 14 (metric, reduction, configuration) cases and hard ones in 0 of 14" in section
    )
    assert "hard pairs score almost like matches" in section


def test_probe_matches_the_metrics_on_one_draw():
    """One draw of all rows equals clamp -> reduce -> raysys.metrics by hand."""
    image, text, negative = _embeddings(30, seed=7)
    pcfg = ProbeConfig(pairs=30, resamples=1, dim=6, reductions=["linear"])
    pcfg.metrics = ["cka", "mutual_knn"]
    got = {
        (r["metric"], r["pair_type"]): r["value"]
        for r in P.probe_arrays(image, text, negative, pcfg, EVAL, stage="raw")
    }
    ri = P.reduce(metrics.clamp_outliers(image, EVAL.outlier_q).numpy(), "linear", 6)
    rn = P.reduce(metrics.clamp_outliers(negative, EVAL.outlier_q).numpy(), "linear", 6)
    assert got["cka", "hard"] == pytest.approx(metrics.cka(ri, rn), abs=1e-9)
    assert got["mutual_knn", "hard"] == pytest.approx(metrics.mutual_knn(ri, rn, k=5))


def test_csv_columns_and_outputs(rows, tmp_path):
    image, text, _ = _embeddings(40, seed=8)
    sample = P.LayerSample("v", "t", {0: image, 5: image * 2 + 1}, {1: text, 3: text[::-1]})
    alignment = P.raw_alignment([sample], EVAL)
    assert {(r["vision_layer"], r["text_layer"]) for r in alignment} == {
        (0, 1),
        (0, 3),
        (5, 1),
        (5, 3),
    }
    by = {(r["vision_layer"], r["text_layer"]): r["value"] for r in alignment}
    assert by[0, 1] > by[0, 3]  # reversed captions no longer match their images
    jam = [r | {"stage": "jam", "model": "con"} for r in rows]
    P.write_outputs(tmp_path, rows + jam, alignment)
    with open(tmp_path / P.PROBE_CSV, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == P.COLUMNS
        read = list(reader)
    assert {r["pair_type"] for r in read} == set(P.PAIR_TYPES)
    assert {r["stage"] for r in read} == {"raw", "jam"}
    assert tuple(P.read_csv(tmp_path / P.ALIGNMENT_CSV)[0]) == P.ALIGNMENT_COLUMNS
    for name in ("probe.png", "alignment.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / P.PROBE_MD).read_text()
    assert "**raw**" in md and "**jam**" in md and "probe.png" in md
    # The section reads the CSV back (strings) as well as the rows it was made from.
    from_csv, from_rows = P.probe_section(read), P.probe_section(rows + jam)
    assert len(from_csv) == len(from_rows)
    assert [x for x in from_csv if x.startswith("On ")] == [
        x for x in from_rows if x.startswith("On ")
    ]


def test_find_models_reads_provenance_and_sweep_rows(tmp_path):
    (tmp_path / "models" / "con").mkdir(parents=True)
    prov = {"objective": "con", "vision": "v", "text": "t", "image_layer": "L08"}
    (tmp_path / "models" / "con" / "provenance.json").write_text(
        json.dumps(prov | {"text_layer": "L03"})
    )
    for trial in ("t000-spread", "t001-spread", "t002-orphan"):
        (tmp_path / "models" / trial).mkdir()
    with open(tmp_path / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(
            f, ["objective", "vision", "text", "vision_layer", "text_layer", "trial"]
        )
        w.writeheader()
        w.writerow({"objective": "raw", "vision": "v", "text": "t", "vision_layer": 8})
        for trial in ("t000-spread", "t001-spread"):
            w.writerow(
                {
                    "objective": "spread",
                    "vision": "v",
                    "text": "t",
                    "vision_layer": 16,
                    "text_layer": 6,
                    "trial": trial,
                }
            )
    found = {m.path.name: m for m in P.find_models(tmp_path)}
    assert set(found) == {"con", "t000-spread", "t001-spread"}
    assert (found["con"].label, found["con"].vision_layer, found["con"].text_layer) == ("con", 8, 3)
    assert found["t000-spread"].label == "spread#t000-spread"
    assert (found["t001-spread"].vision_layer, found["t001-spread"].text_layer) == (16, 6)
    # A sweep hands its rows (numbers, not strings) before results.csv is written.
    rows = [{"trial": "t002-orphan", "objective": "con", "vision": "v", "text": "t"}]
    rows[0] |= {"vision_layer": 4, "text_layer": 1}
    given = {m.path.name: m for m in P.find_models(tmp_path, rows)}
    assert set(given) == {"con", "t002-orphan"} and given["t002-orphan"].vision_layer == 4
    # Seeds stay one label (the plot averages them); Spread's alpha does not.
    axes = {"objective": "spread", "vision": "v", "text": "t", "vision_layer": 4, "text_layer": 1}
    swept = [
        axes | {"trial": "t000-spread", "train.alpha": 0.5, "train.seed": 0},
        axes | {"trial": "t001-spread", "train.alpha": 0.5, "train.seed": 1},
        axes | {"trial": "t002-orphan", "train.alpha": 0.9, "train.seed": 0},
    ]
    labels = {m.path.name: m.label for m in P.find_models(tmp_path, swept)}
    assert labels["t000-spread"] == "spread alpha=0.5#t000-spread"
    assert labels["t001-spread"].split("#")[0] == labels["t000-spread"].split("#")[0]
    assert labels["t002-orphan"] == "spread alpha=0.9#t002-orphan"


def test_probe_config_defaults_are_the_papers():
    cfg = Config()
    assert cfg.probe.dim == 50 and set(cfg.probe.reductions) == set(P.REDUCTIONS)
    assert set(cfg.probe.metrics) == set(P.METRICS)
    assert dataclasses.asdict(cfg.probe)["pairs"] == 1024
