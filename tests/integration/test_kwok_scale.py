"""KWOK plays a few dozen GPU nodes of mixed generations; ~100 FineTuneJobs of mixed schemes are
all placed on compatible GPUs or wait with the operator's condition (hack/bench_scale.py at a
small size; the kwok controller built by hack/kwok-binaries.sh really runs)."""

from __future__ import annotations

from pathlib import Path

import pytest

import bench_scale

# Opt-in (tests/conftest.py): KWOK's build takes minutes, more than CI's time budget has left.
pytestmark = [pytest.mark.integration, pytest.mark.scale]


def test_jobs_beyond_capacity_wait_and_placed_ones_fit(tmp_path: Path) -> None:
    # 30 nodes: 5 of each generation with 1, 2, 4, 8, 1 GPUs (16 GPUs per generation), of which
    # the T4s run nothing; 100 jobs, 20 per scheme, so some must wait.
    result = bench_scale.run(nodes=30, jobs=100, root=tmp_path, timeout=150)
    assert result["gpus"] == 96
    assert result["duplicates"] == 0
    assert result["jobs_missing"] == 0
    assert result["misplaced"] == 0, result["misplaced_examples"]
    assert result["neither"] == 0
    assert result["placed"] + result["waiting"] == 100
    assert result["waiting"] > 0  # more jobs than compatible GPUs
    # No job waits while a GPU that could run it is free; one GPU per placed job, none on T4s.
    assert result["waiting_with_free_compatible_gpu"] == 0
    assert result["placed"] == result["gpus_used"] <= 80
    # Compatible GPUs exist for every scheme, they are only taken: the operator says so.
    assert result["waiting_reasons"] == {"Unschedulable": result["waiting"]}
