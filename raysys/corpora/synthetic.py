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
differ, and a recoloured object never takes the other object's colour).

Everything is derived from ``SyntheticConfig``; the same config gives byte-identical rows. Each
image has its own RNG stream (seeded from ``seed`` and the image index), so any image can be
regenerated on its own, e.g. by a distributed worker.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image, ImageDraw

from raysys.errors import ConfigError

#: Bump when rendering, caption templates or negative rules change: it invalidates caches.
SYNTHETIC_VERSION = 1
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


def sample_scene(seed: int, index: int, image_size: int = 224) -> Scene:
    """Sample scene ``index`` of the corpus with ``seed``: attributes, layout and jitter."""
    rng = _rng(CORPUS_NAME, SYNTHETIC_VERSION, seed, "scene", index)
    colour_a, colour_b = rng.sample(list(COLOURS), 2)  # distinct: keeps negatives false
    sizes = (rng.choice(list(SIZES)), rng.choice(list(SIZES)))
    shapes = (rng.choice(SHAPES), rng.choice(SHAPES))
    relation = rng.choice(RELATIONS)
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
    for i, (sz, col, shp) in enumerate(zip(sizes, (colour_a, colour_b), shapes, strict=True)):
        cx, cy = (main[i], cross[i]) if relation in ("left of", "right of") else (cross[i], main[i])
        red, green, blue = (
            min(255, max(0, c + rng.randint(-_COLOUR_JITTER, _COLOUR_JITTER))) for c in COLOURS[col]
        )
        rotation = 0.0 if shp == "circle" else rng.uniform(-_MAX_ROTATION, _MAX_ROTATION)
        fill = (red, green, blue)
        objects.append(SceneObject(sz, col, shp, cx, cy, radii[i], rotation, fill))
    background = (238 + rng.randint(-8, 8), 238 + rng.randint(-8, 8), 238 + rng.randint(-8, 8))
    return Scene(objects[0], objects[1], relation, background)


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


def negative_scene(scene: Scene, rng: random.Random) -> tuple[Scene, str]:
    """Return (scene with exactly one slot edited so its caption is false, edit name)."""
    edit = rng.choice(NEGATIVE_EDITS)
    a, b = scene.a, scene.b
    if edit == "relation":
        return dataclasses.replace(scene, relation=INVERSE_RELATION[scene.relation]), edit
    if edit == "swap_colours":
        return dataclasses.replace(
            scene,
            a=dataclasses.replace(a, colour=b.colour),
            b=dataclasses.replace(b, colour=a.colour),
        ), edit
    which = rng.choice(("a", "b"))
    obj = a if which == "a" else b
    if edit == "colour":  # never the other object's colour: that could describe it instead
        choices = [c for c in COLOURS if c not in (a.colour, b.colour)]
        obj = dataclasses.replace(obj, colour=rng.choice(choices))
    elif edit == "shape":
        obj = dataclasses.replace(obj, shape=rng.choice([s for s in SHAPES if s != obj.shape]))
    else:  # size
        obj = dataclasses.replace(obj, size=next(s for s in SIZES if s != obj.size))
    return dataclasses.replace(scene, **{which: obj}), edit


def corpus_key(cfg: SyntheticConfig) -> str:
    """Short stable hash of name, version and every config field (the cache key)."""
    payload = {"corpus": CORPUS_NAME, "version": SYNTHETIC_VERSION, **dataclasses.asdict(cfg)}
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


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


def iter_rows(cfg: SyntheticConfig) -> Iterator[dict]:
    """Yield the rows of ``generate`` one by one (rendering is the cost; memory stays flat)."""
    cfg.validate()
    c = cfg.captions_per_image
    for index, split in enumerate(image_splits(cfg)):
        scene = sample_scene(cfg.seed, index, cfg.image_size)
        image = _png(render_scene(scene, cfg.image_size))
        image_id = f"syn-{index:06d}"
        for k in range(min(c, cfg.size - index * c)):
            rng = _rng(CORPUS_NAME, SYNTHETIC_VERSION, cfg.seed, "negative", index, k)
            negative, _ = negative_scene(scene, rng)
            yield {
                "pair_id": f"{image_id}-{k}",
                "image_id": image_id,
                "image": image,
                "caption": scene.caption(k),
                "negative": negative.caption(k),
                "negative_source": "exact",
                "split": split,
            }


def generate(cfg: SyntheticConfig) -> list[dict]:
    """All ``cfg.size`` rows, ordered by image then caption; see ``raysys.corpora``."""
    return list(iter_rows(cfg))
