// The op's sizes and the index arithmetic of bilinear upsampling by an integer
// factor, shared by the CPU and CUDA kernels so that both compute exactly what
// F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False) does.
// Free of ATen so that the CUDA kernels can also be compiled as host code.
#pragma once

#include <c10/macros/Macros.h>
#include <cstdint>

namespace addrmem {

struct Geometry {
  int64_t N;  // rows synthesized
  int64_t R;  // rows of addresses
  int64_t K;  // bases
  int64_t C, h, w;  // base image (low resolution)
  int64_t s;        // upsampling factor
  int64_t H, W;     // output image
  int64_t D;        // C * h * w
};

// x * y - z with two roundings, as ATen computes it on the CPU. Never fused
// into one FMA: nvcc fuses by default (and a host compiler may), and a fused
// source coordinate can round below an integer that the unfused one hits, so
// the device's taps would leave the footprint the host sized (issue 18).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t mul_sub_unfused(acc_t x, acc_t y, acc_t z) {
#ifdef __CUDA_ARCH__
  if constexpr (sizeof(acc_t) == 8)
    return __dsub_rn(__dmul_rn(x, y), z);
  else
    return __fsub_rn(__fmul_rn(x, y), z);
#else
  const volatile acc_t product = x * y;  // a stored product cannot be fused with the subtraction
  return product - z;
#endif
}

// Output coordinate `dst` of an axis upsampled by `s` from `in_size` samples
// reads samples i0 and i1 with weights (1 - l1) and l1. Same formula and
// rounding as ATen's area_pixel_compute_source_index with scale = 1/s.
template <typename acc_t>
C10_HOST_DEVICE inline void source_index(int64_t dst, int64_t in_size, int64_t s,
                                         int64_t& i0, int64_t& i1, acc_t& l1) {
  const acc_t scale = static_cast<acc_t>(1.0 / static_cast<double>(s));
  acc_t src = mul_sub_unfused(scale, static_cast<acc_t>(dst) + static_cast<acc_t>(0.5), static_cast<acc_t>(0.5));
  if (src < static_cast<acc_t>(0)) src = static_cast<acc_t>(0);
  i0 = static_cast<int64_t>(src);
  if (i0 > in_size - 1) i0 = in_size - 1;
  i1 = i0 + (i0 < in_size - 1 ? 1 : 0);
  l1 = src - static_cast<acc_t>(i0);
}

// Weight with which output coordinate `dst` reads input sample `i`: the adjoint
// of source_index, so forward and backward are exact transposes.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t adjoint_weight(int64_t dst, int64_t i, int64_t in_size, int64_t s) {
  int64_t i0, i1;
  acc_t l1;
  source_index<acc_t>(dst, in_size, s, i0, i1, l1);
  acc_t w = static_cast<acc_t>(0);
  if (i0 == i) w += static_cast<acc_t>(1) - l1;
  if (i1 == i) w += l1;
  return w;
}

// Output coordinates that can read input sample i lie in [first, last).
C10_HOST_DEVICE inline int64_t adjoint_first(int64_t i, int64_t s) {
  const int64_t f = s * (i - 1);
  return f < 0 ? 0 : f;
}
C10_HOST_DEVICE inline int64_t adjoint_last(int64_t i, int64_t s, int64_t out_size) {
  const int64_t l = s * (i + 2);
  return l > out_size ? out_size : l;
}

}  // namespace addrmem
