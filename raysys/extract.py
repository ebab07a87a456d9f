"""Extract: corpus -> embedding cache, with Ray Data and a pool of frozen-backbone actors.

Two passes, vision over unique images and language over captions plus hard negatives. Each pass
is CPU `map_batches` (decode / tokenize) feeding an `ActorPoolStrategy` of actors that each hold
one frozen backbone and return the pooled hidden state of every layer in ONE forward. A pass
whose manifest matches is skipped, so an unchanged stage is never recomputed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raysys import storage
from raysys.backbones import REJECT, Backbone, configured_backbone, pick_device
from raysys.config import Config, ExtractConfig
from raysys.corpora import Corpus, load_corpus, negative_counts
from raysys.data import cache
from raysys.errors import ConfigError, CorpusError

PREPROCESS_CPUS = 0.5  # per decode/tokenize task; what the actor plan always leaves free
PARTS_PER_ACTOR = 8  # enough parts per actor that the pool drains evenly
REJECT_PARTS = "rejects.parts"  # actors' reject files, merged into cache.REJECTS at the end


@dataclass
class Extracted:
    """Where one corpus's embeddings live; what `train` and `evaluate` read. The corpus it
    was read from rides along, so later stages (the projector's thumbnails) need not read
    it again."""

    corpus_dir: Path
    image_dir: Path
    text_dir: Path
    image_manifest: dict[str, Any]
    text_manifest: dict[str, Any]
    corpus: Corpus


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


class Prepare:
    """The CPU stage: read images named by URI, then the backbone's own preprocessing
    (decode/resize or tokenize); a reason given upstream (an unreadable file) wins over the
    one preprocessing would give the empty row."""

    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prior = np.full(len(batch["id"]), "", dtype=object)
        if "uri" in batch:
            batch = dict(batch)
            batch["image"], prior = read_images(batch.pop("uri"))
        out = self.backbone.preprocess(batch)
        reasons = np.asarray(out[REJECT], dtype=object)
        out[REJECT] = np.where(prior != "", prior, reasons)
        return out


def read_images(uris: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bytes of each image file (local or s3://), and a reject reason for each one that
    cannot be read; S3 objects are fetched concurrently (one s3fs `cat_ranges` per batch)."""
    data = np.empty(len(uris), dtype=object)
    reasons = np.full(len(uris), "", dtype=object)
    todo = [i for i, u in enumerate(uris) if isinstance(u, str) and u]
    remote = [i for i in todo if storage.is_remote(uris[i])]
    if remote:
        fs, _ = storage.fsspec_fs(uris[remote[0]])
        paths = [storage.fsspec_fs(uris[i])[1] for i in remote]
        # cat_ranges, not cat: cat expands glob characters, which are legal in S3 keys.
        got = fs.cat_ranges(paths, [None] * len(paths), [None] * len(paths), on_error="return")
        for i, value in zip(remote, got, strict=True):
            if isinstance(value, bytes):
                data[i] = value
            else:
                reasons[i] = f"missing or unreadable image file: {type(value).__name__}"
    for i in set(todo) - set(remote):
        try:
            with open(uris[i].removeprefix("file://"), "rb") as f:
                data[i] = f.read()
        except OSError as e:
            reasons[i] = f"missing or unreadable image file: {e.strerror or type(e).__name__}"
    for i in set(range(len(uris))) - set(todo):
        reasons[i] = "no image in the corpus row"
    return data, reasons


class _SkipDone:
    """Drop rows whose id a finished part already holds (a resumed pass over a dataset)."""

    def __init__(self, done: pa.Array) -> None:
        self.done = done

    def __call__(self, batch: pa.Table) -> pa.Table:
        return batch.filter(pc.invert(pc.is_in(batch["id"], self.done)))


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

    dims = {layer_name(i): d for i, d in zip(backbone.layer_ids, backbone.dims, strict=True)}
    if backbone.modality == "text":
        dims |= {"neg_" + name: d for name, d in dims.items()}
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
    rows: pa.Table | PassRows,
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
    done = pa.array(done, pa.string())  # one Arrow array for every filter below
    source = PassRows.of(rows)
    total = len(source.ids)
    n_todo = total - int(pc.sum(pc.is_in(source.ids, done)).as_py() or 0)
    if len(done):
        print(
            f"[extract] {backbone.modality:5s} {backbone.name}: resuming, {len(done)} of "
            f"{total} rows already in finished parts",
            flush=True,
        )
    if n_todo:
        part_rows = _part_rows(n_todo, actors, ecfg)
        if source.table is not None:
            todo = source.table.filter(pc.invert(pc.is_in(source.table["id"], done)))
            ds = ray.data.from_arrow(todo).repartition(math.ceil(todo.num_rows / part_rows))
        else:  # read by Ray Data, block by block; parts form in the batching below
            ds = source.dataset().map_batches(_SkipDone(done), batch_format="pyarrow")
        ds = ds.map_batches(
            Prepare(backbone),
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
    expected = set(source.ids.to_pylist())
    if seen != expected:
        raise CorpusError(
            f"the {backbone.modality} parts in {str(out_dir)!r} hold {len(seen)} ids for "
            f"{len(expected)} rows ({len(expected - seen)} missing, {len(seen - expected)} "
            "foreign); delete the directory and rerun"
        )
    if n_rejects:
        pq.write_table(reject_table.sort_by("id"), out_dir / cache.REJECTS)
    fraction = n_rejects / max(1, total)
    if fraction > ecfg.max_reject_fraction:
        reasons = pc.value_counts(reject_table["reason"]).to_pylist()
        raise CorpusError(
            f"{n_rejects} of {total} {backbone.modality} rows rejected "
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
        "rows": total - n_rejects,
        "rejects": n_rejects,
        "seconds": round(elapsed, 2),
        "resumed_rows": len(done),
        "actors": {"count": actors, "cpus": cpus, "gpus": gpus, "threads": threads},
        # What a published copy must hold: a download takes these and nothing stray.
        "files": sorted(Path(f).name for f in cache.data_files(out_dir))
        + ([cache.REJECTS] if n_rejects else []),
        "cache_version": cache.CACHE_VERSION,
        **provenance,
    }
    cache.write_manifest(out_dir, manifest)
    shutil.rmtree(rejects_dir, ignore_errors=True)  # merged into cache.REJECTS above
    rate = n_todo / max(elapsed, 1e-9)
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

    backbones = {m: configured_backbone(cfg.extract, m) for m in ("image", "text")}
    for backbone in backbones.values():
        backbone.check()  # a wrong model id or layer fails here, before Ray or any GPU work
    if cfg.corpus.name == "webdataset":
        init_ray(cfg.ray)  # its caption index is read by Ray Data
    remote = storage.is_remote(cfg.extract.cache_dir)
    if remote:
        storage.check_writable(cfg.extract.cache_dir)  # fails in seconds, before any work
    corpus = load_corpus(cfg.corpus)
    # Absolute: Ray workers run in their own working directories, not the driver's.
    cache_dir = local_cache_dir(cfg.extract)
    corpus_dir = cache_dir / corpus.key
    cache.write_pairs(corpus_dir, corpus.pairs)
    if remote:
        pairs = corpus_dir / cache.PAIRS
        storage.upload_file(pairs, _remote(cfg.extract, pairs, cache_dir))
    inputs = {"image": image_rows(corpus), "text": text_rows(corpus.pairs)}
    dirs: dict[str, Path] = {}
    manifests: dict[str, dict[str, Any]] = {}
    for modality, backbone in backbones.items():
        backbone_key = cache.content_key(backbone.describe(), cache.CACHE_VERSION)
        out_dir = cache.stage_dir(cache_dir, corpus.key, modality, backbone_key)
        manifest = cache.read_manifest(out_dir)
        published = _remote(cfg.extract, out_dir, cache_dir) if remote else ""
        if published and manifest is not None:
            if not storage.exists(storage.join(published, cache.MANIFEST)):
                _upload_stage(out_dir, published)  # finished here, its upload never completed
        elif published:
            manifest = _download_stage(published, out_dir)
        if manifest is None:
            init_ray(cfg.ray)
            provenance = {
                "corpus_key": corpus.key,
                "corpus": corpus.info | {"negatives": negative_counts(corpus.pairs)},
                "backbone_key": backbone_key,
                "config": {"corpus": dataclasses.asdict(cfg.corpus)}
                | {"extract": dataclasses.asdict(cfg.extract)},
            }
            manifest = run_pass(backbone, inputs[modality], out_dir, cfg.extract, provenance)
            if published:
                _upload_stage(out_dir, published)
        else:
            print(
                f"[extract] {modality:5s} {backbone.name}: cached ({manifest['rows']} rows) "
                f"{out_dir}"
            )
        dirs[modality], manifests[modality] = out_dir, manifest
    return Extracted(
        corpus_dir, dirs["image"], dirs["text"], manifests["image"], manifests["text"], corpus
    )


def local_cache_dir(ecfg: ExtractConfig) -> Path:
    """Where extraction writes and training reads. For an `s3://` cache this is a local
    mirror (`extract.mirror_dir`, by default under ~/.cache/raysys), one per bucket prefix."""
    if not storage.is_remote(ecfg.cache_dir):
        return Path(ecfg.cache_dir).resolve()
    root = Path(ecfg.mirror_dir or Path.home() / ".cache" / "raysys" / "mirror").expanduser()
    return (root / cache.content_key(ecfg.cache_dir.rstrip("/"))).resolve()


def _remote(ecfg: ExtractConfig, local: Path, cache_dir: Path) -> str:
    return storage.join(ecfg.cache_dir, local.relative_to(cache_dir).as_posix())


def _upload_stage(local: Path, uri: str) -> None:
    """Publish a finished stage: parts and rejects first, the manifest last, so a stage on
    S3 with a manifest is always whole (the same rule as on local disk)."""
    started = time.perf_counter()
    files = [local / name for name in cache.read_manifest(local)["files"]]
    for path in files:
        storage.upload_file(path, storage.join(uri, path.name))
    storage.upload_file(local / cache.MANIFEST, storage.join(uri, cache.MANIFEST))
    size = sum(p.stat().st_size for p in files) / 2**20
    print(
        f"[extract] uploaded {len(files)} files ({size:.1f} MiB) in "
        f"{time.perf_counter() - started:.1f} s -> {uri}",
        flush=True,
    )


def _download_stage(uri: str, local: Path) -> dict[str, Any] | None:
    """A finished stage from S3 into the local mirror, or None when S3 has none (no
    manifest: never extracted, or unfinished; the local pass then runs and publishes it)."""
    try:
        manifest = json.loads(storage.read_text(storage.join(uri, cache.MANIFEST)))
    except FileNotFoundError:
        return None
    staging = local.with_name(f".{local.name}.{uuid.uuid4().hex}{cache.TMP_SUFFIX}")
    staging.mkdir(parents=True)
    # Only the files the manifest lists: a concurrent or broken publisher's strays stay out.
    for name in [*manifest["files"], cache.MANIFEST]:
        storage.download_file(storage.join(uri, name), staging / name)
    shutil.rmtree(local, ignore_errors=True)  # an unfinished local pass: S3's is whole
    staging.replace(local)
    print(f"[extract] downloaded the finished stage {uri} -> {local}", flush=True)
    return manifest


def image_rows(corpus: Corpus) -> PassRows:
    """Unique images only: several captions may share one image, which is embedded once."""
    return PassRows(ids=corpus.image_ids, table=corpus.images, dataset=corpus.read_images)


def text_rows(pairs: pa.Table) -> pa.Table:
    return pa.table(
        {"id": pairs["pair_id"], "caption": pairs["caption"], "negative": pairs["negative"]}
    )
