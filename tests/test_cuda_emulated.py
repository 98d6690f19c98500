"""The CUDA kernels (csrc/synthesize_kernels.cuh) and their launch sequences run
as host code, for every dtype, against the float64 reference: their tiling,
footprints, adjoint, index reductions, vector paths and device-side index
asserts are checked even where there is no GPU (tests/emulate_cuda.cpp says
how)."""

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension

from addrmem import synthesize_reference

HERE = Path(__file__).parent

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")

SUFFIX = {torch.float64: "f64", torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
# Relative to the largest reference value: the output's rounding for half and
# bfloat16 (they accumulate in float32), summation error for the others.
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    lib = tmp_path_factory.mktemp("emulator") / "emulate_cuda.so"
    includes = [f"-I{p}" for p in torch.utils.cpp_extension.include_paths()]
    subprocess.run(
        ["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", *includes,
         str(HERE / "emulate_cuda.cpp"), "-o", str(lib)],
        check=True,
    )
    lib = ctypes.CDLL(str(lib))
    lib.emulate_fault_message.restype = ctypes.c_char_p
    lib.emulate_vector_accesses.restype = ctypes.c_int64
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
