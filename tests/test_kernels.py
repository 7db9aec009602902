"""gemmakit's own kernels against float64 references: the int8 product on the shapes its loops
split on, the argmax, and the training loss's cross-entropy rows."""

import os
import platform
from pathlib import Path

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


def rounded_to_int8(x):
    """x with each group of 32 rounded as the kernel rounds activations: to int8 steps of amax / 127
    (llama.cpp's Q8_0), half to even. 127 / amax is divided, not taken as a reciprocal times 127
    (torch's `127 / t`), which rounds differently and lands on other sides of ties."""
    groups = x.view(x.shape[0], -1, 32)
    amax = groups.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.full_like(amax, 127) / amax, torch.zeros_like(amax))
    return (torch.round(groups * inv) * (amax / 127)).view(x.shape)


def int8_rounding_bound(x, w, s):
    """How far rounding the activations to int8 (half a step of amax / 127 each) can move each
    output of x W^T: sum over groups of half the step times the group's |weights|, (M, N)."""
    half_step = x.double().view(x.shape[0], -1, 32).abs().amax(-1) / 254  # (M, G)
    weight = (w.double().abs().view(w.shape[0], -1, 32).sum(-1) * s.double())  # (N, G)
    return half_step @ weight.t()


@pytest.fixture(autouse=True)
def kernel_built():
    assert kernels.extension() is not None, "gemmakit's kernels did not build on this machine"


def runs_here(kind):
    """Whether this CPU runs the kernels built for kernels.VARIANTS[kind]."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    capability = torch.backends.cpu.get_cpu_capability()
    return kind == "portable" or capability == "AVX512" or (kind == "avx2" and capability == "AVX2")


@pytest.fixture(params=["native", "avx512", "avx2", "portable"])
def build(request):
    """(ops, fma_rows, amx_rows): the kernels for this machine, as models call them, and the same
    sources built for AVX2 CPUs (256-bit loops, float32 dense blocks) and for none (the
    compiler's own loops), and for AVX-512 without VNNI where the CPU has AVX-512, so that every
    path runs on every x86-64 machine that can run it."""
    if request.param == "native":
        ops = kernels.extension()
        return ops, kernels.fma_rows(ops.has_vnni()), kernels.AMX_ROWS, kernels.VNNI_MOST_ROWS
    if not runs_here(request.param):
        pytest.skip(f"this CPU cannot run the {request.param} build ({kernels.VARIANTS[request.param]})")
    ops = kernels.variant(request.param)
    assert ops is not None and not ops.has_vnni() and not ops.has_amx()
    return ops, kernels.fma_rows(False), kernels.AMX_ROWS, kernels.VNNI_MOST_ROWS


# rows: 1 and 2 (one pass of the 2-row tiles), odd counts (the 1-row tails), the VNNI loop's last
# count below AMX_ROWS and the AMX loop's first (one tile of 16 rows, two, and a part-filled one),
# the FMA loop's last count without VNNI and the dense path above it. 131 output channels: blocks
# of 4 (FMA) and a tail, 8 blocks of 16 and a short one (VNNI; on AMX, VNNI takes the short one);
# 144: whole blocks of 16. K = 32 and 96: an odd number of groups (VNNI reads two at a time).
@pytest.mark.parametrize("rows", sorted({1, 2, 3, 5, kernels.AMX_ROWS - 1, kernels.AMX_ROWS, 13, kernels.FMA_ROWS_NO_VNNI,
                                         kernels.FMA_ROWS_NO_VNNI + 1, 64, 65}))
@pytest.mark.parametrize("k", [32, 96, 640])
@pytest.mark.parametrize("n", [131, 144])
def test_int8_group_matmul_equals_the_float64_product(build, rows, k, n):
    ops, fma_rows, amx_rows, vnni_most = build
    w, s = int8_weight(n, k)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(1))
    y = ops.int8_group_matmul(x, w, s, fma_rows, amx_rows, vnni_most)
    expected = reference(x, w, s)
    assert y.shape == (rows, n) and y.dtype == torch.float32
    if rows > fma_rows and ops.has_vnni():  # int8 activations: within their rounding (exactly: below)
        assert ((y.double() - expected).abs() <= int8_rounding_bound(x, w, s) + 1e-5 * expected.abs().max()).all()
        return
    # float32 activations: the FMA loop, and the dense blocks without AVX512-BF16 (the AVX2 and
    # portable builds); bfloat16 blocks otherwise
    tol = 1e-5 if rows <= fma_rows or ops is not kernels.extension() else 1e-2
    assert ((y.double() - expected).abs().max() / expected.abs().max()) < tol


# Rows counts across every boundary the dispatch and the loops' tiles have: the VNNI loop's
# tiles of 4, 2 and 1 rows, AMX_ROWS, the AMX tiles of 16 rows (whole, part-filled), the old
# float32 (4) and int8 (64) limits and prefill. 131 outputs: a short last block of 16; K = 64
# (one pair of groups), 640 and 2048 (the default model's layers).
_INVARIANT_ROWS = sorted({1, 2, 5, kernels.AMX_ROWS - 1, kernels.AMX_ROWS, 16, 17, 64, 65, 200})


@pytest.mark.parametrize("k", [64, 640, 2048])
@pytest.mark.parametrize("n", [131, 144, 4096])
def test_int8_group_matmul_gives_a_row_the_same_bits_in_any_batch(n, k):
    """With VNNI the activations go int8 at every row count and every loop forms an output the same
    way, so a row's result does not depend on the rows beside it (a request's greedy text on
    what else is decoding, issue 18)."""
    if not kernels.extension().has_vnni():
        pytest.skip("without VNNI the float32 FMA loop takes few rows and dense blocks many")
    w, s = int8_weight(n, k)
    x = torch.randn(max(_INVARIANT_ROWS), k, generator=torch.Generator().manual_seed(7))
    alone = torch.cat([kernels.int8_group_matmul(x[m:m + 1], w, s) for m in range(x.shape[0])])
    # without AMX, prompts' many rows take the dense blocks (VNNI_MOST_ROWS)
    for rows in [r for r in _INVARIANT_ROWS if kernels.extension().has_amx() or r <= kernels.VNNI_MOST_ROWS]:
        assert torch.equal(kernels.int8_group_matmul(x[:rows], w, s), alone[:rows]), rows


@pytest.mark.parametrize("rows", [1, 5, 16, 21, 200])
@pytest.mark.parametrize("n, k", [(144, 640), (4096, 2048), (131, 96)])
def test_vnni_and_amx_loops_give_the_same_bits(rows, n, k):
    ext = kernels.extension()
    if not ext.has_amx():
        pytest.skip("this CPU (or OS) offers no AMX")
    w, s = int8_weight(n, k)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(8))
    assert torch.equal(ext.vnni_matmul(x, w, s), ext.amx_matmul(x, w, s))


@pytest.mark.parametrize("kind", ["avx512", "avx2", "portable"])
def test_the_fma_loops_give_a_row_the_same_result_in_any_batch(kind):
    """The float32 loops of CPUs without VNNI (512- and 256-bit, portable) use one formula for every
    tile of rows, so a row's output does not depend on the rows beside it (a request's tokens on
    what else is decoding)."""
    if not runs_here(kind):
        pytest.skip(f"this CPU cannot run the {kind} build")
    ops = kernels.variant(kind)
    w, s = int8_weight(131, 640)
    x = torch.randn(kernels.FMA_ROWS_NO_VNNI, 640, generator=torch.Generator().manual_seed(6))
    batch = ops.fma_matmul(x, w, s)
    for m in (0, 5, x.shape[0] - 1):
        assert torch.equal(ops.fma_matmul(x[m:m + 1].contiguous(), w, s)[0], batch[m])


@pytest.mark.parametrize("rows", [1, 5, kernels.AMX_ROWS + 1])  # VNNI, and AMX where there is one
@pytest.mark.parametrize("n", [4099, 4096])
def test_int8_group_matmul_splits_work_across_threads_without_changing_results(rows, n):
    w, s = int8_weight(n, 640)  # more than one parallel task of rows
    x = torch.randn(rows, 640, generator=torch.Generator().manual_seed(2))
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


@pytest.mark.parametrize("rows", [1, 5, kernels.AMX_ROWS + 1, 65])
@pytest.mark.parametrize("n", [4099, 4096])
def test_int8_group_matmul_runs_under_inference_mode_on_every_thread(rows, n):
    """Worker threads do not inherit inference mode: the outputs must not be written by torch ops there."""
    w, s = int8_weight(n, 640)
    x = torch.randn(rows, 640, generator=torch.Generator().manual_seed(3))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with torch.inference_mode():
            y = kernels.int8_group_matmul(x, w, s)
    finally:
        torch.set_num_threads(before)
    expected = reference(x, w, s)
    assert ((y.double() - expected).abs() <= int8_rounding_bound(x, w, s) + 1e-2 * expected.abs().max()).all()


@pytest.mark.parametrize("rows", _INVARIANT_ROWS)
def test_int8_activations_are_the_only_rounding(rows):
    """With VNNI the product's only error is rounding each activation to int8 with a scale per
    group of 32 (amax / 127, as llama.cpp's Q8_0): on activations rounded that way in Python
    first, it equals the float64 product to float32 accuracy, at every row count."""
    if not kernels.extension().has_vnni():
        pytest.skip("this CPU has no VNNI: int8_group_matmul keeps float32 activations")
    w, s = int8_weight(144, 640)
    x = torch.randn(rows, 640, generator=torch.Generator().manual_seed(4))
    x[0, :32] = 0  # an all-zero group
    y = kernels.int8_group_matmul(x, w, s)
    expected = reference(rounded_to_int8(x), w, s)
    assert ((y.double() - expected).abs().max() / expected.abs().max()) < 1e-5
    assert ((y.double() - reference(x, w, s)).abs().max() / expected.abs().max()) > 1e-4  # it did round


def test_gemmakit_no_amx_keeps_the_kernel_off_the_tile_unit_with_the_same_results(tmp_path):
    import subprocess
    import sys

    w, s = int8_weight(144, 640)
    x = torch.randn(65, 640, generator=torch.Generator().manual_seed(9))
    torch.save((w, s, x), tmp_path / "in.pt")
    code = ("import sys, torch; from gemmakit import kernels; w, s, x = torch.load(sys.argv[1]); "
            "torch.save([kernels.int8_group_matmul(x[:m], w, s) for m in (1, 16, 64, 65)], sys.argv[2]); "
            "print(kernels.extension().has_amx())")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                         env={**os.environ, "GEMMAKIT_NO_AMX": "1"}, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False"]
    *without, dense = torch.load(tmp_path / "out.pt")
    for y, m in zip(without, (1, 16, 64)):  # VNNI there, AMX here where the CPU has it
        assert torch.equal(y, kernels.int8_group_matmul(x[:m], w, s))
    # above VNNI_MOST_ROWS the dense blocks take a prompt's rows there: bfloat16 activations
    here = kernels.int8_group_matmul(x, w, s)
    assert 0 < (dense - here).abs().max() / here.abs().max() < 2e-2


def test_argmax_rows_is_torchs_first_maximum():
    ext = kernels.extension()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, 1000, generator=g)
    x[0, [10, 900]] = 99.0  # equal maxima: the first
    x[1, [700, 5]] = float("nan")  # NaN is the maximum, the first NaN
    x[2] = 1.0  # all equal
    x[3, 999] = 50.0  # in the scalar tail (1000 = 62 * 16 + 8)
    assert ext.argmax_rows(x).tolist() == x.max(-1).indices.tolist() == [10, 5, 0, 999, int(x[4].argmax())]
    view = torch.randn(3, 40, generator=g)[:, :33]  # rows with a stride, as the engine's vocab slice
    assert torch.equal(ext.argmax_rows(view), view.max(-1).indices)
    assert kernels.argmax(x.double()) is None  # torch does other dtypes


# 1003 columns: whole vectors of 16 and a tail; extreme logits (a row of -1e4 with one 1e4)
# check that exp neither overflows nor loses the maximum's row.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_softmax_cross_entropy_rows_equal_the_float64_loss_and_gradient(build, dtype, softcap):
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(37, 1003, generator=g) * 6).to(dtype)
    z[3] = -1e4
    z[3, 7] = 1e4
    t = torch.randint(0, 1003, (37,), generator=g)
    t[3] = 7
    zz = z.double().requires_grad_()
    capped = softcap * torch.tanh(zz / softcap) if softcap else zz
    want = torch.nn.functional.cross_entropy(capped, t, reduction="none")
    want.sum().backward()
    grad = z.clone()
    loss = build[0].softmax_cross_entropy_(grad, t, 0.0 if softcap is None else softcap)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-5)
    # float32: the float64 gradient to rounding; bfloat16: to its 8-bit mantissa
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-5)
    torch.testing.assert_close(grad.double(), zz.grad, **tol)


def test_softmax_cross_entropy_rejects_targets_outside_the_vocabulary():
    with pytest.raises(RuntimeError, match="out of"):
        kernels.softmax_cross_entropy_(torch.zeros(2, 5), torch.tensor([0, 5]), None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_draw_rows_is_the_inverse_cdf_of_the_softmax(build, dtype):
    """Each row's token is the first whose cumulative probability (float64, softmax of logits /
    temperature, tokens below min_p times the largest left out) exceeds u times the total; the
    uniforms are kept away from the boundaries by more than the float32 rounding of the terms."""
    ops = build[0]
    g = torch.Generator().manual_seed(7)
    V = 1003  # whole blocks of 256 and a tail
    logits = (torch.randn(6, V, generator=g) * 3).to(dtype)
    logits[2, :] = -float("inf")
    logits[2, 500] = 1.0  # one possible token
    logits[3, :] = 0.0  # all equal
    rows = torch.tensor([0, 1, 2, 3, 4, 5, 0])
    t = torch.tensor([1.0, 0.5, 1.0, 1.0, 2.0, 1e-3, 1.0])
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.05, 0.0, 0.2])
    u = torch.rand(len(rows), dtype=torch.float64, generator=g)
    got = ops.draw_rows(logits, rows, u, (1 / t).float(), min_p.float())
    for i, r in enumerate(rows.tolist()):
        x = logits[r].double()
        p = torch.exp((x - x.max()) / t[i].double())
        p = torch.where(p < min_p[i].double(), 0.0, p)
        cdf = p.cumsum(0)
        target = u[i] * cdf[-1]
        want = int(torch.searchsorted(cdf, target, right=True))
        near = (cdf - target).abs().min() / cdf[-1]
        assert got[i] == want or near < 1e-6, (i, int(got[i]), want)
    assert got[2] == 500
    assert ops.draw_rows(logits[:, :V - 3], rows[:1], u[:1], (1 / t[:1]).float(), min_p[:1].float()).shape == (1,)  # a strided view


def test_a_build_lock_left_by_a_dead_build_does_not_hang_the_next_process():
    """torch's extension loader waits for its build lock without end; a build that was killed
    leaves one behind, which gemmakit removes once it is older than any build takes."""
    import subprocess
    import sys
    import time

    from torch.utils.cpp_extension import _get_build_directory

    assert kernels.variant("portable") is not None
    lock = Path(_get_build_directory("gemmakit_portable", verbose=False)) / "lock"
    lock.touch()
    old = time.time() - 2 * kernels._STALE
    os.utime(lock, (old, old))
    code = "from gemmakit import kernels; print(kernels.variant('portable') is not None)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["True"] and "stale build lock" in out.stderr and not lock.exists()


def attention_inputs(B, Q, S, dtype, seed=0, D=256):
    """q (B, 1, Q, D), k and v views (B, 1, S, D) of a larger cache (strided as the engine's are)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 1, Q, D, generator=g).to(dtype)
    k = torch.randn(B + 1, 1, S + 40, D, generator=g).to(dtype)[1:, :, :S]
    v = torch.randn(B + 1, 1, S + 40, D, generator=g).to(dtype)[1:, :, :S]
    return q, k, v


def additive(keep, dtype):
    return torch.zeros(keep.shape, dtype=dtype).masked_fill_(~keep, float("-inf"))


def attention_reference(q, k, v, mask, scale):
    """float64 softmax(q k^T scale + mask) v; a query with no slot left: zeros."""
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale + mask.double()
    p = torch.softmax(scores, -1).nan_to_num(0.0)
    return p @ v.double()


def attention_bound(q, k, v, scale):
    """How far float32 sums can take the kernel from the float64 attention: each score's D-term
    dot product errs by at most D eps sum |q_d k_d| (times scale), which moves the softmax weights
    by a factor within exp(+-2 delta); the weighted sum of S values adds S eps of max |v|."""
    eps = torch.finfo(torch.float32).eps / 2
    D, S = q.shape[-1], k.shape[-2]
    delta = scale * D * eps * (q.double().abs() @ k.double().abs().transpose(-1, -2)).amax()
    return float((4 * delta + (S + D + 8) * eps) * v.double().abs().amax() * 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Q", [1, 2, 3, 4, 8])  # Gemma's queries per KV head (3: the loops for any count)
@pytest.mark.parametrize("S", [37, 600])  # one part of 256 slots, and three
@pytest.mark.parametrize("D", [48, 256])  # 48: not whole pairs of 16 (bfloat16 pairs' loop)
def test_attend_equals_the_float64_attention(build, dtype, Q, S, D):
    ops, scale = build[0], 0.0625
    B = 4
    q, k, v = attention_inputs(B, Q, S, dtype, D=D)
    slots = torch.arange(S)
    keep = torch.ones(B, 1, Q, S, dtype=torch.bool)
    keep[1] = ((slots >= S * 2 // 3) | (slots < S // 6))[None, None]  # a sliding ring that has wrapped
    keep[2] = torch.rand(1, Q, S, generator=torch.Generator().manual_seed(3)) < 0.3  # each query its own slots
    keep[3, :, 0] = False  # one query with nothing to attend to: zeros
    keep[3, :, 1:, : S // 2] = False
    mask = additive(keep, dtype)
    got = ops.attend(q, k, v, mask, scale)
    assert got.dtype == torch.float32 and got.shape == q.shape
    want = attention_reference(q, k, v, mask, scale)
    assert (got.double() - want).abs().max() <= attention_bound(q, k, v, scale)
    assert torch.equal(got[3, :, 0], torch.zeros_like(got[3, :, 0]))


@pytest.mark.parametrize("Q", [3, 4])
@pytest.mark.parametrize("D", [16, 256])
def test_attend_gives_a_row_the_same_bits_in_any_batch_and_span(build, Q, D):
    """A row's result depends on its own queries, keys and mask: not on the rows beside it, nor on
    how many (masked) slots past its own the step reads, nor on the threads."""
    ops, scale, dtype = build[0], 0.0625, torch.bfloat16
    q, k, v = attention_inputs(5, Q, 700, dtype, seed=1, D=D)
    keep = torch.zeros(5, 1, Q, 700, dtype=torch.bool)
    for b, length in enumerate([300, 700, 520, 1, 690]):
        keep[b, :, :, :length] = True
    mask = additive(keep, dtype)
    together = ops.attend(q, k, v, mask, scale)
    alone = ops.attend(q[:1], k[:1, :, :304], v[:1, :, :304], mask[:1, :, :, :304].contiguous(), scale)
    assert torch.equal(together[:1], alone)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(ops.attend(q, k, v, mask, scale), together)
    finally:
        torch.set_num_threads(threads)


def test_attend_rejects_inputs_it_cannot_read():
    q, k, v = attention_inputs(2, 4, 40, torch.bfloat16)
    mask = additive(torch.ones(2, 1, 4, 40, dtype=torch.bool), torch.bfloat16)
    with pytest.raises(RuntimeError, match="all float32 or all bfloat16"):
        torch.ops.gemmakit.attend(q.float(), k, v, mask, 1.0)
    with pytest.raises(RuntimeError, match="mask"):
        torch.ops.gemmakit.attend(q, k, v, mask[:, :, :, :39], 1.0)
    assert kernels.attend(q.float(), k.float(), v.float(), mask.float(), 1.0) is None  # float caches: torch's attention


def test_geglu_is_gelu_tanh_times_up_within_its_rounding(build):
    """gelu_tanh(g) * u against float64. Rounding: y = c (g + 0.044715 g^3) carries a few eps of
    relative error, which exp turns into |y| times that; the exp, the division and the products
    add a few eps each: within |g u| (4 |y| + 8) eps."""
    import math

    ops = build[0]
    gen = torch.Generator().manual_seed(5)
    g = torch.cat([torch.randn(3, 1000, generator=gen) * 4, torch.linspace(-12, 12, 3000).view(3, 1000)], 1)
    u = torch.randn(g.shape, generator=gen)
    got = ops.geglu(g, u)
    gd, ud = g.double(), u.double()
    y = math.sqrt(2 / math.pi) * (gd + 0.044715 * gd ** 3)
    want = 0.5 * gd * (1 + torch.tanh(y)) * ud
    eps = torch.finfo(torch.float32).eps / 2
    assert ((got.double() - want).abs() <= (gd * ud).abs() * (4 * y.abs() + 8) * eps + 1e-30).all()
    with pytest.raises(RuntimeError, match="one shape"):
        ops.geglu(g, u[:, :10].contiguous())


def test_geglu_runs_only_for_inference_on_float32_cpu_tensors():
    """kernels.geglu: for forwards without gradients on float32 CPU tensors; training (gradients)
    keeps torch's ops, whose backward it needs."""
    g, u = torch.randn(4, 32), torch.randn(4, 32)
    with torch.no_grad():
        assert torch.equal(kernels.geglu(g, u), torch.ops.gemmakit.geglu(g, u))
        assert kernels.geglu(g.double(), u.double()) is None
    assert kernels.geglu(g.requires_grad_(), u) is None


def test_only_int8_models_take_the_geglu_kernel(monkeypatch):
    """A float model's MLP keeps torch's gelu whatever ran before in the process (an int8 model's
    forward must not change a float model's numbers); an int8 model's eager forward takes it."""
    import copy

    from gemmakit.config import GemmaConfig
    from gemmakit.model import Gemma
    from gemmakit.model.quantized import quantize

    config = GemmaConfig(family="gemma3", vocab_size=64, d_model=64, n_layers=2, n_heads=2, n_kv_heads=1,
                         head_dim=32, ffn_dim=128, max_seq_len=32, sliding_window=8)
    model = Gemma(config).eval()
    calls = []
    geglu = kernels.geglu
    monkeypatch.setattr(kernels, "geglu", lambda g, u: calls.append(1) or geglu(g, u))
    tokens = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        quantize(copy.deepcopy(model), "int8")(tokens)
        assert len(calls) == config.n_layers
        model(tokens)
    assert len(calls) == config.n_layers
