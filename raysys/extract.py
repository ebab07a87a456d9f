"""Extract: corpus -> embedding cache, with Ray Data and a pool of frozen-backbone actors.

Two passes, vision over unique images and language over captions plus hard negatives. Each pass
is CPU `map_batches` (decode / tokenize) feeding an `ActorPoolStrategy` of actors that each hold
one frozen backbone and return the pooled hidden state of every layer in ONE forward. The
actors write their parts straight to `extract.cache_dir`, a local path or an `s3://` URI: on a
cluster they run on GPU nodes that share no disk with the driver, so the bucket is the one
place both see. A pass whose manifest matches, and whose files check out against it, is
skipped; damaged files are deleted and their rows re-embedded.

Layers are stored in `extract.cache_dtype`, resolved per backbone (`embed.cache_dtype`) and
part of the stage's key, so a float16 and a float32 cache of one model never mix. A value
float16 cannot hold stops the pass at the first part that has one, with the actor's own
`CacheError`, rather than rejecting rows until the pass ends.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray.data

from raysys import rundir, runtime, storage, zeroshot
from raysys.backbones import Backbone, configured_backbone
from raysys.config import Config, ExtractConfig
from raysys.corpora import Corpus, load_corpus
from raysys.data import cache
from raysys.data.index import dataset as index_dataset
from raysys.data.index import read_marker
from raysys.data.pairs import buckets
from raysys.embed import (
    ERROR,
    REJECT_PARTS,
    EmbedActor,
    Prepare,
    actor_error,
    cache_dtype,
    layer_dims,
    say,
    storage_failure,
)
from raysys.errors import ConfigError, CorpusError, RaysysError

PREPROCESS_CPUS = 0.5  # per decode/tokenize task; what the actor plan always leaves free
PARTS_PER_ACTOR = 8  # enough parts per actor that the pool drains evenly


@dataclass
class Extracted:
    """Where one corpus's embeddings live (absolute paths or `s3://` URIs, as every process
    reads them); what `train` and `evaluate` read. The corpus it was read from rides along,
    so later stages (the projector's thumbnails) need not read it again."""

    corpus_dir: str
    image_dir: str
    text_dir: str
    image_manifest: dict[str, Any]
    text_manifest: dict[str, Any]
    corpus: Corpus
    prompts_uri: str = ""  # the zero-shot class prompts' embeddings ("" when none)


@dataclass
class PassRows:
    """What one pass must embed: every id, exactly once, cached or rejected. The rows are in
    memory (`table`: synthetic and manifest corpora, captions) or opened by Ray Data
    (`dataset`: tar shards). Image rows carry `image` bytes or a `uri` read in the CPU stage."""

    ids: pa.Array
    table: pa.Table | None = None
    dataset: Callable[[], Any] | None = None

    @classmethod
    def of(cls, rows: pa.Table | PassRows) -> PassRows:
        return rows if isinstance(rows, PassRows) else cls(ids=rows["id"], table=rows)


def extract(cfg: Config) -> Extracted:
    """Embed the configured corpus with both backbones, reusing any finished cache."""
    backbones = {m: configured_backbone(cfg.extract, m) for m in ("image", "text")}
    for backbone in backbones.values():
        backbone.check()  # a wrong model id or layer fails here, before Ray or any GPU work
    rundir.check_local_cache(cfg)  # a local cache on a cluster of several nodes is refused
    if cfg.corpus.name == "webdataset":
        runtime.init_ray(cfg.ray)  # its caption index is read by Ray Data
    if storage.is_remote(cfg.extract.cache_dir):
        storage.check_writable(cfg.extract.cache_dir)  # fails in seconds, before any work
    cache_dir = cache.location(cfg.extract.cache_dir)
    # Its index, found or built on the cache (a large source by a Ray Data job).
    corpus = load_corpus(cfg.corpus, cache_dir, before_job=lambda: runtime.init_ray(cfg.ray))
    corpus_dir = corpus.index
    # The zero-shot class prompts ride along with the captions (each distinct text once).
    prompts = zeroshot.text_pass_rows(cfg, corpus)
    inputs = {"image": image_rows(corpus), "text": text_rows(corpus, prompts)}
    stages = {m: _stage(cfg, corpus, b, inputs[m], cache_dir) for m, b in backbones.items()}
    (image_dir, image_manifest), (text_dir, text_manifest) = stages["image"], stages["text"]
    # The zero-shot tasks' class prompts, through the same text backbone at every layer.
    prompts_uri = zeroshot.embed_prompts(cfg, corpus, backbones["text"], text_dir) or ""
    return Extracted(
        corpus_dir, image_dir, text_dir, image_manifest, text_manifest, corpus, prompts_uri
    )


def _stage(
    cfg: Config, corpus: Corpus, backbone: Backbone, rows: pa.Table | PassRows, cache_dir: str
) -> tuple[str, dict[str, Any]]:
    """One modality's stage directory and manifest: the finished stage if its files check
    out, else a fresh or resumed pass; keyed by the backbone's settings and storage dtype."""
    backbone_key = stage_key(backbone, cache_dtype(backbone, cfg.extract.cache_dtype))
    out_dir = cache.stage_dir(cache_dir, corpus.key, backbone.modality, backbone_key)
    manifest = cache.read_manifest(out_dir)
    if manifest is not None:
        damaged = cache.check_files(out_dir, manifest)
        if not damaged:
            say(backbone, f"cached ({manifest['rows']} rows) {out_dir}")
            return out_dir, manifest
        _repair(backbone, out_dir, damaged)
    runtime.init_ray(cfg.ray)
    provenance = {
        "corpus_key": corpus.key,
        "corpus": corpus.info | {"negatives": read_marker(corpus.index)["negatives"]},
        "backbone_key": backbone_key,
        "config": {"corpus": dataclasses.asdict(cfg.corpus)}
        | {"extract": dataclasses.asdict(cfg.extract)},
    }
    return out_dir, run_pass(backbone, rows, out_dir, cfg.extract, provenance)


def stage_key(backbone: Backbone, dtype: str) -> str:
    """The backbone key of a stage directory: what the backbone computes and the dtype it is
    stored in, so a float16 cache is never read (or resumed) as a float32 one."""
    return cache.content_key(backbone.describe() | {"cache_dtype": dtype}, cache.CACHE_VERSION)


def _repair(backbone: Backbone, out_dir: str, damaged: list[cache.Damage]) -> None:
    """A finished stage with missing, truncated or altered files: unpublish it (manifest
    first, so no reader trusts it meanwhile), drop the damaged files, and let the pass
    re-embed just their rows. A damaged reject file costs its rows a re-embed, too."""
    say(
        backbone,
        f"{len(damaged)} damaged file(s) in {out_dir}: {', '.join(map(str, damaged))}; "
        "re-embedding their rows",
    )
    storage.remove(storage.join(out_dir, cache.MANIFEST))
    for d in damaged:
        storage.remove(storage.join(out_dir, d.name))


def image_rows(corpus: Corpus) -> PassRows:
    """Unique images only: several captions may share one image, which is embedded once.
    Images held in memory (synthetic, inline) travel as a table; tar shards stream from
    Ray Data; image files named by the index are read from it, each image's first pair."""
    if corpus.images is not None:
        return PassRows(ids=corpus.images["id"].combine_chunks(), table=corpus.images)
    if corpus.read_images is not None:
        return PassRows(ids=corpus.image_ids, dataset=corpus.read_images)
    return PassRows(ids=corpus.image_ids, dataset=functools.partial(_index_images, corpus.index))


def _index_images(corpus_dir: str) -> ray.data.Dataset:
    columns = ["image_id", "image", "bucket", "first"]
    ds = index_dataset(corpus_dir, columns).filter(expr="first")
    return ds.select_columns(columns[:3]).rename_columns({"image_id": "id", "image": "uri"})


def text_rows(corpus: Corpus, extra: pa.Table | None = None) -> PassRows:
    """One row per pair: its caption, and its hard negative (cached as the `neg_` columns),
    read from the corpus index; then any `extra` rows of the same columns (the zero-shot
    prompts, few)."""
    ids = corpus.pair_table(["pair_id"])["pair_id"].combine_chunks()
    if extra is not None:
        extra = extra.append_column(
            "bucket", pa.array(buckets(extra["id"].to_numpy(zero_copy_only=False)), pa.int16())
        )
        ids = pa.concat_arrays([ids, extra["id"].combine_chunks()])

    def dataset() -> ray.data.Dataset:
        ds = index_dataset(corpus.index, ["pair_id", "caption", "negative", "bucket"])
        ds = ds.rename_columns({"pair_id": "id"})
        return ds if extra is None else ds.union(ray.data.from_arrow(extra))

    return PassRows(ids=ids, dataset=dataset)


def run_pass(
    backbone: Backbone,
    rows: pa.Table | PassRows,
    out_dir: str,
    ecfg: ExtractConfig,
    provenance: dict[str, Any],
) -> dict[str, Any]:
    """One modality: rows -> Parquet + rejects + manifest in `out_dir`. Resumable: a rerun
    keeps the parts a killed pass finished and embeds only the rest."""
    p = _plan_pass(backbone, rows, out_dir, ecfg)
    if p.n_todo:
        _embed(p)
    return _finish(p, provenance)


@dataclass(kw_only=True)
class _Pass:
    """One pass, planned before any embedding: what is left to do and who does it."""

    backbone: Backbone
    out_dir: str  # a path or an s3:// URI
    ecfg: ExtractConfig
    source: PassRows
    done: pa.Array  # ids that finished parts (or a repaired stage's rejects) already hold
    n_todo: int
    actors: int
    cpus: float  # per actor, as are gpus and threads
    gpus: float
    threads: int
    dtype: str  # the resolved extract.cache_dtype the layers are stored in
    started: float  # perf_counter at the start: the manifest's `seconds`
    part_rows: int  # sized to the rows left to embed, not the whole corpus
    written: dict[str, str] = dataclasses.field(default_factory=dict)  # part -> its SHA-256


def _plan_pass(
    backbone: Backbone, rows: pa.Table | PassRows, out_dir: str, ecfg: ExtractConfig
) -> _Pass:
    """Resume: parts a killed pass finished are whole (written in one go); keep them and
    plan only the ids that are in none of them. The parts are listed where they are, so a
    pass killed on one machine resumes on any other that reaches the bucket."""
    actors, cpus, gpus, threads = _actor_plan(ecfg)  # a cluster too small fails before any I/O
    started = time.perf_counter()
    cache.remove_temporary(out_dir)
    done = cache.id_column(_kept_files(out_dir))  # one Arrow array for every filter below
    source = PassRows.of(rows)
    total = len(source.ids)
    n_todo = total - int(pc.sum(pc.is_in(source.ids, done)).as_py() or 0)
    if len(done):
        say(backbone, f"resuming, {len(done)} of {total} rows already in finished parts")
    dtype = cache_dtype(backbone, ecfg.cache_dtype)
    part_rows = _part_rows(n_todo, actors, ecfg)
    actors, threads = _fit_pool(actors, threads, gpus, math.ceil(n_todo / part_rows), ecfg)
    return _Pass(
        backbone=backbone,
        out_dir=out_dir,
        ecfg=ecfg,
        source=source,
        done=done,
        n_todo=n_todo,
        actors=actors,
        cpus=cpus,
        gpus=gpus,
        threads=threads,
        dtype=dtype,
        started=started,
        part_rows=part_rows,
    )


def _fit_pool(
    actors: int, threads: int, gpus: float, parts: int, ecfg: ExtractConfig
) -> tuple[int, int]:
    """No more actors than parts: each actor loads the backbone (seconds of CPU and its
    memory), and one that gets no part only holds a CPU slot the next stage waits for (a
    60-image pass is one part). On CPU the cores an unneeded actor would have had go to the
    others' torch threads; an explicit `extract.num_actors` is kept as asked."""
    if ecfg.num_actors or parts >= actors:
        return actors, threads
    fitted = max(1, parts)
    return fitted, threads if gpus else threads * actors // fitted


def _actor_plan(ecfg: ExtractConfig) -> tuple[int, float, float, int]:
    """Actor count, CPUs and GPUs per actor, torch threads: derived from the cluster so that
    preprocessing tasks always keep a CPU (two 1-CPU actors on 2 cores deadlock Ray Data).
    On a joined cluster that cannot hold them yet (GPU nodes that start on demand), the actors
    (`extract.num_actors`, or one) and a preprocessing slot are first requested from the
    autoscaler; the pool is then sized from what arrived."""
    gpus = ecfg.num_gpus_per_actor
    actor = {"CPU": ecfg.cpus_per_actor or 1.0} | ({"GPU": gpus} if gpus > 0 else {})
    # Looked up on the module, so a test can stand in for the cluster (runtime.cluster_resources).
    res = runtime.ensure_resources(
        [actor] * (ecfg.num_actors or 1) + [{"CPU": PREPROCESS_CPUS}],
        "extraction actors",
        hint="set extract.num_gpus_per_actor=0 to run on CPU"
        if gpus > 0
        else "lower extract.num_actors or extract.cpus_per_actor",
    )
    if gpus > 0:
        if res.gpus < gpus:
            raise ConfigError(
                f"extract.num_gpus_per_actor={gpus} but the cluster has {res.gpus:g} GPUs; "
                "set extract.num_gpus_per_actor=0 to run on CPU"
            )
        actors = ecfg.num_actors or max(1, int(res.gpus // gpus))
        cpus = ecfg.cpus_per_actor or 1.0
    else:
        # On CPU, single-threaded actors, one per core, beat fewer multi-threaded ones (2 cores:
        # 2 × 1 thread 19.8, 1 × 2 threads 15.3 images/s); past 8 cores, 4 threads each keeps
        # the number of model copies in memory down. One CPU stays unreserved for Ray Data's
        # own tasks (repartition, preprocessing).
        per_actor = 1 if res.cpus <= 8 else 4
        actors = ecfg.num_actors or max(1, int(res.cpus // per_actor))
        cpus = ecfg.cpus_per_actor or max(0.25, min(per_actor, (res.cpus - 1) / actors))
    if actors * cpus > res.cpus - PREPROCESS_CPUS:
        raise ConfigError(
            f"{actors} extraction actors × {cpus:g} CPUs leave less than {PREPROCESS_CPUS:g} of "
            f"the cluster's {res.cpus:g} CPUs for decoding and tokenizing, and Ray Data would "
            "wait forever; lower extract.num_actors or extract.cpus_per_actor"
        )
    threads = max(1, math.ceil(cpus)) if gpus else max(1, int(res.cpus // actors))
    return actors, cpus, gpus, threads


def _part_rows(rows: int, actors: int, ecfg: ExtractConfig) -> int:
    """Rows per part: at most `extract.part_rows`, a whole number of forward batches, and
    small enough that every actor gets about 8 parts, so the last parts do not leave
    actors idle (2,000 images on 2 actors: 3 parts ran 62 s, 16 parts of 128 ran 40 s)."""
    batch = max(1, min(ecfg.batch_size, ecfg.part_rows))
    most = max(1, ecfg.part_rows // batch)
    balanced = math.ceil(rows / (actors * PARTS_PER_ACTOR * batch))
    return batch * max(1, min(most, balanced))


def _kept_files(out_dir: str) -> list[str]:
    """Every file whose ids are done: parts, actors' reject parts, and the merged rejects a
    repaired stage kept."""
    rejects = storage.join(out_dir, cache.REJECTS)
    merged = [rejects] if cache.REJECTS in cache.list_files(out_dir) else []
    return cache.data_files(out_dir) + _reject_parts(out_dir) + merged


def _reject_parts(out_dir: str) -> list[str]:
    return cache.data_files(storage.join(out_dir, REJECT_PARTS))


def _embed(p: _Pass) -> None:
    """The Ray Data pipeline: CPU `map_batches` (read, decode or tokenize) feeding the actor
    pool, whose actors write the parts themselves; only per-part names, counts and checksums
    reach the driver."""
    if p.source.table is not None:
        todo = _SkipDone(p.done)(p.source.table)
        ds = ray.data.from_arrow(todo).repartition(math.ceil(todo.num_rows / p.part_rows))
    else:  # read by Ray Data, block by block; parts form in the batching below
        ds = p.source.dataset().map_batches(_SkipDone(p.done), batch_format="pyarrow")
    parts = {"batch_size": p.part_rows, "batch_format": "numpy"}  # a batch is a part, in both
    ds = ds.map_batches(Prepare(p.backbone), num_cpus=PREPROCESS_CPUS, **parts)
    actor = {
        "backbone": p.backbone,
        "use_gpu": p.gpus > 0,
        "num_threads": p.threads,
        "out_dir": p.out_dir,
        "batch_size": p.ecfg.batch_size,
        "dtype": p.dtype,
    }
    pool = ray.data.ActorPoolStrategy(size=p.actors)
    ds = ds.map_batches(
        EmbedActor,
        fn_constructor_kwargs=actor,
        compute=pool,
        num_cpus=p.cpus,
        num_gpus=p.gpus,
        **parts,
    )
    results = iter(ds.select_columns(["part", "sha256", "rows", "rejects", ERROR]).iter_rows())
    progress = _Progress(p)
    try:
        for row in results:  # in the order parts finish, as they finish
            if row[ERROR]:
                raise actor_error(row[ERROR])  # the first bad part ends the pass
            if row["part"]:
                p.written[str(row["part"])] = str(row["sha256"])
            progress.part(int(row["rows"]) + int(row["rejects"]))
    except RaysysError:
        raise
    except Exception as err:  # Ray Data's wrapping of a batch's error
        failure = storage_failure(err)
        if failure is None:
            raise
        raise failure from None
    finally:
        # Stops the pass now (not when a traceback holding it is freed): its actors exit and
        # free their CPUs for whatever runs next in this process.
        getattr(results, "close", lambda: None)()


class _Progress:
    """A line as parts finish (at most every `PROGRESS_S` seconds, and the last): rows done
    of the pass's, rows/s and an ETA, so a pass of hours says how far it is."""

    def __init__(self, p: _Pass) -> None:
        self.p, self.done, self.started, self.said = p, 0, time.perf_counter(), 0.0

    def part(self, rows: int) -> None:
        self.done += rows
        now = time.perf_counter() - self.started
        if now - self.said < PROGRESS_S and self.done < self.p.n_todo:
            return
        self.said = now
        rate = self.done / max(now, 1e-9)
        left = (self.p.n_todo - self.done) / max(rate, 1e-9)
        say(
            self.p.backbone,
            f"{self.done} of {self.p.n_todo} rows ({self.done / max(1, self.p.n_todo):.0%}), "
            f"{rate:.1f} rows/s, ETA {left:.0f}s",
        )


PROGRESS_S = 30.0  # seconds between an extraction pass's progress lines


class _SkipDone:
    """Drop rows whose id a finished part already holds (a resumed pass)."""

    def __init__(self, done: pa.Array) -> None:
        self.done = done

    def __call__(self, batch: pa.Table) -> pa.Table:
        return batch.filter(pc.invert(pc.is_in(batch["id"], self.done)))


def _finish(p: _Pass, provenance: dict[str, Any]) -> dict[str, Any]:
    """Check the parts, merge the rejects, and write the manifest last: a stage with a
    manifest is finished (and skipped next time), so a pass killed before it resumes."""
    rejects, rows_in = _checked_rejects(p)
    n_rejects = rejects.num_rows if rejects is not None else 0
    reject_file = storage.join(p.out_dir, cache.REJECTS)
    if n_rejects:
        merged = cache.write_part(rejects.sort_by("id"), reject_file)
        p.written[merged.name], rows_in[merged.name] = merged.sha256, n_rejects
    total = len(p.source.ids)
    fraction = n_rejects / max(1, total)
    if fraction > p.ecfg.max_reject_fraction:
        reasons = pc.value_counts(rejects["reason"]).to_pylist()
        raise CorpusError(
            f"{n_rejects} of {total} {p.backbone.modality} rows rejected "
            f"({fraction:.1%} > extract.max_reject_fraction={p.ecfg.max_reject_fraction:.1%}); "
            f"reasons: {reasons}; see {reject_file}"
        )
    elapsed = time.perf_counter() - p.started
    dims = layer_dims(p.backbone)
    manifest = {
        **p.backbone.describe(),
        "modality": p.backbone.modality,
        "layers": [c for c in dims if not c.startswith("neg_")],
        "columns": list(dims),
        "dims": list(p.backbone.dims),
        "dtype": p.dtype,
        "rows": total - n_rejects,
        "rejects": n_rejects,
        "seconds": round(elapsed, 2),
        "resumed_rows": len(p.done),
        "actors": {"count": p.actors, "cpus": p.cpus, "gpus": p.gpus, "threads": p.threads},
        # What a reader may open, and what it must find: sizes, rows, checksums.
        "files": _file_records(p, rows_in),
        "cache_version": cache.CACHE_VERSION,
        **provenance,
    }
    cache.write_manifest(p.out_dir, manifest)
    storage.remove(storage.join(p.out_dir, REJECT_PARTS))  # merged above
    rate = p.n_todo / max(elapsed, 1e-9)
    say(
        p.backbone,
        f"{manifest['rows']} rows, {n_rejects} rejects, {len(manifest['layers'])} layers, "
        f"{rate:.1f} rows/s -> {p.out_dir}",
    )
    return manifest


def _file_records(p: _Pass, rows_in: dict[str, int]) -> dict[str, dict[str, Any]]:
    """The manifest's entry for every file it publishes, from one listing. A part this run's
    actors wrote has the checksum they computed; a part kept from a killed run (or rewritten
    without duplicates) is read once to compute it."""
    listed = cache.list_files(p.out_dir)
    records = {}
    for name, rows in sorted(rows_in.items()):
        seen = listed[name]
        digest = p.written.get(name)
        if digest is None:
            digest = hashlib.sha256(cache.get_bytes(storage.join(p.out_dir, name))).hexdigest()
        records[name] = cache.record(cache.Written(name, rows, seen.size, digest), seen)
    return records


def _checked_rejects(p: _Pass) -> tuple[pa.Table | None, dict[str, int]]:
    """Exactly one row per id, none missing: check what the files hold, not what ran (a late
    writer's duplicates are dropped first). Returns every reject as one table, and the row
    count of each data part."""
    parts = cache.data_files(p.out_dir)
    rejected = _reject_parts(p.out_dir)
    merged = storage.join(p.out_dir, cache.REJECTS)
    if cache.REJECTS in cache.list_files(p.out_dir):
        rejected.append(merged)  # a repaired stage's earlier rejects
    dropped, seen, rows_in = _drop_duplicate_rows(parts + rejected, p.written)
    if dropped:
        say(
            p.backbone,
            f"dropped {dropped} duplicate rows (a killed run's actors finished parts this run "
            "had redone)",
        )
    rejected = [f for f in rejected if rows_in.get(f, 0)]
    rejects = pa.concat_tables(cache.read_parquet(f) for f in rejected) if rejected else None
    _check_exactly_once(p, seen)
    return rejects, {f.rsplit("/", 1)[-1]: rows_in[f] for f in parts if rows_in.get(f, 0)}


def _check_exactly_once(p: _Pass, seen: pa.Array) -> None:
    """The ids the files hold (each once, after `_drop_duplicate_rows`) are exactly the
    pass's ids: compared as Arrow columns, never as Python sets of every id."""
    expected = p.source.ids
    if len(seen) == len(expected):
        ordered = [pc.sort_indices(a) for a in (seen, expected)]
        same = pc.equal(seen.take(ordered[0]), expected.take(ordered[1]))
        if pc.all(same).as_py() is not False:
            return
    missing = len(expected) - int(pc.sum(pc.is_in(expected, seen)).as_py() or 0)
    foreign = len(seen) - int(pc.sum(pc.is_in(seen, expected)).as_py() or 0)
    raise CorpusError(
        f"the {p.backbone.modality} parts in {p.out_dir!r} hold {len(seen)} ids for "
        f"{len(expected)} rows ({missing} missing, {foreign} foreign); delete the directory "
        "and rerun"
    )


def _drop_duplicate_rows(
    files: list[str], written: dict[str, str]
) -> tuple[int, pa.Array, dict[str, int]]:
    """Keep each id in the oldest file that holds it; rewrite (whole) or delete the others;
    returns how many rows went, the ids left (each now once) and each file's rows left;
    `written` (part name -> SHA-256) follows the rewrites.
    Duplicates arise when a killed driver's actors outlive it for a moment and finish a part
    a rerun also embedded; embeddings of the same input are the same, so which copy survives
    does not matter. Found with one Arrow sort of every (id, file age) row, not a set."""
    listed = {
        d: cache.list_files(d) for d in {f.rsplit("/", 1)[0] for f in files}
    }  # one LIST per directory, for the files' ages

    def age(f: str) -> tuple[float, str]:
        directory, name = f.rsplit("/", 1)
        found = listed[directory].get(name)
        return (found.mtime if found else 0.0, f)

    files = sorted(files, key=age)
    ids = [cache.read_parquet(path, ["id"])["id"].combine_chunks() for path in files]
    table = pa.table(
        {
            "id": pa.chunked_array(ids, pa.string()),
            "file": pa.chunked_array(
                [pa.array(np.full(len(a), k, np.int32)) for k, a in enumerate(ids)], pa.int32()
            ),
            "row": pa.chunked_array(
                [pa.array(np.arange(len(a), dtype=np.int64)) for a in ids], pa.int64()
            ),
        }
    ).combine_chunks()
    table = table.take(pc.sort_indices(table, [("id", "ascending"), ("file", "ascending")]))
    column = table["id"]
    repeat = np.zeros(table.num_rows, dtype=bool)
    if table.num_rows > 1:
        same = pc.equal(column.slice(1), column.slice(0, table.num_rows - 1))
        repeat[1:] = pc.fill_null(same, False).to_numpy(zero_copy_only=False)
    seen = pc.filter(column, pa.array(~repeat)).combine_chunks()
    dropped, rows_in = int(repeat.sum()), {}
    files_hit = table["file"].to_numpy()[repeat]
    rows_hit = table["row"].to_numpy()[repeat]
    for k, path in enumerate(files):
        mask = np.zeros(len(ids[k]), dtype=bool)
        mask[rows_hit[files_hit == k]] = True
        rows_in[path] = len(ids[k]) - int(mask.sum())
        if mask.any():
            keep = cache.read_parquet(path).filter(pa.array(~mask))
            written.pop(path.rsplit("/", 1)[-1], None)  # rewritten: its checksum changes
            if keep.num_rows:
                write = cache.write_bucketed if "bucket" in keep.column_names else cache.write_part
                part = write(keep, path)
                written[part.name] = part.sha256
            else:
                storage.remove(path)
    return dropped, seen, rows_in
