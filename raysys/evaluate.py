"""Evaluate: score raw backbone embeddings and JAM latents on the same split, same metrics.

The raw row is the paper's baseline: how aligned two independently trained models already are.
Retrieval and hard-negative accuracy need one shared space, so the raw row leaves them empty.
The alignment metrics take one caption per image (its first in the split), as platonic-rep
does: with COCO's five captions, repeated images would otherwise count as each other's
nearest neighbours.
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


def shared_space(
    image: torch.Tensor, text: torch.Tensor, negative: torch.Tensor, pairs: Pairs, cfg: EvalConfig
) -> dict[str, float]:
    """Retrieval both ways and hard-negative accuracy: only meaningful in one shared space."""
    first, text_to_image = pairs.image_index()
    scores = metrics.retrieval(image[first], text, text_to_image, ks=tuple(cfg.retrieval_ks))
    scores["hardneg_acc"] = metrics.hard_negative_accuracy(image, text, negative)
    return scores


def score_raw(pairs: Pairs, cfg: EvalConfig) -> dict[str, float]:
    first, _ = pairs.image_index()
    return alignment(pairs.image[first], pairs.text[first], cfg)


@torch.no_grad()
def encode(model: JAM, pairs: Pairs, batch_size: int = 1024) -> dict[str, torch.Tensor]:
    """Latents and reconstruction error of a split, in eval mode (no dropout), left on the
    model's device: a training worker on a GPU scores there rather than on its CPU."""
    model.eval()
    device = next(model.parameters()).device
    out: dict[str, list[torch.Tensor]] = {"zi": [], "zt": [], "zn": [], "sq": []}
    for start in range(0, len(pairs), batch_size):
        sl = slice(start, start + batch_size)
        image = torch.as_tensor(pairs.image[sl]).to(device)
        text = torch.as_tensor(pairs.text[sl]).to(device)
        res = model(image, text)
        out["zi"].append(res["zi"].float())
        out["zt"].append(res["zt"].float())
        out["zn"].append(model.encode_text(torch.as_tensor(pairs.negative[sl]).to(device)).float())
        sq = torch.cat(
            [
                (res["image_hat"] - res["image_target"]).pow(2).mean(1),
                (res["text_hat"] - res["text_target"]).pow(2).mean(1),
            ]
        )
        out["sq"].append(sq.float())
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


def score_model(model: JAM, pairs: Pairs, cfg: EvalConfig) -> dict[str, float]:
    """Every results.csv metric for a trained model on one split."""
    z = encode(model, pairs)
    where = metric_device(len(pairs), z["zi"].device)
    z = {k: v.to(where) for k, v in z.items()}
    scores = shared_space(z["zi"], z["zt"], z["zn"], pairs, cfg)
    first, _ = pairs.image_index()
    scores |= alignment(z["zi"][first], z["zt"][first], cfg)
    # Mean over both modalities of the per-feature MSE, in the standardised input space.
    scores["recon_mse"] = float(z["sq"].mean())
    return scores
