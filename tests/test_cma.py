"""The same-host data path (deepimage/parallel/cma.py) under a real torchrun launch: both
arrival orders, matching by tag, a size mismatch named on both ranks, two threads waiting on
one peer (no receiver thread), a wait that times out, and a peer that exits; and the two-rank
shared-memory segment (deepimage/parallel/shm.py) in one process: exact sums across chunks and
calls, a timeout and a gone partner named.

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


def _pair_segment(timeout_s, gone=lambda: None):
    """Both ranks' Pair objects on one segment, in this process (each runs in its own thread)."""
    import mmap
    import tempfile

    from deepimage.parallel.transport import shm

    with tempfile.TemporaryFile(dir="/dev/shm") as f:
        f.truncate(shm.segment_bytes())
        mm = mmap.mmap(f.fileno(), shm.segment_bytes())
    return [shm.Pair(mm, rank, timeout_s, gone) for rank in (0, 1)]


def _both(pairs, inputs, op):
    """Run both ranks' allreduce at once (two threads); return their outputs."""
    import threading

    from deepimage.parallel.butterfly import _reduce_into

    outs = [x.clone() for x in inputs]
    tickets = [p.ticket() for p in pairs]
    threads = [threading.Thread(target=p.allreduce, args=(x, out, op, tk, _reduce_into))
               for p, x, out, tk in zip(pairs, inputs, outs, tickets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return outs


def test_shared_pair_sums_exactly_over_many_chunks():
    """3.5 chunks of float32 and an odd float16 length: both ranks get a + b (b + a) bit for bit,
    as the butterfly's owner computes it, across calls that reuse the two slots."""
    import torch

    from deepimage.parallel.transport import shm
    from deepimage.parallel.butterfly import _reduce_into

    pairs = _pair_segment(timeout_s=20)
    try:
        for numel, dtype, op in [(7 * shm.CHUNK_BYTES // 8, torch.float32, "sum"),
                                 (100_001, torch.float16, "average"), (1, torch.float64, "sum")]:
            gen = torch.Generator().manual_seed(numel)
            inputs = [torch.randn(numel, generator=gen).to(dtype) for _ in range(2)]
            expected = inputs[0].clone()
            _reduce_into(expected, inputs[1].view(1, -1), op)
            outs = _both(pairs, inputs, op)
            assert torch.equal(outs[0], expected) and torch.equal(outs[1], expected), (numel, dtype)
    finally:
        for p in pairs:
            p.close()


def test_shared_pair_wait_times_out_and_names_a_gone_partner():
    import torch

    from deepimage.parallel.butterfly import _reduce_into
    from deepimage.parallel.transport.shm import PairError

    alone = _pair_segment(timeout_s=0.3)[0]
    with pytest.raises(PairError, match=r"no answer from the partner in 0.3 s \(train.comm_timeout_s\)"):
        alone.allreduce(torch.ones(10), torch.ones(10), "sum", alone.ticket(), _reduce_into)
    with pytest.raises(PairError, match="unusable after an earlier failure"):
        alone.allreduce(torch.ones(10), torch.ones(10), "sum", alone.ticket(), _reduce_into)
    dead = _pair_segment(timeout_s=30, gone=lambda: "rank 1 closed its connection")[0]
    with pytest.raises(PairError, match="rank 1 closed its connection"):
        dead.allreduce(torch.ones(10), torch.ones(10), "sum", dead.ticket(), _reduce_into)


def test_shared_pair_liveness_check_from_both_lanes_at_once():
    """Both lanes' progress threads check the partner at once without error, and a hang-up is
    named. (A shared poll object failed lazy update's training step with "concurrent poll()
    invocation"; two threads here did not reproduce that race, bench.train_step did.)"""
    import socket
    import threading

    from deepimage.parallel.transport import shm

    class Up:
        rank = 0

        def lost(self, peer):
            return None

    mine, theirs = socket.socketpair()
    gone = shm.socket_gone(mine, Up())
    errors, results = [], []

    def check():
        try:
            results.extend(gone() for _ in range(2000))
        except Exception as err:  # noqa: BLE001 - the test reports any
            errors.append(repr(err))

    threads = [threading.Thread(target=check) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and set(results) == {None}
    theirs.close()
    assert "closed its connection" in gone()
    mine.close()
