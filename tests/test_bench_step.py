"""`raysys bench step`: the training step alone, runnable where Ray is not installed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from raysys.cli import main

SMALL = ["train.batch_size=64", "train.hidden=32", "train.latent=8", "train.num_workers=1"]


def test_bench_step_writes_its_figures_and_settings(tmp_path, capsys) -> None:
    args = ["bench", "step", "--pairs", "512", "--dims", "24,40", "--steps", "3"]
    assert main([*args, "--device", "cpu", "--out", str(tmp_path), *SMALL]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["samples_per_s"] > 0 and result["step_ms"] > 0
    assert result["settings"]["pairs"] == 512
    assert (result["settings"]["d_image"], result["settings"]["d_text"]) == (24, 40)
    assert result["settings"]["train"]["batch_size"] == 64
    assert "samples/s" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dims", "1024"], "must be two widths"),
        (["--pairs", "10"], "must hold a global batch"),
        (["--population", "-2"], "or 0 (the default: time one member only)"),
        # Refused at once rather than killed by the kernel minutes in.
        (["--population", "100000", "--device", "cpu"], "--population 100000 would need"),
    ],
)
def test_bench_step_rejects_bad_sizes(tmp_path, capsys, args, message) -> None:
    assert main(["bench", "step", *args, "--out", str(tmp_path), *SMALL]) == 2
    assert message in capsys.readouterr().err


def test_the_step_imports_neither_ray_nor_pyarrow(tmp_path) -> None:
    # The GPU machine used for step measurements has torch but cannot take Ray: neither the
    # module nor the command line that scripts/device-step.sh runs may import them.
    code = "import sys, raysys.bench.step; print(sorted({'ray', 'pyarrow'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    args = ["bench", "step", "--pairs", "128", "--dims", "8,8", "--steps", "1", "--device", "cpu"]
    args += ["--out", str(tmp_path), *SMALL]
    code = (
        "import sys; from raysys.cli import main; code = main(sys.argv[1:]); "
        "print(code, sorted({'ray', 'pyarrow'} & set(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "0 []", out.stdout + out.stderr
