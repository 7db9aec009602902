"""gemmakit's own int8 kernel against a float64 reference, on the shapes its loops split on."""

import pytest
import torch

from gemmakit import kernels


def int8_weight(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    s = (torch.rand(n, k // 32, generator=g) * 0.02).half()
    s[0, 0] = 0  # a zero group contributes nothing
    return w, s


def reference(x, w, s):
    groups = w.double().view(w.shape[0], -1, 32) * s.double()[..., None]
    return x.double() @ groups.view(w.shape).t()


@pytest.fixture(autouse=True)
def kernel_built():
    assert kernels._extension() is not None, "the int8 kernel did not build on this machine"


# rows: 1 and 2 (one pass of the 2-row tile), odd counts (the 1-row tail), the FMA loop's last
# count, and the dense path above it. 131 output channels: blocks of 4 and a tail of 3.
@pytest.mark.parametrize("rows", [1, 2, 3, 5, kernels.FMA_ROWS, kernels.FMA_ROWS + 1, 37])
@pytest.mark.parametrize("k", [32, 96, 640])
def test_int8_group_matmul_equals_the_float64_product(rows, k):
    w, s = int8_weight(131, k)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(1))
    y = kernels.int8_group_matmul(x, w, s)
    expected = reference(x, w, s)
    assert y.shape == (rows, 131) and y.dtype == torch.float32
    # float32 accumulation for few rows; bfloat16 activations and blocks in the dense path
    tol = 1e-5 if rows <= kernels.FMA_ROWS else 1e-2
    assert ((y.double() - expected).abs().max() / expected.abs().max()) < tol


def test_int8_group_matmul_splits_work_across_threads_without_changing_results():
    w, s = int8_weight(4099, 640)  # more than one parallel task of rows
    x = torch.randn(2, 640, generator=torch.Generator().manual_seed(2))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.int8_group_matmul(x, w, s)
        torch.set_num_threads(2)
        two = kernels.int8_group_matmul(x, w, s)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)  # each output is summed by one thread in a fixed order


def test_int8_group_matmul_rejects_shapes_it_cannot_read():
    w, s = int8_weight(8, 64)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        kernels.int8_group_matmul(torch.randn(1, 48), w[:, :48].contiguous(), s)
    with pytest.raises(RuntimeError, match="scales"):
        kernels.int8_group_matmul(torch.randn(1, 64), w, s[:4].contiguous())


@pytest.mark.parametrize("rows", [1, kernels.FMA_ROWS + 1])
def test_int8_group_matmul_runs_under_inference_mode_on_every_thread(rows):
    """Worker threads do not inherit inference mode: the outputs must not be written by torch ops there."""
    w, s = int8_weight(4099, 640)
    x = torch.randn(rows, 640, generator=torch.Generator().manual_seed(3))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with torch.inference_mode():
            y = kernels.int8_group_matmul(x, w, s)
    finally:
        torch.set_num_threads(before)
    assert ((y.double() - reference(x, w, s)).abs().max() / reference(x, w, s).abs().max()) < 1e-2
