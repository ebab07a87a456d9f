"""JAM training losses: contrastive alignment variants plus reconstruction.

All contrastive losses take *raw* latents and L2-normalise them here, so callers never have to
remember to; the logit scale ``s`` multiplies cosine similarities (CLIP's ``1/temperature``) and
may be a float or a 0-d tensor (e.g. a learnt :meth:`JAM.logit_scale`). Every loss runs in
float32 even when called inside an autocast region (the training step's bf16 one): half inputs
are upcast and autocast is switched off for the loss's own ops, because at a scale of 100
bf16 matmuls and log-sum-exps lose the loss entirely on nearly aligned latents (Spread's
difference of two log-sum-exps most of all). float64 stays float64.

Every loss also takes a population (:mod:`raysys.jam.population`): latents ``[P, B, D]`` of P
members with a scale, α, of shape ``[P]``, and returns the per-member means ``[P]``. Nothing
couples two members, so each member's gradient is the one it would get alone.

In data-parallel training the caller passes latents gathered from every rank
(:func:`raysys.jam.dist.gather_with_grad`); the functions themselves know nothing of ranks.

Notation: ``v`` image latents ``[B, D]``, ``t`` positive captions ``[B, D]`` and ``n`` hard
negative captions ``[B, D]`` (``n[i]`` is the negative of pair ``i``). Every loss is the mean
over the batch and returns a 0-d tensor. Log-softmaxes are computed with ``logsumexp`` /
``cross_entropy`` only, so a scale of 1e4 is as safe as 1.

Multi-caption corpora (COCO has five captions per image) put several rows of one image in a
batch. ``same`` (bool ``[B, B]``, symmetric, ``same[i, j]`` when rows ``i`` and ``j`` show the
same image) removes every off-diagonal such pair from the softmax denominators in both
directions: another caption of image ``i`` is not a wrong answer for image ``i``, nor is a
repeat of caption ``i``'s image in another row a wrong image for caption ``i``. Hard negatives
stay negatives. ``same=None`` treats every row as its own image.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F

Scale = float | torch.Tensor

__all__ = ["con", "negcon", "spread", "reconstruction", "lambda_schedule"]

HALF = (torch.float16, torch.bfloat16)
F_ = TypeVar("F_", bound=Callable[..., torch.Tensor])


def _upcast(x: object) -> object:
    return x.float() if isinstance(x, torch.Tensor) and x.dtype in HALF else x


def in_float32(fn: F_) -> F_:
    """Run a loss in (at least) float32 whatever autocast region it is called from: half
    tensors are upcast (differentiably) and autocast is off for the loss's ops."""

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> torch.Tensor:
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        device = tensors[0].device.type if tensors else "cpu"
        off = (
            torch.autocast(device, enabled=False)
            if torch.amp.is_autocast_available(device)
            else contextlib.nullcontext()
        )
        with off:
            args = tuple(_upcast(a) for a in args)
            kwargs = {k: _upcast(v) for k, v in kwargs.items()}
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _unit(z: torch.Tensor) -> torch.Tensor:
    """L2-normalise rows, in at least float32."""
    return F.normalize(_upcast(z), dim=-1)


def _targets(b: int, device: torch.device) -> torch.Tensor:
    return torch.arange(b, device=device)


def _per_member(x: Scale, like: torch.Tensor) -> Scale:
    """A scale or α of shape ``[P]`` broadcast over a population's ``[P, B, C]`` logits (a
    float or 0-d tensor broadcasts as it is)."""
    if isinstance(x, torch.Tensor) and x.dim() > 0:
        return x.reshape(x.shape + (1,) * (like.dim() - 1))
    return x


def _sim(s: Scale, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``s · a bᵀ`` over the last two dims: ``[B, C]`` logits, ``[P, B, C]`` for a population."""
    return (_per_member(s, a) * a) @ b.transpose(-1, -2)


def _diag(logits: torch.Tensor) -> torch.Tensor:
    """Row i's logit of column i (its own positive): ``[..., B]``."""
    return logits[..., : logits.shape[-2]].diagonal(dim1=-2, dim2=-1)


def _ce(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each row against its own column, averaged over the rows (the last
    batch dim): a population's ``[P, B, C]`` gives ``[P]``."""
    b, c = logits.shape[-2:]
    if logits.dim() == 2:  # torch's own mean (a population's sums its rows in another order)
        return F.cross_entropy(logits, _targets(b, logits.device))
    rows = logits.reshape(-1, c)
    targets = _targets(b, logits.device).repeat(rows.shape[0] // b)
    return F.cross_entropy(rows, targets, reduction="none").reshape(logits.shape[:-1]).mean(-1)


def _others(same: torch.Tensor | None, b: int, device: torch.device) -> torch.Tensor | None:
    """Off-diagonal part of ``same`` (bool ``[B, B]``): the pairs to drop from denominators.
    (No check for "none to drop": on a GPU that would be a host sync every step.)"""
    if same is None:
        return None
    if same.shape != (b, b):
        raise ValueError(f"same must be a bool [{b}, {b}] matrix, got shape {tuple(same.shape)}")
    eye = torch.eye(b, dtype=torch.bool, device=device)
    return same.to(device=device, dtype=torch.bool) & ~eye


def _drop(logits: torch.Tensor, drop: torch.Tensor | None) -> torch.Tensor:
    """Mask the first ``B`` columns' dropped pairs to -inf (later columns, the hard negatives,
    are kept)."""
    if drop is None:
        return logits
    if logits.shape[-1] > drop.shape[-1]:
        pad = drop.new_zeros(drop.shape[0], logits.shape[-1] - drop.shape[-1])
        drop = torch.cat([drop, pad], dim=1)
    return logits.masked_fill(drop, float("-inf"))


def _text_to_image(
    v: torch.Tensor, t: torch.Tensor, s: Scale, drop: torch.Tensor | None = None
) -> torch.Tensor:
    """CE of each positive caption over all images (but other rows of its own image), target
    its own image."""
    return _ce(_drop(_sim(s, t, v), drop))


@in_float32
def con(
    zv: torch.Tensor, zt: torch.Tensor, s: Scale, same: torch.Tensor | None = None
) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP): ``½(CE(image→text) + CE(text→image))``.

    Without ``same`` identical to open_clip's single-process
    ``ClipLoss()(normalize(zv), normalize(zt), s)``.
    """
    v, t = _unit(zv), _unit(zt)
    drop = _others(same, v.shape[-2], v.device)
    return 0.5 * (_ce(_drop(_sim(s, v, t), drop)) + _text_to_image(v, t, s, drop))


@in_float32
def negcon(
    zv: torch.Tensor,
    zt: torch.Tensor,
    zn: torch.Tensor,
    s: Scale,
    same: torch.Tensor | None = None,
) -> torch.Tensor:
    """CLIP with hard negatives on the image side.

    Each image is classified over all ``2B`` captions (positives then negatives), target its own
    positive, so every hard negative competes with every image; the text→image term is plain
    CLIP over positives (negatives have no image to point at).
    """
    v, t, n = _unit(zv), _unit(zt), _unit(zn)
    drop = _others(same, v.shape[-2], v.device)
    i2t = _ce(_drop(_sim(s, v, torch.cat([t, n], dim=-2)), drop))
    return 0.5 * (i2t + _text_to_image(v, t, s, drop))


def context_mask(zt: torch.Tensor, k: int = 0, same: torch.Tensor | None = None) -> torch.Tensor:
    """Bool ``[B, 2B]`` mask (``[P, B, 2B]`` for a population) of each image's context set over
    ``captions = [t; n]``.

    ``C_i = {t_i, n_i}`` plus, for ``k > 0``, the ``k`` other positive captions most
    cosine-similar to ``t_i``, never one of the same image (``same``; it is no negative at
    all). Selection uses detached latents: which captions are "context" is a discrete choice,
    not something to differentiate. ``k`` is capped at the candidates there are (``B - 1``
    less same-image rows), so a small final or per-test batch still works.
    """
    b = zt.shape[-2]
    eye = torch.eye(b, dtype=torch.bool, device=zt.device)
    own = torch.cat([eye, eye], dim=1)  # t_i and n_i
    mask = own.expand(*zt.shape[:-2], b, 2 * b).clone()
    k = min(int(k), b - 1)
    if k > 0:
        with torch.no_grad():
            t = _unit(zt.detach())
            sim = (t @ t.transpose(-1, -2)).masked_fill(eye, float("-inf"))
            drop = _others(same, b, zt.device)
            if drop is not None:
                sim = sim.masked_fill(drop, float("-inf"))
            top = sim.topk(k, dim=-1)
        # a row with fewer than k candidates got -inf picks: those are no context
        mask.scatter_(-1, top.indices, top.values > float("-inf"))
        mask |= own
    return mask


@in_float32
def spread(
    zv: torch.Tensor,
    zt: torch.Tensor,
    zn: torch.Tensor,
    s: Scale,
    alpha: Scale = 0.7,
    k: int = 8,
    same: torch.Tensor | None = None,
) -> torch.Tensor:
    """Context-spread loss: pull each image to its context, then spread within the context.

    ``½( mean_i[(1-α)·ConCon_i + α·ContextNCE_i] + CE(text→image) )`` with, over the ``2B``
    captions and the context set ``C_i`` of :func:`context_mask`::

        ConCon_i     = -log Σ_{c∈C_i} e^{s v_i·c} / Σ_{all c} e^{s v_i·c}
        ContextNCE_i = -log e^{s v_i·t_i} / Σ_{c∈C_i} e^{s v_i·c}

    ConCon alone would let the image sit anywhere inside its context (positive and hard negative
    are equally good); ContextNCE then separates the true caption from the rest of the context,
    so ``α`` trades coarse grouping against fine discrimination.

    Note the image term telescopes: it equals ``(1-α)·lse_all + (2α-1)·lse_ctx - α·pos``, so the
    context set only enters with weight ``2α-1``. At ``α = 0.5`` the loss no longer depends on
    ``C_i`` (or ``k``) at all and is ``½(½·CE(image→all captions) + CE(text→image))``, a
    re-weighted NegCon; hence the defaults are the authors' context variant, ``α = 0.7`` and
    ``K = 8``. Same-image captions (``same``) leave both sums and the context set.
    """
    v, t, n = _unit(zv), _unit(zt), _unit(zn)
    drop = _others(same, v.shape[-2], v.device)
    logits = _drop(_sim(s, v, torch.cat([t, n], dim=-2)), drop)  # [..., B, 2B]
    mask = context_mask(zt, k, same)
    lse_all = torch.logsumexp(logits, dim=-1)
    lse_ctx = torch.logsumexp(logits.masked_fill(~mask, float("-inf")), dim=-1)
    concon = lse_all - lse_ctx
    context_nce = lse_ctx - _diag(logits)
    a = _per_member(alpha, concon)
    i2t = ((1.0 - a) * concon + a * context_nce).mean(-1)
    return 0.5 * (i2t + _text_to_image(v, t, s, drop))


@in_float32
def reconstruction(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all elements, in at least float32 (a float16 target, as the
    cache stores it, meets a float32 prediction).

    JAM calls it in the standardised-feature space (:meth:`JAM.standardize_image` /
    ``standardize_text``: per-feature train-split mean and std), so every feature weighs
    alike and the value is comparable across backbones and layers (1.0 = predicting the mean).
    """
    return F.mse_loss(x_hat, x.to(x_hat.dtype))


def lambda_schedule(step: int, total_steps: int, start: float = 1.0, end: float = 0.1) -> float:
    """Linear ramp from ``start`` at step 0 to ``end`` at step ``total_steps - 1``.

    Steps outside the run are clamped to the ends; a one-step run uses ``start``.
    """
    if total_steps <= 1:
        return float(start)
    frac = min(max(step / (total_steps - 1), 0.0), 1.0)
    return float(start + (end - start) * frac)
