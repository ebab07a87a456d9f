"""`raysys.bench`: the timing arithmetic on known numbers, and `bench embed` (no Ray) end to
end. (`bench train` and `bench extract` on a real local Ray: tests/test_bench_ray.py.)"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest

from raysys.bench import BENCH_FILE
from raysys.bench.train import ray_timeline, steady_rate, window_bounds


def test_windows_end_where_the_worker_validates() -> None:
    assert window_bounds(90, 23) == [23, 46, 69, 90]
    assert window_bounds(20, 5) == [5, 10, 15, 20]
    assert window_bounds(3, 5) == [3]


def test_steady_rate_skips_the_warm_up_window() -> None:
    assert steady_rate([10.0, 100.0, 90.0, 300.0]) == 100.0
    assert steady_rate([10.0]) == 10.0
    with pytest.raises(ValueError):
        steady_rate([])


def test_timeline_accounts_for_every_second_of_the_wall_time() -> None:
    # Called at 1000; 2 s windows start at 1006, 1009.5 and 1013, so each of the two measured
    # validations took 1.5 s; the last window ends at 1015 and train() returns at 1020.
    window_seconds = [2.0, 2.0, 2.0]
    bound_walls = [1008.0, 1011.5, 1015.0]
    t = ray_timeline(1000.0, 1020.0, window_seconds, bound_walls, 30, 10, 150.0, 9.0)
    assert t.source == "tensorboard"
    assert t.to_first_step_s == pytest.approx(6.0)
    assert t.validation_s == pytest.approx(1.5 * 3)  # two measured, the last one their mean
    assert t.shutdown_s == pytest.approx(5.0 - 1.5)
    assert t.train_s == pytest.approx(30 * 10 / 150.0)
    assert t.excess_train_s == pytest.approx(6.0 - 2.0)
    total = t.startup_s + t.train_s + t.excess_train_s + t.validation_s
    assert total == pytest.approx(t.wall_s) and t.wall_s == 20.0


def test_timeline_without_step_times_estimates_validations() -> None:
    t = ray_timeline(0.0, 20.0, [2.0, 2.0], None, 20, 10, 100.0, 0.5)
    assert t.source == "estimate"
    assert t.validation_s == pytest.approx(1.0)
    assert t.startup_s == pytest.approx(20.0 - 4.0 - 1.0)
    assert math.isnan(t.to_first_step_s) and math.isnan(t.shutdown_s)


def test_bench_embed_times_the_actor_batch_function_without_ray(tmp_path) -> None:
    """ViT-B/16 and BERT-base from configs (random weights), through the `hf:` path: the
    actor's batch function and the bare forward on the same tensors, both recorded."""
    from raysys.bench.embed import bench_embed

    bench = bench_embed(tmp_path, "cpu", rows=2, batch=2)
    saved = json.loads((tmp_path / BENCH_FILE).read_text())
    assert saved == bench and saved["device"] == "cpu"
    assert saved["precision"] == "float32"  # extract.precision=auto on a CPU
    # The CPU stage hands the actor uint8 pixels: a quarter of float32's bytes.
    assert saved["image"]["input_bytes_per_row"] == 3 * 224 * 224
    for modality, layers in (("image", 13), ("text", 13)):
        result = saved[modality]
        assert result["layers"] == layers  # every hidden state of a 12-layer model
        assert result["actor_per_s"] > 0 and result["bare_per_s"] > 0
        assert math.isclose(
            result["ratio"], result["actor_per_s"] / result["bare_per_s"], rel_tol=0.05
        )


def test_bench_sweep_summary_compares_the_same_trials() -> None:
    """The sweeps themselves are the real ones (tests/test_sweep_ray.py runs sweeps end to
    end); the summary adds the speedup and refuses to compare runs that did not finish alike."""
    from raysys.bench.sweep import summary
    from raysys.errors import RaysysError

    rows = [{"train_s": 30.0}, {"train_s": 34.0}, {"train_s": 32.0}, {"train_s": 31.0}]
    result = summary(160.0, 40.0, 2, rows, rows)
    assert result["speedup"] == 4.0 and result["population_s"] == 40.0
    assert result["packed_trial_s"] == [30.0, 34.0, 32.0, 31.0] and result["trials"] == 4
    with pytest.raises(RaysysError, match="3 population"):
        summary(160.0, 40.0, 2, rows, rows[:3])


# Run in a fresh interpreter where Pillow, pyarrow and Ray cannot be imported: the borrowed GPU
# machine has torch and transformers only.
WITHOUT = """
import sys

class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("PIL", "pyarrow", "ray"):
            raise ImportError(f"no module named {name!r} (absent in this test)")

sys.meta_path.insert(0, Absent())
"""


def test_bench_embed_imports_and_embeds_text_without_pillow() -> None:
    """`raysys bench embed`'s import chain needs neither Pillow nor pyarrow nor Ray, and a
    text backbone embeds there; the image half knows it must be skipped."""
    script = WITHOUT + textwrap.dedent(
        """
        import numpy as np
        import torch
        import raysys.cli
        from raysys.bench.embed import pillow_missing
        from raysys.backbones import get_backbone

        assert "Pillow" in pillow_missing()
        get_backbone("efficientnet-lite0", "image").describe()
        text = get_backbone("minilm-l6", "text", layers="-1")
        rows = {"id": np.array(["a"]), "caption": np.array(["a red circle"], dtype=object)}
        rows["negative"] = np.array(["a blue circle"], dtype=object)
        pre = text.preprocess(rows)
        text.load(torch.device("cpu"))
        out = text.embed({k: v for k, v in pre.items() if k != "reject"})
        assert out["L06"].shape == (1, 384) and out["neg_L06"].dtype == np.float32
        assert not {"PIL", "pyarrow", "ray"} & set(sys.modules)
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_bench_extract_times_the_bare_loop_where_the_actors_run() -> None:
    """The bare loop runs on the actors' device: the CPU for CPU actors; for GPU actors cuda,
    or, in a process that sees no GPU, the CPU with a note that the ratio is not like for like."""
    import torch

    from raysys.bench.extract import _device_facts, bare_device
    from raysys.config import ExtractConfig

    cpu = ExtractConfig()
    assert bare_device(cpu) == torch.device("cpu")
    facts = _device_facts(cpu, bare_device(cpu))
    assert (facts["bare_device"], facts["actor_device"]) == ("cpu", "cpu")
    assert "bare_note" not in facts
    gpu = ExtractConfig(num_gpus_per_actor=1.0)
    facts = _device_facts(gpu, bare_device(gpu))
    assert facts["actor_device"] == "cuda"
    if torch.cuda.is_available():
        assert facts["bare_device"] == "cuda" and "bare_note" not in facts
    else:
        assert facts["bare_device"] == "cpu" and "unlike devices" in facts["bare_note"]


def test_bench_step_population_reports_the_ratio_to_one_member(tmp_path, capsys) -> None:
    """`bench step --population 3`: three stacked members (one per objective) against one
    member of each objective, on the same batches; bench.json holds both rates and their
    ratio."""
    from raysys.cli import main

    args = ["bench", "step", "--pairs", "128", "--dims", "8,12", "--steps", "2", "--device"]
    small = ["train.batch_size=32", "train.hidden=16", "train.latent=4", "train.num_workers=1"]
    assert main([*args, "cpu", "--population", "3", "--out", str(tmp_path), *small]) == 0
    saved = json.loads((tmp_path / BENCH_FILE).read_text())
    assert saved["population"] == 3 and saved["population_error"] is None
    assert saved["objectives"] == {"con": 1, "negcon": 1, "spread": 1}
    assert set(saved["single"]) == {"con", "negcon", "spread"}
    assert saved["member_samples_per_s"] > 0 and saved["samples_per_s"] > 0
    assert saved["ratio"] == pytest.approx(saved["member_samples_per_s"] / saved["samples_per_s"])
    assert saved["population_step_ms"] > 0 and saved["step_ms"] > 0
    assert "ratio" in capsys.readouterr().out
