"""The CUDA kernels (csrc/synthesize_kernels.cuh) run as host code, against the
float64 reference: their tiling, footprints, slices and fixed-order reductions
are checked even where there is no GPU (tests/emulate_cuda.cpp says how)."""

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


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    lib = tmp_path_factory.mktemp("emulator") / "emulate_cuda.so"
    includes = [f"-I{p}" for p in torch.utils.cpp_extension.include_paths()]
    subprocess.run(
        ["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", *includes,
         str(HERE / "emulate_cuda.cpp"), "-o", str(lib)],
        check=True,
    )
    return ctypes.CDLL(str(lib))


def ptr(t):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else None


# (R, K, C, h, w, scale, N or None for no index): several tiles in every
# direction, K over one backward base tile, a width over one forward tile.
CASES = [
    (7, 1, 3, 5, 4, 1, None),
    (13, 5, 2, 3, 7, 2, 29),
    (9, 4, 1, 6, 5, 3, 21),
    (37, 16, 3, 8, 8, 2, 77),
    (19, 70, 1, 2, 3, 1, 40),
    (6, 3, 1, 2, 40, 2, 17),
    (4, 2, 2, 11, 3, 1, None),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sms", [1, 132])
def test_emulated_kernels_match_reference(emulator, case, dtype, sms):
    R, K, C, h, w, s, N = case
    g = torch.Generator().manual_seed(sum(case[:-1]))
    A = torch.randn(R, K, generator=g, dtype=torch.float64)
    B = torch.randn(K, C, h, w, generator=g, dtype=torch.float64)
    index = None if N is None else torch.randint(0, R, (N,), generator=g)
    n = R if index is None else N
    grad = torch.randn(n, C, h * s, w * s, generator=g, dtype=torch.float64)

    A64, B64 = A.clone().requires_grad_(), B.clone().requires_grad_()
    ref = synthesize_reference(A64, B64, index, s)
    ref_A, ref_B = torch.autograd.grad(ref, (A64, B64), grad)

    suffix = "f64" if dtype == torch.float64 else "f32"
    A, B, grad = A.to(dtype), B.to(dtype), grad.to(dtype)
    out = torch.full((n, C, h * s, w * s), float("nan"), dtype=dtype)
    getattr(emulator, f"emulate_forward_{suffix}")(ptr(A), ptr(B), ptr(index), ptr(out), *map(ctypes.c_int64, (n, R, K, C, h, w, s)))
    grad_bases = torch.full_like(B, float("nan"))
    grad_rows = torch.full((n, K), float("nan"), dtype=dtype)
    getattr(emulator, f"emulate_backward_{suffix}")(
        ptr(grad), ptr(A), ptr(B), ptr(index), ptr(grad_bases), ptr(grad_rows),
        *map(ctypes.c_int64, (n, R, K, C, h, w, s, sms)),
    )
    grad_A = grad_rows if index is None else torch.zeros(R, K, dtype=dtype).index_put_((index,), grad_rows, accumulate=True)

    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for got, want in ((out, ref), (grad_A, ref_A), (grad_bases, ref_B)):
        assert not torch.isnan(got).any()
        assert torch.allclose(got.double(), want.detach(), rtol=tol, atol=tol * (1 + want.abs().max().item()))
