"""Scale-up (issue 13): a `raysys run` job submitted to a cluster shaped like cluster/gpu.yaml
(a head with no CPUs, a worker type with `min_workers: 0`) makes Ray's autoscaler start a
worker node, and completes. Ray's own harness (`AutoscalingCluster`, the fake multi-node
provider) runs the cluster on this machine, in private namespaces: see
tests/autoscale_scenario.py."""

from __future__ import annotations

import csv
import io
import shutil

import pytest
from autoscale_scenario import run

pytestmark = pytest.mark.skipif(
    shutil.which("unshare") is None or shutil.which("ip") is None,
    reason="needs unshare and ip (util-linux, iproute2) and root for private namespaces",
)


@pytest.fixture(scope="module")
def facts() -> dict:
    return run()


def test_a_submitted_run_makes_the_autoscaler_start_a_worker_and_completes(facts) -> None:
    said = f"{facts.get('error', '')}\n{facts.get('logs', '')[-3000:]}\n{facts['output_tail']}"
    assert facts.get("status") == "SUCCEEDED", said
    assert facts["workers_before"] == 0  # min_workers: 0, and nothing asked before the job
    assert facts["most_workers"] >= 1
    rows = list(csv.DictReader(io.StringIO(facts["results_csv"] or "")))
    assert {row["objective"] for row in rows} == {"raw", "con"}, said
    assert "| con " in (facts["report_md"] or "")


def test_the_job_said_what_it_waited_for_and_the_autoscaler_launched_a_node(facts) -> None:
    lines = facts["ray_lines"]
    assert lines[0] == (
        "[ray] waiting up to 900 s for the autoscaler: 1 x {CPU: 1} (one sweep trial's workers)"
    ), facts["ray_lines"]
    assert any(" fit after " in line and "+1" in line for line in lines[1:]), lines
    log = "\n".join(facts["autoscaler_log"])
    assert "Adding 1 node(s) of type cpu_worker" in log, log


def test_the_request_is_withdrawn_and_a_wait_past_its_timeout_says_what_was_missing(
    facts,
) -> None:
    assert facts["request_after_job"] == []  # the cluster may scale down again
    assert facts["probe_said"] == [
        "[ray] waiting up to 4 s for the autoscaler: 1 x {GPU: 1, CPU: 1} (a GPU probe)"
    ]
    error = facts["probe_error"]
    assert error.startswith("a GPU probe need 1 x {GPU: 1, CPU: 1}, each on one node; after 4 s")
    assert "(ray.scale_timeout_s)" in error and "use a GPU type" in error
    assert "2 node(s) (" in error and "1 x {CPU: 0}" in error and "1 x {CPU: 2}" in error
    assert 4 <= facts["probe_s"] < 15
    assert facts["request_after_probe"] == []


def test_every_process_of_the_scenario_is_gone(facts) -> None:
    assert facts["namespace_processes_after"] == []  # `ray stop` left nothing in its namespace
    assert facts["leftover_pids"] == []  # and nothing outside it mentions its temp dir
