// addrmem::synthesize: the op's schema and its CPU kernels.
//
//   out[n] = upsample_s( sum_k addresses[index[n], k] * bases[k] )
//
// with upsample_s = F.interpolate(scale_factor=s, mode="bilinear",
// align_corners=False). The CUDA kernels for the same schema are in
// synthesize_cuda.cu; the Python side (fake kernels, autograd) is addrmem/ops.py.
#include <Python.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "synthesize.h"

namespace addrmem {
namespace {

// Per-axis source samples and weights of the upsampling, computed once per call.
template <typename acc_t>
struct Axis {
  std::vector<int64_t> i0, i1;
  std::vector<acc_t> l1;
  Axis(int64_t out_size, int64_t in_size, int64_t s) : i0(out_size), i1(out_size), l1(out_size) {
    for (int64_t o = 0; o < out_size; ++o) source_index<acc_t>(o, in_size, s, i0[o], i1[o], l1[o]);
  }
};

// The adjoint of one axis in compressed rows: for input sample i, the output
// coordinates first[i]..first[i+1] that read it, with their weights.
template <typename acc_t>
struct AxisAdjoint {
  std::vector<int64_t> start, dst;
  std::vector<acc_t> weight;
  AxisAdjoint(int64_t out_size, int64_t in_size, int64_t s) : start(in_size + 1, 0) {
    for (int64_t i = 0; i < in_size; ++i) {
      for (int64_t o = adjoint_first(i, s); o < adjoint_last(i, s, out_size); ++o) {
        const acc_t wgt = adjoint_weight<acc_t>(o, i, in_size, s);
        if (wgt != acc_t(0)) {
          dst.push_back(o);
          weight.push_back(wgt);
        }
      }
      start[i + 1] = static_cast<int64_t>(dst.size());
    }
  }
};

inline int64_t row_of(const int64_t* idx, int64_t n) { return idx ? idx[n] : n; }

at::Tensor synthesize_cpu(const at::Tensor& addresses, const at::Tensor& bases,
                          const c10::optional<at::Tensor>& index, int64_t scale) {
  const Geometry g = make_geometry(addresses, bases, index, scale);
  const at::Tensor A = addresses.contiguous();
  const at::Tensor B = bases.contiguous();
  const at::Tensor idx = index.has_value() ? index->contiguous() : at::Tensor();
  at::Tensor out = at::empty({g.N, g.C, g.H, g.W}, A.options());
  if (g.N == 0) return out;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "synthesize_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* a = A.const_data_ptr<scalar_t>();
    const scalar_t* b = B.const_data_ptr<scalar_t>();
    const int64_t* ix = idx.defined() ? idx.const_data_ptr<int64_t>() : nullptr;
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const Axis<acc_t> ay(g.H, g.h, g.s), ax(g.W, g.w, g.s);
    const int64_t grain = std::max<int64_t>(1, 65536 / (g.K * g.D + g.C * g.H * g.W));

    at::parallel_for(0, g.N, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> low(g.D);
      for (int64_t n = begin; n < end; ++n) {
        const scalar_t* arow = a + row_of(ix, n) * g.K;
        std::fill(low.begin(), low.end(), acc_t(0));
        for (int64_t k = 0; k < g.K; ++k) {
          const acc_t coef = static_cast<acc_t>(arow[k]);
          const scalar_t* bk = b + k * g.D;
          for (int64_t d = 0; d < g.D; ++d) low[d] += coef * static_cast<acc_t>(bk[d]);
        }
        scalar_t* on = o + n * g.C * g.H * g.W;
        for (int64_t c = 0; c < g.C; ++c) {
          const acc_t* lc = low.data() + c * g.h * g.w;
          for (int64_t Y = 0; Y < g.H; ++Y) {
            const acc_t* r0 = lc + ay.i0[Y] * g.w;
            const acc_t* r1 = lc + ay.i1[Y] * g.w;
            const acc_t ly = ay.l1[Y];
            scalar_t* orow = on + (c * g.H + Y) * g.W;
            for (int64_t X = 0; X < g.W; ++X) {
              const int64_t x0 = ax.i0[X], x1 = ax.i1[X];
              const acc_t lx = ax.l1[X];
              const acc_t top = (acc_t(1) - lx) * r0[x0] + lx * r0[x1];
              const acc_t bottom = (acc_t(1) - lx) * r1[x0] + lx * r1[x1];
              orow[X] = static_cast<scalar_t>((acc_t(1) - ly) * top + ly * bottom);
            }
          }
        }
      }
    });
  });
  return out;
}

// Deterministic backward: the low-resolution pixels are cut into fixed chunks,
// each chunk reduces grad_bases over all rows in order and leaves its share of
// each row's address gradient in `partial`, which is then summed in chunk order.
std::tuple<at::Tensor, at::Tensor> synthesize_backward_cpu(const at::Tensor& grad_out,
                                                           const at::Tensor& addresses,
                                                           const at::Tensor& bases,
                                                           const c10::optional<at::Tensor>& index,
                                                           int64_t scale) {
  const Geometry g = make_geometry(addresses, bases, index, scale);
  check_grad(grad_out, addresses, g);
  const at::Tensor G = grad_out.contiguous();
  const at::Tensor A = addresses.contiguous();
  const at::Tensor B = bases.contiguous();
  const at::Tensor idx = index.has_value() ? index->contiguous() : at::Tensor();
  at::Tensor grad_bases = at::empty_like(B);
  at::Tensor grad_addresses;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "synthesize_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int64_t kChunk = 256;
    const int64_t chunks = (g.D + kChunk - 1) / kChunk;
    const scalar_t* go = G.const_data_ptr<scalar_t>();
    const scalar_t* a = A.const_data_ptr<scalar_t>();
    const scalar_t* b = B.const_data_ptr<scalar_t>();
    const int64_t* ix = idx.defined() ? idx.const_data_ptr<int64_t>() : nullptr;
    scalar_t* gb = grad_bases.mutable_data_ptr<scalar_t>();
    std::vector<acc_t> partial(chunks * g.N * g.K);
    const AxisAdjoint<acc_t> ay(g.H, g.h, g.s), ax(g.W, g.w, g.s);

    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> gl(kChunk), gbk(g.K * kChunk);
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        const int64_t d0 = chunk * kChunk, np = std::min(kChunk, g.D - d0);
        std::fill(gbk.begin(), gbk.end(), acc_t(0));
        for (int64_t n = 0; n < g.N; ++n) {
          // The low-resolution gradient of row n on this chunk: the adjoint of
          // the upsampling, gathered from grad_out.
          const scalar_t* gn = go + n * g.C * g.H * g.W;
          for (int64_t p = 0; p < np; ++p) {
            const int64_t d = d0 + p, x = d % g.w, y = (d / g.w) % g.h, c = d / (g.w * g.h);
            acc_t v = 0;
            for (int64_t i = ay.start[y]; i < ay.start[y + 1]; ++i) {
              const scalar_t* grow = gn + (c * g.H + ay.dst[i]) * g.W;
              acc_t vr = 0;
              for (int64_t j = ax.start[x]; j < ax.start[x + 1]; ++j)
                vr += ax.weight[j] * static_cast<acc_t>(grow[ax.dst[j]]);
              v += ay.weight[i] * vr;
            }
            gl[p] = v;
          }
          const scalar_t* arow = a + row_of(ix, n) * g.K;
          acc_t* part = partial.data() + (chunk * g.N + n) * g.K;
          for (int64_t k = 0; k < g.K; ++k) {
            const acc_t coef = static_cast<acc_t>(arow[k]);
            const scalar_t* bk = b + k * g.D + d0;
            acc_t* gk = gbk.data() + k * kChunk;
            acc_t dot = 0;
            for (int64_t p = 0; p < np; ++p) {
              gk[p] += coef * gl[p];
              dot += gl[p] * static_cast<acc_t>(bk[p]);
            }
            part[k] = dot;
          }
        }
        for (int64_t k = 0; k < g.K; ++k)
          for (int64_t p = 0; p < np; ++p) gb[k * g.D + d0 + p] = static_cast<scalar_t>(gbk[k * kChunk + p]);
      }
    });

    // Each row's address gradient, summed over chunks in order, then added to
    // its address row in row order (repeated rows accumulate).
    std::vector<acc_t> ga(g.R * g.K, acc_t(0));
    for (int64_t n = 0; n < g.N; ++n) {
      acc_t* dst = ga.data() + row_of(ix, n) * g.K;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        const acc_t* part = partial.data() + (chunk * g.N + n) * g.K;
        for (int64_t k = 0; k < g.K; ++k) dst[k] += part[k];
      }
    }
    grad_addresses = at::empty_like(A);
    scalar_t* gap = grad_addresses.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < g.R * g.K; ++i) gap[i] = static_cast<scalar_t>(ga[i]);
  });
  return {grad_addresses, grad_bases};
}

}  // namespace

TORCH_LIBRARY(addrmem, m) {
  m.def("synthesize(Tensor addresses, Tensor bases, Tensor? index, int scale) -> Tensor");
  m.def(
      "synthesize_backward(Tensor grad, Tensor addresses, Tensor bases, Tensor? index, int scale)"
      " -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(addrmem, CPU, m) {
  m.impl("synthesize", &synthesize_cpu);
  m.impl("synthesize_backward", &synthesize_backward_cpu);
}

}  // namespace addrmem

// Importing addrmem._C loads this library, whose static initialisers register
// the op; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
