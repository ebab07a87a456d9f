"""Extract: corpus -> embedding cache, with Ray Data and a pool of frozen-backbone actors.

Two passes, vision over unique images and language over captions plus hard negatives. Each pass
is CPU `map_batches` (decode / tokenize) feeding an `ActorPoolStrategy` of actors that each hold
one frozen backbone and return the pooled hidden state of every layer in ONE forward. A pass
whose manifest matches is skipped, so an unchanged stage is never recomputed.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raysys import cache
from raysys.backbones import REJECT, Backbone, get_backbone, pick_device
from raysys.config import Config, CorpusConfig, ExtractConfig
from raysys.corpora import SyntheticConfig, corpus_key, generate, make_negative
from raysys.errors import ConfigError, CorpusError

PREPROCESS_CPUS = 0.5  # per decode/tokenize task; what the actor plan always leaves free
PARTS_PER_ACTOR = 8  # enough parts per actor that the pool drains evenly
REJECT_PARTS = "rejects.parts"  # actors' reject files, merged into cache.REJECTS at the end


@dataclass
class Extracted:
    """Where one corpus's embeddings live; what `train` and `evaluate` read."""

    corpus_dir: Path
    image_dir: Path
    text_dir: Path
    image_manifest: dict[str, Any]
    text_manifest: dict[str, Any]


_CORPORA: dict[str, tuple[str, list[dict[str, Any]]]] = {}  # this process's built corpora


def load_corpus(cfg: CorpusConfig) -> tuple[str, list[dict[str, Any]]]:
    """The corpus rows and their content key (only `synthetic` is built in so far).

    Built once per process and config (rendering 2,000 scenes takes seconds and a run needs
    them twice: extraction and the projector's thumbnails); callers must not modify the rows.
    """
    if cfg.name != "synthetic":
        raise ConfigError(f"unknown corpus {cfg.name!r}; available: synthetic")
    memo = cache.content_key(dataclasses.asdict(cfg))
    if memo not in _CORPORA:
        fields = {f.name for f in dataclasses.fields(SyntheticConfig)}
        syn = SyntheticConfig(**{k: v for k, v in dataclasses.asdict(cfg).items() if k in fields})
        _CORPORA.clear()  # keep one corpus: they hold every image
        _CORPORA[memo] = (corpus_key(syn), fill_negatives(generate(syn)))
    return _CORPORA[memo]


def fill_negatives(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Derive a rule-based hard negative for every caption that has none, and record where
    each negative came from; a caption no rule applies to keeps None and is rejected later."""
    for row in rows:
        if row.get("negative"):
            row.setdefault("negative_source", "corpus")
            continue
        derived = make_negative(row["caption"], seed=row["pair_id"]) if row.get("caption") else None
        row["negative"] = derived.text if derived else None
        row["negative_source"] = f"generated:{derived.rule}" if derived else "none"
    return rows


class EmbedActor:
    """Holds one frozen backbone for the lifetime of a Ray actor; each call embeds one part
    (`extract.part_rows` rows, in forward batches of `extract.batch_size`) and writes it.

    The actor writes its part itself, atomically, good rows to the cache and bad rows to the
    rejects, so the pass streams through once (no materialized copy of every embedding) and
    a killed pass leaves only whole parts, which a rerun keeps and skips.
    """

    def __init__(
        self,
        backbone: Backbone,
        use_gpu: bool,
        num_threads: int,
        out_dir: str,
        batch_size: int,
    ) -> None:
        import torch

        torch.set_num_threads(max(1, num_threads))
        self.backbone = backbone
        self.backbone.load(pick_device(use_gpu))
        self.out_dir = Path(out_dir)
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        table = pa.concat_tables(
            embed_batch(self.backbone, {k: v[i : i + self.batch_size] for k, v in batch.items()})
            for i in range(0, n, self.batch_size)
        )
        name = uuid.uuid4().hex
        bad = pc.not_equal(table[REJECT], "")
        n_bad = pc.sum(bad.cast("int64")).as_py() or 0
        if n_bad:  # rejects first: a part whose rejects are written is never redone for them
            rejects = table.filter(bad).select(["id", REJECT]).rename_columns(["id", "reason"])
            (self.out_dir / REJECT_PARTS).mkdir(parents=True, exist_ok=True)
            cache.write_part(rejects, self.out_dir / REJECT_PARTS / f"{name}.parquet")
        if n_bad < n:
            good = table.filter(pc.invert(bad)).drop_columns([REJECT])
            cache.write_part(good, self.out_dir / f"part-{name}.parquet")
        return {"rows": np.array([n - n_bad]), "rejects": np.array([n_bad])}


def embed_batch(backbone: Backbone, batch: dict[str, np.ndarray]) -> pa.Table:
    """Embed the good rows of a preprocessed batch; bad rows pass through with their reason
    and empty layers, so nothing is dropped before it is counted."""
    reasons = np.asarray(batch[REJECT], dtype=object)
    good = np.flatnonzero(reasons == "")
    columns: dict[str, Any] = {"id": pa.array(batch["id"].astype(str))}
    if len(good):
        layers = backbone.embed({k: v[good] for k, v in batch.items() if k != REJECT})
    for name, dim in _layer_dims(backbone).items():
        full = np.zeros((len(reasons), dim), dtype=np.float16)
        if len(good):
            with np.errstate(over="ignore"):
                full[good] = layers[name]
            # A value past float16's range (±65504) would be cached as inf: reject the row.
            broken = good[~np.isfinite(full[good]).all(1)]
            reasons[broken] = [r or f"non-finite {name} embedding" for r in reasons[broken]]
        columns[name] = cache.float16_list_array(full)
    columns[REJECT] = pa.array(reasons.astype(str))
    return pa.table(columns)


def _layer_dims(backbone: Backbone) -> dict[str, int]:
    from raysys.backbones import layer_name

    dims = {layer_name(i): d for i, d in enumerate(backbone.dims)}
    if backbone.modality == "text":
        dims |= {layer_name(i, "neg_"): d for i, d in enumerate(backbone.dims)}
    return dims


def _actor_plan(ecfg: ExtractConfig) -> tuple[int, float, float, int]:
    """Actor count, CPUs and GPUs per actor, torch threads: derived from the cluster so that
    preprocessing tasks always keep a CPU (two 1-CPU actors on 2 cores deadlock Ray Data)."""
    from raysys.runtime import cluster_resources

    res = cluster_resources()
    gpus = ecfg.num_gpus_per_actor
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


def run_pass(
    backbone: Backbone,
    rows: pa.Table,
    out_dir: Path,
    ecfg: ExtractConfig,
    provenance: dict[str, Any],
) -> dict[str, Any]:
    """One modality: rows -> Parquet + rejects + manifest in `out_dir`."""
    import ray
    import ray.data

    actors, cpus, gpus, threads = _actor_plan(ecfg)
    started = time.perf_counter()
    # Resume: parts a killed pass finished are whole (written atomically); keep them and
    # embed only the ids that are in none of them.
    out_dir.mkdir(parents=True, exist_ok=True)
    cache.remove_temporary(out_dir)
    rejects_dir = out_dir / REJECT_PARTS
    done = cache.ids_in(cache.data_files(out_dir) + cache.data_files(rejects_dir))
    todo = rows.filter(pc.invert(pc.is_in(rows["id"], pa.array(done, pa.string()))))
    if len(done):
        print(
            f"[extract] {backbone.modality:5s} {backbone.name}: resuming, {len(done)} of "
            f"{rows.num_rows} rows already in finished parts",
            flush=True,
        )
    if todo.num_rows:
        part_rows = _part_rows(todo.num_rows, actors, ecfg)
        ds = ray.data.from_arrow(todo).repartition(math.ceil(todo.num_rows / part_rows))
        ds = ds.map_batches(
            backbone.preprocess,
            batch_size=part_rows,
            batch_format="numpy",
            num_cpus=PREPROCESS_CPUS,
        )
        ds = ds.map_batches(
            EmbedActor,
            fn_constructor_kwargs={
                "backbone": backbone,
                "use_gpu": gpus > 0,
                "num_threads": threads,
                "out_dir": str(out_dir.resolve()),
                "batch_size": ecfg.batch_size,
            },
            compute=ray.data.ActorPoolStrategy(size=actors),
            batch_size=part_rows,
            batch_format="numpy",
            num_cpus=cpus,
            num_gpus=gpus,
        )
        ds.materialize()  # only the per-part counts; the embeddings are already on disk

    # Exactly one row per id, none missing: check what the parts hold, not what ran.
    dropped, seen = _drop_duplicate_rows(cache.data_files(out_dir) + cache.data_files(rejects_dir))
    if dropped:
        print(
            f"[extract] {backbone.modality:5s} {backbone.name}: dropped {dropped} duplicate "
            "rows (a killed run's actors finished parts this run had redone)",
            flush=True,
        )
    rejected = cache.data_files(rejects_dir)
    reject_table = pq.ParquetDataset(rejected).read() if rejected else None
    n_rejects = reject_table.num_rows if reject_table is not None else 0
    expected = set(rows["id"].to_numpy(zero_copy_only=False).astype(str).tolist())
    if seen != expected:
        raise CorpusError(
            f"the {backbone.modality} parts in {str(out_dir)!r} hold {len(seen)} ids for "
            f"{len(expected)} rows ({len(expected - seen)} missing, {len(seen - expected)} "
            "foreign); delete the directory and rerun"
        )
    if n_rejects:
        pq.write_table(reject_table.sort_by("id"), out_dir / cache.REJECTS)
    fraction = n_rejects / max(1, rows.num_rows)
    if fraction > ecfg.max_reject_fraction:
        reasons = pc.value_counts(reject_table["reason"]).to_pylist()
        raise CorpusError(
            f"{n_rejects} of {rows.num_rows} {backbone.modality} rows rejected "
            f"({fraction:.1%} > extract.max_reject_fraction={ecfg.max_reject_fraction:.1%}); "
            f"reasons: {reasons}; see {out_dir / cache.REJECTS}"
        )
    elapsed = time.perf_counter() - started
    dims = _layer_dims(backbone)
    manifest = {
        **backbone.describe(),
        "modality": backbone.modality,
        "layers": [c for c in dims if not c.startswith("neg_")],
        "columns": list(dims),
        "dims": list(backbone.dims),
        "dtype": "float16",
        "rows": rows.num_rows - n_rejects,
        "rejects": n_rejects,
        "seconds": round(elapsed, 2),
        "resumed_rows": len(done),
        "actors": {"count": actors, "cpus": cpus, "gpus": gpus, "threads": threads},
        "cache_version": cache.CACHE_VERSION,
        **provenance,
    }
    cache.write_manifest(out_dir, manifest)
    shutil.rmtree(rejects_dir, ignore_errors=True)  # merged into cache.REJECTS above
    rate = todo.num_rows / max(elapsed, 1e-9)
    print(
        f"[extract] {backbone.modality:5s} {backbone.name}: {manifest['rows']} rows, "
        f"{n_rejects} rejects, {len(manifest['layers'])} layers, {rate:.1f} rows/s -> {out_dir}",
        flush=True,
    )
    return manifest


def _part_rows(rows: int, actors: int, ecfg: ExtractConfig) -> int:
    """Rows per part: at most `extract.part_rows`, a whole number of forward batches, and
    small enough that every actor gets about 8 parts, so the last parts do not leave
    actors idle (2,000 images on 2 actors: 3 parts ran 62 s, 16 parts of 128 ran 40 s)."""
    batch = max(1, min(ecfg.batch_size, ecfg.part_rows))
    most = max(1, ecfg.part_rows // batch)
    balanced = math.ceil(rows / (actors * PARTS_PER_ACTOR * batch))
    return batch * max(1, min(most, balanced))


def _drop_duplicate_rows(files: list[str]) -> tuple[int, set[str]]:
    """Keep each id in the oldest part that holds it; rewrite (atomically) or delete the
    others; returns how many rows went and the ids left (each now once). Duplicates arise
    when a killed driver's actors outlive it for a moment and finish a part a rerun also
    embedded; embeddings of the same input are the same, so which copy survives does not
    matter."""
    seen: set[str] = set()
    dropped = 0
    for path in sorted(files, key=lambda f: (Path(f).stat().st_mtime_ns, f)):
        ids = pq.read_table(path, columns=["id"])["id"].to_pylist()  # ids only: cheap
        repeated = np.array([i in seen for i in ids], dtype=bool)
        seen.update(ids)
        if repeated.any():
            dropped += int(repeated.sum())
            keep = pq.read_table(path).filter(pa.array(~repeated))
            if keep.num_rows:
                cache.write_part(keep, Path(path))
            else:
                Path(path).unlink()
    return dropped, seen


def extract(cfg: Config) -> Extracted:
    """Embed the configured corpus with both backbones, reusing any finished cache."""
    from raysys.runtime import init_ray

    key, rows = load_corpus(cfg.corpus)
    # Absolute: Ray workers run in their own working directories, not the driver's.
    cache_dir = Path(cfg.extract.cache_dir).resolve()
    corpus_dir = cache_dir / key
    cache.write_pairs(corpus_dir, rows)
    passes = {
        "image": (cfg.extract.vision, _image_rows),
        "text": (cfg.extract.text, _text_rows),
    }
    dirs: dict[str, Path] = {}
    manifests: dict[str, dict[str, Any]] = {}
    for modality, (name, make_rows) in passes.items():
        backbone = get_backbone(
            name,
            modality,
            max_text_length=cfg.extract.max_text_length,
            image_size=cfg.extract.image_size,
        )
        backbone_key = cache.content_key(backbone.describe(), cache.CACHE_VERSION)
        out_dir = cache.stage_dir(cache_dir, key, modality, backbone_key)
        manifest = cache.read_manifest(out_dir)
        if manifest is None:
            init_ray(cfg.ray)
            provenance = {
                "corpus_key": key,
                "backbone_key": backbone_key,
                "config": {"corpus": dataclasses.asdict(cfg.corpus)}
                | {"extract": dataclasses.asdict(cfg.extract)},
            }
            manifest = run_pass(backbone, make_rows(rows), out_dir, cfg.extract, provenance)
        else:
            print(f"[extract] {modality:5s} {name}: cached ({manifest['rows']} rows) {out_dir}")
        dirs[modality], manifests[modality] = out_dir, manifest
    return Extracted(corpus_dir, dirs["image"], dirs["text"], manifests["image"], manifests["text"])


def _image_rows(rows: list[dict[str, Any]]) -> pa.Table:
    """Unique images only: several captions may share one image, which is embedded once."""
    seen: dict[str, bytes] = {}
    for r in rows:
        seen.setdefault(r["image_id"], r["image"])
    return pa.table({"id": list(seen), "image": pa.array(list(seen.values()), pa.binary())})


def _text_rows(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.table(
        {
            "id": [r["pair_id"] for r in rows],
            "caption": pa.array([r["caption"] for r in rows], pa.string()),
            "negative": pa.array([r.get("negative") for r in rows], pa.string()),
        }
    )
