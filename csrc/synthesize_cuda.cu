// Launches the CUDA kernels of addrmem::synthesize (synthesize_kernels.cuh,
// which also documents their launch shapes) and registers them for the op's
// schema (synthesize.cpp). The backward's two GEMMs run here, through ATen.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <climits>

#include "synthesize.h"
#include "synthesize_kernels.cuh"

namespace addrmem {
namespace {

// The `launch` functor of synthesize_kernels.cuh: kThreads threads per block
// on the current stream. A block's shared memory, static and dynamic
// together, above the default 48 KB (only the adjoint's, at scales past about
// 48 for double, 96 for float) needs an opt-in, up to the device's limit.
struct Launch {
  cudaStream_t stream;
  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), int64_t blocks, size_t smem, Args... args) const {
    if (blocks == 0) return;
    TORCH_CHECK(blocks < (int64_t{1} << 31), "addrmem::synthesize: too many blocks for one launch");
    cudaFuncAttributes attributes;
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
    const size_t total = attributes.sharedSizeBytes + smem;
    if (total > 48 * 1024) {
      int device = 0, most = 0;
      C10_CUDA_CHECK(cudaGetDevice(&device));
      C10_CUDA_CHECK(cudaDeviceGetAttribute(&most, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
      TORCH_CHECK(total <= static_cast<size_t>(most), "addrmem::synthesize: the scale is too large for the CUDA kernels (",
                  total, " bytes of shared memory, at most ", most, ")");
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    }
    kernel<<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

const int64_t* index_ptr(const at::Tensor& idx) { return idx.defined() ? idx.const_data_ptr<int64_t>() : nullptr; }

at::Tensor synthesize_cuda(const at::Tensor& addresses, const at::Tensor& bases,
                           const c10::optional<at::Tensor>& index, int64_t scale) {
  const Geometry g = make_geometry(addresses, bases, index, scale);
  const c10::cuda::CUDAGuard guard(addresses.device());
  const at::Tensor A = addresses.contiguous();
  const at::Tensor B = bases.contiguous();
  const at::Tensor idx = index.has_value() ? index->contiguous() : at::Tensor();
  at::Tensor out = at::empty({g.N, g.C, g.H, g.W}, A.options());
  if (g.N == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "synthesize_cuda", [&] {
    launch_forward<scalar_t, at::opmath_type<scalar_t>>(Launch{c10::cuda::getCurrentCUDAStream()},
                                                        A.const_data_ptr<scalar_t>(), B.const_data_ptr<scalar_t>(),
                                                        index_ptr(idx), out.mutable_data_ptr<scalar_t>(), g);
  });
  return out;
}

// Deterministic: the kernels use no float atomics, and cuBLAS GEMMs give
// bit-identical results for fixed shapes on one stream and GPU (with several
// streams, set CUBLAS_WORKSPACE_CONFIG as PyTorch's reproducibility notes say).
// The GEMMs run in the accumulation type (float for half, bfloat16 and float)
// and follow torch.backends.cuda.matmul's settings, TF32 included.
std::tuple<at::Tensor, at::Tensor> synthesize_backward_cuda(const at::Tensor& grad_out, const at::Tensor& addresses,
                                                            const at::Tensor& bases,
                                                            const c10::optional<at::Tensor>& index, int64_t scale,
                                                            std::array<bool, 2> output_mask) {
  const Geometry g = make_geometry(addresses, bases, index, scale);
  check_grad(grad_out, addresses, g);
  const bool want_a = output_mask[0], want_b = output_mask[1];
  const c10::cuda::CUDAGuard guard(addresses.device());
  const at::Tensor G = grad_out.contiguous();
  const at::Tensor A = addresses.contiguous();
  const at::Tensor B = bases.contiguous();
  const at::Tensor idx = index.has_value() ? index->contiguous() : at::Tensor();
  const at::Tensor none = A.new_empty({0});  // an output not asked for
  if (g.N == 0)
    return {want_a ? at::zeros({g.R, g.K}, A.options()) : none, want_b ? at::zeros(B.sizes(), B.options()) : none};
  TORCH_CHECK(g.N < INT_MAX, "addrmem::synthesize_backward: at most ", INT_MAX - 1, " indexed rows");
  const auto acc_options = A.options().dtype(at::toOpMathType(A.scalar_type()));
  const Launch launch{c10::cuda::getCurrentCUDAStream()};

  // Per chunk of rows: G_low, the adjoint of the upsampling (the identity at
  // scale 1), then its share of both GEMMs; grad_bases adds the chunks in order.
  const int64_t chunk = backward_chunk_rows(g, kLowBudget);
  const at::Tensor B_t = B.view({g.K, g.D}).to(acc_options.dtype()).t();
  const at::Tensor rows =
      want_b ? (idx.defined() ? A.index_select(0, idx) : A).to(acc_options.dtype()) : at::Tensor();  // (N, K)
  at::Tensor grad_rows = want_a ? at::empty({g.N, g.K}, acc_options) : at::Tensor();
  at::Tensor bases_acc = want_b ? at::empty({g.K, g.D}, acc_options) : at::Tensor();
  const at::Tensor low_buffer = g.s == 1 ? at::Tensor() : at::empty({chunk, g.D}, acc_options);
  for (int64_t n0 = 0; n0 < g.N; n0 += chunk) {
    const int64_t m = std::min(chunk, g.N - n0);
    at::Tensor low;
    if (g.s == 1) {
      low = G.view({g.N, g.D}).narrow(0, n0, m).to(acc_options.dtype());
    } else {
      low = low_buffer.narrow(0, 0, m);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "synthesize_adjoint_cuda", [&] {
        launch_adjoint<scalar_t>(launch, G.const_data_ptr<scalar_t>(),
                                 low.mutable_data_ptr<at::opmath_type<scalar_t>>(), g, n0, m);
      });
    }
    if (want_a) {
      at::Tensor grad_rows_chunk = grad_rows.narrow(0, n0, m);
      at::mm_out(grad_rows_chunk, low, B_t);
    }
    if (want_b && n0 == 0)
      at::mm_out(bases_acc, rows.narrow(0, n0, m).t(), low);
    else if (want_b)
      bases_acc.addmm_(rows.narrow(0, n0, m).t(), low);
  }
  const at::Tensor grad_bases = want_b ? bases_acc.to(A.scalar_type()).view(B.sizes()) : none;
  if (!want_a) return {none, grad_bases};
  if (!idx.defined()) return {grad_rows.to(A.scalar_type()), grad_bases};

  // Each address row's gradients summed in index order over its segment of
  // the stably sorted index (deterministic, O(N log N)).
  at::Tensor grad_addresses = at::empty({g.R, g.K}, A.options());
  // (The stable flag must be an optional<bool>: a plain `true` converts to
  // the other overload's `dim` argument and sorts along dimension 1.)
  const auto [sorted, order] = at::sort(idx, std::optional<bool>(true), /*dim=*/0);
  const at::Tensor bounds = at::zeros({2 * g.R}, A.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "synthesize_index_rows_cuda", [&] {
    launch_index_rows<scalar_t>(launch, grad_rows.const_data_ptr<at::opmath_type<scalar_t>>(),
                                sorted.const_data_ptr<int64_t>(), order.const_data_ptr<int64_t>(),
                                bounds.mutable_data_ptr<int>(), grad_addresses.mutable_data_ptr<scalar_t>(), g);
  });
  return {grad_addresses, grad_bases};
}

}  // namespace

TORCH_LIBRARY_IMPL(addrmem, CUDA, m) {
  m.impl("synthesize", &synthesize_cuda);
  m.impl("synthesize_backward", &synthesize_backward_cuda);
}

}  // namespace addrmem
