"""Tests for the rule-based hard-negative editor: one edit, never a no-op, deterministic."""

from __future__ import annotations

import dataclasses
import difflib
import re

import pytest

from raysys.corpora import Negative, make_negative
from raysys.corpora.negatives import (
    COLOURS,
    NOUN_POOLS,
    RELATION_OPPOSITES,
    RULES,
    SIZE_NUMBER,
)

CAPTIONS = [
    "A red car parked next to a blue bus.",
    "an orange cat sitting on top of a wooden table",
    "Two dogs playing in front of a large house",
    "A man with an umbrella walking under a bridge",
    "The small bird is above the big elephant",
    "a black and white photo of a woman holding a pizza",
    "Three people riding horses on the beach, near the water.",
    "A GREEN TRUCK LEFT OF A YELLOW TAXI",
    "a small red circle left of a large blue square",
    "a child's kite stuck in a tall tree",
]
_ARTICLES = {"a", "an", "A", "An"}


def _words(ops, words):
    return [w for i1, i2 in ops for w in words[i1:i2] if w not in _ARTICLES]


def assert_one_edit(caption: str, negative: str) -> None:
    """Exactly one contiguous replacement of words, or one swap of two words.

    An article right before an edited word may change with it ("an orange" -> "a red").
    """
    a, b = caption.split(), negative.split()
    ops = [op for op in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes()]
    changed = [op for op in ops if op[0] != "equal"]
    assert changed, "no edit"
    if len(changed) == 1:
        return
    assert len(changed) == 2, (caption, negative, changed)
    (t1, i1, i2, j1, j2), (t2, k1, k2, l1, l2) = changed
    assert t1 == t2 == "replace", (caption, negative)
    old1, new1 = _words([(i1, i2)], a), _words([(j1, j2)], b)
    old2, new2 = _words([(k1, k2)], a), _words([(l1, l2)], b)
    assert [w.lower() for w in old1] == [w.lower() for w in new2], (caption, negative)
    assert [w.lower() for w in old2] == [w.lower() for w in new1], (caption, negative)


@pytest.mark.parametrize("caption", CAPTIONS)
def test_one_edit_never_identity(caption):
    outputs = set()
    for seed in range(25):
        neg = make_negative(caption, seed)
        assert isinstance(neg, Negative) and neg.rule in RULES
        assert neg.text != caption
        assert_one_edit(caption, neg.text)
        # Case and punctuation outside the edit survive.
        assert neg.text[0].isupper() == caption[0].isupper()
        assert re.sub(r"[\w\s]", "", neg.text) == re.sub(r"[\w\s]", "", caption)
        outputs.add(neg.text)
    assert len(outputs) > 1, "the seed should vary which edit is made"


@pytest.mark.parametrize("caption", CAPTIONS)
def test_deterministic(caption):
    for seed in (0, 1, "run-7"):
        assert make_negative(caption, seed) == make_negative(caption, seed)


def test_all_rules_reachable():
    fired = {make_negative(c, s).rule for c in CAPTIONS for s in range(25)}
    assert fired == set(RULES)


@pytest.mark.parametrize(
    "caption",
    ["", "   ", "Hello there.", "I need to redo the bedroom", "ontology of the reddish bluebird"],
)
def test_none_when_no_rule_applies(caption):
    assert all(make_negative(caption, seed) is None for seed in range(10))


def test_word_boundaries():
    """Only whole words are edited: 'reddish', 'bluebird', 'ontology' stay intact."""
    caption = "a reddish bluebird reading ontology beside the tall boat"
    for seed in range(30):
        neg = make_negative(caption, seed)
        assert neg is not None
        for word in ("reddish", "bluebird", "ontology"):
            assert word in neg.text


def test_relation_opposites_are_used():
    for phrase, opposite in RELATION_OPPOSITES.items():
        neg = make_negative(f"something {phrase} something", 0)
        assert neg is not None and neg.rule == "relation"
        assert neg.text == f"something {opposite} something"


def test_size_and_number_words():
    for word, replacement in SIZE_NUMBER.items():
        neg = make_negative(f"something {word}", 3)
        assert neg == Negative(f"something {replacement}", "size_number")
    assert make_negative("exactly 4 of them", 0).text == "exactly 3 of them"
    assert make_negative("built in 1999", 0) is None  # a year is not a count


def test_colour_replacement_is_a_new_colour():
    for seed in range(20):
        neg = make_negative("something red", seed)
        assert neg.rule == "colour"
        new = neg.text.split()[-1]
        assert new in COLOURS and new != "red"


def test_noun_replacement_keeps_kind_and_number():
    for pool in NOUN_POOLS.values():
        members = {w for pair in pool for w in pair}
        for singular, plural in pool:
            for word, index in ((singular, 0), (plural, 1)):
                neg = make_negative(f"look at that {word}", 5)
                assert neg.rule == "noun"
                new = neg.text.split()[-1]
                assert new in members and new != word
                assert new in {pair[index] for pair in pool}, (word, new)


def test_articles_follow_the_new_word():
    seen = set()
    for seed in range(40):
        for caption in ("an elephant eating an apple", "a dog near an orange ball"):
            text = make_negative(caption, seed).text
            for article, word in re.findall(r"\b(an?) (\w+)", text):
                assert (article == "an") == (word[0] in "aeiou"), text
            seen.add(text)
    assert any(t.startswith("a ") for t in seen) and any(t.startswith("an ") for t in seen)


def test_swap_exchanges_two_attributes():
    caption = "a red car next to a blue bus"
    swaps = {make_negative(caption, s) for s in range(40)}
    assert Negative("a blue car next to a red bus", "swap_attributes") in swaps
    sizes = {make_negative("a small dog chasing a big cat", s) for s in range(40)}
    assert Negative("a big dog chasing a small cat", "swap_attributes") in sizes


def test_coordinated_attributes_are_not_swapped():
    """Swapping 'red and white' would not change the meaning: no swap may fire there."""
    for seed in range(40):
        neg = make_negative("a red and white bus", seed)
        assert neg.rule != "swap_attributes"
        neg = make_negative("a big, tall giraffe", seed)
        assert neg.rule != "swap_attributes"


def test_case_preserved():
    for seed in range(20):
        neg = make_negative("A GREEN TRUCK LEFT OF A YELLOW TAXI", seed)
        assert neg.text.isupper(), neg
        neg = make_negative("Above the clouds", seed)
        assert neg.text == "Below the clouds"


def test_synthetic_captions_get_valid_negatives():
    """The editor also handles the synthetic corpus's captions (one slot changed)."""
    caption = "the large yellow star is above the small purple triangle"
    for seed in range(20):
        neg = make_negative(caption, seed)
        assert neg is not None
        assert_one_edit(caption, neg.text)
        assert len(neg.text.split()) == len(caption.split())


def test_negative_is_frozen():
    neg = make_negative("a dog", 0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        neg.text = "x"  # type: ignore[misc]
