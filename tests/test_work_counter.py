"""benchmarks/work.py, the op counter behind the predicted H200 floors: bytes and FLOPs of single
ops, a fused kernel counted as one op, and the per-op extrapolation in the batch."""
import importlib.util
from pathlib import Path

import pytest
import torch

from conftest import make_cnn

spec = importlib.util.spec_from_file_location(
    "work", Path(__file__).resolve().parents[1] / "benchmarks" / "work.py")
work = importlib.util.module_from_spec(spec)
spec.loader.exec_module(work)


def count(fn):
    with work.OpCounter() as counter:
        fn()
    return counter.ops


def test_bytes_are_what_each_op_reads_and_writes_and_views_move_nothing():
    a, b = torch.randn(1000), torch.randn(1000)
    assert count(lambda: a + b) == [("aten.add", 0, 3 * 4000)]
    assert count(lambda: a.view(10, 100).t()) == []
    row = torch.randn(1, 100)
    assert count(lambda: row.expand(50, 100) * 2) == [("aten.mul", 0, 400 + 50 * 400)]
    half = torch.randn(100, 100).bfloat16()
    assert count(lambda: half[:, :10].float()) == [("aten._to_copy", 0, (99 * 100 + 10) * 2 +
                                                    100 * 10 * 4)]


def test_flops_follow_torch_flop_counter():
    x, w = torch.randn(8, 16), torch.randn(16, 4)
    assert count(lambda: x @ w)[0][1] == 2 * 8 * 16 * 4
    img, k = torch.randn(2, 3, 10, 10), torch.randn(5, 3, 3, 3)
    ops = count(lambda: torch.nn.functional.conv2d(img, k))
    assert ops[0][1] == 2 * 2 * 5 * 8 * 8 * 3 * 3 * 3


def test_a_fused_kernel_is_one_op_reading_inputs_once():
    h, d = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    z = torch.relu(h)
    ops = count(lambda: work.target_and_error(h, z, d, "relu", recompute_z=True,
                                              with_target=False))
    elems = h.numel() * 4
    assert ops == [("kernels.target_and_error", 0, 3 * elems + 4 * 4)]   # h, d, e and sq


def test_per_op_extrapolation_equals_a_count_at_that_batch():
    torch.manual_seed(0)

    def ops_at(b):
        model = make_cnn()
        x, y = torch.randn(b, 3, 8, 8), torch.arange(b) % 5
        with work.fused_kernels():
            return work.counted(work.STEPS["fxlra_kernels"](model, x, y,
                                                            dict(wiring="residual")))
    got = work.extrapolated([ops_at(2), ops_at(4)], (2, 4), 6)
    want = ops_at(6)
    assert [op for op, _, _ in got] == [op for op, _, _ in want]
    for (op, f, m), (_, f6, m6) in zip(got, want):
        assert (f, m) == pytest.approx((f6, m6)), op


def test_ops_that_differ_across_batches_are_refused():
    with pytest.raises(RuntimeError, match="different ops at different batch sizes"):
        work.extrapolated([[("aten.add", 0, 1)], [("aten.mul", 0, 2)]], (2, 4), 8)
