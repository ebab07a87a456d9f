"""Zero-shot prompts without Ray: tasks from labels and templates, the templates' check, the
prompt file's read-back, and a manifest's label column (the embedding itself: test_zeroshot_ray)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from corpus_files import corpus_config, jsonl

from raysys import config, zeroshot
from raysys.config import CorpusConfig, EvalConfig
from raysys.corpora import Corpus, load_corpus, manifest
from raysys.data import cache
from raysys.errors import CacheError, ConfigError, CorpusError
from raysys.zeroshot import (
    PROMPTS,
    check_templates,
    load_prompts,
    prompt_table,
    prompts_uri,
    tasks,
)


def _corpus(labels: list[str | None]) -> Corpus:
    n = len(labels)
    pairs = pa.table(
        {
            "pair_id": [f"p{i}" for i in range(n)],
            "image_id": [f"i{i}" for i in range(n)],
            "caption": [f"caption {i}" for i in range(n)],
            "labels": pa.array(labels, pa.string()),
        }
    )
    return Corpus(key="k", pairs=pairs)


def _label(value: str) -> str:
    return json.dumps({"label": value})


def test_labelled_task_gets_every_template_for_every_distinct_class() -> None:
    corpus = _corpus([_label("dog"), _label("cat"), None, _label("dog"), ""])
    got = tasks(corpus, EvalConfig(zeroshot_templates=["a photo of a {}.", "{}"]))
    assert got == {
        "label": {"cat": ["a photo of a cat.", "cat"], "dog": ["a photo of a dog.", "dog"]}
    }


def test_corpus_prompts_win_and_unlabelled_corpora_have_no_tasks() -> None:
    corpus = _corpus([json.dumps({"shape": "circle", "colour": "red"})])
    corpus.zeroshot = {"shape": {"circle": ["a circle"], "square": ["a square"]}}
    got = tasks(corpus, EvalConfig(zeroshot_templates=["a {} thing"]))
    assert got == {
        "shape": {"circle": ["a circle"], "square": ["a square"]},
        "colour": {"red": ["a red thing"]},
    }
    corpus.zeroshot["colour"] = {"blue": ["a blue thing"]}
    with pytest.raises(CorpusError, match=r"'colour'.*\['red'\].*no prompts"):
        tasks(corpus, EvalConfig())
    plain = Corpus(key="k", pairs=pa.table({"pair_id": ["p"], "caption": ["c"]}))
    assert tasks(plain, EvalConfig(zeroshot_templates=[])) == {}


@pytest.mark.parametrize(
    "template", ["no field", "{} and {}", "{0}", "{name}", "{:>5}", "{!r}", "open { brace"]
)
def test_a_template_needs_exactly_one_plain_field(template: str) -> None:
    with pytest.raises(ConfigError, match="zeroshot_templates"):
        check_templates(["a photo of a {}.", template])


def test_templates_with_literal_braces_pass_and_labels_need_a_template() -> None:
    check_templates(["{{x}} a photo of a {}.", "{}"])
    with pytest.raises(ConfigError, match="zeroshot_templates is empty"):
        tasks(_corpus([_label("dog")]), EvalConfig(zeroshot_templates=[]))


def test_prompt_table_is_a_class_by_template_grid() -> None:
    table = prompt_table({"t": {"a": ["x a", "y a"], "b": ["x b", "y b"]}})
    assert table.column_names == ["task", "class", "template", "text"]
    assert table["template"].to_pylist() == [0, 1, 0, 1]
    with pytest.raises(CorpusError, match="same number"):
        prompt_table({"t": {"a": ["x a", "y a"], "b": ["x b"]}})
    with pytest.raises(CorpusError, match="empty"):
        prompt_table({"t": {"a": [" "]}})


def test_prompts_live_beside_the_text_stage_and_are_keyed_by_it_and_the_prompts(tmp_path) -> None:
    stage = cache.stage_dir(str(tmp_path), "corpus", "text", "backbone")
    one = prompt_table({"t": {"a": ["a photo of a a."]}})
    other = prompt_table({"t": {"a": ["an image of a a."]}})
    uri = prompts_uri(stage, one)
    assert uri.startswith(str(tmp_path / "corpus" / PROMPTS) + "/") and uri.endswith(".parquet")
    assert uri == prompts_uri(stage, one)
    assert uri != prompts_uri(stage, other)
    assert uri != prompts_uri(cache.stage_dir(str(tmp_path), "corpus", "text", "b2"), one)
    assert prompts_uri("s3://bucket/c/corpus/text/backbone", one).startswith(
        "s3://bucket/c/corpus/prompts/"
    )


def test_load_prompts_gives_classes_by_templates_in_file_order(tmp_path) -> None:
    table = prompt_table(
        {
            "size": {"small": ["s0", "s1"], "large": ["l0", "l1"], "tiny": ["t0", "t1"]},
            "kind": {"x": ["x0", "x1"], "y": ["y0", "y1"]},
        }
    )
    n, d = table.num_rows, 3
    values = np.arange(n * d, dtype=np.float16).reshape(n, d)  # row r holds r*d .. r*d+2
    table = table.append_column("L00", cache.list_array(values)).append_column(
        "L01", cache.list_array(values + 100)
    )
    uri = str(tmp_path / "p.parquet")
    # Rows shuffled: placement goes by (task, class, template), not by row order.
    order = np.array([3, 0, 9, 1, 5, 2, 8, 4, 7, 6])
    cache.write_part(table.take(order), uri)
    got = load_prompts(uri, "L01")
    assert list(got) == ["size", "kind"]  # in order of first appearance
    classes, emb = got["size"]
    assert classes == ["large", "small", "tiny"] and emb.shape == (3, 2, d)
    assert emb.dtype == np.float16
    texts = table["text"].to_pylist()
    for c, name in enumerate(classes):
        for t in range(2):
            row = texts.index(f"{name[0]}{t}")
            np.testing.assert_array_equal(emb[c, t], values[row] + 100)
    assert got["kind"][0] == ["y", "x"] and got["kind"][1].shape == (2, 2, d)
    with pytest.raises(CacheError, match="L05.*L00, L01"):
        load_prompts(uri, "L05")
    with pytest.raises(CacheError, match="no zero-shot prompt"):
        load_prompts(str(tmp_path / "missing.parquet"), "L00")


def _manifest(tmp_path, rows: list[dict], **kw) -> Corpus:
    return manifest.load(corpus_config(jsonl(tmp_path / "m.jsonl", rows), **kw))


def test_manifest_label_key_fills_each_pairs_labels(tmp_path) -> None:
    rows = [
        {"image": "a.png", "caption": ["a one", "a two"], "cls": "cat"},  # COCO style
        {"image": "b.png", "caption": "b one", "cls": 3},
        {"image": "b.png", "caption": "b two"},  # the image's label comes from its other row
        {"image": "c.png", "caption": "c one", "cls": ""},
        {"image": "d.png", "caption": "d one"},
    ]
    corpus = _manifest(tmp_path, rows, label_key="cls")
    pairs = corpus.pairs.to_pydict()
    labels = dict(zip(pairs["caption"], pairs["labels"], strict=True))
    assert labels == {
        "a one": _label("cat"),
        "a two": _label("cat"),
        "b one": _label("3"),
        "b two": _label("3"),
        "c one": None,
        "d one": None,
    }
    unlabelled = _manifest(tmp_path, rows)
    assert "labels" not in unlabelled.pairs.column_names
    assert unlabelled.key != corpus.key
    got = tasks(corpus, EvalConfig(zeroshot_templates=["a photo of a {}."]))
    assert got == {"label": {"3": ["a photo of a 3."], "cat": ["a photo of a cat."]}}


def test_manifest_label_errors_say_what_is_wrong(tmp_path) -> None:
    rows = [{"image": "a.png", "caption": "x", "cls": "cat"}]
    with pytest.raises(ConfigError, match="no column 'label'.*corpus.label_key.*cls"):
        _manifest(tmp_path, rows, label_key="label")
    clash = rows + [{"image": "a.png", "caption": "y", "cls": "dog"}]
    with pytest.raises(CorpusError, match="two labels, 'cat' and 'dog'"):
        _manifest(tmp_path, clash, label_key="cls")
    with pytest.raises(CorpusError, match="must be one value"):
        _manifest(
            tmp_path, [{"image": "a.png", "caption": "x", "cls": ["a", "b"]}], label_key="cls"
        )


def test_labels_survive_corpus_loading_and_synthetic_tasks_form_a_grid(tmp_path) -> None:
    rows = [{"image": "a.png", "caption": "a red circle", "cls": "cat"}]
    corpus = load_corpus(corpus_config(jsonl(tmp_path / "m.jsonl", rows), label_key="cls"))
    assert corpus.pairs["labels"].to_pylist() == [_label("cat")]
    synthetic = load_corpus(CorpusConfig(size=20, image_size=32))
    found = tasks(synthetic, EvalConfig())
    assert found and set(found) == set(synthetic.zeroshot)  # its own prompts, no templates
    table = prompt_table(found)
    assert table.num_rows == sum(len(p) for c in found.values() for p in c.values())


def test_the_text_pass_embeds_each_distinct_prompt_once() -> None:
    corpus = load_corpus(CorpusConfig(size=40, image_size=32))
    rows = zeroshot.text_pass_rows(config.Config(), corpus)
    texts = zeroshot.prompt_table(zeroshot.tasks(corpus, EvalConfig()))["text"].to_pylist()
    assert rows.num_rows == len(set(texts)) and set(rows["caption"].to_pylist()) == set(texts)
    assert rows["caption"].to_pylist() == rows["negative"].to_pylist()
    ids = rows["id"].to_pylist()
    assert len(set(ids)) == len(ids) and all(i.startswith(zeroshot.PROMPT_ID) for i in ids)
    assert not set(ids) & set(corpus.pairs["pair_id"].to_pylist())
    assert zeroshot.prompt_ids(["a"]) != zeroshot.prompt_ids(["a."])  # a new text, a new row
