"""What every benchmark shares: where its result goes, the device clock, the machine facts.

Imports torch only: `bench step` and `bench embed` run on a GPU machine without Ray.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import platform
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from raysys.bench import BENCH_FILE

__all__ = [
    "BENCH_FILE",
    "finite_or_none",
    "host_info",
    "load_average",
    "peak_rss_mb",
    "resolve_device",
    "sync",
    "write_result",
]


def resolve_device(name: str) -> torch.device:
    """`auto` is cuda when available; anything else is taken as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer measures the work, not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_average() -> float | None:
    """1-minute load average: well above the CPU count, other processes took part of the time
    (the paths run one after the other, so contention skews the ratio either way)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def host_info() -> dict[str, Any]:
    """The machine a figure was measured on, written beside every result; the one place a
    bench reads its machine facts, so they agree wherever a bench repeats them."""
    return {
        "cpus": os.cpu_count() or 1,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "load_average_1m": load_average(),
    }


def peak_rss_mb() -> float:
    """This process's peak resident set so far, in MiB (`ru_maxrss` is KiB on Linux, bytes
    on macOS): what the scale benchmarks (corpus, eval) hold to a goal."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def finite_or_none(value: Any) -> Any:
    """JSON has no NaN or infinity: an unmeasured quantity is written as null."""
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_none(v) for v in value]
    if isinstance(value, numbers.Real) and not math.isfinite(value):
        return None
    return value


def write_result(out_dir: Path, result: dict[str, Any]) -> dict[str, Any]:
    """Write `out_dir/bench.json` and return exactly what was written, so a caller's result
    equals the file read back.

    The host facts go under `host`; a bench's own `host` keys win over them (a bench that
    quotes a host fact elsewhere in its result passes the block it quoted, so both agree).
    """
    record = finite_or_none(result | {"host": host_info() | result.get("host", {})})
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / BENCH_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return record
