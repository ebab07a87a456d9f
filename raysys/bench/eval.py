"""`raysys bench eval`: the real `score_model` on N random test pairs — no Ray, no cache.

What scoring a trained model on a large test split costs: encoding every pair, exact retrieval
in both directions over the whole split (in chunks), hard negatives per kind, every alignment
metric on the default seeded sample (`eval.metric_pairs`) with its half-sample interval, and
every per-item bootstrap interval. Embeddings are random float16 at realistic widths (1280-d
image, EfficientNet-Lite's pooled features; 384-d text, MiniLM's) through a freshly initialised
default JAM: the cost does not depend on the values. It prints the seconds and the process's
peak RSS (`ru_maxrss`, which includes torch itself): the goal is 100,000 pairs within 4 GB on
a 2-core machine, which a dense N x N evaluation (80 GB of similarities) cannot meet.

Imports torch and numpy only; runs where Ray is absent.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raysys.bench.common import host_info, peak_rss_mb, resolve_device, write_result
from raysys.config import Config, to_dict
from raysys.data.pairs import Pairs
from raysys.errors import ConfigError
from raysys.evaluate import score_model
from raysys.jam import JAM
from raysys.train.step import jam_config

# Each pair's negative is one of these kinds (so the per-kind scores and their intervals run).
KINDS = ("exact:colour", "exact:shape", "generated:swap")


@dataclass
class EvalBench:
    """The split to score: `--pairs` pairs (one caption per image) of these widths."""

    pairs: int = 100_000
    d_image: int = 1280
    d_text: int = 384
    device: str = "auto"  # auto = cuda when available
    seed: int = 0


def random_pairs(bench: EvalBench) -> Pairs:
    """N float16 pairs filled a block at a time, so no float64 copy of a whole matrix is ever
    made (at 100k x 1280 that copy alone would be 1 GB)."""
    rng = np.random.default_rng(bench.seed)
    n = bench.pairs

    def matrix(d: int) -> np.ndarray:
        out = np.empty((n, d), dtype=np.float16)
        for start in range(0, n, 8192):
            rows = min(8192, n - start)
            out[start : start + rows] = rng.standard_normal((rows, d), dtype=np.float32)
        return out

    ids = np.char.add("p", np.arange(n).astype(str))
    sources = np.array(KINDS)[np.arange(n) % len(KINDS)]
    image, text, negative = matrix(bench.d_image), matrix(bench.d_text), matrix(bench.d_text)
    return Pairs(ids, ids, ids, image, text, negative, negative_sources=sources)


def bench_eval(cfg: Config, out_dir: Path, bench: EvalBench) -> dict[str, Any]:
    """Build the split and a default JAM, time one `score_model` with every interval; print
    and write `out_dir/bench.json` (`pairs`, `seconds`, `peak_rss_mb`, the settings)."""
    device = resolve_device(bench.device)
    torch.manual_seed(bench.seed)
    started = time.perf_counter()
    pairs = random_pairs(bench)
    model = JAM(jam_config(cfg.train, bench.d_image, bench.d_text)).to(device)
    sample = slice(0, min(bench.pairs, 20_000))
    model.fit_input_stats(torch.as_tensor(pairs.image[sample]), torch.as_tensor(pairs.text[sample]))
    setup_s = time.perf_counter() - started
    setup_rss = peak_rss_mb()

    t0 = time.perf_counter()
    scores = score_model(model, pairs, cfg.eval)
    seconds = time.perf_counter() - t0
    peak = peak_rss_mb()
    host = host_info()
    result: dict[str, Any] = {
        "stage": "eval",
        "pairs": bench.pairs,
        "seconds": seconds,
        "peak_rss_mb": peak,
        "setup_s": setup_s,
        "setup_peak_rss_mb": setup_rss,
        "n_images": scores.get("n_images"),
        "n_metric_images": scores.get("n_metric_images"),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "scores": {k: v for k, v in scores.items() if not k.endswith(("_lo", "_hi"))},
        "settings": {**asdict(bench), "device": str(device), "eval": to_dict(cfg.eval)},
        "host": host,
    }
    print(
        f"[bench eval] {bench.pairs:,} pairs ({bench.d_image}/{bench.d_text}-d, alignment on "
        f"{scores.get('n_metric_images', '?')} images) on {device}: {seconds:.1f}s, peak RSS "
        f"{peak:,.0f} MiB (after setup {setup_rss:,.0f} MiB)",
        flush=True,
    )
    return write_result(out_dir, result)


def run(args: Any, cfg: Config, out: Path) -> None:
    """`raysys bench eval --pairs N --device D`."""
    if args.pairs < 2 * (cfg.eval.knn_k + 1):
        raise ConfigError(
            f"--pairs ({args.pairs}) must be at least {2 * (cfg.eval.knn_k + 1)} "
            f"(eval.knn_k={cfg.eval.knn_k} neighbours in each half-sample)"
        )
    bench_eval(cfg, out, EvalBench(pairs=args.pairs, device=args.device))
