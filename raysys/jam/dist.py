"""Gathering latents across data-parallel ranks so contrastive losses see the global batch.

Contrastive losses are not sums of per-sample terms: every sample's loss depends on every other
sample in the batch (the softmax denominators). Averaging per-rank losses would therefore train
on ``world_size`` small batches instead of one large one. Instead each rank gathers the latents
of all ranks and computes the loss of the whole global batch.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_gather


def in_group() -> bool:
    """Whether this process is in a torch.distributed process group (Ray Train always makes
    one; a plain script or test has none): every collective raysys calls asks this first."""
    return dist.is_available() and dist.is_initialized()


def collective_device(device: torch.device) -> torch.device:
    """Where a tensor must live for a collective of the current process group: NCCL takes
    only CUDA tensors (a CPU tensor fails with "No backend type associated with device type
    cpu"), gloo takes CPU and CUDA ones; so `device` unless the backend says otherwise."""
    if dist.get_backend() == "nccl" and device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def gather_with_grad(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """All-gather ``x`` along `dim` in rank order, keeping the autograd graph (a population's
    latents ``[P, b, D]`` gather along dim 1, the batch, so each member sees its own global
    batch).

    Without a process group ``x`` is returned unchanged. A one-rank group still runs the
    collective (a device copy), so a single-GPU check exercises the real NCCL path.

    Why every rank computes the *full* global loss, and why the gradients come out right:
    let ``L`` be the loss on the gathered batch ``Z = [z_0; …; z_{W-1}]``. Every rank holds the
    same ``Z`` (its own slice ``z_r`` with grad, the others as gathered copies) and so computes
    the same ``L``. In backward, the differentiable ``all_gather``
    (``torch.distributed.nn.functional.all_gather``, as open_clip uses) *sums* the incoming
    gradients for slice ``r`` over all ranks and routes the sum to rank ``r``. As all ``W`` ranks
    produced the same ``∂L/∂z_r``, rank ``r`` receives ``W·∂L/∂z_r`` and back-propagates it into
    its parameters, giving ``W·∂L/∂θ|_{samples of r}``. DDP then *averages* parameter gradients:
    ``(1/W)·Σ_r W·∂L/∂θ|_r = Σ_r ∂L/∂θ|_r = ∂L/∂θ``, exactly the single-process gradient of the
    loss on the whole global batch. (A plain ``all_gather`` with the local slice swapped back in,
    open_clip's other mode, keeps only each rank's own copy of the gradient and ends at
    ``∂L/∂θ / W``: same direction, learning rate silently divided by ``W``.)

    All ranks must pass the same shape (equal per-rank batch sizes, e.g. ``drop_last=True``):
    ``all_gather`` does not support ragged inputs.
    """
    if not in_group():
        return x
    with warnings.catch_warnings():
        # Deprecated in favour of a private `_functional_collectives` API; the public
        # function still works and is what open_clip uses, so keep it and stay quiet.
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(x.contiguous()), dim=dim)


@torch.no_grad()
def gather_keys(keys: torch.Tensor) -> torch.Tensor:
    """All-gather a per-row key tensor (e.g. int64 image keys ``[b]``) along dim 0 in rank
    order, without autograd: keys only say which rows belong together, nothing to learn.

    Without a process group ``keys`` is returned unchanged. The collective runs where the
    backend takes tensors (:func:`collective_device`: NCCL needs CUDA, gloo takes either) and
    the result comes back on ``keys``' device. Like :func:`gather_with_grad`, every rank must
    pass the same shape, which equal per-rank batches give.
    """
    if not in_group():
        return keys
    local = keys.to(collective_device(keys.device)).contiguous()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return torch.cat(parts, dim=0).to(keys.device)
