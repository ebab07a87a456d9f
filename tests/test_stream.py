"""The host-memory budget that decides whether the train split streams: pure arithmetic on
nodes' resources, what each Train worker reserves and how many run at once (a sweep's packed
trials), without Ray. Building, reading and streaming a pair view is in test_train_ray.py."""

from __future__ import annotations

import re

from raysys.data.stream import (
    host_memory_reason,
    join_partitions,
    nodes_reason,
    shard_bytes,
    stream_reason,
    windows_bytes,
    workers_on_node,
)

GIB = 2**30
HEAD = {"CPU": 0.0, "memory": 8 * GIB}  # a cluster/gpu.yaml head: holds no Train worker
GPU_NODE = {"CPU": 96.0, "GPU": 8.0, "memory": 512 * GIB}
QUARTER_GPU = {"CPU": 1.0, "GPU": 0.25}  # a packed trial's worker (sweep.trials_per_gpu=4)


def test_a_node_holds_what_its_resources_allow_of_the_workers_running_at_once() -> None:
    assert workers_on_node(GPU_NODE, QUARTER_GPU, running=1) == 1  # one one-worker trial
    assert workers_on_node(GPU_NODE, QUARTER_GPU, running=16) == 16
    assert workers_on_node(GPU_NODE, QUARTER_GPU, running=100) == 32  # 8 GPUs x 4 trials
    assert workers_on_node(GPU_NODE, {"CPU": 8.0, "GPU": 0.25}, running=100) == 12  # CPUs bind
    assert workers_on_node(GPU_NODE, {"CPU": 1.0, "GPU": 1.0}, running=4) == 4
    assert workers_on_node(HEAD, QUARTER_GPU, running=4) == 0
    assert workers_on_node({"CPU": 2.0}, {"CPU": 0.5}, running=8) == 4
    assert workers_on_node({"CPU": 2.0}, {"CPU": 1 / 3}, running=8) == 6  # no float shortfall
    assert workers_on_node({"CPU": 2.0}, {}, running=3) == 3  # shape unknown: all on one node


def test_the_budget_is_a_quarter_of_node_memory_over_the_workers_on_it() -> None:
    assert host_memory_reason(100 * GIB, 8, shard=3.1 * GIB) is None  # 8 x 3.1 <= 25
    reason = host_memory_reason(100 * GIB, 8, shard=3.2 * GIB)
    assert reason is not None
    assert "a worker's shard (3.2 GiB) × 8 worker(s) on a node (25.6 GiB)" in reason
    assert re.search(r"quarter of the node's 100\.0 GiB of Ray memory", reason)
    assert host_memory_reason(100 * GIB, 1, shard=3.2 * GIB) is None  # one worker alone fits


def test_packed_trials_stream_a_shard_that_one_trial_alone_could_hold() -> None:
    shard = 6 * GIB  # a quarter of 512 GiB is 128 GiB: 21 such shards, not 32
    assert nodes_reason([HEAD, GPU_NODE], QUARTER_GPU, running=1, shard=shard) is None
    assert nodes_reason([HEAD, GPU_NODE], QUARTER_GPU, running=16, shard=shard) is None
    packed = nodes_reason([HEAD, GPU_NODE], QUARTER_GPU, running=32, shard=shard)
    assert packed is not None and "× 32 worker(s) on a node" in packed
    # Past what one node holds, the rest run on other nodes: still 32 on this one.
    assert "× 32 worker(s)" in nodes_reason([HEAD, GPU_NODE], QUARTER_GPU, 64, shard)


def test_the_tightest_node_that_can_hold_a_worker_decides() -> None:
    small = {"CPU": 16.0, "GPU": 1.0, "memory": 48 * GIB}  # 4 packed workers, 3 GiB each
    shard = 3.5 * GIB  # fits the big node's 4 GiB per worker (512 / 4 / 32), not the small's
    assert nodes_reason([HEAD, GPU_NODE], QUARTER_GPU, running=64, shard=shard) is None
    reason = nodes_reason([HEAD, GPU_NODE, small], QUARTER_GPU, running=64, shard=shard)
    assert reason is not None and "× 4 worker(s)" in reason and "48.0 GiB" in reason
    # The head's little memory never counts: it holds no worker.
    assert nodes_reason([HEAD, GPU_NODE], QUARTER_GPU, running=1, shard=5 * GIB) is None
    assert nodes_reason([HEAD], QUARTER_GPU, running=1, shard=10**6 * GIB) is None
    assert nodes_reason([{"CPU": 4.0}], {"CPU": 1.0}, running=1, shard=GIB) is None  # no memory


def test_shard_bytes_take_the_cache_value_width() -> None:
    assert shard_bytes(rows=1000, width=2048, workers=4) == 250 * 2048 * 2  # float16
    assert shard_bytes(rows=1000, width=2048, workers=4, bytes_per_value=4) == 250 * 2048 * 4
    # A float16 image layer of 1024 beside a float32 text layer of 512 (text and negative):
    mixed = (1024 * 2 + 2 * 512 * 4) / 2048
    assert shard_bytes(1000, 2048, 4, mixed) == 250 * (1024 * 2 + 2 * 512 * 4)


def test_forced_settings_need_no_cluster() -> None:
    assert stream_reason("stream", rows=48, width=2048, workers=2) == "train.data_on_device=stream"
    assert stream_reason("false", rows=10**12, width=2048, workers=2) is None
    assert stream_reason("true", rows=10**12, width=2048, workers=2) is None


def test_a_streamed_workers_windows_are_bounded_by_its_batch_and_its_rows() -> None:
    row = 18 * 1024  # a 1024/4096-d float16 pair
    rows = 10**7
    group = rows * row / join_partitions(rows, row)  # a view's row group: one join partition
    assert 60e6 < group <= 64e6
    # Four readers' windows, each held twice while reordered, and the one being trained on:
    # 4 batches of 4,096 rows, plus up to one row group.
    assert windows_bytes(4096, rows, 1, row) == 9 * (4 * 4096 * row + group)
    # A small share: never more than its rows twice, plus a row group per window in flight.
    small = 1000 * row / 2  # a 1,000-row view is joined in two partitions
    assert windows_bytes(4096, 1000, 1, row) == 2 * 1000 * row + 5 * small
    assert windows_bytes(4096, 1000, 4, row) == 2 * 250 * row + 5 * small
    # 32 packed workers on a 512 GiB node get 4 GiB each: batch 4,096 fits, 8,192 does not.
    assert nodes_reason([GPU_NODE], QUARTER_GPU, 32, windows_bytes(4096, rows, 1, row)) is None
    big = windows_bytes(8192, rows, 1, row)
    reason = nodes_reason([HEAD, GPU_NODE], QUARTER_GPU, 32, big, "stream windows")
    assert reason is not None and "a worker's stream windows (5.6 GiB) × 32 worker(s)" in reason
