"""The CUDA kernels (csrc/synthesize_kernels.cuh) and their launch sequences run
as host code, for every dtype, against the float64 reference: their tiling,
footprints, adjoint, index reductions, vector paths, shared-memory bounds and
device-side index asserts are checked even where there is no GPU, with the
GPU's fused multiply-adds where the CPU has FMA (tests/emulate_cuda.cpp says
how)."""

import ctypes
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension

import addrmem
from addrmem import synthesize_reference

HERE = Path(__file__).parent

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")

# The kernels are compiled with FMA contraction, as nvcc compiles them, where the CPU can run FMA.
FMA = Path("/proc/cpuinfo").exists() and " fma " in Path("/proc/cpuinfo").read_text()
needs_fma = pytest.mark.skipif(not FMA, reason="the CPU has no FMA instruction to model the GPU's")
SUFFIX = {torch.float64: "f64", torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
# Relative to the largest reference value: the output's rounding for half and
# bfloat16 (they accumulate in float32), summation error for the others.
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    lib = tmp_path_factory.mktemp("emulator") / "emulate_cuda.so"
    includes = [f"-I{p}" for p in torch.utils.cpp_extension.include_paths()]
    subprocess.run(
        ["g++", "-std=c++20", "-O2", *(["-mfma"] if FMA else []), "-ffp-contract=off", "-fsanitize=bounds",
         "-shared", "-fPIC", "-pthread", *includes, str(HERE / "emulate_cuda.cpp"), "-o", str(lib)],
        check=True,
    )
    lib = ctypes.CDLL(str(lib))
    lib.emulate_fault_message.restype = ctypes.c_char_p
    lib.emulate_vector_accesses.restype = ctypes.c_int64
    lib.emulate_device_mul_add.restype = ctypes.c_double
    lib.emulate_device_mul_add.argtypes = [ctypes.c_double] * 3
    for suffix in ("f64", "f32"):
        getattr(lib, f"emulate_tap_mismatches_{suffix}").restype = ctypes.c_int64
    return lib


def ptr(t):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else None


def sizes(*values):
    return [ctypes.c_int64(v) for v in values]


def forward(emulator, A, B, index, s, out=None):
    R, K = A.shape
    _, C, h, w = B.shape
    n = R if index is None else index.shape[0]
    if out is None:
        out = torch.full((n, C, h * s, w * s), float("nan"), dtype=A.dtype)
    code = getattr(emulator, f"emulate_forward_{SUFFIX[A.dtype]}")(
        ptr(A), ptr(B), ptr(index), ptr(out), *sizes(n, R, K, C, h, w, s))
    return code, out


def backward(emulator, grad, A, B, index, s, chunk=7):
    """The backward with G_low held for `chunk` rows at a time (several chunks
    in most cases below; on the GPU, as many rows as fit in 2**26 elements)."""
    R, K = A.shape
    _, C, h, w = B.shape
    grad_A, grad_B = torch.full_like(A, float("nan")), torch.full_like(B, float("nan"))
    code = getattr(emulator, f"emulate_backward_{SUFFIX[A.dtype]}")(
        ptr(grad), ptr(A), ptr(B), ptr(index), ptr(grad_A), ptr(grad_B),
        *sizes(grad.shape[0], R, K, C, h, w, s, chunk * C * h * w))
    return code, grad_A, grad_B


def make(case, dtype):
    """Inputs rounded to `dtype`, so that the float64 reference sees the same values."""
    R, K, C, h, w, s, N = case
    g = torch.Generator().manual_seed(R * 1000 + K * 10 + s)
    A = torch.randn(R, K, generator=g, dtype=torch.float64).to(dtype)
    B = torch.randn(K, C, h, w, generator=g, dtype=torch.float64).to(dtype)
    if N is None:
        index = None
    elif N > 0:  # repeats
        index = torch.randint(0, R, (N,), generator=g)
    else:  # -N distinct rows
        index = torch.randperm(R, generator=g)[:-N]
    n = R if index is None else index.shape[0]
    grad = torch.randn(n, C, h * s, w * s, generator=g, dtype=torch.float64).to(dtype)
    return A, B, index, s, grad


def assert_close(got, want, dtype):
    assert not torch.isnan(got).any()
    tol = TOL[dtype]
    assert torch.allclose(got.double(), want, rtol=tol, atol=tol * (1 + want.abs().max().item()))


# (R, K, C, h, w, scale, N): N None = no index, N > 0 = N random rows
# (repeats), N < 0 = -N distinct rows. Between them: scales 1, 2, 3 and 5;
# widths that are and are not multiples of the vector width; several tiles in
# every direction of every kernel (forward: rows per block, 8 x 64 and 16 x 32
# output tiles, 1,024-element flat tiles; adjoint: 8 x 32 low-resolution
# tiles; backward: 7-row chunks); K over the staged chunk of 32 bases and over
# the index kernel's 128 columns per pass; rows repeated across several of the
# index kernel's 32-row ballots.
CASES = [
    (7, 1, 3, 5, 4, 1, None),
    (13, 5, 2, 3, 7, 2, 29),
    (9, 4, 1, 6, 5, 3, 21),
    (37, 40, 3, 9, 36, 2, 20),
    (30, 6, 2, 4, 5, 2, -23),
    (19, 130, 1, 2, 3, 1, 40),
    (6, 3, 1, 2, 40, 2, 17),
    (18, 3, 4, 16, 17, 1, -18),
    (20, 2, 1, 33, 35, 1, None),
    (5, 33, 1, 3, 2, 3, None),
    (4, 3, 1, 2, 2, 1, 100),  # each row ~25 times, repeats 32+ apart
    (3, 2, 2, 3, 4, 5, None),
]


@pytest.mark.parametrize("dtype", list(SUFFIX))
@pytest.mark.parametrize("case", CASES)
def test_emulated_kernels_match_reference(emulator, case, dtype):
    A, B, index, s, grad = make(case, dtype)
    A64, B64 = A.double().requires_grad_(), B.double().requires_grad_()
    ref = synthesize_reference(A64, B64, index, s)
    ref_A, ref_B = torch.autograd.grad(ref, (A64, B64), grad.double())

    code, out = forward(emulator, A, B, index, s)
    assert code == 0, emulator.emulate_fault_message()
    assert_close(out, ref.detach(), dtype)
    code, grad_A, grad_B = backward(emulator, grad, A, B, index, s)
    assert code == 0, emulator.emulate_fault_message()
    assert_close(grad_A, ref_A, dtype)
    assert_close(grad_B, ref_B, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
@pytest.mark.parametrize("s", [1, 2])
def test_vector_path_only_when_aligned(emulator, dtype, s):
    """Widths that are multiples of 4 and aligned pointers take the vector path
    (the emulator fails a launch on a misaligned vector access); an output
    and bases one element off their alignment take the scalar path."""
    A, B, index, s, _ = make((9, 5, 2, 3, 8, s, None), dtype)
    ref = synthesize_reference(A.double(), B.double(), index, s)
    before = emulator.emulate_vector_accesses()
    code, out = forward(emulator, A, B, index, s)
    assert code == 0 and emulator.emulate_vector_accesses() > before
    assert_close(out, ref, dtype)

    B_off = torch.empty(B.numel() + 1, dtype=dtype)[1:].view_as(B).copy_(B)
    out_off = torch.full((out.numel() + 1,), float("nan"), dtype=dtype)[1:].view_as(out)
    before = emulator.emulate_vector_accesses()
    code, _ = forward(emulator, A, B_off, index, s, out=out_off)
    assert code == 0 and emulator.emulate_vector_accesses() == before
    assert torch.equal(out_off, out)


@pytest.mark.parametrize("bad", [-1, 6])
@pytest.mark.parametrize("s", [1, 2])
def test_out_of_range_index_trips_the_device_assert(emulator, bad, s):
    A, B, _, s, _ = make((6, 3, 1, 4, 4, s, None), torch.float32)
    index = torch.tensor([0, 5, bad, 2])
    grad = torch.randn(4, 1, 4 * s, 4 * s)
    code, _ = forward(emulator, A, B, index, s)
    assert code == 1 and b"index out of range" in emulator.emulate_fault_message()
    code, *_ = backward(emulator, grad, A, B, index, s)
    assert code == 1 and b"index out of range" in emulator.emulate_fault_message()
    code, _ = forward(emulator, A, B, index.clamp(0, 5), s)  # and a valid one runs again
    assert code == 0


def test_emulated_backward_is_deterministic(emulator):
    A, B, index, s, grad = make((13, 5, 2, 3, 7, 2, 29), torch.float32)
    first = backward(emulator, grad, A, B, index, s)
    second = backward(emulator, grad, A, B, index, s)
    assert all(torch.equal(x, y) for x, y in zip(first[1:], second[1:]))


@needs_fma
def test_emulated_kernels_fuse_multiply_adds_as_the_gpu_does(emulator):
    # 0.1 * 10 rounds to 1 exactly; fused, the product keeps 0.1's rounding error.
    assert emulator.emulate_device_mul_add(0.1, 10.0, -1.0) == 0.1 * 10 - 1 + 2.0**-54


@needs_fma
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_device_and_host_taps_agree(emulator, dtype):
    """Issue 18, finding 1: fused on the device, a source coordinate could
    round below an integer that the host's two roundings hit, so a tile of the
    forward spanned one more low-resolution row or column than the host
    allocated. Every axis of up to 16 samples at every scale up to 128, with
    the forward's tile heights and widths (8, 16, 32, 64)."""
    mismatches = getattr(emulator, f"emulate_tap_mismatches_{SUFFIX[dtype]}")
    bad = [(n, s, tile) for n in range(1, 17) for s in range(1, 129) for tile in (8, 16, 32, 64)
           if mismatches(*sizes(n, s, tile))]
    assert not bad


# Shapes (h, w, scale) whose tiled forward overran its shared memory (finding 1).
OVERRUN = [(torch.float64, (3, 2, 27)), (torch.float64, (3, 6, 27)), (torch.float64, (7, 7, 57)),
           (torch.float32, (3, 1, 107)), (torch.float32, (3, 1, 235))]


@needs_fma
@pytest.mark.parametrize("dtype, shape", OVERRUN)
def test_footprints_stay_in_shared_memory(emulator, dtype, shape):
    h, w, s = shape
    A, B, index, s, grad = make((3, 2, 1, h, w, s, None), dtype)
    ref = synthesize_reference(A.double(), B.double(), index, s)
    code, out = forward(emulator, A, B, index, s)
    assert code == 0, emulator.emulate_fault_message()
    assert_close(out, ref, dtype)
    # Float64: the CPU kernel's taps, to the last bits (the blends may differ in their roundings).
    if dtype == torch.float64:
        assert (out - addrmem.synthesize(A, B, index, s)).abs().max() <= 1e-14 * ref.abs().max()


@pytest.mark.parametrize("s", [2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_non_finite_gradients_match_the_cpu(emulator, s, dtype):
    """An inf or NaN in grad_out reaches only the samples whose taps read that
    pixel, as on the CPU: 0 * inf = NaN only where a tap has weight 0."""
    h, w = 5, 7
    g = torch.Generator().manual_seed(s)
    A = torch.ones(1, 1, dtype=dtype)
    B = torch.rand(1, 1, h, w, generator=g, dtype=dtype) + 1
    grad = torch.randn(1, 1, h * s, w * s, generator=g, dtype=dtype)
    flat = grad.view(-1)
    for pos, value in zip(torch.randperm(flat.numel(), generator=g)[:6], [1, -1, 1, 1, -1, 0]):
        flat[pos] = float("inf") * value if value else float("nan")
    grad[0, 0, -1, -1] = float("inf")  # the corners, where the taps coincide
    grad[0, 0, 0, 0] = float("-inf")
    code, _, grad_B = backward(emulator, grad, A, B, None, s)
    assert code == 0, emulator.emulate_fault_message()
    A_cpu, B_cpu = A.clone().requires_grad_(), B.clone().requires_grad_()
    (want,) = torch.autograd.grad(addrmem.synthesize(A_cpu, B_cpu, None, s), B_cpu, grad)
    assert torch.equal(grad_B.isnan(), want.isnan()) and torch.equal(grad_B.isinf(), want.isinf())
    assert torch.equal(grad_B.isinf() & (grad_B > 0), want.isinf() & (want > 0))
    finite = want.isfinite()
    assert torch.allclose(grad_B[finite], want[finite], rtol=1e-5, atol=1e-5)


def test_indexed_backward_is_not_quadratic(emulator):
    """A random index with repeats spread through it costs about what a
    permutation does (the sums run over a sorted index), not a scan of the
    index per repeated row."""
    def seconds(index):  # of CPU time, which other processes' load disturbs less than wall time
        A, B = torch.randn(4096, 1), torch.randn(1, 1, 1, 1)
        grad = torch.randn(index.shape[0], 1, 1, 1)
        start = time.process_time()
        code, *_ = backward(emulator, grad, A, B, index, 1, chunk=1 << 20)
        assert code == 0, emulator.emulate_fault_message()
        return time.process_time() - start

    g = torch.Generator().manual_seed(0)
    permutation = seconds(torch.randperm(4096, generator=g))
    repeats = seconds(torch.randint(0, 4096, (4096,), generator=g))
    assert repeats < 3 * permutation
