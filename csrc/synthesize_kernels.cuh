// The CUDA kernels of addrmem::synthesize, their launch shapes and the host
// functions that launch them (called from synthesize_cuda.cu; schema and CPU
// kernels: synthesize.cpp). Free of ATen, so that tests/emulate_cuda.cpp runs
// the very same kernels and launch sequence as host code: each launch goes
// through a `launch(kernel, blocks, smem, args...)` functor that the .cu file
// and the emulator each define. All kernels use kThreads threads per block and
// a 1-D grid; indices inside a block are int32, offsets into global memory
// int64.
//
// Forward, one launch:
//  - scale 1, synthesize_flat_kernel: block = TN rows x kFlatTile consecutive
//    elements of the flattened (C*h*w) image; each thread owns kVec
//    consecutive elements for all TN rows (TN x kVec accumulators).
//  - scale > 1, synthesize_tiled_kernel: block = TN rows x one channel's tile
//    of 8 x 64 output pixels (16 x 32 for images at most 32 wide). Phase 1
//    forms the tile's low-resolution footprint (at most 6 x 34 or 10 x 18
//    pixels, at s = 2) for all TN rows in dynamic shared memory (<= 13 KB);
//    phase 2 upsamples it:
//    each thread owns a fixed output row and kVec fixed output columns, whose
//    taps it computes once, and loops over every other of the TN rows.
//    The low-resolution images never reach global memory.
//  Both write kVec outputs with one vector store when the row length and the
//  pointers allow it (checked at launch, a scalar path otherwise).
//
// Backward (the GEMMs run through ATen in synthesize_cuda.cu):
//  1. synthesize_adjoint_kernel (scale > 1): the adjoint of the upsampling,
//     separable, into the low-resolution gradient G_low (N, C*h*w) in the
//     accumulation type, for a chunk of rows at a time (backward_chunk_rows). Block = one (n, c) plane's tile of kLowY x kLowX
//     low-resolution pixels, one per thread (warp = row, lane = column). Per
//     chunk of kLowY output rows, each warp reduces one output row along x into
//     shared memory, then each thread reduces the chunk along y. The per-axis
//     adjoint weights are computed once per block into shared memory.
//  2. grad_rows = G_low . B^T and grad_bases (+)= A_rows^T . G_low: two GEMMs
//     per chunk.
//  3. With an index, the caller sorts it stably (ATen on the GPU), then
//     index_segments_kernel finds each address row's segment of the sorted
//     positions and index_rows_kernel (one thread per element of
//     grad_addresses) sums the row's gradients over its segment, in index
//     order: O(N log N) for the sort, O(N K) for the sums. No float atomics
//     anywhere: the backward is deterministic.
// Index ranges are checked in the kernels with device-side asserts
// (CUDA_KERNEL_ASSERT, as PyTorch's indexing kernels do).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "geometry.h"

// `name`: the kernel's dynamic shared memory as an array of T (the emulator
// defines a bound-checked one).
#ifndef ADDRMEM_DYNAMIC_SMEM
#define ADDRMEM_DYNAMIC_SMEM(T, name)                                   \
  extern __shared__ __align__(16) unsigned char name##_bytes[]; \
  T* const name = reinterpret_cast<T*>(name##_bytes)
#endif
// Called with every vector load or store address (the emulator checks alignment).
#ifndef ADDRMEM_CHECK_VECTOR
#define ADDRMEM_CHECK_VECTOR(ptr)
#endif

namespace addrmem {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Consecutive output elements per thread: one vector store when aligned.
constexpr int kVec = 4;
// Scale 1: flattened image elements per block.
constexpr int kFlatTile = kThreads * kVec;
// Scale > 1: output tile of one channel, TX columns (64, or 32 for images at
// most 32 wide) x tile_rows<TX>() rows, so that TX / kVec column groups x rows
// x kRowParities = kThreads threads in phase 2.
constexpr int kRowParities = 2;
template <int TX>
constexpr int tile_rows() {
  return kThreads * kVec / (TX * kRowParities);
}
// Bases whose coefficients are staged in shared memory at a time.
constexpr int kBaseChunk = 32;
// Adjoint tile: kLowY rows (one per warp) x kLowX columns (one per lane).
constexpr int kLowY = kWarps;
constexpr int kLowX = 32;

// Rows per block: fewer for double so that registers and shared memory stay
// within the same budget.
template <typename acc_t>
constexpr int rows_per_block() {
  return sizeof(acc_t) == 8 ? 8 : 16;
}

// kVec elements, aligned to their size: one 8-, 16- or (double: two) 16-byte
// access. Only used on addresses that are multiples of alignof(Vec<T>).
template <typename T>
struct alignas(sizeof(T) * kVec) Vec {
  T v[kVec];
};

// Vector i of a Vec-aligned row. Indexing in vectors, not elements, is what
// lets nvcc emit one 8- or 16-byte access (an element offset made it split a
// Vec copy into scalar accesses).
template <typename T>
__device__ __forceinline__ Vec<T>* vector_at(T* row, int64_t i) {
  Vec<T>* p = reinterpret_cast<Vec<T>*>(row) + i;
  ADDRMEM_CHECK_VECTOR(p);
  return p;
}
template <typename T>
__device__ __forceinline__ const Vec<T>* vector_at(const T* row, int64_t i) {
  const Vec<T>* p = reinterpret_cast<const Vec<T>*>(row) + i;
  ADDRMEM_CHECK_VECTOR(p);
  return p;
}

inline bool vector_aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

__host__ __device__ inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// rows[t] = the address row of synthesized row n0 + t (-1 past the end),
// written by threads t < TN; the caller synchronises before reading it.
template <int TN>
__device__ __forceinline__ void load_rows(int64_t* rows, const int64_t* idx, int64_t n0, const Geometry& g) {
  if (threadIdx.x < TN) {
    const int64_t n = n0 + threadIdx.x;
    int64_t r = -1;
    if (n < g.N) {
      r = idx ? idx[n] : n;
      CUDA_KERNEL_ASSERT(r >= 0 && r < g.R && "addrmem::synthesize: index out of range");
    }
    rows[threadIdx.x] = r;
  }
}

// coef[kk][t] = A[rows[t], k0 + kk] for kk < kc (0 elsewhere). Consecutive
// threads read consecutive coefficients of one row (coalesced).
template <typename scalar_t, typename acc_t, int TN>
__device__ __forceinline__ void stage_coef(acc_t (*coef)[TN], const int64_t* rows, const scalar_t* A, int64_t k0,
                                           int kc, int64_t K) {
  for (int e = threadIdx.x; e < kBaseChunk * TN; e += kThreads) {
    const int t = e / kBaseChunk, kk = e % kBaseChunk;
    const int64_t r = rows[t];
    coef[kk][t] = (kk < kc && r >= 0) ? static_cast<acc_t>(A[r * K + k0 + kk]) : acc_t(0);
  }
}

// Scale 1: out[n, p] = sum_k A[row n, k] B[k, p]. `vec`: D is a multiple of
// kVec and B and out are Vec-aligned, so every thread's kVec elements are one
// aligned vector in B's rows and in out's rows.
template <typename scalar_t, typename acc_t, int TN>
__global__ void __launch_bounds__(kThreads)
    synthesize_flat_kernel(const scalar_t* __restrict__ A, const scalar_t* __restrict__ B,
                           const int64_t* __restrict__ idx, scalar_t* __restrict__ out, Geometry g,
                           int64_t d_tiles, bool vec) {
  __shared__ acc_t coef[kBaseChunk][TN];
  __shared__ int64_t rows[TN];
  const int64_t n0 = (blockIdx.x / d_tiles) * TN;
  const int64_t p0 = (blockIdx.x % d_tiles) * kFlatTile;  // the tile's first element
  const int64_t p = p0 + threadIdx.x * kVec;
  load_rows<TN>(rows, idx, n0, g);

  acc_t acc[TN][kVec];
#pragma unroll
  for (int t = 0; t < TN; ++t)
#pragma unroll
    for (int v = 0; v < kVec; ++v) acc[t][v] = acc_t(0);
  for (int64_t k0 = 0; k0 < g.K; k0 += kBaseChunk) {
    const int kc = static_cast<int>(imin(kBaseChunk, g.K - k0));
    __syncthreads();  // rows[] written; the previous chunk's coef[] consumed
    stage_coef<scalar_t, acc_t, TN>(coef, rows, A, k0, kc, g.K);
    __syncthreads();
    if (p >= g.D) continue;
    for (int kk = 0; kk < kc; ++kk) {
      const scalar_t* bk = B + (k0 + kk) * g.D;
      acc_t b[kVec];
      if (vec) {
        const Vec<scalar_t> bv = *vector_at(bk + p0, threadIdx.x);
#pragma unroll
        for (int v = 0; v < kVec; ++v) b[v] = static_cast<acc_t>(bv.v[v]);
      } else {
#pragma unroll
        for (int v = 0; v < kVec; ++v) b[v] = p + v < g.D ? static_cast<acc_t>(bk[p + v]) : acc_t(0);
      }
#pragma unroll
      for (int t = 0; t < TN; ++t)
#pragma unroll
        for (int v = 0; v < kVec; ++v) acc[t][v] += coef[kk][t] * b[v];
    }
  }
  if (p >= g.D) return;
#pragma unroll
  for (int t = 0; t < TN; ++t) {
    if (n0 + t >= g.N) break;
    scalar_t* o = out + (n0 + t) * g.D;
    if (vec) {
      Vec<scalar_t> ov;
#pragma unroll
      for (int v = 0; v < kVec; ++v) ov.v[v] = static_cast<scalar_t>(acc[t][v]);
      *vector_at(o + p0, threadIdx.x) = ov;
    } else {
#pragma unroll
      for (int v = 0; v < kVec; ++v)
        if (p + v < g.D) o[p + v] = static_cast<scalar_t>(acc[t][v]);
    }
  }
}

// Low-resolution footprint [first, last] of output coordinates [a, b).
template <typename acc_t>
__host__ __device__ inline void footprint(int64_t a, int64_t b, int64_t in_size, int64_t s, int64_t& first,
                                          int64_t& last) {
  int64_t unused;
  acc_t l1;
  source_index<acc_t>(a, in_size, s, first, unused, l1);
  source_index<acc_t>(b - 1, in_size, s, unused, last, l1);
}

// The largest footprint over all tiles of one axis.
template <typename acc_t>
inline int64_t max_footprint(int64_t out_size, int64_t in_size, int64_t s, int64_t tile) {
  int64_t most = 0;
  for (int64_t a = 0; a < out_size; a += tile) {
    int64_t first, last;
    footprint<acc_t>(a, std::min(a + tile, out_size), in_size, s, first, last);
    most = std::max(most, last - first + 1);
  }
  return most;
}

// Scale > 1. `vec`: W is a multiple of kVec and out is Vec-aligned, so each
// thread's kVec columns (X is a multiple of kVec) are one aligned vector.
template <typename scalar_t, typename acc_t, int TN, int TX>
__global__ void __launch_bounds__(kThreads)
    synthesize_tiled_kernel(const scalar_t* __restrict__ A, const scalar_t* __restrict__ B,
                            const int64_t* __restrict__ idx, scalar_t* __restrict__ out, Geometry g,
                            int64_t tiles_y, int64_t tiles_x, bool vec) {
  constexpr int TY = tile_rows<TX>(), kColumnGroups = TX / kVec;
  static_assert(kColumnGroups * TY * kRowParities == kThreads, "phase 2 uses every thread once");
  ADDRMEM_DYNAMIC_SMEM(acc_t, low);  // [TN][npix]
  __shared__ acc_t coef[kBaseChunk][TN];
  __shared__ int64_t rows[TN];

  int64_t block = blockIdx.x;
  const int64_t tx = block % tiles_x;
  block /= tiles_x;
  const int64_t ty = block % tiles_y;
  block /= tiles_y;
  const int64_t c = block % g.C;
  const int64_t n0 = (block / g.C) * TN;
  const int64_t Y0 = ty * TY, X0 = tx * TX;
  const int64_t X1 = imin(X0 + TX, g.W);
  int64_t ry0, ry1, rx0, rx1;
  footprint<acc_t>(Y0, imin(Y0 + TY, g.H), g.h, g.s, ry0, ry1);
  footprint<acc_t>(X0, X1, g.w, g.s, rx0, rx1);
  const int ncols = static_cast<int>(rx1 - rx0 + 1);
  const int npix = static_cast<int>(ry1 - ry0 + 1) * ncols;
  load_rows<TN>(rows, idx, n0, g);

  // Phase 1: low[t][p] = sum_k A[row t, k] * B[k, c, footprint pixel p].
  const scalar_t* Bc = B + c * g.h * g.w;
  for (int base = 0; base < npix; base += kThreads) {
    const int p = base + threadIdx.x;
    const bool active = p < npix;
    const int64_t offset = active ? (ry0 + p / ncols) * g.w + rx0 + p % ncols : 0;
    acc_t acc[TN];
#pragma unroll
    for (int t = 0; t < TN; ++t) acc[t] = acc_t(0);
    for (int64_t k0 = 0; k0 < g.K; k0 += kBaseChunk) {
      const int kc = static_cast<int>(imin(kBaseChunk, g.K - k0));
      __syncthreads();  // rows[] written; the previous chunk's coef[] consumed
      stage_coef<scalar_t, acc_t, TN>(coef, rows, A, k0, kc, g.K);
      __syncthreads();
      if (active) {
        // A pointer stepped by D: no 64-bit multiply per base.
        const scalar_t* bk = Bc + k0 * g.D + offset;
        for (int kk = 0; kk < kc; ++kk, bk += g.D) {
          const acc_t b = static_cast<acc_t>(*bk);
#pragma unroll
          for (int t = 0; t < TN; ++t) acc[t] += coef[kk][t] * b;
        }
      }
    }
    if (active) {
#pragma unroll
      for (int t = 0; t < TN; ++t) low[t * npix + p] = acc[t];
    }
  }
  __syncthreads();

  // Phase 2: this thread's output row Y and columns X..X+kVec-1, for rows
  // t = parity, parity + kRowParities, ... of the block.
  const int64_t X = X0 + (threadIdx.x % kColumnGroups) * kVec;
  const int64_t Y = Y0 + (threadIdx.x / kColumnGroups) % TY;
  const int parity = threadIdx.x / (kColumnGroups * TY);
  if (Y >= g.H || X >= X1) return;
  // The taps, with ATen's weights (1 - l1, l1) and order of operations.
  int64_t i0, i1;
  acc_t ly1, lx1[kVec], lx0[kVec];
  source_index<acc_t>(Y, g.h, g.s, i0, i1, ly1);
  const acc_t ly0 = acc_t(1) - ly1;
  const int top = static_cast<int>(i0 - ry0) * ncols, bottom = static_cast<int>(i1 - ry0) * ncols;
  int x0[kVec], x1[kVec];
#pragma unroll
  for (int v = 0; v < kVec; ++v) {  // columns past the row's end get the last column's taps, unstored
    source_index<acc_t>(imin(X + v, g.W - 1), g.w, g.s, i0, i1, lx1[v]);
    lx0[v] = acc_t(1) - lx1[v];
    x0[v] = static_cast<int>(i0 - rx0);
    x1[v] = static_cast<int>(i1 - rx0);
  }
  // Rows t = parity, parity + kRowParities, ...: shared and output pointers
  // advance by a row each step, offsets within a row stay in registers.
  auto L = low + parity * npix;
  scalar_t* o = out + (((n0 + parity) * g.C + c) * g.H + Y) * g.W + X0;
  const int64_t o_step = kRowParities * g.C * g.H * g.W;
  const int64_t n_end = imin(n0 + TN, g.N);
  for (int64_t n = n0 + parity; n < n_end; n += kRowParities, L += kRowParities * npix, o += o_step) {
    acc_t value[kVec];
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      const acc_t up = lx0[v] * L[top + x0[v]] + lx1[v] * L[top + x1[v]];
      const acc_t down = lx0[v] * L[bottom + x0[v]] + lx1[v] * L[bottom + x1[v]];
      value[v] = ly0 * up + ly1 * down;
    }
    if (vec) {
      Vec<scalar_t> ov;
#pragma unroll
      for (int v = 0; v < kVec; ++v) ov.v[v] = static_cast<scalar_t>(value[v]);
      *vector_at(o, threadIdx.x % kColumnGroups) = ov;
    } else {
#pragma unroll
      for (int v = 0; v < kVec; ++v)
        if (X + v < X1) o[X - X0 + v] = static_cast<scalar_t>(value[v]);
    }
  }
}

// The output coordinates whose taps include sample i of an axis:
// [first, first + count), a contiguous range since both taps grow with the
// coordinate. `twin`: the offset of the coordinate (at most one, at the axis'
// end) whose two taps are both i and the second has weight 0, or -1. Only
// these coordinates may touch sample i's gradient: an inf there becomes NaN
// exactly where the CPU kernel (and ATen) multiply it by a zero weight.
struct TapWindow {
  int64_t first;
  int count, twin;
};
template <typename acc_t>
__device__ inline TapWindow tap_window(int64_t i, int64_t in_size, int64_t s, int64_t out_size) {
  TapWindow w{0, 0, -1};
  for (int64_t X = adjoint_first(i, s); X < adjoint_last(i, s, out_size); ++X) {
    int64_t i0, i1;
    acc_t l1;
    source_index<acc_t>(X, in_size, s, i0, i1, l1);
    if (i0 != i && i1 != i) continue;
    if (w.count == 0) w.first = X;
    w.count = static_cast<int>(X - w.first + 1);
    if (i0 == i1 && l1 == acc_t(0)) w.twin = static_cast<int>(X - w.first);
  }
  return w;
}

// Scale > 1: low[n, c, y, x] = sum_{Y, X} wy(Y, y) wx(X, x) grad[n, c, Y, X]
// over the output pixels whose taps include (y, x), summed in a fixed order.
// `taps` bounds that window along either axis. A twin coordinate (see
// tap_window) adds 0 * grad once more, as the CPU kernel's two products do.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    synthesize_adjoint_kernel(const scalar_t* __restrict__ grad, acc_t* __restrict__ low, Geometry g,
                              int64_t tiles_y, int64_t tiles_x, int taps) {
  ADDRMEM_DYNAMIC_SMEM(acc_t, wx);  // [taps][kLowX]: weight of column first_x[lane] + j
  auto wy = wx + taps * kLowX;      // [taps][kLowY]: weight of row first_y[warp] + j
  __shared__ acc_t rowsum[kLowY][kLowX];
  __shared__ TapWindow window_x[kLowX], window_y[kLowY];

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int64_t block = blockIdx.x;
  const int64_t tx = block % tiles_x;
  block /= tiles_x;
  const int64_t ty = block % tiles_y;
  const int64_t plane = block / tiles_y;  // n * C + c
  const int64_t x = tx * kLowX + lane, y = ty * kLowY + warp;

  // The windows of the tile's columns and rows (empty past the image), then
  // their weights, spread over all threads.
  if (threadIdx.x < kLowX) {
    const int64_t i = tx * kLowX + threadIdx.x;
    window_x[threadIdx.x] = i < g.w ? tap_window<acc_t>(i, g.w, g.s, g.W) : TapWindow{0, 0, -1};
  } else if (threadIdx.x < kLowX + kLowY) {
    const int64_t i = ty * kLowY + threadIdx.x - kLowX;
    window_y[threadIdx.x - kLowX] = i < g.h ? tap_window<acc_t>(i, g.h, g.s, g.H) : TapWindow{0, 0, -1};
  }
  __syncthreads();
  for (int e = threadIdx.x; e < taps * (kLowX + kLowY); e += kThreads) {
    if (e < taps * kLowX) {
      const int j = e / kLowX, l = e % kLowX;
      const TapWindow& w = window_x[l];
      wx[e] = j < w.count ? adjoint_weight<acc_t>(w.first + j, tx * kLowX + l, g.w, g.s) : acc_t(0);
    } else {
      const int j = (e - taps * kLowX) / kLowY, l = (e - taps * kLowX) % kLowY;
      const TapWindow& w = window_y[l];
      wy[e - taps * kLowX] = j < w.count ? adjoint_weight<acc_t>(w.first + j, ty * kLowY + l, g.h, g.s) : acc_t(0);
    }
  }
  __syncthreads();

  // Output rows read by the tile: from its first row's window to its last's.
  const int64_t Ya = window_y[0].first;
  const TapWindow& last_row = window_y[imin(kLowY, g.h - ty * kLowY) - 1];
  const int64_t Yb = last_row.first + last_row.count;
  const TapWindow wcol = window_x[lane], wrow = window_y[warp];
  const scalar_t* gx = grad + plane * g.H * g.W + wcol.first;
  acc_t acc = acc_t(0);
  for (int64_t Yc = Ya; Yc < Yb; Yc += kLowY) {
    // Warp w reduces output row Yc + w along x for the tile's columns.
    const int64_t Y = Yc + warp;
    acc_t sum = acc_t(0);
    if (Y < Yb) {
      const scalar_t* row = gx + Y * g.W;
      for (int j = 0; j < wcol.count; ++j) sum += wx[j * kLowX + lane] * static_cast<acc_t>(row[j]);
      if (wcol.twin >= 0) sum += acc_t(0) * static_cast<acc_t>(row[wcol.twin]);
    }
    rowsum[warp][lane] = sum;
    __syncthreads();
    // Thread (warp, lane) adds the chunk's rows that lie in its window along
    // y: rows Yc + j for j in [lo, hi), weights from offset Yc + lo - first.
    const int lo = static_cast<int>(imax(0, wrow.first - Yc));
    const int hi = static_cast<int>(imin(kLowY, wrow.first + wrow.count - Yc));
    const int shift = static_cast<int>(Yc - wrow.first);
    for (int j = lo; j < hi; ++j) acc += wy[(j + shift) * kLowY + warp] * rowsum[j][lane];
    if (wrow.twin >= 0 && wrow.twin - shift >= lo && wrow.twin - shift < hi)
      acc += acc_t(0) * rowsum[wrow.twin - shift][lane];
    __syncthreads();
  }
  if (x < g.w && y < g.h) low[plane * g.h * g.w + y * g.w + x] = acc;
}

// With an index, its rows' gradients are summed per address row through a
// stable sort of the index (done by the caller): `sorted` is the index in
// that order and `order` the positions n, so each address row's occurrences
// form one segment, in increasing n. One thread per position: a segment's
// first and last positions set begin[r] and end[r] (zeroed before, so rows
// that do not occur keep an empty segment). O(N), no atomics.
__global__ void __launch_bounds__(kThreads)
    index_segments_kernel(const int64_t* __restrict__ sorted, int* __restrict__ begin, int* __restrict__ end,
                          int64_t N, int64_t R) {
  const int64_t j = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  if (j >= N) return;
  const int64_t r = sorted[j];
  CUDA_KERNEL_ASSERT(r >= 0 && r < R && "addrmem::synthesize_backward: index out of range");
  if (j == 0 || sorted[j - 1] != r) begin[r] = static_cast<int>(j);
  if (j == N - 1 || sorted[j + 1] != r) end[r] = static_cast<int>(j + 1);
}

// grad_addresses[r, k] = sum of grad_rows[n, k] over idx[n] == r, in
// increasing n (0 if r does not occur). One thread per element; a warp's
// threads read consecutive columns of the same rows. O(N K) in all.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    index_rows_kernel(const acc_t* __restrict__ grad_rows, const int64_t* __restrict__ order,
                      const int* __restrict__ begin, const int* __restrict__ end,
                      scalar_t* __restrict__ grad_addresses, int64_t R, int64_t K) {
  const int64_t e = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  if (e >= R * K) return;
  const int64_t r = e / K, k = e % K;
  const int b = begin[r], last = end[r];
  acc_t acc = b < last ? grad_rows[order[b] * K + k] : acc_t(0);
  for (int j = b + 1; j < last; ++j) acc += grad_rows[order[j] * K + k];
  grad_addresses[e] = static_cast<scalar_t>(acc);
}

// ---- Host side: launch shapes and launch sequences ---------------------------------------
// `launch(kernel, blocks, smem_bytes, args...)` runs `kernel` on `blocks`
// blocks of kThreads threads with that much dynamic shared memory.

template <typename scalar_t, typename acc_t, typename Launch>
void launch_forward(Launch&& launch, const scalar_t* A, const scalar_t* B, const int64_t* idx, scalar_t* out,
                    const Geometry& g) {
  constexpr int TN = rows_per_block<acc_t>();
  const int64_t row_blocks = ceil_div(g.N, TN);
  const size_t vec_bytes = sizeof(Vec<scalar_t>);
  if (g.s == 1) {
    const int64_t d_tiles = ceil_div(g.D, kFlatTile);
    const bool vec = g.D % kVec == 0 && vector_aligned(B, vec_bytes) && vector_aligned(out, vec_bytes);
    launch(synthesize_flat_kernel<scalar_t, acc_t, TN>, row_blocks * d_tiles, 0, A, B, idx, out, g, d_tiles, vec);
  } else {
    const bool vec = g.W % kVec == 0 && vector_aligned(out, vec_bytes);
    auto tiled = [&](auto kernel, int64_t tile_y, int64_t tile_x) {
      const int64_t tiles_y = ceil_div(g.H, tile_y), tiles_x = ceil_div(g.W, tile_x);
      const size_t smem = sizeof(acc_t) * TN * max_footprint<acc_t>(g.H, g.h, g.s, tile_y) *
                          max_footprint<acc_t>(g.W, g.w, g.s, tile_x);
      launch(kernel, row_blocks * g.C * tiles_y * tiles_x, smem, A, B, idx, out, g, tiles_y, tiles_x, vec);
    };
    if (g.W <= 32)
      tiled(synthesize_tiled_kernel<scalar_t, acc_t, TN, 32>, tile_rows<32>(), 32);
    else
      tiled(synthesize_tiled_kernel<scalar_t, acc_t, TN, 64>, tile_rows<64>(), 64);
  }
}

// The window of one low-resolution sample holds at most 3s output
// coordinates. Shared memory: 40 * 3s weights plus about 2 KB of static
// arrays, under 48 KB up to s = 47 (double) or 98 (float); the .cu launcher
// opts in above.
// Writes rows [n0, n0 + rows) of G_low, as a (rows, D) matrix at `low`.
template <typename scalar_t, typename acc_t, typename Launch>
void launch_adjoint(Launch&& launch, const scalar_t* grad, acc_t* low, Geometry g, int64_t n0, int64_t rows) {
  grad += n0 * g.C * g.H * g.W;
  g.N = rows;
  const int64_t tiles_y = ceil_div(g.h, kLowY), tiles_x = ceil_div(g.w, kLowX);
  const int taps = static_cast<int>(3 * g.s);
  launch(synthesize_adjoint_kernel<scalar_t, acc_t>, g.N * g.C * tiles_y * tiles_x,
         sizeof(acc_t) * taps * (kLowX + kLowY), grad, low, g, tiles_y, tiles_x, taps);
}

// The backward holds G_low for this many rows at a time (the adjoint and both
// GEMMs run chunk by chunk), so that it takes at most `budget` elements
// however large N is. A function of the shapes only: the order of the sums,
// and so the result, depends on nothing else.
constexpr int64_t kLowBudget = int64_t{1} << 26;  // 256 MB in float
inline int64_t backward_chunk_rows(const Geometry& g, int64_t budget) {
  return std::max<int64_t>(1, std::min(g.N, budget / g.D));
}

// sorted, order: the index sorted stably and the positions in that order;
// bounds: 2 * R ints, zeroed. grad_addresses: (R, K).
template <typename scalar_t, typename acc_t, typename Launch>
void launch_index_rows(Launch&& launch, const acc_t* grad_rows, const int64_t* sorted, const int64_t* order,
                       int* bounds, scalar_t* grad_addresses, const Geometry& g) {
  launch(index_segments_kernel, ceil_div(g.N, kThreads), 0, sorted, bounds, bounds + g.R, g.N, g.R);
  launch(index_rows_kernel<scalar_t, acc_t>, ceil_div(g.R * g.K, kThreads), 0, grad_rows, order,
         static_cast<const int*>(bounds), static_cast<const int*>(bounds + g.R), grad_addresses, g.R, g.K);
}

}  // namespace addrmem
