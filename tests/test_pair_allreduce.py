"""Transport.allreduce of two ranks of one host through their shared-memory segment on the
caller's thread (transport/cpu.py, datapath.blocking_pair): the same bits as gloo, under a real
torchrun launch (tests/workers/pair_allreduce_check.py).

    pytest tests/test_pair_allreduce.py
"""
from __future__ import annotations

import platform

import pytest

from workers.transport_launch import launch_worker


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the pair segment opens on x86-64 only")
def test_pair_allreduce_matches_gloo_bit_for_bit(tmp_path):
    """sum/max (and average of floats) of float32/float64/int64 tensors (1 element, a (64, 10)
    block, 600 001 elements over several chunks) give gloo's bytes, leave the input alone, and
    work while a butterfly is in flight on lane 0."""
    reports = launch_worker("torchrun", 2, "tests.workers.pair_allreduce_check", tmp_path)
    for report in reports:
        assert not report["errors"], f"rank {report['rank']}: {report['errors']}"
        assert report["pair"], "two ranks of one host opened no blocking pair segment"
        assert len(report["checks"]) == 3 * (2 * 3 + 2) * 2 + 2  # shapes * (dtype, op) * 2 + 2
        failed = [name for name, ok in report["checks"].items() if not ok]
        assert not failed, f"rank {report['rank']} failed {failed}"
