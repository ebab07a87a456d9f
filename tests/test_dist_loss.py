"""The global-batch loss in 2 gloo processes equals the single-process loss, gradients included.

Each rank encodes half the batch with a DDP-wrapped encoder, gathers latents with
:func:`gather_with_grad`, computes the loss on the gathered batch and backpropagates; after DDP
averages gradients, every rank must hold exactly the single-process gradient of the loss on the
full batch. Rows of one image (image keys, gathered with :func:`gather_keys`, some spanning the
two ranks) are masked alike in both. Runs on loopback only (``tcp://127.0.0.1``,
``GLOO_SOCKET_IFNAME=lo``).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from raysys.jam import losses
from raysys.jam.dist import gather_keys, gather_with_grad

WORLD = 2
PER_RANK = 4
D_IMG, D_TXT, D_LAT = 6, 7, 5
SCALE = 10.0
TOL = 1e-9  # float64: only summation order differs between the two computations
TIMEOUT_S = 60.0

# rows 3 (rank 0) and 4 (rank 1) show one image, as do rows 5 and 6
KEYS = torch.tensor([10, 11, 12, 13, 13, 14, 14, 15], dtype=torch.int64)

LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "con": lambda zv, zt, zn, same: losses.con(zv, zt, SCALE),
    "negcon": lambda zv, zt, zn, same: losses.negcon(zv, zt, zn, SCALE),
    "spread_a0.5_k1": lambda zv, zt, zn, same: losses.spread(zv, zt, zn, SCALE, alpha=0.5, k=1),
    "spread_a0.3_k3": lambda zv, zt, zn, same: losses.spread(zv, zt, zn, SCALE, alpha=0.3, k=3),
    "con_same": lambda zv, zt, zn, same: losses.con(zv, zt, SCALE, same=same),
    "spread_same": lambda zv, zt, zn, same: losses.spread(zv, zt, zn, SCALE, same=same),
}


def _same(keys: torch.Tensor) -> torch.Tensor:
    return keys[:, None] == keys[None, :]


class Towers(nn.Module):
    """Minimal two-tower encoder; negatives share the text tower as in JAM."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Linear(D_IMG, D_LAT)
        self.text = nn.Linear(D_TXT, D_LAT)

    def forward(self, img, txt, neg):
        return self.image(img), self.text(txt), self.text(neg)


def _problem() -> tuple[Towers, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same weights and data in every process (seeded, CPU, float64)."""
    torch.manual_seed(0)
    model = Towers().double()
    g = torch.Generator().manual_seed(1)
    b = WORLD * PER_RANK
    img = torch.randn(b, D_IMG, generator=g, dtype=torch.float64)
    txt = torch.randn(b, D_TXT, generator=g, dtype=torch.float64)
    neg = txt + 0.5 * torch.randn(b, D_TXT, generator=g, dtype=torch.float64)
    return model, img, txt, neg


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=TIMEOUT_S),
    )
    try:
        model, img, txt, neg = _problem()
        ddp = DDP(model)
        part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        keys = gather_keys(KEYS[part])
        assert torch.equal(keys, KEYS), keys
        results = {}
        for name, fn in LOSSES.items():
            ddp.zero_grad(set_to_none=True)
            zv, zt, zn = ddp(img[part], txt[part], neg[part])
            gathered = (gather_with_grad(z) for z in (zv, zt, zn))
            loss = fn(*gathered, _same(keys))
            loss.backward()
            results[name] = (loss.detach(), _grads(model))
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_ranks(out_dir: Path) -> list[dict]:
    ctx = mp.start_processes(
        _worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 2 * TIMEOUT_S
    while not ctx.join(timeout=1.0):  # re-raises a worker's exception
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail("gloo workers did not finish in time")
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


def _single_process() -> dict:
    model, img, txt, neg = _problem()
    out = {}
    for name, fn in LOSSES.items():
        model.zero_grad(set_to_none=True)
        loss = fn(*model(img, txt, neg), _same(KEYS))
        loss.backward()
        out[name] = (loss.detach(), _grads(model))
    return out


def test_gather_is_identity_without_process_group() -> None:
    x = torch.randn(3, 2)
    assert gather_with_grad(x) is x
    assert gather_keys(KEYS) is KEYS


def test_two_gloo_ranks_match_single_process(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    ranks = _run_two_ranks(tmp_path)
    ref = _single_process()
    assert abs(float(ref["con_same"][0] - ref["con"][0])) > 1e-3  # the keys mask something
    for name, (ref_loss, ref_grads) in ref.items():
        assert all(g.abs().sum() > 0 for g in ref_grads.values()), name
        for rank, res in enumerate(ranks):
            loss, grads = res[name]
            torch.testing.assert_close(loss, ref_loss, atol=TOL, rtol=0, msg=f"{name} r{rank}")
            for pname, g in ref_grads.items():
                torch.testing.assert_close(
                    grads[pname], g, atol=TOL, rtol=0, msg=f"{name} rank {rank} grad {pname}"
                )
