"""score_model: today's scores unchanged, plus a bootstrap interval per per-item metric, each
over the right test items (unique images for image->text, pairs for the rest)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raysys import config, metrics
from raysys.data.pairs import Pairs
from raysys.evaluate import encode, score_model
from raysys.jam import JAM, JAMConfig
from raysys.report.schema import ALIGNMENT, interval_columns, interval_names, metric_names

KS = (1, 5, 10)


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
    assert list(scores) == metric_names(KS) + interval_columns(KS)
    assert (scores["n_images"], scores["n_captions"]) == (40, 120)
    assert not any(f"{m}_lo" in scores for m in ALIGNMENT)  # set-level: no interval
    # The per-item scores, recomputed from the latents by the plain metric functions.
    z = encode(model, pairs)
    first, owner = pairs.image_index()
    want = metrics.retrieval(z["zi"][first], z["zt"], owner, ks=KS)
    want["hardneg_acc"] = metrics.hard_negative_accuracy(z["zi"], z["zt"], z["zn"])
    assert {k: scores[k] for k in want} == want
    assert 0 < scores["i2t_r1"] < 1 and 0 < scores["hardneg_acc"] < 1
    for name in interval_names(KS)[::2]:
        metric = name.removesuffix("_lo")
        assert scores[f"{metric}_lo"] <= scores[metric] <= scores[f"{metric}_hi"], metric
    assert scores["i2t_r1_lo"] < scores["i2t_r1_hi"]
    plain = score_model(model, pairs, cfg, with_intervals=False)
    assert plain == {k: scores[k] for k in metric_names(KS)}


def test_each_direction_resamples_its_own_queries() -> None:
    """i2t_r1's interval is the bootstrap over the 40 unique images, t2i_r1's over the 120
    caption queries and recon_mse's over the 120 pairs (each image + caption error)."""
    pairs, model, cfg = _pairs(), _model(), config.EvalConfig(bootstrap=500, interval=0.9)
    scores = score_model(model, pairs, cfg)
    z = encode(model, pairs)
    first, owner = pairs.image_index()
    i2t, t2i = metrics.retrieval_hits(z["zi"][first], z["zt"], owner, ks=KS)
    assert len(i2t) == 40 and len(t2i) == 120

    def interval(values: torch.Tensor) -> tuple[float, float]:
        return metrics.bootstrap_interval(values.double().numpy(), 500, 0.9, seed=0)

    assert (scores["i2t_r1_lo"], scores["i2t_r1_hi"]) == pytest.approx(interval(i2t[:, 0]))
    assert (scores["t2i_r5_lo"], scores["t2i_r5_hi"]) == pytest.approx(interval(t2i[:, 1]))
    n = len(pairs)
    per_pair = (z["sq"][:n] + z["sq"][n:]) / 2  # one batch: image errors, then caption errors
    assert per_pair.mean().item() == pytest.approx(scores["recon_mse"], rel=1e-6)
    assert (scores["recon_mse_lo"], scores["recon_mse_hi"]) == pytest.approx(interval(per_pair))
    off = config.EvalConfig(bootstrap=0)  # no intervals; the scores do not depend on them
    assert score_model(model, pairs, off) == {k: scores[k] for k in metric_names(KS)}
