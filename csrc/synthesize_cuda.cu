// Launches the CUDA kernels of addrmem::synthesize (synthesize_kernels.cuh)
// and registers them for the op's schema (synthesize.cpp).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "synthesize.h"
#include "synthesize_kernels.cuh"

namespace addrmem {
namespace {

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
    using acc_t = at::opmath_type<scalar_t>;
    const ForwardLaunch l = forward_launch<acc_t>(g);
    TORCH_CHECK(l.blocks < (int64_t{1} << 31), "addrmem::synthesize: too many rows for one launch");
    synthesize_forward_kernel<scalar_t, acc_t, rows_per_block<acc_t>()>
        <<<static_cast<unsigned>(l.blocks), kThreads, l.smem, c10::cuda::getCurrentCUDAStream()>>>(
            A.const_data_ptr<scalar_t>(), B.const_data_ptr<scalar_t>(),
            idx.defined() ? idx.const_data_ptr<int64_t>() : nullptr, out.mutable_data_ptr<scalar_t>(), g,
            l.tiles_y, l.tiles_x);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> synthesize_backward_cuda(const at::Tensor& grad_out, const at::Tensor& addresses,
                                                            const at::Tensor& bases,
                                                            const c10::optional<at::Tensor>& index, int64_t scale) {
  const Geometry g = make_geometry(addresses, bases, index, scale);
  check_grad(grad_out, addresses, g);
  const c10::cuda::CUDAGuard guard(addresses.device());
  const at::Tensor G = grad_out.contiguous();
  const at::Tensor A = addresses.contiguous();
  const at::Tensor B = bases.contiguous();
  const at::Tensor idx = index.has_value() ? index->contiguous() : at::Tensor();
  at::Tensor grad_bases = at::empty_like(B);
  at::Tensor grad_rows = at::empty({g.N, g.K}, A.options().dtype(at::toOpMathType(A.scalar_type())));
  if (g.N == 0) {
    grad_bases.zero_();
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "synthesize_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      int sms = 0;
      C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, addresses.get_device()));
      const BackwardLaunch l = backward_launch<acc_t>(g, sms);
      TORCH_CHECK(l.blocks < (int64_t{1} << 31), "addrmem::synthesize_backward: too many blocks for one launch");
      at::Tensor bases_part = at::empty({l.slices, g.K, g.D}, grad_rows.options());
      at::Tensor rows_part = at::empty({l.pix_tiles, g.N, g.K}, grad_rows.options());
      const auto stream = c10::cuda::getCurrentCUDAStream();
      synthesize_backward_kernel<scalar_t, acc_t, rows_per_block<acc_t>()>
          <<<static_cast<unsigned>(l.blocks), kThreads, 0, stream>>>(
              G.const_data_ptr<scalar_t>(), A.const_data_ptr<scalar_t>(), B.const_data_ptr<scalar_t>(),
              idx.defined() ? idx.const_data_ptr<int64_t>() : nullptr, bases_part.mutable_data_ptr<acc_t>(),
              rows_part.mutable_data_ptr<acc_t>(), g, l.pix_tiles, l.base_tiles, l.rows_per_slice);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      synthesize_reduce_kernel<scalar_t, acc_t><<<static_cast<unsigned>(l.reduce_blocks), kThreads, 0, stream>>>(
          bases_part.const_data_ptr<acc_t>(), rows_part.const_data_ptr<acc_t>(),
          grad_bases.mutable_data_ptr<scalar_t>(), grad_rows.mutable_data_ptr<acc_t>(), l.slices, l.pix_tiles,
          g.K * g.D, g.N * g.K);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  // Each row's address gradient, added to its address row; index_put_'s CUDA
  // kernel with accumulate=true sorts the indices and is deterministic.
  at::Tensor grad_addresses =
      idx.defined() ? at::zeros({g.R, g.K}, grad_rows.options()).index_put_({idx}, grad_rows, /*accumulate=*/true)
                    : grad_rows;
  return {grad_addresses.to(A.scalar_type()), grad_bases};
}

}  // namespace

TORCH_LIBRARY_IMPL(addrmem, CUDA, m) {
  m.impl("synthesize", &synthesize_cuda);
  m.impl("synthesize_backward", &synthesize_backward_cuda);
}

}  // namespace addrmem
