"""`raysys bench extract`: the Ray Data extraction pass against a bare PyTorch loop.

The same vision backbone, images, input size and forward batch size run twice:

- **bare**: one process, every CPU's thread to torch, over images decoded *before* the clock
  starts — the model-only upper bound;
- **pipeline**: `extract.run_pass` into a fresh directory, exactly what `raysys extract` does
  (Ray Data decode + an actor pool of the backbone + Parquet parts), timed end to end, so its
  rate includes starting the actors and loading the model in each, decoding and writing.

The ratio `pipeline_per_s / bare_per_s` is what the pipeline delivers of the model's own
speed. Ray is started before either run (one Ray serves a whole session), so both see the same
idle Ray; the bare loop runs first. The 1-minute load average is recorded beside the figures.
"""

from __future__ import annotations

import json
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from raysys.bench.common import BENCH_FILE, load_average
from raysys.config import Config
from raysys.errors import ConfigError


def bench_extract(cfg: Config, out_dir: Path, images: int) -> dict[str, Any]:
    import numpy as np
    import ray
    import torch

    from raysys.backbones import configured_backbone
    from raysys.corpora import load_corpus
    from raysys.extract import run_pass
    from raysys.runtime import cluster_resources, init_ray

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
    init_ray(cfg.ray)
    table = table.slice(0, images)
    ecfg = cfg.extract

    # Bare loop: decode first (untimed), one warm-up batch, then the timed forwards.
    cpus = max(1, int(cluster_resources().cpus))
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cpus)
    bare = configured_backbone(ecfg, "image")
    bare.load(torch.device("cpu"))
    decoded = bare.preprocess(
        {"id": np.asarray(table["id"]), "image": np.asarray(table["image"].to_pylist(), object)}
    )
    batch = ecfg.batch_size
    bare.embed({k: v[:batch] for k, v in decoded.items()})
    started = time.perf_counter()
    for i in range(0, images, batch):
        bare.embed({k: v[i : i + batch] for k, v in decoded.items()})
    bare_s = time.perf_counter() - started
    torch.set_num_threads(threads_before)

    # Pipeline: the real pass, into a directory of its own.
    work = Path(tempfile.mkdtemp(prefix="raysys-bench-extract-"))
    try:
        started = time.perf_counter()
        manifest = run_pass(configured_backbone(ecfg, "image"), table, work / "image", ecfg, {})
        pipeline_s = time.perf_counter() - started
    finally:
        shutil.rmtree(work, ignore_errors=True)

    pipeline_per_s, bare_per_s = images / pipeline_s, images / bare_s
    result: dict[str, Any] = {
        "pipeline_per_s": pipeline_per_s,
        "bare_per_s": bare_per_s,
        "ratio": pipeline_per_s / bare_per_s,
        "pipeline_s": pipeline_s,
        "bare_s": bare_s,
        "settings": {
            "backbone": ecfg.vision,
            "image_size": bare.image_size,
            "images": images,
            "batch_size": batch,
            "cached_rows": manifest["rows"],
            "actors": manifest["actors"],
            "bare_torch_threads": cpus,
            "cluster_cpus": cluster_resources().cpus,
            "torch": torch.__version__,
            "ray": ray.__version__,
            "python": platform.python_version(),
            "load_average_1m": load_average(),
        },
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / BENCH_FILE).write_text(json.dumps(result, indent=1))
    print(
        f"[bench] extract {ecfg.vision} at {bare.image_size}px, {images} images, batch {batch}\n"
        f"[bench] bare torch loop ({cpus} threads, pre-decoded): {result['bare_per_s']:8.1f} "
        f"images/s\n"
        f"[bench] ray data pass ({manifest['actors']['count']} actors, end to end): "
        f"{result['pipeline_per_s']:8.1f} images/s\n"
        f"[bench] ratio {result['ratio']:.3f} (goal >= 0.7 on 2 CPU cores, >= 0.9 on a GPU)",
        flush=True,
    )
    return result


def run(args: Any, cfg: Config, out: Path) -> None:
    """`raysys bench extract --images N`."""
    bench_extract(cfg, out, args.images)
