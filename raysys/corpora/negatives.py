"""Rule-based hard negatives for arbitrary English captions (for corpora that ship none).

A hard negative is the caption with exactly ONE small edit that (very likely) makes it false for
its image, so a model must read the words, not just the topic, to tell them apart. The rules:

``swap_attributes``  swap two colour words, or two size words of opposite polarity, that belong
                     to different phrases ("a red car near a blue bus" -> "a blue car near a red
                     bus"); coordinated ones ("red and white") are left alone, as swapping them
                     would not change the meaning.
``relation``         replace a relation word/phrase with its opposite (left<->right,
                     above<->below, on<->under, in front of<->behind, inside<->outside, with<->
                     without, ...).
``colour``           replace a colour word with a colour not already in the caption.
``noun``             replace a common object noun with another of the same kind and number
                     (dog -> cat, man -> woman, buses -> trucks, circle -> square, ...).
``size_number``      replace a size or number word (small<->large, tall<->short, two->three...).

The rules are tried in an order shuffled by ``(seed, caption)``; the first rule that applies
fires once on one seeded choice of word. Everything else (case, punctuation, spacing) is kept;
only an article right before the edited word may change ("an orange" -> "a red"), which stays
within the one contiguous edit. Matching is on whole words, so "redo" never matches "red".
When no rule applies, ``make_negative`` returns None and the caller records the pair as having
no negative.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import pyarrow as pa

RULES: tuple[str, ...] = ("swap_attributes", "relation", "colour", "noun", "size_number")


@dataclass(frozen=True)
class Negative:
    """A hard-negative caption and the rule that made it (one of ``RULES``)."""

    text: str
    rule: str


COLOURS: tuple[str, ...] = (
    "red",
    "orange",
    "yellow",
    "green",
    "blue",
    "purple",
    "pink",
    "brown",
    "black",
    "white",
    "gray",
    "grey",
)
_COLOUR_CANON = {c: ("gray" if c == "grey" else c) for c in COLOURS}

#: Relation phrase -> its opposite. Multi-word phrases win over their parts ("in front of").
RELATION_OPPOSITES: dict[str, str] = {
    "in front of": "behind",
    "behind": "in front of",
    "on top of": "underneath",
    "underneath": "on top of",
    "beneath": "above",
    "above": "below",
    "below": "above",
    "over": "under",
    "under": "on",
    "on": "under",
    "off": "on",
    "left": "right",
    "right": "left",
    "inside": "outside",
    "outside": "inside",
    "into": "out of",
    "out of": "into",
    "up": "down",
    "down": "up",
    "near": "far from",
    "next to": "far from",
    "close to": "far from",
    "beside": "far from",
    "far from": "near",
    "with": "without",
    "without": "with",
    "toward": "away from",
    "towards": "away from",
    "away from": "towards",
}

#: Size and number words -> a contradicting replacement.
SIZE_NUMBER: dict[str, str] = {
    "small": "large",
    "large": "small",
    "big": "small",
    "little": "big",
    "tiny": "huge",
    "huge": "tiny",
    "giant": "tiny",
    "tall": "short",
    "short": "tall",
    "long": "short",
    "wide": "narrow",
    "narrow": "wide",
    "thick": "thin",
    "thin": "thick",
    "one": "two",
    "two": "three",
    "three": "two",
    "four": "three",
    "five": "four",
    "six": "five",
    "seven": "six",
    "eight": "seven",
    "nine": "eight",
    "ten": "nine",
}
#: Polarity of size words: swapping two of the same polarity would change nothing.
_SIZE_POLARITY = {
    **dict.fromkeys(("large", "big", "huge", "giant", "tall", "long", "wide", "thick"), 1),
    **dict.fromkeys(("small", "little", "tiny", "short", "narrow", "thin"), -1),
}

#: Replacement pools of (singular, plural); a noun is replaced from its own pool.
NOUN_POOLS: dict[str, tuple[tuple[str, str], ...]] = {
    "people": (("man", "men"), ("woman", "women"), ("boy", "boys"), ("girl", "girls")),
    "animals": (
        ("dog", "dogs"),
        ("cat", "cats"),
        ("horse", "horses"),
        ("cow", "cows"),
        ("bird", "birds"),
        ("elephant", "elephants"),
        ("bear", "bears"),
        ("zebra", "zebras"),
        ("giraffe", "giraffes"),
    ),
    "vehicles": (
        ("car", "cars"),
        ("bus", "buses"),
        ("truck", "trucks"),
        ("train", "trains"),
        ("boat", "boats"),
        ("bicycle", "bicycles"),
        ("motorcycle", "motorcycles"),
        ("airplane", "airplanes"),
    ),
    "furniture": (
        ("chair", "chairs"),
        ("table", "tables"),
        ("couch", "couches"),
        ("bed", "beds"),
        ("bench", "benches"),
    ),
    "food": (
        ("pizza", "pizzas"),
        ("cake", "cakes"),
        ("banana", "bananas"),
        ("apple", "apples"),
        ("sandwich", "sandwiches"),
        ("donut", "donuts"),
    ),
    "things": (
        ("umbrella", "umbrellas"),
        ("kite", "kites"),
        ("ball", "balls"),
        ("laptop", "laptops"),
        ("clock", "clocks"),
        ("book", "books"),
    ),
    "shapes": (
        ("circle", "circles"),
        ("square", "squares"),
        ("triangle", "triangles"),
        ("star", "stars"),
    ),
}
#: word -> (pool to draw the replacement from, plural?). "person" has no safe same-kind
#: replacement ("man" may be true), so it is replaced by an animal.
_NOUNS: dict[str, tuple[str, bool]] = {
    **{s: (pool, False) for pool, pairs in NOUN_POOLS.items() for s, _ in pairs},
    **{p: (pool, True) for pool, pairs in NOUN_POOLS.items() for _, p in pairs},
    "person": ("animals", False),
    "people": ("animals", True),
    "child": ("animals", False),
    "children": ("animals", True),
}

#: Tokens that do not separate two attributes: "red and white" is one attribute, not two.
_CONNECTIVES = frozenset({"and", "or", "a", "an", "the", "of", "very", "light", "dark", "bright"})

_WORD = re.compile(r"[A-Za-z]+|[0-9]+")


@dataclass(frozen=True)
class _Token:
    start: int
    end: int
    word: str  # lower case


@dataclass(frozen=True)
class _Edit:
    """Replace ``tokens[first:last + 1]`` with ``text`` (case taken from the first token)."""

    first: int
    last: int
    text: str


def _tokenize(caption: str) -> list[_Token]:
    return [_Token(m.start(), m.end(), m.group().lower()) for m in _WORD.finditer(caption)]


def _match_case(source: str, new: str) -> str:
    """Give ``new`` the case pattern of ``source`` (UPPER, Title or lower)."""
    if len(source) > 1 and source.isupper():
        return new.upper()
    if source[:1].isupper():
        return new[:1].upper() + new[1:]
    return new


def _adjacent(caption: str, tokens: list[_Token], i: int, j: int) -> bool:
    """True when tokens i and j (i < j) are consecutive words separated only by spaces."""
    return j == i + 1 and caption[tokens[i].end : tokens[j].start].isspace()


def _apply(caption: str, tokens: list[_Token], edits: list[_Edit]) -> str:
    """Apply non-overlapping edits, fixing an "a"/"an" right before an edited word."""
    spans = []
    for edit in edits:
        first, text = edit.first, edit.text
        new = _match_case(caption[tokens[first].start : tokens[first].end], text)
        if (
            first > 0
            and tokens[first - 1].word in ("a", "an")
            and _adjacent(caption, tokens, first - 1, first)
        ):
            article = "an" if text[:1].lower() in "aeiou" else "a"
            if article != tokens[first - 1].word:
                prev = tokens[first - 1]
                new = _match_case(caption[prev.start : prev.end], article) + (
                    caption[prev.end : tokens[first].start] + new
                )
                first -= 1
        spans.append((tokens[first].start, tokens[edit.last].end, new))
    out = caption
    shouting = caption.isupper()  # "A" alone cannot tell UPPER from Title case
    for start, end, new in sorted(spans, reverse=True):
        new = new.upper() if shouting else new
        out = out[:start] + new + out[end:]
    return out


def _swap_candidates(caption: str, tokens: list[_Token], rng: random.Random) -> list[list[_Edit]]:
    attrs = [
        (i, t.word)
        for i, t in enumerate(tokens)
        if t.word in _COLOUR_CANON or t.word in _SIZE_POLARITY
    ]
    out = []
    for x, (i, wi) in enumerate(attrs):
        for j, wj in attrs[x + 1 :]:
            if wi in _COLOUR_CANON and wj in _COLOUR_CANON:
                differ = _COLOUR_CANON[wi] != _COLOUR_CANON[wj]
            elif wi in _SIZE_POLARITY and wj in _SIZE_POLARITY:
                differ = _SIZE_POLARITY[wi] != _SIZE_POLARITY[wj]
            else:
                continue
            separated = any(t.word not in _CONNECTIVES for t in tokens[i + 1 : j])
            if differ and separated:
                out.append([_Edit(i, i, wj), _Edit(j, j, wi)])
    return out


def _relation_candidates(
    caption: str, tokens: list[_Token], rng: random.Random
) -> list[list[_Edit]]:
    phrases = sorted(
        ((tuple(p.split()), q) for p, q in RELATION_OPPOSITES.items()), key=lambda pq: -len(pq[0])
    )
    out, i = [], 0
    while i < len(tokens):
        for words, opposite in phrases:
            j = i + len(words) - 1
            if j < len(tokens) and tuple(t.word for t in tokens[i : j + 1]) == words:
                if all(_adjacent(caption, tokens, k, k + 1) for k in range(i, j)):
                    out.append([_Edit(i, j, opposite)])
                    i = j
                    break
        i += 1
    return out


def _colour_candidates(caption: str, tokens: list[_Token], rng: random.Random) -> list[list[_Edit]]:
    present = {_COLOUR_CANON[t.word] for t in tokens if t.word in _COLOUR_CANON}
    pool = [c for c in COLOURS if c != "grey" and c not in present]
    return [
        [_Edit(i, i, rng.choice(pool))]
        for i, t in enumerate(tokens)
        if t.word in _COLOUR_CANON and pool
    ]


def _noun_candidates(caption: str, tokens: list[_Token], rng: random.Random) -> list[list[_Edit]]:
    present = {t.word for t in tokens}
    out = []
    for i, t in enumerate(tokens):
        if t.word not in _NOUNS:
            continue
        pool, plural = _NOUNS[t.word]
        choices = [pair[plural] for pair in NOUN_POOLS[pool]]
        choices = [w for w in choices if w != t.word and w not in present]
        if choices:
            out.append([_Edit(i, i, rng.choice(choices))])
    return out


def _size_number_candidates(
    caption: str, tokens: list[_Token], rng: random.Random
) -> list[list[_Edit]]:
    out = []
    for i, t in enumerate(tokens):
        if t.word in SIZE_NUMBER:
            out.append([_Edit(i, i, SIZE_NUMBER[t.word])])
        elif t.word.isdigit() and 1 <= int(t.word) <= 20:  # counts, not years or sizes
            n = int(t.word)
            out.append([_Edit(i, i, str(2 if n == 1 else n - 1))])
    return out


_FINDERS = {
    "swap_attributes": _swap_candidates,
    "relation": _relation_candidates,
    "colour": _colour_candidates,
    "noun": _noun_candidates,
    "size_number": _size_number_candidates,
}


def make_negative(caption: str, seed: int | str = 0) -> Negative | None:
    """One-edit hard negative of ``caption``, or None when no rule applies.

    Deterministic in ``(caption, seed)``: the caption is part of the RNG key so that one corpus
    seed still spreads the rules over the captions. The result never equals the caption.
    """
    rng = random.Random(f"negatives\x00{seed}\x00{caption}")  # str seed: stable across runs
    tokens = _tokenize(caption)
    order = list(RULES)
    rng.shuffle(order)
    for rule in order:
        candidates = _FINDERS[rule](caption, tokens, rng)
        while candidates:
            edits = candidates.pop(rng.randrange(len(candidates)))
            text = _apply(caption, tokens, edits)
            if text != caption:
                return Negative(text, rule)
    return None


def filled(
    caption: str | None, negative: str | None, pair_id: str, source: str | None
) -> tuple[str | None, str]:
    """One pair's negative and where it came from: a supplied one kept (source `corpus`
    unless the corpus named it), else a rule-based edit of the caption seeded by the pair
    id (`generated:<rule>`), else None (`none`: the text pass rejects it)."""
    if negative:
        return negative, source or "corpus"
    derived = make_negative(caption, seed=pair_id) if caption else None
    return (derived.text, f"generated:{derived.rule}") if derived else (None, "none")


def fill_negatives(rows: list[dict]) -> list[dict]:
    """`filled` on rows in place: every caption gets a negative where a rule applies, and
    every row its `negative_source`."""
    for row in rows:
        row["negative"], row["negative_source"] = filled(
            row.get("caption"), row.get("negative"), row["pair_id"], row.get("negative_source")
        )
    return rows


RULES_VERSION = 1  # bump when a rule changes what it generates: it re-keys every corpus index


def negatives_table(pairs: pa.Table) -> pa.Table:
    """`filled` on a table (a batch of the index job, or a small corpus's pairs):
    `negative` filled where a rule applies and `negative_source` for every pair."""
    captions = pairs["caption"].to_pylist()
    given = pairs["negative"].to_pylist()
    ids = pairs["pair_id"].to_pylist()
    known = (
        pairs["negative_source"].to_pylist()
        if "negative_source" in pairs.column_names
        else [None] * len(ids)
    )
    results = [filled(*values) for values in zip(captions, given, ids, known, strict=True)]
    negatives = [negative for negative, _ in results]
    sources = [source for _, source in results]
    out = pairs.drop_columns(
        [c for c in ("negative", "negative_source") if c in pairs.column_names]
    )
    position = out.column_names.index("caption") + 1
    out = out.add_column(position, "negative", pa.array(negatives, pa.string()))
    return out.add_column(position + 1, "negative_source", pa.array(sources, pa.string()))
