"""addrmem: distill a labelled image dataset into an addressable memory.

A few shared bases plus learned addressing coefficients (Deng & Russakovsky,
"Remember the Past", NeurIPS 2022), with fused CPU and CUDA kernels.
"""

from .ops import build_info, synthesize, synthesize_reference

__version__ = "0.1.0"

__all__ = ["build_info", "synthesize", "synthesize_reference"]
