"""The fused synthesis op: ``addresses[index] @ bases``, bilinearly upsampled.

The kernels live in ``csrc/``: ``synthesize.cpp`` holds the schema, the CPU
kernels and the autograd formulas (C++ autograd Functions, so a call costs no
Python beyond this wrapper), ``synthesize_cuda.cu`` the CUDA kernels. This
module checks the arguments, registers the op's fake (meta) implementations
with ``torch.library`` and documents it.
"""

from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (loading it registers torch.ops.addrmem.*)
except ImportError as exc:  # pragma: no cover - only without a built extension
    raise ImportError(
        "addrmem's compiled extension (addrmem._C) is missing or was built against "
        "another torch. Install the package with `pip install --no-build-isolation .` "
        "from the repository root, after installing torch."
    ) from exc

__all__ = ["synthesize", "synthesize_reference", "build_info", "validate_index"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def build_info() -> dict:
    """How the extension was built.

    Returns a dict with ``cuda`` (bool: CUDA kernels compiled in and
    registered), ``cuda_archs`` (the ``TORCH_CUDA_ARCH_LIST`` they were
    compiled for, '' if none), ``cuda_version`` (of the toolkit used, '' if
    none), ``torch_built`` (the torch the extension was compiled against) and
    ``torch_runtime`` (the torch imported now; they should match).
    """
    from . import _build

    return {
        "cuda": torch._C._dispatch_has_kernel_for_dispatch_key("addrmem::synthesize", "CUDA"),
        "cuda_archs": _build.CUDA_ARCHS,
        "cuda_version": _build.CUDA_VERSION,
        "torch_built": _build.TORCH_VERSION,
        "torch_runtime": torch.__version__,
    }


def _check(addresses, bases, scale):
    if not isinstance(addresses, torch.Tensor) or not isinstance(bases, torch.Tensor):
        raise TypeError("addresses and bases must be torch.Tensors")
    if addresses.dim() != 2:
        raise ValueError(f"addresses must be 2-D (R, K); got shape {tuple(addresses.shape)}")
    if bases.dim() not in (2, 4):
        raise ValueError(
            f"bases must be 4-D (K, C, h, w) or 2-D (K, D); got shape {tuple(bases.shape)}"
        )
    for name, t in (("addresses", addresses), ("bases", bases)):
        if t.dtype not in _FLOATS:
            raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64); got {t.dtype}")
    if addresses.dtype != bases.dtype:
        raise TypeError(f"addresses and bases must share a dtype; got {addresses.dtype} and {bases.dtype}")
    if addresses.device != bases.device:
        raise ValueError(f"addresses and bases are on different devices: {addresses.device} and {bases.device}")
    if addresses.shape[1] != bases.shape[0]:
        raise ValueError(
            f"K mismatch: addresses has {addresses.shape[1]} columns but bases has {bases.shape[0]} bases"
        )
    if bases.shape[0] == 0:
        raise ValueError("the memory is empty: K (the number of bases) must be at least 1")
    if any(s == 0 for s in bases.shape[1:]):
        raise ValueError(f"bases have an empty image dimension: shape {tuple(bases.shape)}")
    if isinstance(scale, bool) or not isinstance(scale, int):
        raise TypeError(f"scale must be an int; got {type(scale).__name__}")
    if scale < 1:
        raise ValueError(f"scale must be >= 1; got {scale}")
    if bases.dim() == 2 and scale != 1:
        raise ValueError("2-D bases (K, D) have no image layout to upsample: pass 4-D bases or scale=1")


def validate_index(index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Check that ``index`` is an (N,) integer tensor on ``device``; returns it
    as int64. Its range is checked by the kernels (an ``IndexError`` on the
    CPU, a device-side assertion on CUDA), so this reads nothing from the
    device and works under ``torch.compile``."""
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"index must be an integer tensor; got {type(index).__name__}")
    if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        raise TypeError(f"index must be an integer tensor; got {index.dtype}")
    if index.dim() != 1:
        raise ValueError(f"index must be 1-D (N,); got shape {tuple(index.shape)}")
    if index.device != device:
        raise ValueError(f"index is on {index.device} but the rows it selects are on {device}")
    return index.long()


def synthesize(
    addresses: torch.Tensor,
    bases: torch.Tensor,
    index: torch.Tensor | None = None,
    scale: int = 1,
) -> torch.Tensor:
    """Recall images from an addressable memory in one fused kernel.

    ``out[n] = upsample(sum_k addresses[index[n], k] * bases[k], scale)``, where
    ``upsample`` is exactly ``F.interpolate(scale_factor=scale, mode="bilinear",
    align_corners=False)``; the low-resolution intermediate is never stored.

    Args:
        addresses: (R, K) coefficients, one row per stored example.
        bases: (K, C, h, w) shared memories, or (K, D) when ``scale`` is 1.
        index: optional (N,) integer tensor of rows to synthesize (repeats
            allowed; their gradients add up). Without it N = R. A row outside
            [0, R) raises ``IndexError`` on the CPU and trips a device-side
            assertion on CUDA, as PyTorch's own indexing does.
        scale: integer upsampling factor >= 1.

    Returns:
        (N, C, h*scale, w*scale), or (N, D) for 2-D bases; dtype and device of
        the inputs. Differentiable in ``addresses`` and ``bases`` (twice).
    """
    _check(addresses, bases, scale)
    if index is not None:
        index = validate_index(index, addresses.device)
    op = torch.ops.addrmem.synthesize
    if bases.dim() == 2:
        flat = op(addresses, bases[:, None, None, :], index, 1)
        return flat.view(flat.shape[0], bases.shape[1])
    return op(addresses, bases, index, scale)


def synthesize_reference(
    addresses: torch.Tensor,
    bases: torch.Tensor,
    index: torch.Tensor | None = None,
    scale: int = 1,
) -> torch.Tensor:
    """The same computation in plain PyTorch (gather, matmul, reshape,
    ``F.interpolate``): the reference for tests and the baseline for benchmarks.
    Shapes as in :func:`synthesize`."""
    rows = addresses if index is None else addresses[index]
    low = rows @ bases.reshape(bases.shape[0], -1)
    if bases.dim() == 2:
        return low
    low = low.view(-1, *bases.shape[1:])
    if scale == 1:
        return low
    return torch.nn.functional.interpolate(low, scale_factor=scale, mode="bilinear", align_corners=False)


# --- fake (meta) implementations, for torch.compile and opcheck ----------------------------


@torch.library.register_fake("addrmem::synthesize")
def _synthesize_fake(addresses, bases, index, scale):
    n = addresses.shape[0] if index is None else index.shape[0]
    k, c, h, w = bases.shape
    return addresses.new_empty((n, c, h * scale, w * scale))


@torch.library.register_fake("addrmem::synthesize_backward")
def _synthesize_backward_fake(grad, addresses, bases, index, scale, output_mask):
    # The kernels return contiguous gradients (whatever the inputs' strides),
    # and an empty tensor for an output not asked for.
    return tuple(t.new_empty(t.shape if wanted else (0,)) for t, wanted in zip((addresses, bases), output_mask))
