"""What every benchmark shares: where its result goes, the device clock, the machine facts.

Imports torch only: `bench step` and `bench embed` run on a GPU machine without Ray.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from raysys.bench import BENCH_FILE


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
    """The machine a figure was measured on, written beside every result."""
    return {
        "cpus": os.cpu_count() or 1,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "load_average_1m": load_average(),
    }


def write_result(out_dir: Path, result: dict[str, Any]) -> Path:
    """`bench.json`, with the host facts added under `host` unless the bench gave its own."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / BENCH_FILE
    path.write_text(json.dumps({"host": host_info()} | result, indent=1) + "\n")
    return path
