"""`raysys bench <stage>`: the arguments and which benchmark runs each stage.

Each benchmark module checks its own arguments in its `run(args, cfg, out)`; the modules
are imported when their stage runs, because `step` and `embed` must run where Ray is absent
(a torch-only GPU machine) and the others import Ray.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from raysys.bench import BENCH_FILE
from raysys.config import Config

STAGES = {
    "train": "Ray Train vs a bare loop on the cache",
    "step": "the training step alone (no Ray) on random embeddings held on the device",
    "extract": "the Ray Data image pass vs a bare loop over pre-decoded images",
    "embed": "the extract actor's batch function (no Ray) vs a bare forward, ViT-B/16 and "
    "BERT-base",
    "sweep": "identical small trials packed one per process vs stacked as one population",
    "corpus": "the Ray Data corpus index job on --rows synthetic captions (--format manifest "
    "or webdataset): rows/s and the driver's peak RSS",
    "stream": "a sweep trial's streamed reads of a --pairs pair view (no Ray) vs a bare "
    "pyarrow loop over its files",
    "eval": "score_model (chunked retrieval, sampled alignment, intervals) on --pairs random "
    "test pairs (no Ray): seconds and peak RSS",
}

__all__ = ["BENCH_FILE", "STAGES", "add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "stage",
        choices=list(STAGES),
        help="; ".join(f"{name}: {what}" for name, what in STAGES.items()),
    )
    parser.add_argument("--images", type=int, default=1000, help="extract: images embedded")
    parser.add_argument(
        "--rows", type=int, default=256, help="embed: rows per modality; corpus: captions"
    )
    parser.add_argument("--format", default="manifest", help="corpus: manifest or webdataset")
    parser.add_argument("--trials", type=int, default=4, help="sweep: identical trials")
    parser.add_argument(
        "--pairs",
        type=int,
        default=200_000,
        help="step: pairs on device; eval: test pairs; stream: pairs in the view",
    )
    parser.add_argument(
        "--dims", default="1024,4096", help="step, stream: image,text embedding widths"
    )
    parser.add_argument("--steps", type=int, default=50, help="step: timed steps")
    parser.add_argument(
        "--population",
        type=int,
        default=0,
        help="step: also time P stacked members against one member (ratio of member·samples/s)",
    )
    parser.add_argument(
        "--step-ms",
        type=float,
        default=0.0,
        help="stream: a wait after each batch, standing in for a device step",
    )
    parser.add_argument(
        "--readers",
        type=int,
        default=0,
        help="stream: row groups or windows made at once (0: the default, by the cores)",
    )
    parser.add_argument("--device", default="auto", help="step, embed, eval: auto, cpu, cuda, …")


def run(args: argparse.Namespace, cfg: Config, out: Path) -> None:
    module = importlib.import_module(f"raysys.bench.{args.stage}")
    module.run(args, cfg, out)
