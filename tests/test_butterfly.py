"""Butterfly all-reduce: equal to hvd.allreduce / torch all_reduce and to the exact sum on 1 to 4
processes under horovodrun and torchrun, for many shapes and all four float dtypes.

    pytest tests/test_butterfly.py
"""
from __future__ import annotations

import pytest
import torch

from deepimage.parallel import butterfly_allreduce, butterfly_allreduce_async
from deepimage.parallel.butterfly import _reduce_into
from deepimage.parallel.even_split import partition_sizes
from deepimage.parallel.transport import LocalTransport, TransportError

from workers.transport_launch import launch_worker  # noqa: E402

# max |error| / max |exact| allowed, per dtype (one rounding of an N-term sum, N <= 4)
TOLERANCE = {"float64": 1e-12, "float32": 1e-6, "float16": 2e-3, "bfloat16": 1.6e-2}


@pytest.mark.parametrize("np", [1, 2, 3, 4])
@pytest.mark.parametrize("launcher", ["horovod", "torchrun"])
def test_equals_launcher_allreduce_and_exact_sum(launcher, np, tmp_path):
    """~100 cases (empty, 1 element, sizes not divisible by N, 3-d, 1.2 and 4.4 MB, many small
    pieces; float32/64/16, bfloat16; sum and average), run twice: synchronously, then all in
    flight; on 2 processes also with the two phases instead of one exchange (same bits)."""
    reports = launch_worker(launcher, np, "tests.workers.butterfly_check", tmp_path)
    for report in reports:
        assert not report["errors"], f"rank {report['rank']}: {report['errors']}"
        assert report["size"] == np and report["reference"] == launcher
        assert len(report["cases"]) >= 90
        for case in report["cases"]:
            where = f"rank {report['rank']} {launcher} np={np} {case['name']}"
            tol = TOLERANCE[case["dtype"]]
            assert case["same_shape_dtype"] and case["input_unchanged"], where
            assert case["err_truth"] <= tol, f"{where}: error {case['err_truth']:.3g} vs exact"
            # The reference rounds too (Horovod adds float16 in float16): allow both errors.
            assert case["err_reference"] <= tol + case["reference_err_truth"], where
            assert case["identical_on_all_ranks"], f"{where}: ranks differ"
            assert case["async_same_bits"], f"{where}: async round differs"
            assert case.get("pair_same_bits", np != 2), f"{where}: one exchange != two phases"
    assert any(c["numel"] == 0 for c in reports[0]["cases"])
    assert np == 1 or any(c["numel"] % np for c in reports[0]["cases"])


def test_slices_are_nearly_equal_and_cover_the_tensor():
    for numel in (0, 1, 5, 12, 13, 1031):
        for n in (1, 2, 3, 4, 7):
            sizes = partition_sizes(numel, n)
            assert len(sizes) == n and sum(sizes) == numel
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_low_precision_accumulates_in_float32():
    """bfloat16 1 + 3 * 2^-9: each addition alone rounds away, the float32 total does not."""
    mine = torch.tensor([1.0], dtype=torch.bfloat16)
    others = torch.full((3, 1), 2.0**-9, dtype=torch.bfloat16)
    _reduce_into(mine, others, "sum")
    assert mine.item() == 1.0 + 2.0**-7  # the bfloat16 nearest to 1.00586
    sequential = torch.tensor([1.0], dtype=torch.bfloat16)
    for row in others:
        sequential += row
    assert sequential.item() == 1.0  # what adding in bfloat16 would have given


def test_one_process_returns_a_copy():
    t = LocalTransport()
    x = torch.randn(4, 5)
    for op in ("sum", "average"):
        y = butterfly_allreduce(x, op, t)
        assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()
    assert torch.equal(butterfly_allreduce_async(x, "sum", t).wait(), x)


def test_bad_arguments_name_the_value():
    t = LocalTransport()
    with pytest.raises(TransportError, match="op must be one of"):
        butterfly_allreduce(torch.zeros(3), "max", t)
    with pytest.raises(TransportError, match="dtype must be one of"):
        butterfly_allreduce(torch.zeros(3, dtype=torch.int32), "sum", t)
    with pytest.raises(TransportError, match="piece_mib"):
        butterfly_allreduce(torch.zeros(3), "sum", t, piece_mib=0)
