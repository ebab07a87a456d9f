"""ASHA over population members: the sweep's rungs, shared by every population through a Ray
actor, so a member is compared with every member of the sweep, not only its own population.

Tune's `ASHAScheduler` stops Tune trials; a population is one Tune trial, and stopping it would
stop all its members. So the same rule runs here per member: rungs at `grace · rf^k`
validations; a member reaching a rung is stopped when its score is below the `1 - 1/rf`
quantile of the scores recorded there before it (the first at a rung always continues), as
Ray's asynchronous successive halving decides. Scores are signed so that higher is better.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


class Rungs:
    """Asynchronous successive halving's rungs and their recorded scores."""

    def __init__(self, grace: int = 1, reduction_factor: int = 4, max_t: int = 10**6) -> None:
        self.rf = reduction_factor
        count = int(math.log(max_t / grace) / math.log(reduction_factor)) + 1
        self.milestones = [grace * reduction_factor**k for k in range(count)]
        self.recorded: dict[int, dict[str, float]] = {t: {} for t in self.milestones}

    def stop(self, member: str, t: int, score: float) -> bool:
        """Record `member`'s `score` at the highest rung `t` reached that it has not yet
        passed; True when it falls below that rung's cutoff."""
        for milestone in reversed(self.milestones):
            recorded = self.recorded[milestone]
            if t < milestone or member in recorded:
                continue
            cutoff = (
                float(np.nanpercentile(list(recorded.values()), (1 - 1 / self.rf) * 100))
                if recorded
                else None
            )
            recorded[member] = score
            return cutoff is not None and score < cutoff
        return False


def start_rungs() -> Any:
    """The sweep's rung actor (no CPU: it only records numbers). Its handle travels to each
    population's rank 0 (a name lookup would depend on the job's namespace); the actor lives
    as long as the sweep's driver holds the handle."""
    import ray

    return ray.remote(num_cpus=0)(Rungs).remote()
