"""Evaluate: score raw backbone embeddings and JAM latents on the same split, same metrics.

The raw row is the paper's baseline: how aligned two independently trained models already are.
Retrieval and hard-negative accuracy need one shared space, so the raw row leaves them empty.
The alignment metrics take one caption per image (its first in the split), as platonic-rep
does: with COCO's five captions, repeated images would otherwise count as each other's
nearest neighbours.

Per-item metrics (retrieval both ways, hard-negative accuracy, reconstruction error) also get a
seeded percentile bootstrap interval over the test items they average (`<metric>_lo`,
`<metric>_hi`): image->text recall over unique image queries, text->image recall,
hard-negative accuracy and reconstruction over pairs (caption queries). The set-level alignment
metrics get none: a resample repeats rows, and repeated rows become each other's nearest
neighbours, which biases kNN metrics and CKA rather than measuring their noise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from raysys import metrics
from raysys.config import EvalConfig
from raysys.jam import JAM

if TYPE_CHECKING:
    from raysys.data.pairs import Pairs


def alignment(image: np.ndarray | torch.Tensor, text: np.ndarray | torch.Tensor, cfg: EvalConfig):
    """The representation-similarity metrics of the Platonic Representation Hypothesis."""
    a = torch.as_tensor(image, dtype=torch.float32)
    b = torch.as_tensor(text, dtype=torch.float32)
    k = min(cfg.knn_k, len(a) - 1)
    return {
        "mutual_knn": metrics.mutual_knn(a, b, k=k),
        "cka": metrics.cka(a, b),
        "unbiased_cka": metrics.cka(a, b, unbiased=True),
        "cknna": metrics.cknna(a, b, k=k),
        "svcca": metrics.svcca(a, b, dim=min(cfg.svcca_dim, len(a) - 1, a.shape[1], b.shape[1])),
    }


def per_item(
    image: torch.Tensor,
    text: torch.Tensor,
    negative: torch.Tensor,
    index: tuple[np.ndarray, np.ndarray],
    cfg: EvalConfig,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The 0/1 outcomes behind each shared-space metric, grouped by the items they are over:
    unique images (image->text queries) and pairs (caption queries, hard negatives). `index`
    is the split's `Pairs.image_index()`."""
    first, text_to_image = index
    ks = tuple(cfg.retrieval_ks)
    i2t, t2i = metrics.retrieval_hits(image[first], text, text_to_image, ks=ks)
    by_image = {f"i2t_r{k}": i2t[:, j] for j, k in enumerate(ks)}
    by_pair = {f"t2i_r{k}": t2i[:, j] for j, k in enumerate(ks)}
    by_pair["hardneg_acc"] = metrics.hard_negative_wins(image, text, negative)
    return by_image, by_pair


def means(outcomes: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each metric as the mean of its per-item outcomes (recall@k, accuracy), in float32 as
    `metrics.retrieval` and `metrics.hard_negative_accuracy` compute them."""
    return {k: v.to(torch.float32).mean().item() for k, v in outcomes.items()}


def intervals(outcomes: dict[str, torch.Tensor], cfg: EvalConfig) -> dict[str, float]:
    """`<metric>_lo` / `<metric>_hi`: the `cfg.interval` percentile bootstrap interval of each
    metric's mean over its items (all of one group resampled together), or none when
    `cfg.bootstrap` is 0."""
    if not outcomes or cfg.bootstrap < 1:
        return {}
    matrix = torch.stack([v.detach().double().cpu() for v in outcomes.values()], dim=1)
    lo, hi = metrics.bootstrap_interval(matrix.numpy(), cfg.bootstrap, cfg.interval, seed=0)
    out: dict[str, float] = {}
    for name, low, high in zip(outcomes, lo, hi, strict=True):
        out |= {f"{name}_lo": float(low), f"{name}_hi": float(high)}
    return out


def score_raw(pairs: Pairs, cfg: EvalConfig) -> dict[str, float]:
    first, _ = pairs.image_index()
    return alignment(pairs.image[first], pairs.text[first], cfg)


@torch.no_grad()
def encode(model: JAM, pairs: Pairs, batch_size: int = 1024) -> dict[str, torch.Tensor]:
    """Latents and reconstruction error of a split, in eval mode (no dropout), left on the
    model's device: a training worker on a GPU scores there rather than on its CPU."""
    model.eval()
    device = next(model.parameters()).device
    out: dict[str, list[torch.Tensor]] = {"zi": [], "zt": [], "zn": [], "sq": [], "sq_pair": []}
    for start in range(0, len(pairs), batch_size):
        sl = slice(start, start + batch_size)
        image = torch.as_tensor(pairs.image[sl]).to(device)
        text = torch.as_tensor(pairs.text[sl]).to(device)
        res = model(image, text)
        out["zi"].append(res["zi"].float())
        out["zt"].append(res["zt"].float())
        out["zn"].append(model.encode_text(torch.as_tensor(pairs.negative[sl]).to(device)).float())
        sq_image = (res["image_hat"] - res["image_target"]).pow(2).mean(1).float()
        sq_text = (res["text_hat"] - res["text_target"]).pow(2).mean(1).float()
        out["sq"].append(torch.cat([sq_image, sq_text]))
        out["sq_pair"].append((sq_image + sq_text) / 2)  # per pair, for its interval
    return {k: torch.cat(v) for k, v in out.items()}


# The kernel metrics hold about this many N x N float64 matrices at once (CKNNA the most).
KERNEL_MATRICES = 10


def metric_device(n: int, device: torch.device) -> torch.device:
    """Where N-pair metrics run: on the GPU the latents are on when their N x N matrices fit
    in half its free memory (packed trials and a shard held there share it), else the CPU."""
    if device.type != "cuda":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    return device if KERNEL_MATRICES * 8 * n * n < free // 2 else torch.device("cpu")


def score_model(
    model: JAM, pairs: Pairs, cfg: EvalConfig, with_intervals: bool = True
) -> dict[str, float]:
    """Every results.csv metric for a trained model on one split, then the per-item metrics'
    bootstrap intervals and the item counts behind them (`n_images`, `n_captions`);
    `with_intervals=False` or `cfg.bootstrap=0` skips those (e.g. per-epoch validation)."""
    z = encode(model, pairs)
    where = metric_device(len(pairs), z["zi"].device)
    z = {k: v.to(where) for k, v in z.items()}
    index = pairs.image_index()
    by_image, by_pair = per_item(z["zi"], z["zt"], z["zn"], index, cfg)
    scores = means(by_image | by_pair)
    first = index[0]
    scores |= alignment(z["zi"][first], z["zt"][first], cfg)
    # Mean over both modalities of the per-feature MSE, in the standardised input space.
    scores["recon_mse"] = float(z["sq"].mean())
    if with_intervals and cfg.bootstrap > 0:
        scores |= intervals(by_image, cfg) | intervals(by_pair | {"recon_mse": z["sq_pair"]}, cfg)
        scores |= {"n_images": len(first), "n_captions": len(pairs)}
    return scores
