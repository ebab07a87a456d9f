"""Pairs and multi-caption images: stable image keys for the step's same-image mask, batches
that carry them, and alignment metrics over one caption per image."""

from __future__ import annotations

import numpy as np
import torch

from raysys import config
from raysys.data.batches import MemoryBatches, batch_plan
from raysys.data.pairs import Pairs, image_keys
from raysys.evaluate import alignment, score_raw


def _pairs(n_images: int = 40, captions: int = 3, seed: int = 0) -> Pairs:
    """`captions` captions per image, rows grouped by image (COCO-like)."""
    rng = np.random.default_rng(seed)
    image_ids = np.repeat([f"img{i:03d}" for i in range(n_images)], captions)
    image = np.repeat(rng.standard_normal((n_images, 12)), captions, axis=0)
    text = rng.standard_normal((len(image_ids), 8))
    pair_ids = np.array([f"p{i}" for i in range(len(image_ids))])
    return Pairs(
        pair_ids,
        image_ids,
        pair_ids,
        image.astype(np.float16),
        text.astype(np.float16),
        rng.standard_normal((len(image_ids), 8)).astype(np.float16),
    )


def test_image_keys_are_stable_and_equal_exactly_for_the_same_image() -> None:
    ids = np.array(["a", "b", "a", "c", "b"])
    keys = image_keys(ids)
    assert keys.dtype == np.int64
    assert keys[0] == keys[2] and keys[1] == keys[4]
    assert len({int(keys[0]), int(keys[1]), int(keys[3])}) == 3
    # The same on any worker: a key depends on the id alone, not on the other rows.
    np.testing.assert_array_equal(image_keys(np.array(["c", "a"])), keys[[3, 0]])


def test_memory_batches_carry_each_rows_image_key() -> None:
    pairs = _pairs()
    cfg = config.load(None, ["train.batch_size=12", "train.num_workers=1"])
    plan = batch_plan(cfg.train, len(pairs))
    rows = plan.worker_rows(0, 1)
    mine = pairs.take(rows)
    batches = MemoryBatches(mine, plan, "auto", 0, 1, torch.device("cpu"))
    image, text, negative, keys = batches.get(3)
    at = plan.worker_batch(3, 0, 1)
    np.testing.assert_array_equal(keys.numpy(), image_keys(mine.image_ids[at]))
    np.testing.assert_array_equal(text.numpy(), mine.text[at])


def test_alignment_metrics_take_one_caption_per_image() -> None:
    pairs = _pairs()
    cfg = config.load(None, []).eval
    first = np.arange(0, len(pairs), 3)  # each image's first caption
    want = alignment(pairs.image[first], pairs.text[first], cfg)
    assert score_raw(pairs, cfg, with_intervals=False) == want
    assert alignment(pairs.image, pairs.text, cfg)["mutual_knn"] != want["mutual_knn"]
