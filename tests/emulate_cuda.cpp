// Runs the CUDA kernels of csrc/synthesize_kernels.cuh as host code, so that
// their tiling, indexing and reductions are tested on machines without a GPU
// (tests/test_cuda_emulated.py builds this file with g++ and calls it through
// ctypes). Each block's threads are real threads: __syncthreads() is a barrier
// and __shfl_xor_sync exchanges through a buffer between two barriers. Blocks
// run one after another (each thread loops over them, with a barrier between
// blocks), so a block's __shared__ variables can be statics.
#include <barrier>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__
#define __align__(n) alignas(n)
#define __shared__ static

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};
static thread_local Dim3 threadIdx, blockIdx;
static Dim3 blockDim, gridDim;
static std::barrier<>* block_barrier = nullptr;
static std::vector<unsigned char> dynamic_smem;
static double shuffle_buffer[1024];

#define ADDRMEM_DYNAMIC_SMEM(name) unsigned char* name = dynamic_smem.data()

inline void __syncthreads() { block_barrier->arrive_and_wait(); }

template <typename T>
inline T __shfl_xor_sync(unsigned, T value, int offset) {
  shuffle_buffer[threadIdx.x] = static_cast<double>(value);
  __syncthreads();
  const T other = static_cast<T>(shuffle_buffer[threadIdx.x ^ offset]);
  __syncthreads();
  return other;
}

#include "../csrc/synthesize_kernels.cuh"

using namespace addrmem;

template <typename Kernel>
static void launch(int64_t blocks, int threads, size_t smem, Kernel kernel) {
  gridDim.x = static_cast<unsigned>(blocks);
  blockDim.x = static_cast<unsigned>(threads);
  dynamic_smem.assign(smem, 0xff);  // poison: kernels must not read what they did not write
  std::barrier<> barrier(threads);
  block_barrier = &barrier;
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([t, blocks, &kernel] {
      threadIdx.x = static_cast<unsigned>(t);
      for (int64_t b = 0; b < blocks; ++b) {
        blockIdx.x = static_cast<unsigned>(b);
        kernel();
        __syncthreads();  // the block's shared memory is free for the next one
      }
    });
  for (auto& th : pool) th.join();
}

static Geometry geometry(int64_t N, int64_t R, int64_t K, int64_t C, int64_t h, int64_t w, int64_t s) {
  return Geometry{N, R, K, C, h, w, s, h * s, w * s, C * h * w};
}

template <typename T>
static void forward(const T* A, const T* B, const int64_t* idx, T* out, Geometry g) {
  const ForwardLaunch l = forward_launch<T>(g);
  launch(l.blocks, kThreads, l.smem, [&] {
    synthesize_forward_kernel<T, T, rows_per_block<T>()>(A, B, idx, out, g, l.tiles_y, l.tiles_x);
  });
}

// grad_rows: (N, K), each synthesized row's address gradient (before the rows
// are added into the (R, K) gradient).
template <typename T>
static void backward(const T* grad, const T* A, const T* B, const int64_t* idx, T* grad_bases, T* grad_rows,
                     Geometry g, int64_t sms) {
  const BackwardLaunch l = backward_launch<T>(g, sms);
  std::vector<T> bases_part(l.slices * g.K * g.D, T(-1e30)), rows_part(l.pix_tiles * g.N * g.K, T(-1e30));
  launch(l.blocks, kThreads, 0, [&] {
    synthesize_backward_kernel<T, T, rows_per_block<T>()>(grad, A, B, idx, bases_part.data(), rows_part.data(), g,
                                                          l.pix_tiles, l.base_tiles, l.rows_per_slice);
  });
  launch(l.reduce_blocks, kThreads, 0, [&] {
    synthesize_reduce_kernel<T, T>(bases_part.data(), rows_part.data(), grad_bases, grad_rows, l.slices,
                                   l.pix_tiles, g.K * g.D, g.N * g.K);
  });
}

extern "C" {
void emulate_forward_f64(const double* A, const double* B, const int64_t* idx, double* out, int64_t N, int64_t R,
                         int64_t K, int64_t C, int64_t h, int64_t w, int64_t s) {
  forward(A, B, idx, out, geometry(N, R, K, C, h, w, s));
}
void emulate_forward_f32(const float* A, const float* B, const int64_t* idx, float* out, int64_t N, int64_t R,
                         int64_t K, int64_t C, int64_t h, int64_t w, int64_t s) {
  forward(A, B, idx, out, geometry(N, R, K, C, h, w, s));
}
void emulate_backward_f64(const double* grad, const double* A, const double* B, const int64_t* idx,
                          double* grad_bases, double* grad_rows, int64_t N, int64_t R, int64_t K, int64_t C,
                          int64_t h, int64_t w, int64_t s, int64_t sms) {
  backward(grad, A, B, idx, grad_bases, grad_rows, geometry(N, R, K, C, h, w, s), sms);
}
void emulate_backward_f32(const float* grad, const float* A, const float* B, const int64_t* idx, float* grad_bases,
                          float* grad_rows, int64_t N, int64_t R, int64_t K, int64_t C, int64_t h, int64_t w,
                          int64_t s, int64_t sms) {
  backward(grad, A, B, idx, grad_bases, grad_rows, geometry(N, R, K, C, h, w, s), sms);
}
}
