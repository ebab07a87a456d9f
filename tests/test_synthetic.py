"""Tests for the built-in synthetic corpus: determinism, splits, and captions true to pixels."""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import math
import re

import numpy as np
import pytest
from PIL import Image

from raysys.corpora import SyntheticConfig, corpus_key, generate
from raysys.corpora.synthetic import (
    COLOURS,
    NEGATIVE_EDITS,
    RELATIONS,
    SHAPES,
    SIZES,
    sample_scene,
    split_overlap,
    zeroshot_tasks,
)
from raysys.errors import ConfigError

_CAPTION = re.compile(
    r"^(?:a|the|there is a) (\w+) (\w+) (\w+) (?:is |placed )?(left of|right of|above|below) "
    r"(?:a|the) (\w+) (\w+) (\w+)$"
)
_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def parse(caption: str) -> tuple[tuple[str, str, str], str, tuple[str, str, str]]:
    """(object a, relation, object b) of any caption template; fails on unknown words."""
    m = _CAPTION.match(caption)
    assert m, f"unparseable caption {caption!r}"
    size_a, colour_a, shape_a, rel, size_b, colour_b, shape_b = m.groups()
    for size, colour, shape in ((size_a, colour_a, shape_a), (size_b, colour_b, shape_b)):
        assert size in SIZES and colour in COLOURS and shape in SHAPES, caption
    return (size_a, colour_a, shape_a), rel, (size_b, colour_b, shape_b)


def canonical(caption: str) -> tuple:
    """The scene a caption states, independent of which object it speaks from."""
    a, rel, b = parse(caption)
    return (a, rel, b) if rel in ("left of", "above") else (b, _INVERSE[rel], a)


def decode(png: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.mode == "RGB"
    return np.asarray(image, dtype=np.int32)


def colour_masks(pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Pixels nearest each palette colour (and close to it); the light background is far."""
    names = list(COLOURS)
    palette = np.array([COLOURS[n] for n in names], dtype=np.int32)
    dist = np.linalg.norm(pixels[:, :, None, :] - palette[None, None], axis=-1)
    nearest, close = dist.argmin(-1), dist.min(-1) < 35
    return {n: close & (nearest == i) for i, n in enumerate(names)}


def _hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of (x, y) points (monotone chain + shoelace)."""
    pts = sorted(set(map(tuple, points.tolist())))

    def half(seq):
        out = []
        for p in seq:
            while (
                len(out) >= 2
                and (
                    (out[-1][0] - out[-2][0]) * (p[1] - out[-2][1])
                    - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0])
                )
                <= 0
            ):
                out.pop()
            out.append(p)
        return out

    hull = half(pts)[:-1] + half(pts[::-1])[:-1]
    xs, ys = np.array([p[0] for p in hull], float), np.array([p[1] for p in hull], float)
    return 0.5 * abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1)))


def measure(mask: np.ndarray) -> dict:
    """Centroid, extent and shape descriptors of one object's pixel mask."""
    ys, xs = np.nonzero(mask)
    cx, cy, area = xs.mean(), ys.mean(), float(len(xs))
    reach = np.sqrt((xs - cx) ** 2 + (ys - cy) ** 2).max() + 0.5
    # Row-wise left/right ends (pixel corners) suffice for the hull of a filled shape.
    rows = {}
    for x, y in zip(xs.tolist(), ys.tolist(), strict=True):
        lo, hi = rows.get(y, (x, x))
        rows[y] = (min(lo, x), max(hi, x))
    corners = [(x, y + dy) for y, (lo, hi) in rows.items() for x in (lo, hi + 1) for dy in (0, 1)]
    return {
        "cx": cx,
        "cy": cy,
        "extent": max(xs.max() - xs.min(), ys.max() - ys.min()) + 1,
        "roundness": area / (math.pi * reach**2),  # circle ~1, square ~0.64, others ~0.4
        "solidity": area / _hull_area(np.array(corners)),  # star ~0.55, the others ~1
    }


def shape_of(m: dict) -> str:
    if m["roundness"] > 0.8:
        return "circle"
    if m["roundness"] > 0.52:
        return "square"
    return "triangle" if m["solidity"] > 0.8 else "star"


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return generate(SyntheticConfig(size=200, seed=7))


@pytest.fixture(scope="module")
def multi_rows() -> list[dict]:
    return generate(SyntheticConfig(size=103, seed=1, captions_per_image=4, image_size=96))


def _small(size: int, seed: int, captions: int, val: float, test: float) -> SyntheticConfig:
    """A corpus of tiny images (rendering is not what these tests check)."""
    return SyntheticConfig(
        size=size,
        seed=seed,
        captions_per_image=captions,
        val_fraction=val,
        test_fraction=test,
        image_size=32,
    )


def test_deterministic_per_seed(rows):
    again = generate(SyntheticConfig(size=200, seed=7))
    assert again == rows  # dict equality includes the PNG bytes
    other = generate(SyntheticConfig(size=200, seed=8))
    assert [r["caption"] for r in other] != [r["caption"] for r in rows]
    assert [r["image"] for r in other] != [r["image"] for r in rows]


def test_image_depends_only_on_its_index_and_split(rows):
    """Image i depends on the seed, i and its split, not on how many images are generated
    (per-image RNG streams): a worker can regenerate any image on its own."""
    small = generate(SyntheticConfig(size=20, seed=7))
    same = [i for i in range(20) if small[i]["split"] == rows[i]["split"]]
    assert len(same) >= 10
    for i in same:
        assert small[i] == rows[i]


def test_row_contract_and_ids(rows):
    assert len(rows) == 200
    assert len({r["pair_id"] for r in rows}) == 200
    for r in rows:
        assert set(r) == {
            "pair_id",
            "image_id",
            "image",
            "caption",
            "negative",
            "negative_source",
            "split",
            "labels",
        }
        assert re.fullmatch(r"syn-\d{6}", r["image_id"])
        assert re.fullmatch(re.escape(r["image_id"]) + r"-\d+", r["pair_id"])
        assert isinstance(r["image"], bytes) and isinstance(r["labels"], str)
        assert r["negative_source"] in {f"exact:{e}" for e in NEGATIVE_EDITS}


@pytest.mark.parametrize(
    "size,captions,val,test",
    [(200, 1, 0.1, 0.1), (103, 4, 0.1, 0.1), (50, 2, 0.2, 0.3), (17, 3, 0.0, 0.5)],
)
def test_sizes_and_split_counts(size, captions, val, test):
    cfg = _small(size, 2, captions, val, test)
    out = generate(cfg)
    assert len(out) == size
    by_image = collections.defaultdict(list)
    for r in out:
        by_image[r["image_id"]].append(r)
    n_images = math.ceil(size / captions)
    assert len(by_image) == n_images
    assert all(len(group) <= captions for group in by_image.values())
    assert sum(len(group) == captions for group in by_image.values()) >= n_images - 1
    split_of = {}
    for image_id, group in by_image.items():
        assert len({r["split"] for r in group}) == 1, "captions of one image split apart"
        assert len({r["image"] for r in group}) == 1
        split_of[image_id] = group[0]["split"]
    counts = collections.Counter(split_of.values())
    assert counts["test"] == round(n_images * test)
    assert counts["val"] == round(n_images * val)
    assert counts["train"] == n_images - counts["test"] - counts["val"]


def test_splits_are_shuffled_not_contiguous():
    out = generate(SyntheticConfig(size=100, seed=3, image_size=32))
    test_idx = [i for i, r in enumerate(out) if r["split"] == "test"]
    assert test_idx != list(range(test_idx[0], test_idx[0] + len(test_idx)))


@pytest.mark.parametrize("image_size", [64, 224])
def test_images_decode_at_size(image_size):
    for r in generate(SyntheticConfig(size=5, image_size=image_size)):
        assert decode(r["image"]).shape == (image_size, image_size, 3)


def test_caption_is_true_to_pixels(rows):
    """Colours, shapes, sizes and the relation of every caption, read back from the image."""
    extents = collections.defaultdict(list)
    for r in rows[:80]:
        pixels = decode(r["image"])
        masks = colour_masks(pixels)
        a, rel, b = parse(r["caption"])
        present = {c for c, m in masks.items() if m.sum() > 20}
        assert present == {a[1], b[1]}, r["caption"]
        ma, mb = measure(masks[a[1]]), measure(masks[b[1]])
        for (size, colour, shape), m in ((a, ma), (b, mb)):
            assert masks[colour][round(m["cy"]), round(m["cx"])], "object centre not filled"
            assert shape_of(m) == shape, (r["caption"], m)
            extents[size].append(m["extent"])
        dx, dy = mb["cx"] - ma["cx"], mb["cy"] - ma["cy"]
        along, across = {"left of": (dx, dy), "right of": (-dx, dy)}.get(rel, (0, 0))
        if rel in ("above", "below"):
            along, across = (dy, dx) if rel == "above" else (-dy, dx)
        assert along > 0.15 * pixels.shape[0], f"{rel!r} not clearly true: {r['caption']}"
        assert abs(across) < along, f"{rel!r} is not the dominant relation: {r['caption']}"
    assert min(extents["large"]) > 1.2 * max(extents["small"])


_SLOTS = {
    "colour": set(COLOURS),
    "shape": set(SHAPES),
    "size": set(SIZES),
    "relation": {"left", "right", "above", "below"},
}


def test_negative_is_one_slot_edit_and_false(rows, multi_rows):
    kinds = collections.Counter()
    for r in rows + multi_rows:
        cap, neg = r["caption"].split(), r["negative"].split()
        assert r["negative"] != r["caption"] and len(cap) == len(neg)
        diff = [i for i in range(len(cap)) if cap[i] != neg[i]]
        if len(diff) == 1:
            (i,) = diff
            kind = next(k for k, vocab in _SLOTS.items() if cap[i] in vocab)
            assert neg[i] in _SLOTS[kind], "edit crossed slot kinds"
        else:
            assert len(diff) == 2, (r["caption"], r["negative"])
            i, j = diff
            assert cap[i] in COLOURS and (cap[i], cap[j]) == (neg[j], neg[i]), "not a colour swap"
            kind = "swap_colours"
        assert r["negative_source"] == f"exact:{kind}", (r["caption"], r["negative"])
        kinds[kind] += 1
        # A different stated scene, still of two differently coloured objects (a recolour never
        # takes the other object's colour, which could then describe that object): it is false.
        assert canonical(r["negative"]) != canonical(r["caption"])
        a, _, b = parse(r["negative"])
        assert a[1] != b[1], r["negative"]
    assert set(kinds) == set(NEGATIVE_EDITS), kinds
    assert min(kinds.values()) > 0.08 * sum(kinds.values()), kinds


def test_paraphrases_state_the_same_scene(multi_rows):
    by_image = collections.defaultdict(list)
    for r in multi_rows:
        by_image[r["image_id"]].append(r["caption"])
    for captions in by_image.values():
        assert len(set(captions)) == len(captions), "duplicate paraphrase"
        assert len({canonical(c) for c in captions}) == 1, captions


def test_distribution_is_diverse(rows):
    captions = collections.Counter(r["caption"] for r in rows)
    assert len(captions) > 0.8 * len(rows)
    words = " ".join(captions).split()
    for vocab in (COLOURS, SHAPES, SIZES):
        assert set(vocab) <= set(words)
    assert {parse(c)[1] for c in captions} == set(RELATIONS)


def test_corpus_key_tracks_every_field():
    base = SyntheticConfig()
    key = corpus_key(base)
    assert re.fullmatch(r"[0-9a-f]{16}", key)
    assert corpus_key(SyntheticConfig()) == key
    for field in dataclasses.fields(SyntheticConfig):
        value = getattr(base, field.name)
        changed = value + (0.05 if isinstance(value, float) else 1)
        assert corpus_key(dataclasses.replace(base, **{field.name: changed})) != key, field.name


@pytest.mark.parametrize(
    "change",
    [
        {"size": 0},
        {"captions_per_image": 0},
        {"captions_per_image": 99},
        {"val_fraction": -0.1},
        {"val_fraction": 0.5, "test_fraction": 0.5},
        {"image_size": 8},
    ],
)
def test_bad_config_raises(change):
    with pytest.raises(ConfigError):
        generate(SyntheticConfig(**change))


# ---- the compositional split ---------------------------------------------------------------


@pytest.mark.parametrize(
    "size,seed,captions,val,test",
    [(2000, 0, 1, 0.1, 0.1), (1000, 3, 5, 0.1, 0.1), (400, 11, 8, 0.2, 0.3), (60, 5, 1, 0.0, 0.05)],
)
def test_split_is_compositional(size, seed, captions, val, test):
    """No val/test caption, paraphrase of one, negative or paraphrase of a negative is a train
    caption or negative (checked with this file's own parser), at the asked fractions."""
    cfg = _small(size, seed, captions, val, test)
    out = generate(cfg)
    assert len(out) == size
    stated = collections.defaultdict(set)  # split -> every scene its captions and negatives state
    texts = collections.defaultdict(set)
    for r in out:
        for text in (r["caption"], r["negative"]):
            stated[r["split"]].add(canonical(text))
            texts[r["split"]].add(text)
    for held in ("val", "test"):
        assert not stated[held] & stated["train"], held
        assert not texts[held] & texts["train"], held
    assert not stated["val"] & stated["test"]
    assert set(split_overlap(out).values()) == {0}
    pairs = collections.Counter(r["split"] for r in out)
    for name, fraction in (("val", val), ("test", test)):
        assert abs(pairs[name] / size - fraction) <= captions / size + 0.01, (name, pairs)
    # Negative kinds stay balanced inside the held-out splits too.
    kinds = collections.Counter(r["negative_source"] for r in out if r["split"] == "test")
    assert len(kinds) == len(NEGATIVE_EDITS) or pairs["test"] < 25, kinds


def _row(split: str, caption: str, negative: str) -> dict:
    return {"split": split, "caption": caption, "negative": negative}


def test_split_overlap_detects_each_leak():
    train = [
        _row("train", "a large red circle left of a small blue star", "x"),
        _row(
            "train",
            "a small green square above a large red star",
            "a small green square below a large red star",
        ),
    ]
    clean = [
        _row(
            "test",
            "a large red circle above a small blue star",
            "a large red circle below a small blue star",
        )
    ]
    assert set(split_overlap(train + clean).values()) == {0}
    leaks = [  # (a leaky held-out row, the counts it must raise; every other stays 0)
        # a verbatim train caption (so its scene too)
        (
            _row("test", "a large red circle left of a small blue star", "y"),
            {"test_captions_in_train": 1, "test_scenes_in_train": 1},
        ),
        # a negative that is a training positive
        (
            _row("val", "z", "a large red circle left of a small blue star"),
            {"val_negatives_in_train": 1, "val_negative_scenes_in_train": 1},
        ),
        # the inverse-relation paraphrase of a train caption, in another template
        (
            _row("test", "the small blue star is right of the large red circle", "w"),
            {"test_scenes_in_train": 1},
        ),
        # a negative stating a train negative's scene
        (
            _row("test", "v", "there is a large red star above a small green square"),
            {"test_negative_scenes_in_train": 1},
        ),
    ]
    for leak, raised in leaks:
        found = split_overlap(train + clean + [leak])
        assert {k: v for k, v in found.items() if v} == raised, leak


def test_split_overlap_reads_a_pairs_table():
    import pyarrow as pa

    rows = [_row("train", "a b", "c"), _row("test", "a b", "c"), _row("val", None, None)]
    found = split_overlap(pa.Table.from_pylist(rows))
    assert found["test_captions_in_train"] == 1 and found["test_scenes_in_train"] == 1
    assert found["test_negatives_in_train"] == 0 and found["test_negative_scenes_in_train"] == 1


# ---- zero-shot labels ----------------------------------------------------------------------


def _expected_labels(caption: str) -> dict[str, str]:
    """The classes a caption implies, from the caption alone."""
    a, rel, b = parse(caption)
    labels = {"arrangement": "side by side" if rel in ("left of", "right of") else "stacked"}
    if a[0] != b[0]:
        large = a if a[0] == "large" else b
        labels |= {"large_shape": large[2], "large_colour": large[1]}
    return labels


def test_labels_agree_with_the_scene(rows, multi_rows):
    multi_cfg = SyntheticConfig(size=103, seed=1, captions_per_image=4, image_size=96)
    for cfg, out in ((SyntheticConfig(size=200, seed=7), rows), (multi_cfg, multi_rows)):
        for r in out:
            labels = json.loads(r["labels"])
            assert labels == _expected_labels(r["caption"]), r
            scene = sample_scene(cfg, int(r["image_id"][4:]), r["split"])
            assert labels["arrangement"] == (
                "stacked" if scene.relation in ("above", "below") else "side by side"
            )
            if scene.a.size == scene.b.size:
                assert set(labels) == {"arrangement"}
            else:
                large = max((scene.a, scene.b), key=lambda o: o.radius)
                assert (labels["large_shape"], labels["large_colour"]) == (
                    large.shape,
                    large.colour,
                )
    tasks = collections.Counter(t for r in rows for t in json.loads(r["labels"]))
    assert tasks["arrangement"] == len(rows) and 0.3 < tasks["large_shape"] / len(rows) < 0.7


def test_zeroshot_tasks_cover_the_labels_and_are_not_captions(rows, multi_rows):
    tasks = zeroshot_tasks()
    assert set(tasks) == {"arrangement", "large_shape", "large_colour"}
    assert set(tasks["large_shape"]) == set(SHAPES) and set(tasks["large_colour"]) == set(COLOURS)
    texts = {t for r in rows + multi_rows for t in (r["caption"], r["negative"])}
    prompts = [p for classes in tasks.values() for ps in classes.values() for p in ps]
    assert all(len(ps) == 2 for classes in tasks.values() for ps in classes.values())
    assert len(set(prompts)) == len(prompts) and not set(prompts) & texts
    for r in rows + multi_rows:
        for task, label in json.loads(r["labels"]).items():
            assert label in tasks[task], (task, label)
    tasks["arrangement"].clear()
    assert zeroshot_tasks()["arrangement"], "callers must not be able to edit the tasks"


def test_a_one_group_split_substitutes_edits_and_counts_them():
    """A test split of one hold-out group has no in-split recolour or reshape: those drawn
    edits become others, counted in the corpus info, and the split stays sealed."""
    from raysys.corpora.synthetic import corpus_info

    cfg = SyntheticConfig(size=1000, captions_per_image=5, test_fraction=0.003, image_size=32)
    out = generate(cfg)
    info = corpus_info(cfg, out)
    assert info["split"]["groups"]["test"] == 1 and info["split"]["pairs"]["test"] == 5
    test_kinds = {r["negative_source"] for r in out if r["split"] == "test"}
    assert not test_kinds & {"exact:colour", "exact:shape"}
    assert info["split"]["substituted_negatives"] == 2  # the image's colour and shape captions
    assert set(info["overlap"].values()) == {0}
