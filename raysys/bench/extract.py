"""`raysys bench extract`: the Ray Data extraction pass against a bare PyTorch loop.

The same vision backbone, images, input size and forward batch size run twice:

- **bare**: one process on the device the actors use (cuda where `extract.num_gpus_per_actor`
  > 0, else the CPU with every CPU's thread to torch), the same weight dtype, over images
  decoded *before* the clock starts — the model-only upper bound;
- **pipeline**: `extract.run_pass` into a fresh directory, exactly what `raysys extract` does
  (Ray Data decode + an actor pool of the backbone + Parquet parts), timed end to end, so its
  rate includes starting the actors and loading the model in each, decoding and writing.
  With `extract.cache_dir=s3://…` the parts go to a fresh prefix in that bucket, as on a
  cluster (`settings.cache` says which).

The ratio `pipeline_per_s / bare_per_s` is what the pipeline delivers of the model's own
speed. Ray is started before either run (one Ray serves a whole session), so both see the same
idle Ray; the bare loop runs first. The 1-minute load average is recorded beside the figures.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch

from raysys import storage
from raysys.backbones import configured_backbone, pick_device
from raysys.bench.common import host_info, sync, write_result
from raysys.config import Config, ExtractConfig
from raysys.corpora import load_corpus
from raysys.errors import ConfigError
from raysys.extract import run_pass
from raysys.runtime import cluster_resources, init_ray


def bench_extract(cfg: Config, out_dir: Path, images: int) -> dict[str, Any]:
    """Time the bare loop, then the pipeline, on the first `images` images of the corpus; print
    both rates and their ratio, write `out_dir/bench.json` and return what it holds."""

    table = _corpus_images(cfg, images)
    if storage.is_remote(cfg.extract.cache_dir):
        storage.check_writable(cfg.extract.cache_dir)  # a wrong bucket fails before the clock
    init_ray(cfg.ray)
    cluster_cpus = cluster_resources().cpus
    cpus = max(1, int(cluster_cpus))
    device = bare_device(cfg.extract)
    threads = cpus if device.type == "cpu" else torch.get_num_threads()
    bare_s, image_size = _bare_pass(cfg.extract, table, threads, device)
    pipeline_s, manifest = _pipeline_pass(cfg.extract, table)
    figures = _result(
        cfg.extract, images, bare_s, pipeline_s, image_size, manifest, threads, cluster_cpus
    )
    result = write_result(out_dir, figures | _device_facts(cfg.extract, device))
    where = f"{device}, {cpus} threads" if device.type == "cpu" else str(device)
    print(
        f"[bench] extract {cfg.extract.vision} at {image_size}px, {images} images, batch "
        f"{cfg.extract.batch_size}, {result['settings']['precision']} weights\n"
        + (f"[bench] note: {result['bare_note']}\n" if result.get("bare_note") else "")
        + f"[bench] bare torch loop ({where}, pre-decoded): {result['bare_per_s']:8.1f} "
        f"images/s\n"
        f"[bench] ray data pass ({manifest['actors']['count']} actors, end to end): "
        f"{result['pipeline_per_s']:8.1f} images/s\n"
        f"[bench] ratio {result['ratio']:.3f} (goal >= 0.7 on 2 CPU cores, >= 0.9 on a GPU)",
        flush=True,
    )
    return result


def _corpus_images(cfg: Config, images: int) -> pa.Table:
    """The first `images` rows of the corpus, which must hold the image bytes inline: both
    paths must start from the same bytes."""

    table = load_corpus(cfg.corpus).images
    if table is None or "image" not in table.column_names:
        raise ConfigError(
            "bench extract times decoded images against the pipeline on the same bytes; use "
            "the synthetic corpus or a manifest with inline image bytes"
        )
    if not 1 <= images <= table.num_rows:
        raise ConfigError(
            f"--images {images}: the corpus has {table.num_rows} images; choose 1 to "
            f"{table.num_rows} or raise corpus.size"
        )
    return table.slice(0, images)


def bare_device(ecfg: ExtractConfig) -> torch.device:
    """Where the bare loop runs: where the actors run (`pick_device`, as `EmbedActor` picks
    it), so the ratio compares the pipeline with the model on the same kind of device."""
    return pick_device(ecfg.num_gpus_per_actor > 0)


def _device_facts(ecfg: ExtractConfig, device: torch.device) -> dict[str, Any]:
    """The bare loop's device for `bench.json`, and a note when it cannot be the actors'
    (GPU actors, but no GPU in this process): that ratio compares unlike devices."""
    facts: dict[str, Any] = {
        "bare_device": str(device),
        "bare_device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else host_info()["processor"] or "cpu",
        "actor_device": "cuda" if ecfg.num_gpus_per_actor > 0 else "cpu",
    }
    if ecfg.num_gpus_per_actor > 0 and device.type != "cuda":
        facts["bare_note"] = (
            "the actors hold GPUs but this process sees none, so the bare loop ran on the "
            "CPU and the ratio compares unlike devices; run the bench where the GPU is"
        )
    return facts


def _bare_pass(
    ecfg: ExtractConfig, table: pa.Table, threads: int, device: torch.device
) -> tuple[float, int]:
    """Seconds of forwards on `device` over images decoded before the clock starts (after
    one warm-up batch), with `threads` torch threads: the model-only upper bound.
    Each batch's uint8 pixels are copied to the device inside the clock, as in the actors.
    Also the input size."""

    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        bare = configured_backbone(ecfg, "image")  # the actors' weight dtype
        bare.load(device)
        decoded = bare.preprocess(
            {"id": np.asarray(table["id"]), "image": np.asarray(table["image"].to_pylist(), object)}
        )
        batch = ecfg.batch_size
        bare.embed({k: v[:batch] for k, v in decoded.items()})
        sync(device)
        started = time.perf_counter()
        for i in range(0, table.num_rows, batch):
            bare.embed({k: v[i : i + batch] for k, v in decoded.items()})
        sync(device)  # embed copies its features to the host, but say so: no queued work
        return time.perf_counter() - started, bare.image_size
    finally:
        torch.set_num_threads(threads_before)


def _pipeline_pass(ecfg: ExtractConfig, table: pa.Table) -> tuple[float, dict[str, Any]]:
    """Seconds of `raysys extract`'s real pass, end to end, into a directory of its own (removed
    after), and the pass's manifest. With an `s3://` `extract.cache_dir` the actors write
    their parts to a fresh prefix there, as on a cluster; else to a local temp directory."""

    if storage.is_remote(ecfg.cache_dir):
        work = storage.join(ecfg.cache_dir, f"bench-extract-{uuid.uuid4().hex}")
    else:
        work = tempfile.mkdtemp(prefix="raysys-bench-extract-")
    try:
        started = time.perf_counter()
        out = storage.join(work, "image")
        manifest = run_pass(configured_backbone(ecfg, "image"), table, out, ecfg, {})
        return time.perf_counter() - started, manifest
    finally:
        storage.remove(work)


def _result(
    ecfg: ExtractConfig,
    images: int,
    bare_s: float,
    pipeline_s: float,
    image_size: int,
    manifest: dict[str, Any],
    threads: int,
    cluster_cpus: float,
) -> dict[str, Any]:
    """The figures and the settings `bench.json` holds."""

    pipeline_per_s, bare_per_s = images / pipeline_s, images / bare_s
    host = host_info()
    return {
        "pipeline_per_s": pipeline_per_s,
        "bare_per_s": bare_per_s,
        "ratio": pipeline_per_s / bare_per_s,
        "pipeline_s": pipeline_s,
        "bare_s": bare_s,
        "settings": {
            "backbone": ecfg.vision,
            "image_size": image_size,
            "images": images,
            "batch_size": ecfg.batch_size,
            "cached_rows": manifest["rows"],
            "cache": "s3" if storage.is_remote(ecfg.cache_dir) else "local",
            "actors": manifest["actors"],
            "bare_torch_threads": threads,
            "precision": configured_backbone(ecfg, "image").precision,
            "cluster_cpus": cluster_cpus,
            "torch": host["torch"],
            "ray": ray.__version__,
            "python": host["python"],
            "load_average_1m": host["load_average_1m"],
        },
        "host": host,
    }


def run(args: Any, cfg: Config, out: Path) -> None:
    """`raysys bench extract --images N`."""
    bench_extract(cfg, out, args.images)
