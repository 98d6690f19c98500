"""addrmem.synthesize against a float64 plain-PyTorch reference, on the CPU and
(when there is one) on the GPU: values, both gradients, double backward,
opcheck, torch.compile, and every kind of bad input."""

import os
import subprocess
import sys

import pytest
import torch

import addrmem
from addrmem import synthesize, synthesize_reference

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

# (R, K, C, h, w, scale, index): odd sizes, K=1, h != w, scales 1-3,
# no index / a random index / an index with repeated rows.
CASES = [
    (7, 1, 3, 5, 4, 1, None),
    (13, 5, 2, 3, 7, 2, "random"),
    (9, 4, 1, 6, 5, 3, "repeat"),
    (37, 16, 3, 8, 8, 2, "random"),
    (23, 3, 3, 4, 9, 2, None),
    (5, 7, 2, 1, 11, 3, "repeat"),
    (19, 70, 1, 2, 2, 1, "random"),  # K above one base tile of the CUDA backward
]


def make(case, dtype=torch.float64, device="cpu", seed=0):
    R, K, C, h, w, scale, kind = case
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(R, K, generator=g, dtype=torch.float64)
    B = torch.randn(K, C, h, w, generator=g, dtype=torch.float64)
    if kind is None:
        index = None
    elif kind == "random":
        index = torch.randint(0, R, (2 * R + 3,), generator=g)
    else:
        index = torch.tensor([0, R - 1, 0, 1, 0, R - 1, 2 % R] * 3)
    A, B = A.to(device, dtype), B.to(device, dtype)
    index = None if index is None else index.to(device)
    return A, B, index, scale


def reference(A, B, index, scale, grad):
    """float64 CPU values and gradients."""
    A64 = A.detach().cpu().double().requires_grad_()
    B64 = B.detach().cpu().double().requires_grad_()
    out = synthesize_reference(A64, B64, None if index is None else index.cpu(), scale)
    gA, gB = torch.autograd.grad(out, (A64, B64), grad.detach().cpu().double())
    return out.detach(), gA, gB


def values_and_grads(A, B, index, scale, grad=None):
    A = A.detach().requires_grad_()
    B = B.detach().requires_grad_()
    out = synthesize(A, B, index, scale)
    if grad is None:
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        grad = grad.to(out.device, out.dtype)
    gA, gB = torch.autograd.grad(out, (A, B), grad)
    return out.detach(), gA, gB, grad


TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def assert_close(got, want, dtype):
    tol = TOL[dtype]
    scale = want.abs().max().item() + 1.0
    err = (got.detach().cpu().double() - want).abs().max().item()
    assert err <= tol * scale, f"max error {err:.3g} > {tol * scale:.3g}"


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference_cpu(case, dtype):
    A, B, index, scale = make(case, dtype)
    out, gA, gB, grad = values_and_grads(A, B, index, scale)
    assert out.dtype == dtype and out.shape == (
        (A.shape[0] if index is None else index.shape[0]),
        B.shape[1],
        B.shape[2] * scale,
        B.shape[3] * scale,
    )
    ref, rA, rB = reference(A, B, index, scale, grad)
    assert_close(out, ref, dtype)
    assert_close(gA, rA, dtype)
    assert_close(gB, rB, dtype)


def test_unselected_rows_get_zero_gradient():
    A, B, _, scale = make(CASES[1])
    index = torch.tensor([2, 2, 5])
    _, gA, _, _ = values_and_grads(A, B, index, scale)
    untouched = [r for r in range(A.shape[0]) if r not in (2, 5)]
    assert torch.all(gA[untouched] == 0)
    assert torch.all(gA[[2, 5]].abs().sum(1) > 0)


SMALL = [(5, 1, 2, 3, 2, 1, None), (6, 3, 1, 3, 4, 2, "random"), (4, 2, 2, 2, 3, 3, "repeat")]


@pytest.mark.parametrize("case", SMALL)
def test_gradcheck(case):
    A, B, index, scale = make(case)
    A.requires_grad_()
    B.requires_grad_()
    fn = lambda a, b: synthesize(a, b, index, scale)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (A, B))
    assert torch.autograd.gradgradcheck(fn, (A, B))


def layouts(A, B, index, grad):
    """The same values in every layout a caller can pass: contiguous,
    transposed addresses, sliced with a storage offset, channels-last bases and
    an expanded (stride-0) output gradient."""
    R, K = A.shape
    padded = torch.zeros(R + 2, K + 3, dtype=A.dtype)
    padded[1:-1, 2:-1] = A
    yield "contiguous", A, B, index, grad
    yield "transposed", A.t().contiguous().t(), B, index, grad
    yield "offset", padded[1:-1, 2:-1], B, None if index is None else torch.cat([index, index])[index.numel():], grad
    yield "channels_last", A, B.contiguous(memory_format=torch.channels_last), index, grad
    yield "expanded grad", A, B, index, grad[:1].expand_as(grad)


@pytest.mark.parametrize("case", SMALL)
def test_opcheck_every_layout(case):
    A, B, index, scale = make(case)
    grad = torch.randn(synthesize(A, B, index, scale).shape, dtype=torch.float64)
    for name, a, b, idx, g in layouts(A, B, index, grad):
        a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
        torch.library.opcheck(torch.ops.addrmem.synthesize.default, (a, b, idx, scale))
        for mask in ([True, True], [True, False], [False, True]):
            torch.library.opcheck(torch.ops.addrmem.synthesize_backward.default,
                                  (g, a.detach(), b.detach(), idx, scale, mask))
        gA, gB = torch.ops.addrmem.synthesize_backward(g, a.detach(), b.detach(), idx, scale, [True, True])
        assert gA.is_contiguous() and gB.is_contiguous(), name


@pytest.mark.parametrize("case", [SMALL[1], SMALL[2]])
def test_compile_fullgraph_with_backward_every_layout(case):
    A, B, index, scale = make(case, torch.float32)
    grad = torch.randn(synthesize(A, B, index, scale).shape)
    for name, a, b, idx, g in layouts(A, B, index, grad):
        torch._dynamo.reset()
        compiled = torch.compile(lambda a, b, i: synthesize(a, b, i, scale), fullgraph=True)
        a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
        out = compiled(a, b, idx)
        gA, gB = torch.autograd.grad(out, (a, b), g)
        ref, rA, rB = reference(a, b, idx, scale, g)
        assert_close(out, ref, torch.float32)
        assert_close(gA, rA, torch.float32)
        assert_close(gB, rB, torch.float32)


def test_double_backward_computes_only_what_is_used():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Masks(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.addrmem.synthesize_backward.default:
                self.seen.append(tuple(args[5]))
            return func(*args, **(kwargs or {}))

    A, B, index, scale = make(SMALL[1])
    A.requires_grad_()
    B.requires_grad_()
    out = synthesize(A, B, index, scale)
    weight = torch.randn(out.shape, dtype=out.dtype)
    gA, gB = torch.autograd.grad((out * weight).sum(), (A, B), create_graph=True)
    with Masks() as masks:
        torch.autograd.grad(gA.sum() + gB.sum(), (A, B))
    # d(gA)/dB and d(gB)/dA: each needs one output of synthesize_backward.
    assert sorted(masks.seen) == [(False, True), (True, False)]
    with Masks() as masks:  # only bases need a gradient: only grad_bases is computed
        torch.autograd.grad(synthesize(A.detach(), B, index, scale).sum(), B)
    assert masks.seen == [(False, True)]


def test_direct_calls_check_geometry():
    grad = torch.zeros(2, 1, 2, 2)
    with pytest.raises(RuntimeError, match="K = 0"):
        torch.ops.addrmem.synthesize_backward(grad, torch.zeros(2, 0), torch.zeros(0, 1, 2, 2), None, 1, [True, True])
    with pytest.raises(RuntimeError, match="K = 0"):
        torch.ops.addrmem.synthesize(torch.zeros(2, 0), torch.zeros(0, 1, 2, 2), None, 1)
    with pytest.raises(IndexError, match="out of range"):
        torch.ops.addrmem.synthesize_backward(grad, torch.zeros(2, 3), torch.zeros(3, 1, 2, 2), torch.tensor([0, 2]), 1,
                                              [True, True])


def test_two_dimensional_bases():
    A, B, index, _ = make((11, 4, 1, 1, 30, 1, "random"))
    B2 = B.reshape(4, 30)
    out = synthesize(A, B2, index)
    assert out.shape == (index.shape[0], 30)
    assert torch.allclose(out, (A[index] @ B2), atol=1e-12)


def test_non_contiguous_inputs():
    A, B, index, scale = make(CASES[3])
    A_nc = A.t().contiguous().t()  # same values, column-major
    B_nc = B.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    idx_nc = torch.stack([index, index], 1)[:, 0]
    assert not (A_nc.is_contiguous() or B_nc.is_contiguous() or idx_nc.is_contiguous())
    got, gA, gB, grad = values_and_grads(A_nc, B_nc, idx_nc, scale)
    ref, rA, rB = reference(A, B, index, scale, grad)
    assert_close(got, ref, torch.float64)
    assert_close(gA, rA, torch.float64)
    assert_close(gB, rB, torch.float64)


def test_empty_index_gives_empty_result():
    A, B, _, scale = make(CASES[1])
    A.requires_grad_()
    out = synthesize(A, B, torch.zeros(0, dtype=torch.long), scale)
    assert out.shape == (0, B.shape[1], B.shape[2] * scale, B.shape[3] * scale)
    (gA,) = torch.autograd.grad(out.sum(), A)
    assert torch.all(gA == 0)


def test_int32_index_is_accepted():
    A, B, index, scale = make(CASES[1])
    assert torch.equal(synthesize(A, B, index.int(), scale), synthesize(A, B, index, scale))


def test_backward_is_deterministic():
    A, B, index, scale = make(CASES[3], torch.float32)
    first = values_and_grads(A, B, index, scale)
    second = values_and_grads(A, B, index, scale, first[3])
    for x, y in zip(first[1:3], second[1:3]):
        assert torch.equal(x, y)


def test_compile_fullgraph_with_index():
    A, B, index, scale = make(CASES[1], torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b: torch.relu(synthesize(a, b, index, scale)) * 2, fullgraph=True)
    want = torch.relu(synthesize_reference(A, B, index, scale)) * 2
    assert torch.allclose(compiled(A, B), want, atol=1e-5)


def test_torch_func_transforms_are_refused_clearly():
    # The autograd formulas are C++ autograd Functions (no Python per call),
    # which torch.func transforms do not support: the error says so.
    A, B, index, scale = make(CASES[1], torch.float32)
    with pytest.raises(RuntimeError, match="functorch transforms"):
        torch.func.grad(lambda a: synthesize(a, B, index, scale).sum())(A)


def test_build_info():
    info = addrmem.build_info()
    assert set(info) >= {"cuda", "cuda_archs", "cuda_version", "torch_built", "torch_runtime"}
    assert info["torch_built"] == info["torch_runtime"]
    assert info["cuda"] == bool(info["cuda_archs"])


# --- bad input -------------------------------------------------------------------------

A0 = torch.randn(5, 3)
B0 = torch.randn(3, 2, 4, 4)


@pytest.mark.parametrize(
    "args, kwargs, error, words",
    [
        ((torch.randn(5), B0), {}, ValueError, "addresses must be 2-D"),
        ((A0, torch.randn(3, 2, 4)), {}, ValueError, "bases must be 4-D"),
        ((A0, torch.randn(4, 2, 4, 4)), {}, ValueError, "K mismatch"),
        ((A0.long(), B0.long()), {}, TypeError, "floating"),
        ((A0, B0.double()), {}, TypeError, "share a dtype"),
        ((A0, B0), {"index": torch.tensor([0.0, 1.0])}, TypeError, "integer tensor"),
        ((A0, B0), {"index": [0, 1]}, TypeError, "integer tensor"),
        ((A0, B0), {"index": torch.tensor([[0, 1]])}, ValueError, "1-D"),
        ((A0, B0), {"index": torch.tensor([0, 5])}, IndexError, "index\\[1\\] = 5 is out of range for 5"),
        ((A0, B0), {"index": torch.tensor([0, -1])}, IndexError, "index\\[1\\] = -1 is out of range"),
        ((A0, B0), {"scale": 0}, ValueError, "scale must be >= 1"),
        ((A0, B0), {"scale": 2.0}, TypeError, "scale must be an int"),
        ((A0, B0.reshape(3, 32)), {"scale": 2}, ValueError, "2-D bases"),
        ((torch.randn(5, 0), torch.randn(0, 2, 4, 4)), {}, ValueError, "empty"),
        ((A0, torch.randn(3, 2, 0, 4)), {}, ValueError, "empty image dimension"),
    ],
)
def test_bad_input(args, kwargs, error, words):
    with pytest.raises(error, match=words):
        synthesize(*args, **kwargs)


@needs_cuda
def test_mixed_devices_rejected():
    with pytest.raises(ValueError, match="different devices"):
        synthesize(A0.cuda(), B0)
    with pytest.raises(ValueError, match="index is on cpu"):
        synthesize(A0.cuda(), B0.cuda(), torch.tensor([0]))  # "index is on cpu but ..."


# --- CUDA ------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference_cuda(case, dtype):
    A, B, index, scale = make(case, dtype, "cuda", seed=3)
    out, gA, gB, grad = values_and_grads(A, B, index, scale)
    assert out.device.type == "cuda" and out.dtype == dtype
    ref, rA, rB = reference(A, B, index, scale, grad)
    assert_close(out, ref, dtype)
    assert_close(gA, rA, dtype)
    assert_close(gB, rB, dtype)


@needs_cuda
@pytest.mark.parametrize("case", SMALL)
def test_gradcheck_cuda(case):
    A, B, index, scale = make(case, device="cuda")
    A.requires_grad_()
    B.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: synthesize(a, b, index, scale), (A, B))
    torch.library.opcheck(torch.ops.addrmem.synthesize.default, (A, B, index, scale))


@needs_cuda
def test_out_of_range_index_trips_device_assert_cuda():
    # A device-side assert poisons the CUDA context: run it in its own process.
    code = ("import torch, addrmem; A = torch.randn(5, 3, device='cuda'); B = torch.randn(3, 2, 4, 4, device='cuda'); "
            "addrmem.synthesize(A, B, torch.tensor([0, 5], device='cuda'), 2); torch.cuda.synchronize()")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=os.path.dirname(os.path.dirname(addrmem.__file__)))
    assert result.returncode != 0 and "device-side assert" in result.stderr


@needs_cuda
def test_every_output_element_is_written():
    A, B, index, scale = make((301, 16, 3, 16, 16, 2, "random"), torch.float32, "cuda")
    n = index.shape[0]
    for _ in range(2):  # let the caching allocator hand out a NaN-filled block
        poison = torch.full((n, 3, 32, 32), float("nan"), device="cuda")
        del poison
        out = synthesize(A, B, index, scale)
        assert not torch.isnan(out).any()


@needs_cuda
def test_large_n_cuda():
    A, B, index, scale = make((1150, 64, 3, 32, 32, 2, "random"), torch.float32, "cuda")
    index = torch.randint(0, 1150, (8193,), device="cuda")
    out, gA, gB, grad = values_and_grads(A, B, index, scale)
    ref, rA, rB = reference(A, B, index, scale, grad)
    assert_close(out, ref, torch.float32)
    assert_close(gA, rA, torch.float32)
    assert_close(gB, rB, torch.float32)


@needs_cuda
def test_backward_is_deterministic_cuda():
    A, B, index, scale = make((1150, 16, 3, 16, 16, 2, "repeat"), torch.float32, "cuda")
    first = values_and_grads(A, B, index, scale)
    second = values_and_grads(A, B, index, scale, first[3])
    for x, y in zip(first[1:3], second[1:3]):
        assert torch.equal(x, y)


def assert_matches_cpu_kernel(case, dtype):
    """The op on CUDA against its CPU kernel (float64: to 1e-14 of the largest value)."""
    A, B, index, scale = make(case, dtype)
    out, gA, gB, grad = values_and_grads(A.cuda(), B.cuda(), None if index is None else index.cuda(), scale)
    want = values_and_grads(A, B, index, scale, grad.cpu())
    tol = 1e-14 if dtype == torch.float64 else 1e-5
    for got, cpu in zip((out, gA, gB), want):
        assert (got.cpu() - cpu).abs().max() <= tol * cpu.abs().max()


# Issue 18, finding 1: forward shapes (R, K, C, h, w, scale, index) whose
# tiles' footprints the device once computed larger than the host allocated.
FOOTPRINT_CASES = [((3, 2, 1, 3, w, 27, None), torch.float64) for w in range(2, 7)]
FOOTPRINT_CASES += [((2, 2, 1, h, h, 57, None), torch.float64) for h in (7, 11, 15)]
FOOTPRINT_CASES += [((2, 2, 1, 3, 3, s, None), torch.float32) for s in (107, 123, 235)]


@needs_cuda
@pytest.mark.parametrize("case, dtype", FOOTPRINT_CASES)
def test_issue18_footprints_cuda(case, dtype):
    assert_matches_cpu_kernel(case, dtype)


@needs_cuda
@pytest.mark.parametrize("case", CASES)
def test_issue18_float64_matches_cpu_kernel_cuda(case):
    assert_matches_cpu_kernel(case, torch.float64)


@needs_cuda
@pytest.mark.parametrize("dtype, fits, too_large", [(torch.float32, 100, 482), (torch.float64, 50, 240)])
def test_issue18_shared_memory_past_48kb_cuda(dtype, fits, too_large):
    """The adjoint's shared memory grows with the scale: past 48 KB (static
    and dynamic together) it opts in, and past the device's limit the op says
    so itself rather than CUDA's "invalid argument"."""
    A, B, index, _ = make((2, 2, 1, 2, 3, fits, None), dtype, "cuda")
    out, gA, gB, grad = values_and_grads(A, B, index, fits)
    for got, want in zip((out, gA, gB), reference(A, B, index, fits, grad)):
        assert (got.cpu().double() - want).abs().max() <= 1e-5 * want.abs().max()
    A, B, index, _ = make((2, 2, 1, 2, 3, too_large, None), dtype, "cuda")
    with pytest.raises(RuntimeError, match="the scale is too large for the CUDA kernels"):
        values_and_grads(A, B, index, too_large)


@needs_cuda
def test_issue18_indexed_backward_is_bit_identical_cuda():
    A, B, _, scale = make((8192, 16, 3, 16, 16, 2, None), torch.float32, "cuda")
    index = torch.randint(0, 8192, (8192,), generator=torch.Generator().manual_seed(0)).cuda()
    first = values_and_grads(A, B, index, scale)
    for _ in range(2):
        again = values_and_grads(A, B, index, scale, first[3])
        assert all(torch.equal(x, y) for x, y in zip(first[:3], again[:3]))


@needs_cuda
def test_issue18_more_than_2_31_elements_cuda():
    """An output and grad_out of 2^31 + 2^20 elements: 64-bit offsets
    throughout. Rows at both ends checked against the CPU kernel."""
    n = (2**31 + 2**20) // (3 * 64 * 64) + 1
    g = torch.Generator().manual_seed(0)
    A = torch.randn(n, 4, generator=g, dtype=torch.float16)
    B = torch.randn(4, 3, 32, 32, generator=g, dtype=torch.float16)
    A_cuda, B_cuda = A.cuda().requires_grad_(), B.cuda().requires_grad_()
    out = synthesize(A_cuda, B_cuda, None, 2)
    assert out.numel() > 2**31
    ends = torch.tensor([0, 1, n - 2, n - 1])
    want = synthesize(A[ends].float(), B.float(), None, 2)
    assert (out[ends.cuda()].float().cpu() - want).abs().max() <= 2e-2 * want.abs().max()
    grad = torch.zeros_like(out)
    grad[-1] = 1  # only the last row: its address row's gradient is the last one written
    gA, gB = torch.autograd.grad(out, (A_cuda, B_cuda), grad)
    del out, grad
    A1, B1 = A[-1:].float().requires_grad_(), B.float().requires_grad_()
    want_A, want_B = torch.autograd.grad(synthesize(A1, B1, None, 2), (A1, B1), torch.ones(1, 3, 64, 64))
    assert (gA[-1].float().cpu() - want_A[0]).abs().max() <= 2e-2 * want_A.abs().max()
    assert gA[:-1].abs().max() == 0
    assert (gB.float().cpu() - want_B).abs().max() <= 2e-2 * want_B.abs().max()


# Several row blocks and backward chunks on the CPU (blocks hold about 64K
# low-resolution values), at scales 1 (the GEMM writes the output) and 2: the
# backward's BLAS GEMMs (the digits job's shape: 12 bases, short rows; 20
# bases) and its fused pass for up to 16 bases on rows of 256 values or more
# (rows not a multiple of the vector width, blocks not a multiple of 4 rows).
BLOCKED = [(600, 6, 3, 8, 8, 2, "random"), (700, 5, 2, 9, 7, 1, "random"), (400, 3, 1, 5, 6, 3, None),
           (740, 12, 1, 8, 8, 1, None), (300, 20, 1, 8, 8, 1, "random"), (517, 5, 1, 15, 19, 1, None),
           (600, 16, 1, 16, 16, 1, "random"), (500, 4, 1, 16, 17, 2, None)]


@pytest.mark.parametrize("case", [CASES[3], *BLOCKED])
def test_cpu_result_does_not_depend_on_thread_count(case):
    A, B, index, scale = make(case, torch.float32)
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            results.append(values_and_grads(A, B, index, scale, results[0][3] if results else None))
    finally:
        torch.set_num_threads(previous)
    for other in results[1:]:
        for x, y in zip(results[0][:3], other[:3]):
            assert torch.equal(x, y)


@pytest.mark.parametrize("case", BLOCKED)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_blocked_shapes_match_reference_cpu(case, dtype):
    A, B, index, scale = make(case, dtype)
    out, gA, gB, grad = values_and_grads(A, B, index, scale)
    ref, rA, rB = reference(A, B, index, scale, grad)
    assert_close(out, ref, dtype)
    assert_close(gA, rA, dtype)
    assert_close(gB, rB, dtype)


def test_non_finite_values_stay_in_their_pixels():
    # The widening reads neighbours across line ends with zero weight; an inf
    # there must not turn a finite pixel into NaN.
    A = torch.ones(3, 1)
    B = torch.zeros(1, 2, 5, 6)
    B[0, 0, 2, 5] = float("inf")  # a line's last sample
    B[0, 1, 3, 0] = float("inf")  # a line's first sample
    out = synthesize(A, B, scale=2)
    ref = synthesize_reference(A, B, scale=2)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    assert torch.equal(out[out.isfinite()], ref[ref.isfinite()])
