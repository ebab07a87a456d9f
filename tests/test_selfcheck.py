"""`scripts/device-train.sh`: the train worker's code under a real process group, no Ray.

On the borrowed GPU it runs under NCCL; here under gloo with two processes, which also
exercises the global-batch gather across ranks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_device_train_runs_the_worker_code_under_gloo_and_resumes_exactly(tmp_path) -> None:
    env = os.environ | {"DEVICE": "cpu", "PYTHON": sys.executable, "OUT": str(tmp_path)}
    extra = ["--world", "2", "train.hidden=[128,128]", "train.latent=64"]
    run = subprocess.run(
        ["bash", str(REPO / "scripts" / "device-train.sh"), *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "data-on-device-auto" / "device-train.json").read_text())
    assert (result["backend"], result["world"]) == ("gloo", 2)
    assert result["failures"] == []
    assert result["loss_last"] < result["loss_first"]
    assert result["val"]["i2t_r1"] > 2 / 256  # above chance on the 256 val pairs
    assert result["resume_max_abs_diff"] <= 1e-4 and result["resumed_reports"] >= 1
    assert "[device-train] gloo on cpu x2" in run.stdout


def test_the_self_check_imports_neither_ray_nor_pyarrow() -> None:
    code = (
        "import sys, raysys.train.selfcheck; "
        "print(sorted({'ray', 'pyarrow', 'PIL'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
