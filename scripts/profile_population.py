"""Where a population step's GPU time goes: each objective's step for one member and for
P = 8 and 32 stacked members (batch 4,096, 1024/4096-d, bf16 autocast), then torch.profiler's
top kernels for one Spread member and for 32. A device-only diagnostic (torch, no Ray):
`PYTHONPATH=. python3 scripts/profile_population.py` (about 45 s on an H200)."""

import time

import torch
from torch.profiler import ProfilerActivity, profile

from raysys.config import TrainConfig
from raysys.jam.population import Population
from raysys.train.population import PopulationTrainer, build_members
from raysys.train.step import Trainer

B, DI, DT = 4096, 1024, 4096
dev = torch.device("cuda")
x = [torch.randn(B, d, device=dev, dtype=torch.float16) for d in (DI, DT, DT)]


def timed(trainer, n=10):
    for _ in range(3):
        trainer.train_step(*x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        trainer.train_step(*x)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1000


for objective in ("con", "negcon", "spread"):
    tcfg = TrainConfig(objective=objective, batch_size=B)
    (jam,) = build_members([tcfg], [(DI, DT)])
    jam = jam.to(dev)
    one = Trainer(jam, tcfg, 1000)
    print(f"{objective} one member: {timed(one):.1f} ms", flush=True)
    for p in (8, 32):
        tcfgs = [TrainConfig(objective=objective, batch_size=B, seed=i) for i in range(p)]
        pop = Population.from_members(build_members(tcfgs, [(DI, DT)] * p)).to(dev)
        trainer = PopulationTrainer(pop, tcfgs, 1000)
        print(f"{objective} P={p}: {timed(trainer):.1f} ms", flush=True)
        del trainer, pop
        torch.cuda.empty_cache()

# Profile P=32 spread and one member spread
for label, make in (("one", None), ("P32", 32)):
    tcfg = TrainConfig(objective="spread", batch_size=B)
    if make is None:
        (jam,) = build_members([tcfg], [(DI, DT)])
        tr = Trainer(jam.to(dev), tcfg, 1000)
    else:
        tcfgs = [TrainConfig(objective="spread", batch_size=B, seed=i) for i in range(make)]
        pop = Population.from_members(build_members(tcfgs, [(DI, DT)] * make)).to(dev)
        tr = PopulationTrainer(pop, tcfgs, 1000)
    timed(tr, 2)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            tr.train_step(*x)
        torch.cuda.synchronize()
    print(f"--- {label} spread: top CUDA ops (3 steps)")
    table = prof.key_averages().table(
        sort_by="cuda_time_total", row_limit=22, max_name_column_width=60
    )
    print(table)
    del tr
    torch.cuda.empty_cache()
