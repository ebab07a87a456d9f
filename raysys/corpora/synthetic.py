"""The built-in ``synthetic`` corpus: rendered two-object scenes with exact captions.

Why it exists: the project needs a corpus that ships with the code, needs no download and
whose captions (and hard-negative captions) are *exactly* true (or false) for their image.
Each scene holds two objects, each with a size (small/large), a colour (6 well-separated
colours) and a shape (circle/square/triangle/star), plus a spatial relation between them
(left of/right of/above/below). Objects are big, flat-coloured and never overlap, so a frozen
ImageNet CNN can ground every word of the caption.

Hard negatives are built from the scene structure, not from text rules: exactly one slot is
edited (one object's colour, shape or size, the relation, or the two colours swapped), and the
edit is chosen so the negative is false for the image (colours of the two objects always
differ, and a recoloured object never takes the other object's colour). Each row records its
edit as ``negative_source = "exact:<edit>"`` for per-kind hard-negative scores.

The split is compositional, so test scores measure generalisation, not recall of training
inputs (the text backbone is frozen: a test caption seen in train is literally a training
input). Scenes fall into *hold-out groups* (the relation's axis, the pair of colours, the pair
of shapes); every group belongs to one split, and each image draws a scene, and every
negative, from its own split's groups. The relation, size and colour-swap edits never leave a
group, and colour and shape edits are only chosen when they land in the same split, so no
test caption, none of its paraphrases and no test negative (or paraphrase of one) is ever a
train caption or negative; likewise for val. ``split_overlap`` measures this on the rows and
the corpus records it (``corpus_info``).

Every row also carries ``labels``, a JSON object {task: class} for the zero-shot tasks of
``zeroshot_tasks`` (the arrangement, and the larger object's shape and colour when the two
sizes differ).

Everything is derived from ``SyntheticConfig``; the same config gives byte-identical rows. Each
image has its own RNG stream (seeded from ``seed`` and the image index) and draws from its
split's groups, so any image can be regenerated on its own, e.g. by a distributed worker.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import itertools
import json
import math
import random
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import pyarrow as pa
from PIL import Image, ImageDraw

from raysys.errors import ConfigError

#: Bump when rendering, caption templates, negative rules or the split change: it invalidates
#: caches. 2: compositional split, "exact:<edit>" sources, zero-shot labels.
SYNTHETIC_VERSION = 2
CORPUS_NAME = "synthetic"

#: Well-separated RGB palette (pairwise distance > 70, far from the light background).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 160, 60),
    "blue": (35, 75, 210),
    "yellow": (235, 205, 30),
    "purple": (135, 55, 175),
    "orange": (240, 135, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
#: Half-extent (circumradius) of an object as a fraction of the image side, before jitter.
SIZES: dict[str, float] = {"small": 0.08, "large": 0.20}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
INVERSE_RELATION: dict[str, str] = {
    "left of": "right of",
    "right of": "left of",
    "above": "below",
    "below": "above",
}
#: Caption templates; each is used from both objects' side, giving 2 * len paraphrases.
TEMPLATES: tuple[str, ...] = (
    "a {a} {rel} a {b}",
    "the {a} is {rel} the {b}",
    "there is a {a} {rel} a {b}",
    "a {a} placed {rel} a {b}",
)
MAX_CAPTIONS_PER_IMAGE = 2 * len(TEMPLATES)
NEGATIVE_EDITS: tuple[str, ...] = ("colour", "shape", "size", "relation", "swap_colours")
#: Edits that keep a scene in its hold-out group (so in its split), whatever the scene.
_GROUP_PRESERVING = ("size", "relation", "swap_colours")
SPLITS: tuple[str, ...] = ("train", "val", "test")

#: Zero-shot tasks: task -> class -> prompts. None of them is a caption of the corpus.
ARRANGEMENT: dict[str, str] = {
    "left of": "side by side",
    "right of": "side by side",
    "above": "stacked",
    "below": "stacked",
}
_ZEROSHOT: dict[str, dict[str, list[str]]] = {
    "arrangement": {
        "side by side": ["two shapes side by side", "two shapes next to each other"],
        "stacked": ["two shapes, one above the other", "two shapes stacked vertically"],
    },
    "large_shape": {s: [f"a large {s}", f"a picture of a large {s}"] for s in SHAPES},
    "large_colour": {c: [f"a large {c} shape", f"a picture of a large {c} shape"] for c in COLOURS},
}

_SIZE_JITTER = 0.08  # relative jitter of an object's half-extent
_COLOUR_JITTER = 14  # per-channel jitter of an object's fill (keeps it nearest its palette entry)
_MARGIN = 0.02  # min distance (fraction of side) between an object and the image border
_GAP = 0.06  # min empty space (fraction of side) between the two objects along the relation axis
_MAX_ROTATION = 12.0  # degrees, for non-circles


@dataclass
class SyntheticConfig:
    """What to generate. Every field feeds ``corpus_key`` so caches never go stale."""

    size: int = 2000  # number of (image, caption) pairs, not images
    seed: int = 0
    image_size: int = 224
    captions_per_image: int = 1  # >1 adds paraphrases of the same scene
    val_fraction: float = 0.1
    test_fraction: float = 0.1

    def validate(self) -> None:
        """Raise ConfigError naming the bad field, before any work is done."""
        if self.size < 1:
            raise ConfigError(f"synthetic.size must be >= 1, got {self.size}")
        if self.image_size < 32:
            raise ConfigError(f"synthetic.image_size must be >= 32, got {self.image_size}")
        if not 1 <= self.captions_per_image <= MAX_CAPTIONS_PER_IMAGE:
            raise ConfigError(
                f"synthetic.captions_per_image must be in 1..{MAX_CAPTIONS_PER_IMAGE} "
                f"(distinct paraphrases available), got {self.captions_per_image}"
            )
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"synthetic.{name} must be in [0, 1), got {value}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ConfigError(
                "synthetic.val_fraction + synthetic.test_fraction must be < 1 "
                f"(got {self.val_fraction} + {self.test_fraction}); nothing would be left to train"
            )


@dataclass(frozen=True)
class SceneObject:
    """One rendered object; ``cx, cy, radius`` are in pixels (radius = circumradius)."""

    size: str
    colour: str
    shape: str
    cx: float = 0.0
    cy: float = 0.0
    radius: float = 0.0
    rotation: float = 0.0
    fill: tuple[int, int, int] = (0, 0, 0)

    @property
    def phrase(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """Two objects and the relation of ``a`` to ``b`` (``a`` is ``relation`` ``b``)."""

    a: SceneObject
    b: SceneObject
    relation: str
    background: tuple[int, int, int] = (238, 238, 238)

    def caption(self, variant: int = 0) -> str:
        """Paraphrase ``variant``: even variants speak from ``a``'s side, odd from ``b``'s."""
        template = TEMPLATES[(variant // 2) % len(TEMPLATES)]
        if variant % 2 == 0:
            return template.format(a=self.a.phrase, rel=self.relation, b=self.b.phrase)
        return template.format(
            a=self.b.phrase, rel=INVERSE_RELATION[self.relation], b=self.a.phrase
        )


def _rng(*parts: object) -> random.Random:
    """A stable RNG for the given key (str seeds are hashed with SHA-512, not ``hash``)."""
    return random.Random(":".join(str(p) for p in parts))


# ---- compositions, hold-out groups and the split ------------------------------------------

#: A scene's attributes without layout: ((size, colour, shape) of a, relation, of b).
Attrs = tuple[str, str, str]
Stated = tuple[Attrs, str, Attrs]


def _stated(scene: Scene) -> Stated:
    a, b = scene.a, scene.b
    return (a.size, a.colour, a.shape), scene.relation, (b.size, b.colour, b.shape)


def composition(stated: Stated | Scene) -> Stated:
    """The scene a caption states, whichever object it speaks from: every paraphrase (all 8
    templates and sides) of a scene has the same composition, a different scene never does."""
    a, rel, b = _stated(stated) if isinstance(stated, Scene) else stated
    return (a, rel, b) if rel in ("left of", "above") else (b, INVERSE_RELATION[rel], a)


def holdout_group(stated: Stated | Scene) -> tuple[str, tuple[str, str], tuple[str, str]]:
    """The unit the split holds out: the relation's axis, the colour pair and the shape pair.
    Size, relation and colour-swap edits never leave it (see ``_GROUP_PRESERVING``)."""
    a, rel, b = _stated(stated) if isinstance(stated, Scene) else stated
    axis = "horizontal" if rel in ("left of", "right of") else "vertical"
    return axis, (min(a[1], b[1]), max(a[1], b[1])), (min(a[2], b[2]), max(a[2], b[2]))


def _split_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(val, test) counts of n items: rounded, at least one for a non-zero fraction, and at
    least one item left to train (the larger held-out split gives way)."""
    n_val = max(round(n * val_fraction), 1 if val_fraction > 0 else 0)
    n_test = max(round(n * test_fraction), 1 if test_fraction > 0 else 0)
    while n_val + n_test > n - 1:
        if n_test >= n_val:
            n_test -= 1
        else:
            n_val -= 1
    return n_val, n_test


@functools.lru_cache(maxsize=8)
def group_splits(seed: int, val_fraction: float, test_fraction: float) -> Mapping[tuple, str]:
    """Split of every hold-out group (2 axes x 15 colour pairs x 10 shape pairs = 300):
    counts from the fractions, chosen by a seeded shuffle (each seed holds out different
    combinations). Read-only: it is cached."""
    groups = [
        (axis, colours, shapes)
        for axis in ("horizontal", "vertical")
        for colours in itertools.combinations(sorted(COLOURS), 2)
        for shapes in itertools.combinations_with_replacement(sorted(SHAPES), 2)
    ]
    _rng(CORPUS_NAME, SYNTHETIC_VERSION, seed, "groups").shuffle(groups)
    n_val, n_test = _split_counts(len(groups), val_fraction, test_fraction)
    return MappingProxyType(
        {
            g: "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
            for rank, g in enumerate(groups)
        }
    )


def negative_candidates(stated: Stated) -> dict[str, list[Stated]]:
    """Every one-slot edit of a scene that makes its caption false, by edit, in a fixed order.
    A recolour never takes the other object's colour (that caption could describe it)."""
    a, rel, b = stated
    colours = [c for c in COLOURS if c not in (a[1], b[1])]
    out: dict[str, list[Stated]] = {
        "colour": [],
        "shape": [],
        "size": [],
        "relation": [(a, INVERSE_RELATION[rel], b)],
        "swap_colours": [((a[0], b[1], a[2]), rel, (b[0], a[1], b[2]))],
    }
    for which, obj in ((0, a), (1, b)):

        def edited(new: Attrs, which: int = which) -> Stated:
            return (new, rel, b) if which == 0 else (a, rel, new)

        out["colour"] += [edited((obj[0], c, obj[2])) for c in colours]
        out["shape"] += [edited((obj[0], obj[1], s)) for s in SHAPES if s != obj[2]]
        out["size"] += [edited((s, obj[1], obj[2])) for s in SIZES if s != obj[0]]
    return out


@dataclass(frozen=True)
class _Entry:
    """A scene a split may draw, with its negatives that stay in the split, by edit."""

    stated: Stated
    negatives: dict[str, tuple[Stated, ...]]


class _Catalogue:
    """Every scene (7,680 = 48 x 40 ordered object pairs x 4 relations) by split, and which
    of them can give each set of negative edits without leaving the split."""

    def __init__(self, seed: int, val_fraction: float, test_fraction: float) -> None:
        self.group_split = group_splits(seed, val_fraction, test_fraction)
        self.entries: dict[str, list[_Entry]] = {s: [] for s in SPLITS}
        objects = list(itertools.product(SIZES, COLOURS, SHAPES))
        for a, b in itertools.product(objects, objects):
            if a[1] == b[1]:
                continue  # distinct colours keep every negative false
            for rel in RELATIONS:
                stated = (a, rel, b)
                split = self.group_split[holdout_group(stated)]
                kept = {
                    edit: tuple(
                        n
                        for n in cands
                        if edit in _GROUP_PRESERVING or self.group_split[holdout_group(n)] == split
                    )
                    for edit, cands in negative_candidates(stated).items()
                }
                self.entries[split].append(_Entry(stated, kept))
        self._eligible: dict[tuple[str, frozenset[str]], list[_Entry]] = {}

    def eligible(self, split: str, edits: frozenset[str]) -> list[_Entry]:
        """Scenes of ``split`` with an in-split negative for every edit in ``edits``."""
        key = (split, edits)
        if key not in self._eligible:
            self._eligible[key] = [
                e for e in self.entries[split] if all(e.negatives[x] for x in edits)
            ]
        return self._eligible[key]


@functools.lru_cache(maxsize=4)
def _catalogue(seed: int, val_fraction: float, test_fraction: float) -> _Catalogue:
    return _Catalogue(seed, val_fraction, test_fraction)


def image_splits(cfg: SyntheticConfig) -> list[str]:
    """Split of each image: exact counts from the fractions, positions from a seeded shuffle."""
    n_images = math.ceil(cfg.size / cfg.captions_per_image)
    n_test = round(n_images * cfg.test_fraction)
    n_val = min(round(n_images * cfg.val_fraction), n_images - n_test)
    order = list(range(n_images))
    _rng(CORPUS_NAME, SYNTHETIC_VERSION, cfg.seed, "split").shuffle(order)
    splits = ["train"] * n_images
    for rank, index in enumerate(order):
        if rank < n_test:
            splits[index] = "test"
        elif rank < n_test + n_val:
            splits[index] = "val"
    return splits


@dataclass(frozen=True)
class ImagePlan:
    """What image ``index`` shows and states, before layout: its scene, one (negative, edit)
    per caption, and how many captions got another edit than drawn (none fitted the split)."""

    stated: Stated
    negatives: tuple[tuple[Stated, str], ...]
    substituted: int


def _plan(cfg: SyntheticConfig, index: int, split: str, rng: random.Random) -> ImagePlan:
    """Draw the edits of the image's captions (a seeded permutation of the edits, cycled, so
    kinds stay balanced in every split), then a scene of the split that gives each of them
    an in-split negative, then the negatives. Only when a split is too small to have such a
    scene are colour/shape edits replaced (by the next drawn edit the scene allows)."""
    c = cfg.captions_per_image
    order = rng.sample(NEGATIVE_EDITS, len(NEGATIVE_EDITS))
    wanted = [order[k % len(order)] for k in range(min(c, cfg.size - index * c))]
    catalogue = _catalogue(cfg.seed, cfg.val_fraction, cfg.test_fraction)
    needed = frozenset(wanted)
    for drop in ((), ("shape",), ("colour",), ("colour", "shape")):
        eligible = catalogue.eligible(split, needed - frozenset(drop))
        if eligible:
            break
    entry = rng.choice(eligible)
    negatives, substituted = [], 0
    for edit in wanted:
        if not entry.negatives[edit]:  # the next drawn edit this scene allows
            later = order[order.index(edit) + 1 :] + order
            edit = next(e for e in later if entry.negatives[e])
            substituted += 1
        negatives.append((rng.choice(entry.negatives[edit]), edit))
    return ImagePlan(entry.stated, tuple(negatives), substituted)


def _as_scene(stated: Stated) -> Scene:
    """A scene without layout (enough for captions and labels)."""
    (sa, ca, ha), rel, (sb, cb, hb) = stated
    return Scene(SceneObject(sa, ca, ha), SceneObject(sb, cb, hb), rel)


def _layout(stated: Stated, rng: random.Random, image_size: int) -> Scene:
    """Place, size, tint and rotate the two objects so the stated relation clearly holds."""
    a_attrs, relation, b_attrs = stated
    sizes = (a_attrs[0], b_attrs[0])
    s = float(image_size)
    radii = [SIZES[sz] * s * (1.0 + rng.uniform(-_SIZE_JITTER, _SIZE_JITTER)) for sz in sizes]

    # Along the relation axis, put the "first" object (lower coordinate) then the second, with
    # at least _GAP between their extents; the free slack is split randomly around them.
    first, second = (0, 1) if relation in ("left of", "above") else (1, 0)
    margin, gap = _MARGIN * s, _GAP * s
    slack = max(0.0, s - 2 * margin - 2 * radii[0] - 2 * radii[1] - gap)
    u1 = rng.uniform(0.0, slack)
    u2 = rng.uniform(0.0, slack - u1)
    main = [0.0, 0.0]
    main[first] = margin + radii[first] + u1
    main[second] = main[first] + radii[first] + gap + radii[second] + u2
    # Across the axis, keep the offset below half the main-axis distance so the stated
    # relation is the dominant one (never "left of" while mostly "above").
    distance = main[second] - main[first]
    r_max = max(radii)
    delta = min(0.25 * distance, 0.12 * s)
    lo, hi = margin + r_max + delta, s - margin - r_max - delta
    mid = rng.uniform(lo, hi) if hi > lo else s / 2
    offset = rng.uniform(-delta, delta)
    cross = [mid + offset, mid - offset]

    objects = []
    for i, (sz, col, shp) in enumerate((a_attrs, b_attrs)):
        cx, cy = (main[i], cross[i]) if relation in ("left of", "right of") else (cross[i], main[i])
        red, green, blue = (
            min(255, max(0, c + rng.randint(-_COLOUR_JITTER, _COLOUR_JITTER))) for c in COLOURS[col]
        )
        rotation = 0.0 if shp == "circle" else rng.uniform(-_MAX_ROTATION, _MAX_ROTATION)
        fill = (red, green, blue)
        objects.append(SceneObject(sz, col, shp, cx, cy, radii[i], rotation, fill))
    background = (238 + rng.randint(-8, 8), 238 + rng.randint(-8, 8), 238 + rng.randint(-8, 8))
    return Scene(objects[0], objects[1], relation, background)


def plan_image(
    cfg: SyntheticConfig, index: int, split: str | None = None
) -> tuple[Scene, ImagePlan]:
    """Image ``index`` of the corpus: its laid-out scene and its plan (``split`` defaults to
    the image's own, from ``image_splits``)."""
    if split is None:
        split = image_splits(cfg)[index]
    rng = _rng(CORPUS_NAME, SYNTHETIC_VERSION, cfg.seed, "scene", index)
    plan = _plan(cfg, index, split, rng)
    return _layout(plan.stated, rng, cfg.image_size), plan


def sample_scene(cfg: SyntheticConfig, index: int, split: str | None = None) -> Scene:
    """The laid-out scene of image ``index`` (what its pixels show)."""
    return plan_image(cfg, index, split)[0]


def scene_labels(scene: Scene) -> dict[str, str]:
    """The scene's zero-shot classes: its arrangement, and the larger object's shape and
    colour when the sizes differ (when they do not, those tasks have no answer)."""
    labels = {"arrangement": ARRANGEMENT[scene.relation]}
    if scene.a.size != scene.b.size:
        large = scene.a if scene.a.size == "large" else scene.b
        labels |= {"large_shape": large.shape, "large_colour": large.colour}
    return labels


def zeroshot_tasks() -> dict[str, dict[str, list[str]]]:
    """The zero-shot tasks (task -> class -> prompt texts); a fresh copy each call."""
    return {task: {k: list(v) for k, v in classes.items()} for task, classes in _ZEROSHOT.items()}


def _polygon(obj: SceneObject) -> list[tuple[float, float]]:
    """Vertices of a non-circle shape, centred (by area centroid) on the object's centre."""
    if obj.shape == "square":
        angles, radii = [45 + 90 * k for k in range(4)], [obj.radius] * 4
    elif obj.shape == "triangle":
        angles, radii = [-90 + 120 * k for k in range(3)], [obj.radius] * 3
    elif obj.shape == "star":
        angles = [-90 + 36 * k for k in range(10)]
        radii = [obj.radius if k % 2 == 0 else 0.45 * obj.radius for k in range(10)]
    else:  # pragma: no cover - guarded by SHAPES
        raise ValueError(f"unknown shape {obj.shape!r}")
    return [
        (
            obj.cx + r * math.cos(math.radians(a + obj.rotation)),
            obj.cy + r * math.sin(math.radians(a + obj.rotation)),
        )
        for a, r in zip(angles, radii, strict=True)
    ]


def render_scene(scene: Scene, image_size: int) -> Image.Image:
    """Draw the scene: flat fills, no anti-aliasing, so every pixel is background or an object."""
    image = Image.new("RGB", (image_size, image_size), scene.background)
    draw = ImageDraw.Draw(image)
    for obj in (scene.a, scene.b):
        if obj.shape == "circle":
            r = obj.radius
            draw.ellipse((obj.cx - r, obj.cy - r, obj.cx + r, obj.cy + r), fill=obj.fill)
        else:
            draw.polygon(_polygon(obj), fill=obj.fill)
    return image


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def corpus_key(cfg: SyntheticConfig) -> str:
    """Short stable hash of name, version and every config field (the cache key)."""
    payload = {"corpus": CORPUS_NAME, "version": SYNTHETIC_VERSION, **dataclasses.asdict(cfg)}
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def labels_json(labels: dict[str, str]) -> str:
    """The ``labels`` column's value: a JSON object {task: class}, keys sorted (stable bytes)."""
    return json.dumps(labels, sort_keys=True, separators=(",", ":"))


def iter_rows(cfg: SyntheticConfig) -> Iterator[dict]:
    """Yield the rows of ``generate`` one by one (rendering is the cost; memory stays flat)."""
    cfg.validate()
    for index, split in enumerate(image_splits(cfg)):
        scene, plan = plan_image(cfg, index, split)
        image = _png(render_scene(scene, cfg.image_size))
        image_id = f"syn-{index:06d}"
        labels = labels_json(scene_labels(scene))
        for k, (negative, edit) in enumerate(plan.negatives):
            yield {
                "pair_id": f"{image_id}-{k}",
                "image_id": image_id,
                "image": image,
                "caption": scene.caption(k),
                "negative": _as_scene(negative).caption(k),
                "negative_source": f"exact:{edit}",
                "split": split,
                "labels": labels,
            }


def generate(cfg: SyntheticConfig) -> list[dict]:
    """All ``cfg.size`` rows, ordered by image then caption; see ``raysys.corpora``."""
    return list(iter_rows(cfg))


# ---- measuring the split ------------------------------------------------------------------

_PHRASE = r"(\w+) (\w+) (\w+)"
_REL = "|".join(re.escape(r) for r in RELATIONS)
_TEMPLATE_RES = tuple(
    re.compile(
        "^"
        + re.escape(t)
        .replace(re.escape("{a}"), _PHRASE)
        .replace(re.escape("{rel}"), f"({_REL})")
        .replace(re.escape("{b}"), _PHRASE)
        + "$"
    )
    for t in TEMPLATES
)


def parse_caption(text: str) -> Stated | None:
    """The scene a caption of any template states, or None for any other text."""
    for pattern in _TEMPLATE_RES:
        m = pattern.match(text)
        if m is None:
            continue
        sa, ca, ha, rel, sb, cb, hb = m.groups()
        if all(s in SIZES for s in (sa, sb)) and all(c in COLOURS for c in (ca, cb)):
            if all(h in SHAPES for h in (ha, hb)):
                return (sa, ca, ha), rel, (sb, cb, hb)
    return None


def _scene_key(text: str) -> tuple:
    """What a text states: its composition when it parses, else the text itself."""
    stated = parse_caption(text)
    return ("scene", composition(stated)) if stated else ("text", text)


def split_overlap(pairs: pa.Table | Iterable[dict[str, Any]]) -> dict[str, int]:
    """How much of val and test the train split already holds, counted in held-out rows:

    ``<s>_captions_in_train``        caption verbatim among train captions
    ``<s>_negatives_in_train``       negative verbatim among train captions (a training input)
    ``<s>_scenes_in_train``          caption's scene (any paraphrase) stated by a train caption
                                     or train negative
    ``<s>_negative_scenes_in_train`` the same for the negative

    Texts that are not synthetic captions count by their exact text. All zero for a sound
    compositional split; any corpus's pair rows can be measured."""
    rows = pairs.to_pylist() if isinstance(pairs, pa.Table) else list(pairs)
    train = [r for r in rows if r.get("split") == "train"]
    captions = {r["caption"] for r in train if r.get("caption")}
    texts = captions | {r["negative"] for r in train if r.get("negative")}
    scenes = {_scene_key(t) for t in texts}
    out: dict[str, int] = {}
    for held in ("val", "test"):
        mine = [r for r in rows if r.get("split") == held]
        caps = [r["caption"] for r in mine if r.get("caption")]
        negs = [r["negative"] for r in mine if r.get("negative")]
        out[f"{held}_captions_in_train"] = sum(t in captions for t in caps)
        out[f"{held}_negatives_in_train"] = sum(t in captions for t in negs)
        out[f"{held}_scenes_in_train"] = sum(_scene_key(t) in scenes for t in caps)
        out[f"{held}_negative_scenes_in_train"] = sum(_scene_key(t) in scenes for t in negs)
    return out


def corpus_info(cfg: SyntheticConfig, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What the cache manifest records about the split: its unit, the groups and pairs per
    split, the negatives whose drawn edit no in-split scene allowed, and the overlap (0)."""
    splits = image_splits(cfg)
    substituted = sum(
        _plan(cfg, i, s, _rng(CORPUS_NAME, SYNTHETIC_VERSION, cfg.seed, "scene", i)).substituted
        for i, s in enumerate(splits)
    )
    groups = group_splits(cfg.seed, cfg.val_fraction, cfg.test_fraction).values()
    return {
        "split": {
            "unit": "hold-out group (relation axis, colour pair, shape pair)",
            "groups": {s: sum(g == s for g in groups) for s in SPLITS},
            "pairs": {s: sum(r["split"] == s for r in rows) for s in SPLITS},
            "fractions": {
                s: round(sum(r["split"] == s for r in rows) / max(1, len(rows)), 4) for s in SPLITS
            },
            "substituted_negatives": substituted,
        },
        "overlap": split_overlap(rows),
    }
