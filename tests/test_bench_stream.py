"""`raysys bench stream`: a sweep trial's streamed reads of a synthetic pair view against a
bare pyarrow loop over its files, without Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from raysys.cli import main
from raysys.data.view_shard import READERS


def test_bench_stream_reads_every_batch_both_ways_and_removes_its_view(tmp_path, capsys) -> None:
    args = ["bench", "stream", "--pairs", "3000", "--dims", "24,16", "--out", str(tmp_path)]
    assert main([*args, "train.batch_size=256"]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["settings"] == {
        "pairs": 3000, "d_image": 24, "d_text": 16, "batch": 256, "step_ms": 0.0,
        "readers": READERS, "row_group": 8192, "files": 8,
    }  # fmt: skip
    assert result["bare_rows_s"] > 0 and result["stream_rows_s"] > 0
    assert result["ratio"] == result["stream_rows_s"] / result["bare_rows_s"]
    # Both credited with every row read; the stream feeds only whole batches (11 of 256).
    assert result["rows"] == {"bare": 3000, "stream": 3000}
    assert result["stream_batches_s"] * 256 == pytest.approx(result["stream_rows_s"] * 2816 / 3000)
    assert all(len(t) == 3 and min(t) > 0 for t in result["seconds"].values())
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]  # the view is gone
    assert "[bench stream] 3,000 pairs (24/16-d float16" in capsys.readouterr().out
    # A stand-in device step: a 20 ms wait after each of an epoch's 11 whole batches, on
    # both paths (the bare loop waited once per record batch: 16, two a file, short ones
    # at each file's end, which inflated the stream's ratio behind a step).
    assert main([*args, "--step-ms", "20", "train.batch_size=256"]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["settings"]["step_ms"] == 20.0
    assert min(result["seconds"]["stream"]) >= 11 * 0.02
    assert 11 * 0.02 <= min(result["seconds"]["bare"]) < 16 * 0.02
    assert "; a 20 ms step after each batch" in capsys.readouterr().out
    assert main([*args, "--readers", "3", "train.batch_size=256"]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["settings"]["readers"] == 3 and result["rows"]["stream"] == 3000
    assert "; 3 reader(s)" in capsys.readouterr().out
    assert main(["bench", "stream", "--pairs", "5", "--out", str(tmp_path)]) == 2
    assert "--pairs (5) must hold one batch" in capsys.readouterr().err
    assert main([*args, "--readers", "-1"]) == 2
    assert "--readers (-1) must be 0" in capsys.readouterr().err


def test_the_stream_bench_runs_without_ray_as_the_device_script_does(tmp_path) -> None:
    """`scripts/device-stream.sh` measures the readers on a lent GPU machine's many cores,
    which has pyarrow but cannot take Ray: the command line it runs must not import Ray."""
    args = ["bench", "stream", "--pairs", "600", "--dims", "8,8", "--out", str(tmp_path)]
    code = (
        "import sys; from raysys.cli import main; code = main(sys.argv[1:]); "
        "print(code, 'ray' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, *args, "train.batch_size=64"], capture_output=True, text=True
    )
    assert out.stdout.strip().splitlines()[-1] == "0 False", out.stdout + out.stderr
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "device")}
    env |= {"PAIRS": "600", "DIMS": "8,8", "BATCH": "64", "READERS": "1 3"}
    script = Path(__file__).parents[1] / "scripts" / "device-stream.sh"
    run = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].endswith("; 1 reader(s)") and "; 3 reader(s)" in lines[1]
    assert json.loads((tmp_path / "device" / "readers-3" / "bench.json").read_text())["rows"] == {
        "bare": 600,
        "stream": 600,
    }
