// addrmem::synthesize: the op's schema, its CPU kernels and its autograd.
//
//   out[n] = upsample_s( sum_k addresses[index[n], k] * bases[k] )
//
// with upsample_s = F.interpolate(scale_factor=s, mode="bilinear",
// align_corners=False). The CUDA kernels for the same schema are in
// synthesize_cuda.cu; the fake (meta) kernels and the Python wrapper are in
// addrmem/ops.py.
//
// The CPU kernels work on blocks of rows fixed by the shape alone (never by
// the thread count):
//   forward:  low = A_rows @ B (a BLAS GEMM) into a block buffer that stays
//             in cache (at scale 1 in float/double, straight into the
//             output), then the separable upsampling: every low-resolution
//             line is widened once, then every output row blends two widened
//             rows;
//   backward: the adjoint of those two steps folds the output gradient into
//             a block buffer G_low (at scale 1 in float/double, the output
//             gradient itself), then grad_rows = G_low @ B^T and this block's
//             share of grad_B = A_rows^T @ G_low: in one pass over G_low with
//             up to 16 bases on rows of 256 values or more (fused_backward),
//             otherwise as two BLAS GEMMs; grad_B is summed over at most 8
//             fixed chunks of blocks, in chunk order.
// Every BLAS call runs on one thread (parallel_blocks) and every sum in an
// order fixed by the shapes, so results are bit-identical whatever the number
// of threads. The loops are unit-stride, with the taps and weights of each
// axis computed once per call, so the compiler vectorises them; float16 and
// bfloat16 are converted to float on the way in and accumulate in float.
#include <Python.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <vector>

#include "synthesize.h"

namespace addrmem {
namespace {

// One axis of the upsampling. Output coordinate X reads inputs i0[X] and i1[X]
// with weights l0[X] and l1[X] (exactly source_index's taps). Away from the
// ends, the taps are (x-1, x) where low[X] is 1 and (x, x+1) where it is 0,
// for x = X / s. l0, l1 and low are repeated for `reps` consecutive lines, so
// the widening and its adjoint run over many short lines at once as one
// long, vectorised loop.
template <typename acc_t>
struct Axis {
  int64_t in = 0, out = 0, s = 1, reps = 0;
  std::vector<int64_t> i0, i1;
  std::vector<acc_t> l0, l1, low;

  Axis() = default;

  Axis(int64_t out_size, int64_t in_size, int64_t scale)
      : in(in_size), out(out_size), s(scale), reps(std::max<int64_t>(1, 512 / out_size)), i0(out_size),
        i1(out_size), l0(reps * out_size), l1(reps * out_size), low(reps * out_size) {
    for (int64_t X = 0; X < out_size; ++X) {
      source_index<acc_t>(X, in_size, scale, i0[X], i1[X], l1[X]);
      l0[X] = acc_t(1) - l1[X];
      low[X] = i0[X] < X / scale ? acc_t(1) : acc_t(0);
    }
    for (auto* v : {&l0, &l1, &low})
      for (int64_t e = out_size; e < reps * out_size; ++e) (*v)[e] = (*v)[e - out_size];
  }
};

// Compiled for AVX-512, AVX2 and baseline x86-64, picked at load time (GCC's
// and Clang's function multi-versioning); elsewhere compiled once.
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define ADDRMEM_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ADDRMEM_MULTIVERSION
#endif
// Helpers inlined into each version of their caller.
#if defined(__GNUC__) || defined(__clang__)
#define ADDRMEM_INLINE inline __attribute__((always_inline))
#else
#define ADDRMEM_INLINE inline
#endif

// The scale as a compile-time constant S for the common factors 2, 3 and 4
// (so the loops over a line's s columns unroll and vectorise), or 0: read it
// from the axis.
template <int S, typename acc_t>
inline int64_t factor(const Axis<acc_t>& ax) {
  return S ? S : ax.s;
}

// Widens `lines` consecutive lines of ax.in samples (t) to lines of ax.out (o):
// interior columns by the select of their two taps (so every output reads only
// its own taps, as F.interpolate does: no 0 * inf), over many lines at once;
// then the columns of each line's first and last sample from the taps.
template <int S, typename acc_t>
ADDRMEM_MULTIVERSION void widen(const Axis<acc_t>& ax, const acc_t* __restrict__ t, acc_t* __restrict__ o,
                                int64_t lines) {
  const int64_t s = factor<S>(ax), in = ax.in, out = ax.out;
  const acc_t *__restrict__ l0 = ax.l0.data(), *__restrict__ l1 = ax.l1.data(), *__restrict__ low = ax.low.data();
  for (int64_t first = 0; first < lines; first += ax.reps) {
    const int64_t n = std::min(ax.reps, lines - first) * in;
    const acc_t* tl = t + first * in;
    acc_t* ol = o + first * out;
    for (int64_t x = 1; x < n - 1; ++x) {
      const acc_t a = tl[x - 1], b = tl[x], c = tl[x + 1];
      for (int64_t j = 0; j < s; ++j) {
        const int64_t X = s * x + j;
        const bool left = low[X] != acc_t(0);
        ol[X] = l0[X] * (left ? a : b) + l1[X] * (left ? b : c);
      }
    }
  }
  for (int64_t line = 0; line < lines; ++line) {
    const acc_t* tl = t + line * in;
    acc_t* ol = o + line * out;
    for (int64_t X = 0; X < s; ++X) ol[X] = l0[X] * tl[ax.i0[X]] + l1[X] * tl[ax.i1[X]];
    for (int64_t X = std::max(s, s * (in - 1)); X < out; ++X) ol[X] = l0[X] * tl[ax.i0[X]] + l1[X] * tl[ax.i1[X]];
  }
}

// Each column's products with its two weights, sent to its left, centre or
// right sample (selected, so that a zero weight never meets an inf).
template <typename acc_t>
ADDRMEM_INLINE void split_products(const acc_t* __restrict__ l0, const acc_t* __restrict__ l1,
                                   const acc_t* __restrict__ low, const acc_t* __restrict__ g,
                                   acc_t* __restrict__ to_left, acc_t* __restrict__ to_centre,
                                   acc_t* __restrict__ to_right, int64_t count) {
  for (int64_t X = 0; X < count; ++X) {
    const bool left = low[X] != acc_t(0);
    const acc_t p0 = l0[X] * g[X], p1 = l1[X] * g[X];
    to_left[X] = left ? p0 : acc_t(0);
    to_centre[X] = left ? p1 : p0;
    to_right[X] = left ? acc_t(0) : p1;
  }
}

// The adjoint of widen: folds `lines` lines of ax.out values (g) into lines of
// ax.in (t). Each column's two products go to its left, centre or right
// sample (split_products); sample x then sums
// the right parts of x-1's columns, the centre parts of its own and the left
// parts of x+1's. The first and last sample of each line are summed from the
// taps.
template <int S, typename acc_t>
ADDRMEM_MULTIVERSION void narrow(const Axis<acc_t>& ax, const acc_t* __restrict__ g, acc_t* __restrict__ t,
                                 int64_t lines) {
  const int64_t s = factor<S>(ax), in = ax.in, out = ax.out;
  const acc_t *l0 = ax.l0.data(), *l1 = ax.l1.data(), *low = ax.low.data();
  std::vector<acc_t> parts(3 * ax.reps * out);
  acc_t *to_left = parts.data(), *to_centre = to_left + ax.reps * out, *to_right = to_centre + ax.reps * out;
  for (int64_t first = 0; first < lines; first += ax.reps) {
    const int64_t n = std::min(ax.reps, lines - first) * in;
    const acc_t* gl = g + first * out;
    acc_t* __restrict__ tl = t + first * in;
    split_products(l0, l1, low, gl, to_left, to_centre, to_right, s * n);
    for (int64_t x = 1; x < n - 1; ++x) {
      acc_t v = 0;
      for (int64_t j = 0; j < s; ++j) v += to_right[s * (x - 1) + j] + to_centre[s * x + j] + to_left[s * (x + 1) + j];
      tl[x] = v;
    }
  }
  for (int64_t line = 0; line < lines; ++line) {
    const acc_t* gl = g + line * out;
    acc_t* tl = t + line * in;
    for (const int64_t x : {int64_t{0}, in - 1}) {
      acc_t v = 0;
      for (int64_t X = std::max<int64_t>(0, s * (x - 1)); X < std::min(out, s * (x + 2)); ++X) {
        if (ax.i0[X] == x) v += l0[X] * gl[X];
        if (ax.i1[X] == x) v += l1[X] * gl[X];
      }
      tl[x] = v;
    }
  }
}

// Output rows of `planes` planes: row Y of a plane blends rows i0[Y] and i1[Y]
// of its widened plane (`wide`, h x W each).
template <typename scalar_t, typename acc_t>
ADDRMEM_MULTIVERSION void blend(const Axis<acc_t>& ay, int64_t W, const acc_t* __restrict__ wide,
                                scalar_t* __restrict__ out, int64_t planes) {
  for (int64_t p = 0; p < planes; ++p) {
    const acc_t* wp = wide + p * ay.in * W;
    for (int64_t Y = 0; Y < ay.out; ++Y) {
      const acc_t* __restrict__ r0 = wp + ay.i0[Y] * W;
      const acc_t* __restrict__ r1 = wp + ay.i1[Y] * W;
      const acc_t w0 = ay.l0[Y], w1 = ay.l1[Y];
      scalar_t* __restrict__ o = out + (p * ay.out + Y) * W;
      for (int64_t X = 0; X < W; ++X) o[X] = static_cast<scalar_t>(w0 * r0[X] + w1 * r1[X]);
    }
  }
}

// Its adjoint: each output row of `planes` planes of grad added into its two
// rows of `folded` (h x W per plane).
template <typename scalar_t, typename acc_t>
ADDRMEM_MULTIVERSION void unblend(const Axis<acc_t>& ay, int64_t W, const scalar_t* __restrict__ grad,
                                  acc_t* __restrict__ folded, int64_t planes) {
  std::fill(folded, folded + planes * ay.in * W, acc_t(0));
  for (int64_t p = 0; p < planes; ++p) {
    acc_t* fp = folded + p * ay.in * W;
    for (int64_t Y = 0; Y < ay.out; ++Y) {
      acc_t* __restrict__ f0 = fp + ay.i0[Y] * W;
      acc_t* __restrict__ f1 = fp + ay.i1[Y] * W;
      const acc_t w0 = ay.l0[Y], w1 = ay.l1[Y];
      const scalar_t* __restrict__ g = grad + (p * ay.out + Y) * W;
      for (int64_t X = 0; X < W; ++X) f0[X] += w0 * static_cast<acc_t>(g[X]);
      for (int64_t X = 0; X < W; ++X) f1[X] += w1 * static_cast<acc_t>(g[X]);
    }
  }
}

// Element-wise conversion (scale 1 with half types; the compiler vectorises it).
template <typename dst_t, typename src_t>
ADDRMEM_MULTIVERSION void convert(const src_t* __restrict__ src, dst_t* __restrict__ dst, int64_t count) {
  for (int64_t e = 0; e < count; ++e) dst[e] = static_cast<dst_t>(src[e]);
}

// Calls f.template operator()<S>() with the scale as a constant where it is 2, 3 or 4.
template <typename F>
void with_factor(int64_t s, F&& f) {
  switch (s) {
    case 2: return f.template operator()<2>();
    case 3: return f.template operator()<3>();
    case 4: return f.template operator()<4>();
    default: return f.template operator()<0>();
  }
}

// Rows per block. A block buffer (of low-resolution images or gradients)
// stays within about 256 KB, in cache for the GEMMs that read it. The forward
// without one (scale 1 in float or double: the GEMM writes the output itself)
// cuts the rows into at most 8 blocks of at least 512 rows instead (each BLAS
// call costs a few microseconds, which the digits job's small GEMMs feel).
inline int64_t block_rows(const Geometry& g, bool large) {
  if (large) return std::max<int64_t>(512, (g.N + 7) / 8);
  return std::clamp<int64_t>(65536 / g.D, 8, 256);
}

// The op's GEMMs, on blocks of rows, go to the BLAS through ATen (at::mm_out,
// addmm_). Each call must run on one thread: the BLAS may split a GEMM's sums
// over its threads, so that they would change with the thread count. Inside
// a parallel region it does run on one thread, and parallel_blocks makes sure
// every call is made there or with a single thread.

// A (rows, cols) matrix over `data`, with rows `ld` apart (no copy).
template <typename T>
at::Tensor matrix(const T* data, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<T*>(data), {rows, cols}, {ld, 1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// at::parallel_for over tasks [0, tasks), with f(begin, end) called on
// consecutive ranges. With more than one thread it always opens a parallel
// region, even for one task, which at::parallel_for would run inline, where
// the BLAS could thread over that task's GEMMs.
template <typename F>
void parallel_blocks(int64_t tasks, const F& f) {
  at::parallel_for(0, std::max<int64_t>(tasks, 2), 1, [&](int64_t begin, int64_t end) {
    if (begin < tasks) f(begin, std::min(end, tasks));
  });
}

// With more than 16 bases the forward and grad_rows = G_low @ B^T run in
// addrmem's own register tiles (gemm_rows_bases), faster than the BLAS there
// (issue 18, on Zen 4); each output element is summed over k in order.
inline bool own_tiles(const Geometry& g) { return g.K > 16; }

// Columns [d0, d0 + COLS) of rows a[0..ROWS) of gemm_rows_bases, with the
// accumulators in registers; rows q >= nr repeat a valid row and are not stored.
template <int64_t ROWS, int64_t COLS, typename acc_t>
ADDRMEM_INLINE void rows_bases_tile(const acc_t* const* a, const acc_t* __restrict__ B, acc_t* __restrict__ out,
                                    int64_t nr, int64_t K, int64_t D, int64_t d0) {
  acc_t acc[ROWS][COLS] = {};
  for (int64_t k = 0; k < K; ++k) {
    const acc_t* b = B + k * D + d0;
    for (int64_t q = 0; q < ROWS; ++q)
      for (int64_t d = 0; d < COLS; ++d) acc[q][d] += a[q][k] * b[d];
  }
  for (int64_t q = 0; q < std::min(ROWS, nr); ++q)
    for (int64_t d = 0; d < COLS; ++d) out[q * D + d0 + d] = acc[q][d];
}

// out (n, D) = rows (n, K) @ B (K, D); each element summed over k in order.
// Tiles of 8 rows by 32, 16 or 8 columns, or 4 rows by 64 (16 vector
// registers of accumulators with AVX-512 floats), then single columns.
template <typename acc_t>
ADDRMEM_MULTIVERSION void gemm_rows_bases(const acc_t* __restrict__ rows, const acc_t* __restrict__ B,
                                          acc_t* __restrict__ out, int64_t n, int64_t K, int64_t D) {
  for (int64_t i0 = 0; i0 < n; i0 += 8) {
    const int64_t nr = std::min<int64_t>(8, n - i0);
    const acc_t* a[8];  // a partial tile repeats its last row
    for (int64_t q = 0; q < 8; ++q) a[q] = rows + (i0 + std::min(q, nr - 1)) * K;
    acc_t* o = out + i0 * D;
    int64_t d0 = 0;
    for (; d0 + 64 <= D; d0 += 64) {
      rows_bases_tile<4, 64>(a, B, o, nr, K, D, d0);
      if (nr > 4) rows_bases_tile<4, 64>(a + 4, B, o + 4 * D, nr - 4, K, D, d0);
    }
    for (; d0 + 32 <= D; d0 += 32) rows_bases_tile<8, 32>(a, B, o, nr, K, D, d0);
    for (; d0 + 16 <= D; d0 += 16) rows_bases_tile<8, 16>(a, B, o, nr, K, D, d0);
    for (; d0 + 8 <= D; d0 += 8) rows_bases_tile<8, 8>(a, B, o, nr, K, D, d0);
    for (; d0 < D; ++d0) rows_bases_tile<8, 1>(a, B, o, nr, K, D, d0);
  }
}

// Whether the backward forms both gradients in one pass over G_low
// (fused_backward): with few bases both GEMMs are bound by reading G_low,
// which the BLAS would read twice, and the BLAS handles their few output
// columns poorly (issue 18). With more bases they are bound by arithmetic,
// where the BLAS is faster, and with short rows (D < 256) the fused kernel's
// per-row sums over vector lanes cost more than they save.
inline bool fuse_backward(const Geometry& g) { return g.K <= 16 && g.D >= 256; }

// Rows g[0..ROWS) of fused_backward, for bases [k0, k0 + KT): each row's
// gradients summed in the lanes of one 64-byte vector over d (the lanes in
// order at the end), and P[k] += a[0][k] * g[0] + a[1][k] * g[1] + ..., in
// row order. GCC's and Clang's vector extensions, so that the accumulators
// stay in registers.
template <int ROWS, int KT, typename acc_t>
ADDRMEM_INLINE void fused_tile(const acc_t* const* g, const acc_t* const* a, const acc_t* __restrict__ B,
                               acc_t* __restrict__ P, acc_t* const* gr, int64_t k0, int64_t D) {
  typedef acc_t vec __attribute__((vector_size(64), aligned(sizeof(acc_t))));  // any alignment
  constexpr int64_t V = 64 / sizeof(acc_t);
  acc_t x[ROWS][KT];
  for (int q = 0; q < ROWS; ++q)
    for (int k = 0; k < KT; ++k) x[q][k] = a[q][k0 + k];
  const acc_t* __restrict__ Bk = B + k0 * D;
  acc_t* __restrict__ Pk = P + k0 * D;
  vec acc[ROWS][KT] = {};
  int64_t d0 = 0;
  for (; d0 + V <= D; d0 += V) {
    vec gv[ROWS];
    for (int q = 0; q < ROWS; ++q) gv[q] = *reinterpret_cast<const vec*>(g[q] + d0);
    for (int k = 0; k < KT; ++k) {
      const vec b = *reinterpret_cast<const vec*>(Bk + k * D + d0);
      vec* p = reinterpret_cast<vec*>(Pk + k * D + d0);
      vec v = *p;
      for (int q = 0; q < ROWS; ++q) {
        acc[q][k] += gv[q] * b;
        v += x[q][k] * gv[q];
      }
      *p = v;
    }
  }
  for (int q = 0; q < ROWS; ++q)
    for (int k = 0; k < KT; ++k) {
      acc_t v = 0;
      for (int64_t j = 0; j < V; ++j) v += acc[q][k][j];
      for (int64_t d = d0; d < D; ++d) {
        v += g[q][d] * Bk[k * D + d];
        Pk[k * D + d] += x[q][k] * g[q][d];
      }
      gr[q][k0 + k] = v;
    }
}

// Rows g[0..ROWS) of fused_backward, over all bases in tiles of 4 (so that
// the accumulators fit in registers); each row of G is read from L1 once
// per tile.
template <int ROWS, typename acc_t>
ADDRMEM_INLINE void fused_rows(const acc_t* const* g, const acc_t* const* a, const acc_t* B, acc_t* P,
                               acc_t* const* gr, int64_t K, int64_t D) {
  for (int64_t k0 = 0; k0 < K; k0 += 4) {
    switch (std::min<int64_t>(4, K - k0)) {
      case 1: fused_tile<ROWS, 1>(g, a, B, P, gr, k0, D); break;
      case 2: fused_tile<ROWS, 2>(g, a, B, P, gr, k0, D); break;
      case 3: fused_tile<ROWS, 3>(g, a, B, P, gr, k0, D); break;
      default: fused_tile<ROWS, 4>(g, a, B, P, gr, k0, D);
    }
  }
}

// grad_rows (n, K) = G (n, D) @ B^T and P (K, D) += rows (n, K)^T @ G in one
// pass over G, 4 rows at a time (B and P pass through L1 once per 4 rows).
template <typename acc_t>
ADDRMEM_MULTIVERSION void fused_backward(const acc_t* G, const acc_t* rows, const acc_t* B, acc_t* P, acc_t* gr,
                                         int64_t n, int64_t K, int64_t D) {
  for (int64_t i = 0; i < n; i += 4) {
    const acc_t *g[4], *a[4];
    acc_t* o[4];
    for (int64_t q = 0; q < 4; ++q) {
      const int64_t row = i + std::min<int64_t>(q, n - 1 - i);
      g[q] = G + row * D, a[q] = rows + row * K, o[q] = gr + row * K;
    }
    switch (std::min<int64_t>(4, n - i)) {
      case 1: fused_rows<1>(g, a, B, P, o, K, D); break;
      case 2: fused_rows<2>(g, a, B, P, o, K, D); break;
      case 3: fused_rows<3>(g, a, B, P, o, K, D); break;
      default: fused_rows<4>(g, a, B, P, o, K, D);
    }
  }
}

// Rows of addresses [n0, n0 + nb) (through the index), converted to acc_t.
template <typename scalar_t, typename acc_t>
void gather_rows(const scalar_t* a, const int64_t* idx, const Geometry& g, int64_t n0, int64_t nb, acc_t* dst) {
  for (int64_t i = 0; i < nb; ++i) {
    const scalar_t* row = a + (idx ? idx[n0 + i] : n0 + i) * g.K;
    for (int64_t k = 0; k < g.K; ++k) dst[i * g.K + k] = static_cast<acc_t>(row[k]);
  }
}

// The bases as a contiguous (K, D) acc_t tensor (a copy only for half types).
at::Tensor bases_in_acc(const at::Tensor& B, const Geometry& g) {
  const auto acc = at::toOpMathType(B.scalar_type());
  return B.reshape({g.K, g.D}).to(acc).contiguous();
}

// The two axes of the upsampling (rows, columns); unused, and left empty, at scale 1.
template <typename acc_t>
std::pair<Axis<acc_t>, Axis<acc_t>> axes(const Geometry& g) {
  if (g.s == 1) return {Axis<acc_t>(), Axis<acc_t>()};
  return {Axis<acc_t>(g.H, g.h, g.s), Axis<acc_t>(g.W, g.w, g.s)};
}

// The index, checked in range: an IndexError, as for PyTorch's own indexing.
at::Tensor checked_index(const c10::optional<at::Tensor>& index, const Geometry& g) {
  if (!index.has_value()) return at::Tensor();
  at::Tensor idx = index->contiguous();
  const int64_t* ix = idx.const_data_ptr<int64_t>();
  for (int64_t n = 0; n < g.N; ++n)
    TORCH_CHECK_INDEX(ix[n] >= 0 && ix[n] < g.R, "addrmem::synthesize: index[", n, "] = ", ix[n],
                      " is out of range for ", g.R, " address rows");
  return idx;
}

at::Tensor synthesize_cpu(const at::Tensor& addresses, const at::Tensor& bases,
                          const c10::optional<at::Tensor>& index, int64_t scale) {
  const Geometry g = make_geometry(addresses, bases, index, scale);
  const at::RecordFunctionGuard one_op(false);  // profiles show the op, not the ATen calls inside it
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // the GEMMs go straight to their CPU kernels
  const at::Tensor A = addresses.contiguous();
  const at::Tensor idx = checked_index(index, g);
  at::Tensor out = at::empty({g.N, g.C, g.H, g.W}, A.options());
  if (g.N == 0) return out;
  const at::Tensor Bacc = bases_in_acc(bases, g);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "synthesize_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr bool same = std::is_same_v<acc_t, scalar_t>;
    const scalar_t* a = A.const_data_ptr<scalar_t>();
    const int64_t* ix = idx.defined() ? idx.const_data_ptr<int64_t>() : nullptr;
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    // At scale 1 in float/double the GEMM writes the output itself, and
    // without an index it reads the addresses in place.
    const bool direct = same && g.s == 1, in_place = same && !ix;
    const int64_t nb_max = block_rows(g, direct), blocks = (g.N + nb_max - 1) / nb_max;
    const auto [ay, ax] = axes<acc_t>(g);

    parallel_blocks(blocks, [&](int64_t begin, int64_t end) {
      const auto acc = A.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
      const at::Tensor rows = in_place ? at::Tensor() : at::empty({nb_max, g.K}, acc);
      const at::Tensor low = direct ? at::Tensor() : at::empty({nb_max, g.D}, acc);
      std::vector<acc_t> wide(g.s > 1 ? nb_max * g.C * g.h * g.W : 0);
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t n0 = blk * nb_max, nb = std::min(nb_max, g.N - n0);
        const acc_t* r = reinterpret_cast<const acc_t*>(a + n0 * g.K);
        if (!in_place) {
          gather_rows(a, ix, g, n0, nb, rows.mutable_data_ptr<acc_t>());
          r = rows.const_data_ptr<acc_t>();
        }
        acc_t* lo = direct ? reinterpret_cast<acc_t*>(o + n0 * g.D) : low.mutable_data_ptr<acc_t>();
        if (own_tiles(g)) {
          gemm_rows_bases(r, Bacc.const_data_ptr<acc_t>(), lo, nb, g.K, g.D);
        } else {
          at::Tensor lo_m = matrix(lo, nb, g.D, g.D);
          at::mm_out(lo_m, matrix(r, nb, g.K, g.K), Bacc);
        }
        scalar_t* ob = o + n0 * g.C * g.H * g.W;
        if (direct) continue;
        if (g.s == 1) {
          convert(lo, ob, nb * g.D);
          continue;
        }
        with_factor(g.s, [&]<int S>() { widen<S>(ax, lo, wide.data(), nb * g.C * g.h); });
        blend(ay, g.W, wide.data(), ob, nb * g.C);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> synthesize_backward_cpu(const at::Tensor& grad_out,
                                                           const at::Tensor& addresses,
                                                           const at::Tensor& bases,
                                                           const c10::optional<at::Tensor>& index,
                                                           int64_t scale, std::array<bool, 2> output_mask) {
  const Geometry g = make_geometry(addresses, bases, index, scale);
  check_grad(grad_out, addresses, g);
  const at::RecordFunctionGuard one_op(false);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const bool want_a = output_mask[0], want_b = output_mask[1];
  const at::Tensor G = grad_out.contiguous();
  const at::Tensor A = addresses.contiguous();
  const at::Tensor idx = checked_index(index, g);
  const auto acc_type = at::toOpMathType(A.scalar_type());
  const bool same = acc_type == A.scalar_type();
  at::Tensor grad_addresses = A.new_empty({0});
  at::Tensor grad_bases = want_b ? at::empty({g.K, g.C, g.h, g.w}, A.options()) : A.new_empty({0});
  if (g.N == 0) {
    if (want_b) grad_bases.zero_();
    return {want_a ? at::zeros({g.R, g.K}, A.options()) : grad_addresses, grad_bases};
  }
  const at::Tensor Bacc = want_a ? bases_in_acc(bases, g) : at::Tensor();
  const at::Tensor Bt = want_a && own_tiles(g) ? Bacc.t().contiguous() : at::Tensor();  // (D, K) for the tiles
  // At scale 1 in float/double the output gradient is G_low itself.
  const bool direct = g.s == 1 && same;
  const int64_t nb_max = block_rows(g, false), blocks = (g.N + nb_max - 1) / nb_max;
  // Blocks are taken in up to 8 chunks of consecutive blocks (fewer if their
  // grad_B partial sums would pass 2^24 values); grad_B is summed over chunks
  // in order.
  const int64_t chunks = std::min<int64_t>({blocks, 8, want_b ? std::max<int64_t>(1, (1 << 24) / (g.K * g.D)) : 8});
  // Without an index, in float/double, grad_rows is grad_addresses itself.
  at::Tensor grad_rows = want_a ? at::empty({g.N, g.K}, A.options().dtype(acc_type)) : at::Tensor();
  at::Tensor partial = want_b ? at::empty({chunks, g.K, g.D}, A.options().dtype(acc_type)) : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "synthesize_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* go = G.const_data_ptr<scalar_t>();
    const scalar_t* a = A.const_data_ptr<scalar_t>();
    const int64_t* ix = idx.defined() ? idx.const_data_ptr<int64_t>() : nullptr;
    const bool in_place = same && !ix, fused = want_a && want_b && fuse_backward(g);
    const auto [ay, ax] = axes<acc_t>(g);
    acc_t* part = want_b ? partial.mutable_data_ptr<acc_t>() : nullptr;
    acc_t* gr = want_a ? grad_rows.mutable_data_ptr<acc_t>() : nullptr;

    parallel_blocks(chunks, [&](int64_t begin, int64_t end) {
      const auto acc = A.options().dtype(acc_type);
      const at::Tensor rows = want_b && !in_place ? at::empty({nb_max, g.K}, acc) : at::Tensor();
      const at::Tensor low = direct ? at::Tensor() : at::empty({nb_max, g.D}, acc);
      std::vector<acc_t> folded(g.s > 1 ? nb_max * g.C * g.h * g.W : 0);
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        const int64_t first = chunk * blocks / chunks, last = (chunk + 1) * blocks / chunks;
        acc_t* part_c = want_b ? part + chunk * g.K * g.D : nullptr;
        at::Tensor P = want_b && !fused ? matrix(part_c, g.K, g.D, g.D) : at::Tensor();
        for (int64_t blk = first; blk < last; ++blk) {
          const int64_t n0 = blk * nb_max, nb = std::min(nb_max, g.N - n0);
          const scalar_t* gblk = go + n0 * g.C * g.H * g.W;
          const acc_t* gl = reinterpret_cast<const acc_t*>(gblk);
          if (!direct) {
            acc_t* l = low.mutable_data_ptr<acc_t>();
            if (g.s == 1) convert(gblk, l, nb * g.D);
            else {
              unblend(ay, g.W, gblk, folded.data(), nb * g.C);
              with_factor(g.s, [&]<int S>() { narrow<S>(ax, folded.data(), l, nb * g.C * g.h); });
            }
            gl = l;
          }
          const acc_t* r = reinterpret_cast<const acc_t*>(a + n0 * g.K);
          if (want_b && !in_place) {
            gather_rows(a, ix, g, n0, nb, rows.mutable_data_ptr<acc_t>());
            r = rows.const_data_ptr<acc_t>();
          }
          if (fused) {
            if (blk == first) std::fill(part_c, part_c + g.K * g.D, acc_t(0));
            fused_backward(gl, r, Bacc.const_data_ptr<acc_t>(), part_c, gr + n0 * g.K, nb, g.K, g.D);
            continue;
          }
          const at::Tensor G_low = matrix(gl, nb, g.D, g.D);
          if (want_a && own_tiles(g)) {
            gemm_rows_bases(gl, Bt.const_data_ptr<acc_t>(), gr + n0 * g.K, nb, g.D, g.K);
          } else if (want_a) {
            at::Tensor gr_m = matrix(gr + n0 * g.K, nb, g.K, g.K);
            at::mm_out(gr_m, G_low, Bacc.t());
          }
          if (want_b) {
            const at::Tensor rows_t = matrix(r, nb, g.K, g.K).t();
            if (blk == first) at::mm_out(P, rows_t, G_low);
            else P.addmm_(rows_t, G_low);
          }
        }
      }
    });

    if (want_b) {
      // Sum the chunks in order (columns in parallel: the order per element is fixed).
      const acc_t* pp = partial.const_data_ptr<acc_t>();
      scalar_t* gb = grad_bases.mutable_data_ptr<scalar_t>();
      const int64_t total = g.K * g.D;
      at::parallel_for(0, total, 4096, [&](int64_t begin, int64_t end) {
        for (int64_t e = begin; e < end; ++e) {
          acc_t v = pp[e];
          for (int64_t c = 1; c < chunks; ++c) v += pp[c * total + e];
          gb[e] = static_cast<scalar_t>(v);
        }
      });
    }
    if (want_a) {
      // Each row's gradient into its address row, in row order (repeats add up).
      if (in_place) {
        grad_addresses = grad_rows;
      } else {
        std::vector<acc_t> ga(g.R * g.K, acc_t(0));
        for (int64_t n = 0; n < g.N; ++n) {
          acc_t* dst = ga.data() + (ix ? ix[n] : n) * g.K;
          for (int64_t k = 0; k < g.K; ++k) dst[k] += gr[n * g.K + k];
        }
        grad_addresses = at::empty({g.R, g.K}, A.options());
        scalar_t* gap = grad_addresses.mutable_data_ptr<scalar_t>();
        for (int64_t e = 0; e < g.R * g.K; ++e) gap[e] = static_cast<scalar_t>(ga[e]);
      }
    }
  });
  return {grad_addresses, grad_bases};
}

// --- Autograd: the formulas, as C++ autograd Functions (one graph node per
// call, with no Python on the way; works for every device).

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_synthesize(const at::Tensor& addresses, const at::Tensor& bases,
                           const c10::optional<at::Tensor>& index, int64_t scale) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("addrmem::synthesize", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                                               int64_t)>();
  return op.call(addresses, bases, index, scale);
}

std::tuple<at::Tensor, at::Tensor> call_synthesize_backward(const at::Tensor& grad, const at::Tensor& addresses,
                                                            const at::Tensor& bases,
                                                            const c10::optional<at::Tensor>& index, int64_t scale,
                                                            std::array<bool, 2> output_mask) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("addrmem::synthesize_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                    const c10::optional<at::Tensor>&, int64_t, std::array<bool, 2>)>();
  return op.call(grad, addresses, bases, index, scale, output_mask);
}

c10::optional<at::Tensor> optional_of(const at::Tensor& t) { return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt; }

struct SynthesizeFunction : torch::autograd::Function<SynthesizeFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& addresses, const at::Tensor& bases,
                            const c10::optional<at::Tensor>& index, int64_t scale) {
    ctx->save_for_backward({addresses, bases, index.value_or(at::Tensor())});
    ctx->saved_data["scale"] = scale;
    at::AutoDispatchBelowADInplaceOrView below;
    return call_synthesize(addresses, bases, index, scale);
  }

  // d out / d (addresses, bases): the backward op, computing only what is needed.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const std::array<bool, 2> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1)};
    if (!grads[0].defined() || !(mask[0] || mask[1])) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    auto [ga, gb] = call_synthesize_backward(grads[0], saved[0], saved[1], optional_of(saved[2]),
                                             ctx->saved_data["scale"].toInt(), mask);
    return {mask[0] ? ga : at::Tensor(), mask[1] ? gb : at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

struct SynthesizeBackwardFunction : torch::autograd::Function<SynthesizeBackwardFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad, const at::Tensor& addresses,
                               const at::Tensor& bases, const c10::optional<at::Tensor>& index, int64_t scale,
                               std::array<bool, 2> output_mask) {
    ctx->save_for_backward({grad, addresses, bases, index.value_or(at::Tensor())});
    ctx->saved_data["scale"] = scale;
    at::AutoDispatchBelowADInplaceOrView below;
    auto [ga, gb] = call_synthesize_backward(grad, addresses, bases, index, scale, output_mask);
    return {ga, gb};
  }

  // synthesize_backward is bilinear: (grad, bases) -> grad_addresses and
  // (grad, addresses) -> grad_bases. Its derivatives are the op and its
  // backward again, with a cotangent in place of one argument; each backward
  // call computes only the output that is used.
  static variable_list backward(AutogradContext* ctx, variable_list cot) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &grad = saved[0], &addresses = saved[1], &bases = saved[2];
    const auto index = optional_of(saved[3]);
    const int64_t s = ctx->saved_data["scale"].toInt();
    const bool need_grad = ctx->needs_input_grad(0), need_a = ctx->needs_input_grad(1),
               need_b = ctx->needs_input_grad(2);
    at::Tensor d_grad, d_a, d_b;
    if (cot[0].defined() && cot[0].numel() > 0) {
      if (need_grad) d_grad = call_synthesize(cot[0], bases, index, s);
      if (need_b) d_b = std::get<1>(call_synthesize_backward(grad, cot[0], bases, index, s, {false, true}));
    }
    if (cot[1].defined() && cot[1].numel() > 0) {
      if (need_grad) {
        const at::Tensor term = call_synthesize(addresses, cot[1], index, s);
        d_grad = d_grad.defined() ? d_grad + term : term;
      }
      if (need_a) d_a = std::get<0>(call_synthesize_backward(grad, addresses, cot[1], index, s, {true, false}));
    }
    return {d_grad, d_a, d_b, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor synthesize_autograd(const at::Tensor& addresses, const at::Tensor& bases,
                               const c10::optional<at::Tensor>& index, int64_t scale) {
  return SynthesizeFunction::apply(addresses, bases, index, scale);
}

std::tuple<at::Tensor, at::Tensor> synthesize_backward_autograd(const at::Tensor& grad, const at::Tensor& addresses,
                                                                const at::Tensor& bases,
                                                                const c10::optional<at::Tensor>& index,
                                                                int64_t scale, std::array<bool, 2> output_mask) {
  const auto out = SynthesizeBackwardFunction::apply(grad, addresses, bases, index, scale, output_mask);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY(addrmem, m) {
  m.def("synthesize(Tensor addresses, Tensor bases, Tensor? index, int scale) -> Tensor");
  // output_mask: which of (grad_addresses, grad_bases) to compute; an output
  // not asked for is an empty tensor.
  m.def(
      "synthesize_backward(Tensor grad, Tensor addresses, Tensor bases, Tensor? index, int scale,"
      " bool[2] output_mask) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(addrmem, CPU, m) {
  m.impl("synthesize", &synthesize_cpu);
  m.impl("synthesize_backward", &synthesize_backward_cpu);
}

TORCH_LIBRARY_IMPL(addrmem, Autograd, m) {
  m.impl("synthesize", &synthesize_autograd);
  m.impl("synthesize_backward", &synthesize_backward_autograd);
}

}  // namespace addrmem

// Importing addrmem._C loads this library, whose static initialisers register
// the op; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
