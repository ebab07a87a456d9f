"""ASHA over population members: the sweep's rungs, shared by every population through a Ray
actor, so a member is compared with every member of the sweep, not only its own population.

Tune's `ASHAScheduler` stops Tune trials; a population is one Tune trial, and stopping it would
stop all its members. So the same rule runs here per member: rungs at `grace · rf^k`
validations; a member reaching a rung is stopped when its score is below the `1 - 1/rf`
quantile of the scores recorded there before it (the first at a rung always continues), as
Ray's asynchronous successive halving decides. Scores are signed so that higher is better.

The actor lives as long as the sweep's driver. A resumed sweep starts a new one and replays
into it every score its populations gave the old one (each member keeps them in its
checkpoint), so the rungs' cutoffs are those an uninterrupted sweep would have drawn.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from raysys import storage


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

    def replay(self, asked: list[tuple[str, int, float]]) -> int:
        """Record scores given to an earlier actor (their decisions were taken then: a
        stopped member stays frozen in its checkpoint); returns how many were given."""
        for member, t, score in asked:
            self.stop(member, int(t), score)
        return len(asked)


def asked_before(run_dirs: Iterable[str]) -> list[tuple[str, int, float]]:
    """Every (member, validations, signed score) the populations under `run_dirs` (their Ray
    Train run directories, local or `s3://`) gave the rungs, from each one's newest
    checkpoint; a population with none yet gave nothing that survived."""
    # Here, not at the top: the rungs themselves need neither Ray Train nor torch.
    from raysys.train.driver import latest_checkpoint
    from raysys.train.population_loop import MEMBERS_FILE

    asked = []
    for run_dir in run_dirs:
        latest = latest_checkpoint(run_dir)
        if latest is None:
            continue
        for saved in json.loads(storage.read_text(storage.join(latest, MEMBERS_FILE))):
            member = saved["member"]
            asked += [(member["id"], int(t), float(v)) for t, v in member.get("asked", [])]
    return asked


def start_rungs() -> Any:
    """The sweep's rung actor (no CPU: it only records numbers). Its handle travels to each
    population's rank 0 (a name lookup would depend on the job's namespace); the actor lives
    as long as the sweep's driver holds the handle."""
    import ray

    return ray.remote(num_cpus=0)(Rungs).remote()
