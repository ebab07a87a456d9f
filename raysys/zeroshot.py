"""Zero-shot classification's class prompts, embedded by the frozen text backbone.

A zero-shot task is a set of classes, each named by a few prompt texts ("a photo of a cat.").
Evaluation maps the prompts through JAM's text encoder exactly as it maps captions, so their
raw embeddings must come from the same backbone, the same way: the same weights, precision,
compute policy, tokenization and pooling, every cached layer, stored in the text cache's dtype.
The cheapest way to be exact is to embed them *with* the captions: a text pass adds one row per
distinct prompt (`text_pass_rows`, ids `zeroshot:<hash of the text>`), and `embed_prompts` then
only copies those rows out of the text cache. A text stage built without them (an older cache,
or new templates) gets them from ONE Ray task shaped like an extraction actor (a driver may
have no GPU and no weights) that runs `raysys.embed`'s own `Prepare` and `embed_batch`. Either
way one small Parquet file is written (through `raysys.data.cache`, so an `s3://` cache works):

    <cache>/<corpus-key>/prompts/<key>.parquet
    columns: task, class, template (index), text, L00, L01, … (one list column per layer)

`key` hashes the text stage's key and the prompt table, so new templates re-embed only the
prompts (never the corpus), and a finished file (written whole, at once) is reused.

Tasks come from the corpus (`Corpus.zeroshot`: task -> class -> prompts, e.g. the synthetic
scenes' relation or shape) and from the pairs' `labels` column (JSON {task: class}, e.g. a
manifest's `corpus.label_key`): a labelled task the corpus gives no prompts for gets
`eval.zeroshot_templates`, each formatted with the class name.
"""

from __future__ import annotations

import hashlib
import json
import string
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from raysys import runtime, storage
from raysys.backbones import REJECT, Backbone
from raysys.config import Config, EvalConfig
from raysys.corpora import Corpus
from raysys.data import cache
from raysys.embed import EmbedActor, Prepare, actor_error, cache_dtype, embed_batch, layer_dims, say
from raysys.errors import CacheError, ConfigError, CorpusError, RaysysError

PROMPTS = "prompts"  # the directory beside a corpus's modality stages
PROMPTS_VERSION = 1  # bump when how prompts are embedded or stored changes: re-keys every file
PROMPT_COLUMNS = ("task", "class", "template", "text")
PROMPT_ID = "zeroshot:"  # a prompt's id in the text cache: this, then a hash of its text

Tasks = dict[str, dict[str, list[str]]]  # task -> class -> prompt texts


def check_templates(templates: list[str]) -> None:
    """Each template holds exactly one `{}`, where the class name goes (`{{`/`}}` are literal
    braces); anything else would fail, or silently drop the class, only when formatted."""
    for template in templates:
        where = f"eval.zeroshot_templates entry {template!r}"
        try:
            fields = [f for f in string.Formatter().parse(template) if f[1] is not None]
        except ValueError as e:
            raise ConfigError(f"{where}: {e}; write literal braces as {{{{ and }}}}") from None
        if len(fields) != 1 or fields[0][1:] != ("", "", None):
            raise ConfigError(
                f"{where} must hold exactly one '{{}}' where the class name goes (no names, "
                "indices or format specs), e.g. 'a photo of a {}.'"
            )


def label_classes(pairs: pa.Table) -> dict[str, list[str]]:
    """Task -> its classes (sorted) over every pair's `labels` (JSON {task: class}); none
    without the column. Only the distinct label objects are parsed, not one per pair."""
    if "labels" not in pairs.column_names:
        return {}
    found: dict[str, set[str]] = {}
    for text in pc.unique(pairs["labels"]).to_pylist():
        if not text:
            continue
        try:
            labels = json.loads(text)
        except ValueError:
            labels = None
        if not isinstance(labels, dict):
            raise CorpusError(
                f"a pair's labels {text!r:.80} are not a JSON object {{task: class}}; "
                "the corpus index is broken: delete it and rerun `raysys extract`"
            )
        for task, value in labels.items():
            if value is not None and str(value) != "":
                found.setdefault(str(task), set()).add(str(value))
    return {task: sorted(classes) for task, classes in sorted(found.items())}


def tasks(corpus: Corpus, eval_cfg: EvalConfig) -> Tasks:
    """The zero-shot tasks of a corpus: its own prompts (`Corpus.zeroshot`), then every task
    of the pairs' labels it gives none for, prompted with `eval.zeroshot_templates` (checked
    only then: a corpus that needs no templates never fails on them)."""
    own: Tasks = {t: dict(c) for t, c in corpus.zeroshot.items()}
    labelled = label_classes(corpus.label_values())
    for task in set(labelled) & set(own):
        unprompted = sorted(set(labelled[task]) - set(own[task]))
        if unprompted:  # evaluation could never predict them: a broken corpus, said now
            raise CorpusError(
                f"zero-shot task {task!r}: the pairs' labels name class(es) {unprompted[:5]} "
                f"that the corpus gives no prompts for (it has {sorted(own[task])[:10]})"
            )
    labelled = {t: c for t, c in labelled.items() if t not in own}
    if labelled and not eval_cfg.zeroshot_templates:
        raise ConfigError(
            f"the corpus labels its images for zero-shot task(s) {', '.join(labelled)} but "
            "eval.zeroshot_templates is empty; give at least one template, e.g. "
            "'a photo of a {}.'"
        )
    templates = eval_cfg.zeroshot_templates
    if labelled:
        check_templates(templates)
    return own | {
        t: {c: [x.format(c) for x in templates] for c in cs} for t, cs in labelled.items()
    }


def prompt_table(found: Tasks) -> pa.Table:
    """One row per prompt: `task`, `class`, `template` (its index among the class's prompts),
    `text`. Every class of a task has the same number of prompts (a [classes, templates]
    grid, what evaluation averages over), each a non-empty text."""
    rows: dict[str, list[Any]] = {c: [] for c in PROMPT_COLUMNS}
    for task, classes in found.items():
        counts = {len(prompts) for prompts in classes.values()}
        if len(counts) > 1 or 0 in counts:
            raise CorpusError(
                f"zero-shot task {task!r}: every class needs the same number (at least one) of "
                f"prompts, got {sorted(counts)}"
            )
        for name, prompts in classes.items():
            for k, text in enumerate(prompts):
                if not isinstance(text, str) or not text.strip():
                    raise CorpusError(
                        f"zero-shot task {task!r} class {name!r}: prompt {k} is empty"
                    )
                for column, value in zip(PROMPT_COLUMNS, (task, name, k, text), strict=True):
                    rows[column].append(value)
    types = {"task": pa.string(), "class": pa.string(), "template": pa.int32()}
    return pa.table({c: pa.array(v, types.get(c, pa.string())) for c, v in rows.items()})


def prompt_ids(texts: list[str]) -> list[str]:
    """A prompt's id among the text pass's rows: keyed by its text, so one text is one row
    whatever task or template uses it, and a changed template is a new row."""
    return [PROMPT_ID + hashlib.blake2b(t.encode(), digest_size=12).hexdigest() for t in texts]


def text_pass_rows(cfg: Config, corpus: Corpus) -> pa.Table | None:
    """The text pass's extra rows: each distinct prompt once, as its own caption and hard
    negative (the pass embeds both columns), or None when the corpus has no tasks."""
    found = tasks(corpus, cfg.eval)
    if not found:
        return None
    texts = list(dict.fromkeys(prompt_table(found)["text"].to_pylist()))
    return pa.table({"id": prompt_ids(texts), "caption": texts, "negative": texts})


def _from_text_stage(table: pa.Table, text_stage_dir: str) -> pa.Table | None:
    """The prompt table with every cached layer, read from the text stage when its pass
    embedded them beside the captions (None when it did not)."""
    manifest = cache.read_manifest(text_stage_dir) or {}
    layers = manifest.get("layers") or []
    ids = np.asarray(prompt_ids(table["text"].to_pylist()))
    try:
        found = cache.read_rows(text_stage_dir, list(layers), ids) if layers else None
    except CacheError:
        return None
    if found is None:
        return None
    out = table
    for name in layers:
        out = out.append_column(name, cache.list_array(found[name], str(found[name].dtype)))
    return out


def prompts_uri(text_stage_dir: str, table: pa.Table) -> str:
    """`<cache>/<corpus-key>/prompts/<key>.parquet` beside the text stage
    `<cache>/<corpus-key>/text/<backbone-key>`: keyed by that stage and the prompts."""
    corpus_dir, _, stage_key = text_stage_dir.rstrip("/").rsplit("/", 2)
    key = cache.content_key("prompts", PROMPTS_VERSION, stage_key, table.to_pydict())
    return storage.join(corpus_dir, PROMPTS, f"{key}.parquet")


def embed_prompts(
    cfg: Config, corpus: Corpus, text_backbone: Backbone, text_stage_dir: str
) -> str | None:
    """Embed every class prompt of the corpus's zero-shot tasks with the text stage's
    backbone; returns the file's URI (reused when it exists), or None without tasks.

    One Ray task with one extraction actor's resources loads the backbone as the actors do
    (`EmbedActor`) and writes the file: the driver needs neither a GPU nor the weights."""
    found = tasks(corpus, cfg.eval)
    if not found:
        return None
    table = prompt_table(found)
    uri = prompts_uri(text_stage_dir, table)
    what = f"{table.num_rows} zero-shot prompts ({len(found)} task(s): {', '.join(found)})"
    if storage.exists(uri):
        say(text_backbone, f"{what}: cached {uri}")
        return uri
    embedded = _from_text_stage(table, text_stage_dir)
    if embedded is not None:  # the text pass embedded them with the captions
        cache.write_part(embedded, uri)
        say(text_backbone, f"{what} from the text pass -> {uri}")
        return uri
    from raysys.extract import _actor_plan  # here: raysys.extract calls this module

    runtime.init_ray(cfg.ray)
    _, cpus, gpus, threads = _actor_plan(cfg.extract)
    dtype = cache_dtype(text_backbone, cfg.extract.cache_dtype)
    started = time.perf_counter()
    task = ray.remote(_embed_and_write).options(num_cpus=cpus, num_gpus=gpus)
    job = task.remote(text_backbone, table, uri, cfg.extract.batch_size, dtype, gpus > 0, threads)
    error = ray.get(job)
    if error:
        raise actor_error(error)
    say(text_backbone, f"{what} in {time.perf_counter() - started:.1f} s -> {uri}")
    return uri


def _embed_and_write(
    backbone: Backbone,
    table: pa.Table,
    uri: str,
    batch_size: int,
    dtype: str,
    use_gpu: bool,
    threads: int,
) -> str:
    """The Ray task: load the backbone as an extraction actor does, tokenize and embed the
    prompts as captions are (each prompt stands in as its own hard negative, which the text
    pass requires, and is dropped), and write the file whole. A raysys error travels back as
    text (`embed.actor_error`), as the actors' do."""
    actor = EmbedActor(backbone, use_gpu, threads, "", batch_size, dtype)
    texts = np.asarray(table["text"].to_pylist(), dtype=object)
    rows = {"id": np.arange(len(texts)).astype(str), "caption": texts, "negative": texts}
    try:
        ready = Prepare(actor.backbone)(rows)
        embedded = pa.concat_tables(
            embed_batch(actor.backbone, {k: v[i : i + batch_size] for k, v in ready.items()}, dtype)
            for i in range(0, len(texts), batch_size)
        )
        bad = [r for r in embedded[REJECT].to_pylist() if r]
        if bad:
            raise CorpusError(f"{len(bad)} zero-shot prompt(s) could not be embedded: {bad[0]}")
    except RaysysError as err:
        return f"{type(err).__name__}: {err}"
    layers = [c for c in layer_dims(backbone) if not c.startswith("neg_")]
    out = table
    for name in layers:
        out = out.append_column(name, embedded[name])
    cache.write_part(out, uri)
    return ""


def load_prompts(uri: str, layer_column: str) -> dict[str, tuple[list[str], np.ndarray]]:
    """Task -> (class names, raw embeddings `[classes, templates, d]` of one text layer, in
    the stored dtype), tasks and classes in the file's order."""
    try:
        names = cache.footer(uri).schema.to_arrow_schema().names
    except FileNotFoundError:
        raise CacheError(
            f"no zero-shot prompt embeddings at {uri!r}; rerun `raysys extract`"
        ) from None
    if layer_column not in names:
        layers = [n for n in names if n not in PROMPT_COLUMNS]
        raise CacheError(
            f"layer column {layer_column!r} not in the zero-shot prompts {uri!r}; it holds "
            f"{', '.join(layers)}"
        )
    table = cache.read_parquet(uri, [*PROMPT_COLUMNS[:3], layer_column])
    values = cache.to_numpy(table[layer_column])
    grid: dict[str, dict[str, dict[int, int]]] = {}  # task -> class -> template -> row
    rows = zip(*(table[c].to_pylist() for c in PROMPT_COLUMNS[:3]), strict=True)
    for row, (task, name, template) in enumerate(rows):
        grid.setdefault(task, {}).setdefault(name, {})[template] = row
    out = {}
    for task, classes in grid.items():
        order = [[rows_of[k] for k in sorted(rows_of)] for rows_of in classes.values()]
        if len({len(o) for o in order}) != 1:
            raise CacheError(f"zero-shot task {task!r} in {uri!r} is not a class x template grid")
        out[task] = (list(classes), values[np.asarray(order)])
    return out
