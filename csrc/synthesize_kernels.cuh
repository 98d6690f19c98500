// The CUDA kernels of addrmem::synthesize and their launch shapes (launched
// from synthesize_cuda.cu; schema and CPU kernels: synthesize.cpp). Free of
// ATen, so that tests/emulate_cuda.cpp can also run them as host code.
//
// Forward, one launch: each block owns TN rows and one channel's tile of
// kTileY x kTileX output pixels. It forms the low-resolution values the tile
// reads (the tile's footprint, at most 9 x 65 pixels) in shared memory, then
// writes the upsampled tile with coalesced stores. The low-resolution
// intermediate never reaches global memory.
//
// Backward, two launches, deterministic (no float atomics):
//  1. each block owns kPixTile low-resolution pixels x kBaseTile bases and a
//     slice of the rows; per chunk of TN rows it gathers the low-resolution
//     gradient (the adjoint of the upsampling, read from grad_out on the fly)
//     into shared memory, accumulates grad_bases in registers and leaves each
//     row's address-gradient share (a warp reduction over its pixels) in a
//     workspace;
//  2. a reduction sums the workspace in a fixed order: grad_bases over row
//     slices, address gradients over pixel tiles.
// With an index, the per-row address gradients are added to their rows with
// index_put_(accumulate=true), whose CUDA kernel sorts the indices and is
// deterministic.
#pragma once

#include <algorithm>
#include <cstddef>

#include "geometry.h"

// The forward kernel's dynamic shared memory (the emulator defines its own).
#ifndef ADDRMEM_DYNAMIC_SMEM
#define ADDRMEM_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace addrmem {

constexpr int kThreads = 256;
// Forward tile: output rows x output columns of one channel, and the chunk of
// bases whose coefficients are staged in shared memory at a time.
constexpr int kTileY = 8;
constexpr int kTileX = 64;
constexpr int kBaseChunk = 32;
// Backward tile: 32 lanes x 4 low-resolution pixels, 8 warps x 8 bases.
constexpr int kPixPerLane = 4;
constexpr int kPixTile = 32 * kPixPerLane;
constexpr int kBasesPerWarp = 8;
constexpr int kBaseTile = (kThreads / 32) * kBasesPerWarp;

// Rows per block: fewer for double so that shared memory stays under 48 KB.
template <typename acc_t>
constexpr int rows_per_block() {
  return sizeof(acc_t) == 8 ? 8 : 16;
}

__host__ __device__ inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

__device__ __forceinline__ int64_t row_of(const int64_t* idx, int64_t n) { return idx ? idx[n] : n; }

// Low-resolution footprint [first, last] of output coordinates [a, b).
template <typename acc_t>
__host__ __device__ inline void footprint(int64_t a, int64_t b, int64_t in_size, int64_t s, int64_t& first,
                                          int64_t& last) {
  int64_t i0, i1;
  acc_t l1;
  source_index<acc_t>(a, in_size, s, first, i1, l1);
  source_index<acc_t>(b - 1, in_size, s, i0, last, l1);
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

template <typename scalar_t, typename acc_t, int TN>
__global__ void __launch_bounds__(kThreads)
    synthesize_forward_kernel(const scalar_t* __restrict__ A, const scalar_t* __restrict__ B,
                              const int64_t* __restrict__ idx, scalar_t* __restrict__ out, Geometry g,
                              int64_t tiles_y, int64_t tiles_x) {
  ADDRMEM_DYNAMIC_SMEM(smem);
  acc_t* coef = reinterpret_cast<acc_t*>(smem);  // [kBaseChunk][TN]
  acc_t* low = coef + kBaseChunk * TN;           // [TN][rows * cols]
  __shared__ int64_t rows[TN];

  int64_t block = blockIdx.x;
  const int64_t tx = block % tiles_x;
  block /= tiles_x;
  const int64_t ty = block % tiles_y;
  block /= tiles_y;
  const int64_t c = block % g.C;
  const int64_t n0 = (block / g.C) * TN;

  const int64_t Y0 = ty * kTileY, Y1 = imin(Y0 + kTileY, g.H);
  const int64_t X0 = tx * kTileX, X1 = imin(X0 + kTileX, g.W);
  int64_t ry0, ry1, rx0, rx1;
  footprint<acc_t>(Y0, Y1, g.h, g.s, ry0, ry1);
  footprint<acc_t>(X0, X1, g.w, g.s, rx0, rx1);
  const int64_t ncols = rx1 - rx0 + 1;
  const int64_t npix = (ry1 - ry0 + 1) * ncols;

  if (threadIdx.x < TN) {
    const int64_t n = n0 + threadIdx.x;
    rows[threadIdx.x] = n < g.N ? row_of(idx, n) : -1;
  }

  // Phase 1: low[tn][p] = sum_k A[row tn, k] * B[k, c, footprint pixel p].
  const scalar_t* Bc = B + c * g.h * g.w;
  for (int64_t base = 0; base < npix; base += kThreads) {
    const int64_t p = base + threadIdx.x;
    const bool active = p < npix;
    const int64_t offset = active ? (ry0 + p / ncols) * g.w + rx0 + p % ncols : 0;
    acc_t acc[TN];
#pragma unroll
    for (int tn = 0; tn < TN; ++tn) acc[tn] = acc_t(0);
    for (int64_t k0 = 0; k0 < g.K; k0 += kBaseChunk) {
      const int kc = static_cast<int>(imin(kBaseChunk, g.K - k0));
      __syncthreads();  // rows[] written; previous chunk's coef[] consumed
      for (int e = threadIdx.x; e < kBaseChunk * TN; e += kThreads) {
        const int kk = e / TN, tn = e % TN;
        const int64_t r = rows[tn];
        coef[e] = (kk < kc && r >= 0) ? static_cast<acc_t>(A[r * g.K + k0 + kk]) : acc_t(0);
      }
      __syncthreads();
      if (active) {
        for (int kk = 0; kk < kc; ++kk) {
          const acc_t b = static_cast<acc_t>(Bc[(k0 + kk) * g.D + offset]);
#pragma unroll
          for (int tn = 0; tn < TN; ++tn) acc[tn] += coef[kk * TN + tn] * b;
        }
      }
    }
    if (active) {
#pragma unroll
      for (int tn = 0; tn < TN; ++tn) low[tn * npix + p] = acc[tn];
    }
  }
  __syncthreads();

  // Phase 2: bilinear upsampling of the footprint, one output pixel a thread.
  const int64_t ny = Y1 - Y0, nx = X1 - X0;
  const int64_t count = TN * ny * nx;
  for (int64_t e = threadIdx.x; e < count; e += kThreads) {
    const int64_t X = X0 + e % nx;
    const int64_t Y = Y0 + (e / nx) % ny;
    const int tn = static_cast<int>(e / (nx * ny));
    const int64_t n = n0 + tn;
    if (n >= g.N) continue;
    int64_t y0, y1, x0, x1;
    acc_t ly, lx;
    source_index<acc_t>(Y, g.h, g.s, y0, y1, ly);
    source_index<acc_t>(X, g.w, g.s, x0, x1, lx);
    const acc_t* L = low + tn * npix;
    const acc_t* r0 = L + (y0 - ry0) * ncols;
    const acc_t* r1 = L + (y1 - ry0) * ncols;
    x0 -= rx0;
    x1 -= rx0;
    const acc_t top = (acc_t(1) - lx) * r0[x0] + lx * r0[x1];
    const acc_t bottom = (acc_t(1) - lx) * r1[x0] + lx * r1[x1];
    out[((n * g.C + c) * g.H + Y) * g.W + X] = static_cast<scalar_t>((acc_t(1) - ly) * top + ly * bottom);
  }
}

// Kernel 1 of the backward. Block (pixel tile, base tile, row slice).
// Writes grad_bases_part[slice][k][d] and grad_rows_part[pixel tile][n][k].
template <typename scalar_t, typename acc_t, int TN>
__global__ void __launch_bounds__(kThreads)
    synthesize_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ A,
                               const scalar_t* __restrict__ B, const int64_t* __restrict__ idx,
                               acc_t* __restrict__ grad_bases_part, acc_t* __restrict__ grad_rows_part,
                               Geometry g, int64_t pix_tiles, int64_t base_tiles, int64_t rows_per_slice) {
  __shared__ acc_t coef[TN][kBaseTile];
  __shared__ acc_t gl[TN][kPixTile];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int64_t block = blockIdx.x;
  const int64_t pt = block % pix_tiles;
  block /= pix_tiles;
  const int64_t kt = block % base_tiles;
  const int64_t slice = block / base_tiles;
  const int64_t p0 = pt * kPixTile, k0 = kt * kBaseTile;
  const int64_t n_begin = slice * rows_per_slice;
  const int64_t n_end = imin(n_begin + rows_per_slice, g.N);

  // This thread's pixels p0 + lane + 32 j and bases k0 + warp + 8 i.
  acc_t bases[kBasesPerWarp][kPixPerLane];
  acc_t acc[kBasesPerWarp][kPixPerLane];
#pragma unroll
  for (int i = 0; i < kBasesPerWarp; ++i) {
    const int64_t k = k0 + warp + 8 * i;
#pragma unroll
    for (int j = 0; j < kPixPerLane; ++j) {
      const int64_t p = p0 + lane + 32 * j;
      bases[i][j] = (k < g.K && p < g.D) ? static_cast<acc_t>(B[k * g.D + p]) : acc_t(0);
      acc[i][j] = acc_t(0);
    }
  }

  for (int64_t n0 = n_begin; n0 < n_end; n0 += TN) {
    __syncthreads();  // the previous chunk's shared tiles are consumed
    for (int e = threadIdx.x; e < TN * kBaseTile; e += kThreads) {
      const int tn = e / kBaseTile, kk = e % kBaseTile;
      const int64_t n = n0 + tn, k = k0 + kk;
      coef[tn][kk] = (n < n_end && k < g.K) ? static_cast<acc_t>(A[row_of(idx, n) * g.K + k]) : acc_t(0);
    }
    for (int e = threadIdx.x; e < TN * kPixTile; e += kThreads) {
      const int tn = e / kPixTile, pp = e % kPixTile;
      const int64_t n = n0 + tn, d = p0 + pp;
      acc_t v = acc_t(0);
      if (n < n_end && d < g.D) {
        const int64_t x = d % g.w, y = (d / g.w) % g.h, c = d / (g.w * g.h);
        const scalar_t* gc = grad + (n * g.C + c) * g.H * g.W;
        const int64_t X0 = adjoint_first(x, g.s), X1 = adjoint_last(x, g.s, g.W);
        for (int64_t Y = adjoint_first(y, g.s); Y < adjoint_last(y, g.s, g.H); ++Y) {
          const acc_t wy = adjoint_weight<acc_t>(Y, y, g.h, g.s);
          if (wy == acc_t(0)) continue;
          acc_t row = acc_t(0);
          for (int64_t X = X0; X < X1; ++X) {
            const acc_t wx = adjoint_weight<acc_t>(X, x, g.w, g.s);
            if (wx != acc_t(0)) row += wx * static_cast<acc_t>(gc[Y * g.W + X]);
          }
          v += wy * row;
        }
      }
      gl[tn][pp] = v;
    }
    __syncthreads();

    for (int tn = 0; tn < TN; ++tn) {
      acc_t gv[kPixPerLane];
#pragma unroll
      for (int j = 0; j < kPixPerLane; ++j) gv[j] = gl[tn][lane + 32 * j];
      const int64_t n = n0 + tn;
#pragma unroll
      for (int i = 0; i < kBasesPerWarp; ++i) {
        const acc_t a = coef[tn][warp + 8 * i];
        acc_t dot = acc_t(0);
#pragma unroll
        for (int j = 0; j < kPixPerLane; ++j) {
          acc[i][j] += a * gv[j];
          dot += gv[j] * bases[i][j];
        }
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
        const int64_t k = k0 + warp + 8 * i;
        if (lane == 0 && n < n_end && k < g.K) grad_rows_part[(pt * g.N + n) * g.K + k] = dot;
      }
    }
  }

#pragma unroll
  for (int i = 0; i < kBasesPerWarp; ++i) {
    const int64_t k = k0 + warp + 8 * i;
#pragma unroll
    for (int j = 0; j < kPixPerLane; ++j) {
      const int64_t p = p0 + lane + 32 * j;
      if (k < g.K && p < g.D) grad_bases_part[(slice * g.K + k) * g.D + p] = acc[i][j];
    }
  }
}

// Kernel 2 of the backward: fixed-order sums of the workspace.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    synthesize_reduce_kernel(const acc_t* __restrict__ grad_bases_part, const acc_t* __restrict__ grad_rows_part,
                             scalar_t* __restrict__ grad_bases, acc_t* __restrict__ grad_rows, int64_t slices,
                             int64_t pix_tiles, int64_t n_bases_elems, int64_t n_rows_elems) {
  const int64_t total = n_bases_elems + n_rows_elems;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t sum = acc_t(0);
    if (e < n_bases_elems) {
      for (int64_t s = 0; s < slices; ++s) sum += grad_bases_part[s * n_bases_elems + e];
      grad_bases[e] = static_cast<scalar_t>(sum);
    } else {
      const int64_t r = e - n_bases_elems;
      for (int64_t t = 0; t < pix_tiles; ++t) sum += grad_rows_part[t * n_rows_elems + r];
      grad_rows[r] = sum;
    }
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid and shared memory of the forward kernel.
struct ForwardLaunch {
  int64_t tiles_y, tiles_x, blocks;
  size_t smem;
};

template <typename acc_t>
inline ForwardLaunch forward_launch(const Geometry& g) {
  constexpr int TN = rows_per_block<acc_t>();
  ForwardLaunch l;
  l.tiles_y = ceil_div(g.H, kTileY);
  l.tiles_x = ceil_div(g.W, kTileX);
  l.blocks = ceil_div(g.N, TN) * g.C * l.tiles_y * l.tiles_x;
  const int64_t footprint_pixels =
      max_footprint<acc_t>(g.H, g.h, g.s, kTileY) * max_footprint<acc_t>(g.W, g.w, g.s, kTileX);
  l.smem = sizeof(acc_t) * (kBaseChunk * TN + TN * footprint_pixels);
  return l;
}

// Grids of the two backward kernels and the workspace they share: the rows are
// cut into slices so that the first grid fills the GPU's `sms` about twice.
struct BackwardLaunch {
  int64_t pix_tiles, base_tiles, rows_per_slice, slices, blocks, reduce_blocks;
};

template <typename acc_t>
inline BackwardLaunch backward_launch(const Geometry& g, int64_t sms) {
  constexpr int TN = rows_per_block<acc_t>();
  BackwardLaunch l;
  l.pix_tiles = ceil_div(g.D, kPixTile);
  l.base_tiles = ceil_div(g.K, kBaseTile);
  const int64_t chunks = ceil_div(g.N, TN);
  const int64_t tiles = l.pix_tiles * l.base_tiles;
  const int64_t wanted = std::min(chunks, std::max<int64_t>(1, ceil_div(2 * sms, tiles)));
  l.rows_per_slice = ceil_div(chunks, wanted) * TN;
  l.slices = ceil_div(g.N, l.rows_per_slice);
  l.blocks = tiles * l.slices;
  l.reduce_blocks = std::min<int64_t>(ceil_div(g.K * g.D + g.N * g.K, kThreads), 8 * sms);
  return l;
}

}  // namespace addrmem
