// Shapes and argument checks of addrmem::synthesize, shared by the CPU and CUDA
// kernels. The Python wrapper (addrmem/ops.py) checks the same things first
// with friendlier messages; these checks guard direct torch.ops calls.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include "geometry.h"

namespace addrmem {

inline Geometry make_geometry(const at::Tensor& addresses, const at::Tensor& bases,
                              const c10::optional<at::Tensor>& index, int64_t scale) {
  TORCH_CHECK(addresses.dim() == 2, "addrmem::synthesize: addresses must be 2-D (R, K), got ",
              addresses.sizes());
  TORCH_CHECK(bases.dim() == 4, "addrmem::synthesize: bases must be 4-D (K, C, h, w), got ",
              bases.sizes());
  TORCH_CHECK(addresses.scalar_type() == bases.scalar_type(),
              "addrmem::synthesize: addresses and bases must share a dtype");
  TORCH_CHECK(addresses.device() == bases.device(),
              "addrmem::synthesize: addresses and bases must be on one device");
  TORCH_CHECK(addresses.size(1) == bases.size(0), "addrmem::synthesize: K mismatch (",
              addresses.size(1), " vs ", bases.size(0), ")");
  TORCH_CHECK(scale >= 1, "addrmem::synthesize: scale must be >= 1, got ", scale);
  TORCH_CHECK(bases.size(0) >= 1, "addrmem::synthesize: the memory has no bases (K = 0)");
  TORCH_CHECK(bases.size(1) >= 1 && bases.size(2) >= 1 && bases.size(3) >= 1,
              "addrmem::synthesize: bases have an empty image dimension: ", bases.sizes());
  Geometry g;
  g.R = addresses.size(0);
  g.K = addresses.size(1);
  g.C = bases.size(1);
  g.h = bases.size(2);
  g.w = bases.size(3);
  g.s = scale;
  g.H = g.h * scale;
  g.W = g.w * scale;
  g.D = g.C * g.h * g.w;
  if (index.has_value()) {
    const at::Tensor& idx = *index;
    TORCH_CHECK(idx.scalar_type() == at::kLong, "addrmem::synthesize: index must be int64");
    TORCH_CHECK(idx.dim() == 1, "addrmem::synthesize: index must be 1-D");
    TORCH_CHECK(idx.device() == addresses.device(),
                "addrmem::synthesize: index must be on the device of addresses");
    g.N = idx.size(0);
  } else {
    g.N = g.R;
  }
  return g;
}

inline void check_grad(const at::Tensor& grad, const at::Tensor& addresses, const Geometry& g) {
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == g.N && grad.size(1) == g.C && grad.size(2) == g.H &&
                  grad.size(3) == g.W,
              "addrmem::synthesize_backward: grad has shape ", grad.sizes(), ", expected (", g.N, ", ",
              g.C, ", ", g.H, ", ", g.W, ")");
  TORCH_CHECK(grad.scalar_type() == addresses.scalar_type() && grad.device() == addresses.device(),
              "addrmem::synthesize_backward: grad must match addresses in dtype and device");
}

}  // namespace addrmem
