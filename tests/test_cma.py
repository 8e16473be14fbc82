"""The same-host data path (deepimage/parallel/cma.py) under a real torchrun launch: both
arrival orders, matching by tag, a size mismatch named on both ranks, two threads waiting on
one peer (no receiver thread), a wait that times out, and a peer that exits.

    pytest tests/test_cma.py
"""
from __future__ import annotations

import pytest

from deepimage.parallel.transport import TransportError, init_transport

from workers.transport_launch import launch_worker  # noqa: E402


def test_messages_errors_and_a_peer_that_exits(tmp_path):
    reports = launch_worker("torchrun", 2, "tests.workers.cma_check", tmp_path)
    both = {"both_orders_deliver", "matched_by_tag", "size_mismatch_named", "use_data_path_error",
            "waiters_read_the_socket"}
    expected = {0: both | {"wait_times_out", "peer_exit_fails_the_receive", "later_send_fails_at_once"},
                1: both}
    for report in reports:
        assert "error" not in report["texts"], report["texts"]["error"]
        assert set(report["checks"]) == expected[report["rank"]]
        assert all(report["checks"].values()), (report["checks"], report["texts"])


def test_bad_data_path_is_named():
    with pytest.raises(TransportError, match="data_path must be one of .* got 'tcp'"):
        init_transport("torchrun", data_path="tcp")
