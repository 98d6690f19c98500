// Runs the CUDA kernels and launch sequences of csrc/synthesize_kernels.cuh as
// host code, for every dtype the op dispatches (double; float, c10::Half and
// c10::BFloat16 accumulating in float), so that their tiling, indexing and
// reductions are tested on machines without a GPU (tests/test_cuda_emulated.py
// builds this file with g++ and calls it through ctypes). The backward's two
// GEMMs, which run through ATen on the GPU (synthesize_cuda.cu), are plain
// loops here in the accumulation type.
//
// Each block's threads are real threads: __syncthreads() is a barrier of the
// block and __ballot_sync one of the warp (every lane must vote, as on the
// GPU, or the warp deadlocks). Blocks run one after another (each thread loops
// over them, with a barrier between blocks), so a block's __shared__ variables
// can be statics; dynamic shared memory is filled with NaN bytes before each
// block. What only hardware enforces is checked where it can be: a
// vector access must be aligned to its size (else the launch fails with code
// 2); every shared-memory access must fall inside its array: the dynamic
// one as large as the launch allocated (a bound-checked pointer), the static
// ones as declared (-fsanitize=bounds, reported through the handler below),
// else the launch fails with code 3. A failed CUDA_KERNEL_ASSERT ends the
// launch with code 1, as a device-side assert ends a CUDA kernel.
//
// The arithmetic is the GPU's: nvcc fuses a * b + c into one FMA wherever it
// can, the host compiler does not. Built with -mfma and -ffp-contract=off
// (test_cuda_emulated.py does so where the CPU has FMA), the kernels and
// device functions below are compiled with contraction on and everything
// else, the launch sequences included, with it off.
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#define __global__ __attribute__((optimize("fp-contract=fast")))
#define __device__ __attribute__((optimize("fp-contract=fast")))
// Functions for both sides are inlined into every caller, so that each call
// takes its caller's contraction, as nvcc's and the host compiler's copies do.
#define __host__ __attribute__((always_inline))
#undef C10_HOST_DEVICE
#define C10_HOST_DEVICE __attribute__((always_inline))
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__
#define __align__(n) alignas(n)
#define __shared__ static

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};
static thread_local Dim3 threadIdx, blockIdx;

// Why a launch failed: 0 none, 1 device-side assert, 2 misaligned vector
// access, 3 shared memory out of bounds.
static std::atomic<int> fault{0};
static std::string fault_message;
static std::atomic<int64_t> vector_accesses{0};
struct Abort {};  // unwinds a thread out of a failed launch

static void fail(int code, const char* message) {
  int none = 0;
  if (fault.compare_exchange_strong(none, code)) fault_message = message;
  throw Abort{};
}

#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(cond) \
  if (!(cond)) fail(1, "device-side assert: " #cond)
#define ADDRMEM_CHECK_VECTOR(ptr) check_vector(ptr, sizeof(*(ptr)))

static void check_vector(const void* p, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) fail(2, "misaligned vector access");
  ++vector_accesses;
}

// -fsanitize=bounds calls these on an out-of-bounds index of a fixed-size
// array (the __shared__ ones included).
extern "C" void __ubsan_handle_out_of_bounds(void*, void*) { fail(3, "static shared memory out of bounds"); }
extern "C" void __ubsan_handle_out_of_bounds_abort(void*, void*) { fail(3, "static shared memory out of bounds"); }

// A pointer into dynamic shared memory that checks every access against the
// launch's allocation.
template <typename T>
struct Shared {
  T* base;
  int64_t size, offset;  // in elements of T
  T& operator[](int64_t i) const {
    if (offset + i < 0 || offset + i >= size) fail(3, "dynamic shared memory out of bounds");
    return base[offset + i];
  }
  Shared operator+(int64_t n) const { return {base, size, offset + n}; }
  Shared& operator+=(int64_t n) {
    offset += n;
    return *this;
  }
};

static std::barrier<>* block_barrier = nullptr;
static std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
static std::vector<unsigned char> dynamic_smem;
static bool ballot_votes[1024];

#define ADDRMEM_DYNAMIC_SMEM(T, name)                    \
  const Shared<T> name {                                  \
    reinterpret_cast<T*>(dynamic_smem.data()),            \
        static_cast<int64_t>(dynamic_smem.size() / sizeof(T)), 0 \
  }

// A failed thread leaves the barriers; the others stop at their next one.
static void wait(std::barrier<>& barrier) {
  barrier.arrive_and_wait();
  if (fault.load()) throw Abort{};
}

inline void __syncthreads() { wait(*block_barrier); }

inline unsigned __ballot_sync(unsigned mask, bool vote) {
  if (mask != 0xffffffffu) fail(2, "__ballot_sync with a partial mask");
  const unsigned warp = threadIdx.x / 32;
  ballot_votes[threadIdx.x] = vote;
  wait(*warp_barriers[warp]);
  unsigned bits = 0;
  for (unsigned lane = 0; lane < 32; ++lane) bits |= unsigned(ballot_votes[warp * 32 + lane]) << lane;
  wait(*warp_barriers[warp]);
  return bits;
}

inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }
inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
inline int atomicMax(int* p, int v) {
  std::atomic_ref<int> a(*p);
  int old = a.load();
  while (old < v && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}

#include "../csrc/synthesize_kernels.cuh"

using namespace addrmem;

// Runs `body` on `blocks` blocks of kThreads threads.
template <typename Body>
static void run(int64_t blocks, size_t smem, Body body) {
  dynamic_smem.resize(smem);
  std::barrier<> barrier(kThreads);
  block_barrier = &barrier;
  warp_barriers.clear();
  for (int w = 0; w < kWarps; ++w) warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
  std::vector<std::thread> pool;
  for (int t = 0; t < kThreads; ++t)
    pool.emplace_back([t, blocks, &body] {
      threadIdx.x = static_cast<unsigned>(t);
      try {
        for (int64_t b = 0; b < blocks; ++b) {
          if (fault.load()) throw Abort{};
          blockIdx.x = static_cast<unsigned>(b);
          // Poison: a block must not read shared memory it did not write.
          if (t == 0) std::memset(dynamic_smem.data(), 0xff, dynamic_smem.size());
          __syncthreads();
          body();
          __syncthreads();  // the block's shared memory is free for the next one
        }
      } catch (const Abort&) {
        block_barrier->arrive_and_drop();
        warp_barriers[t / 32]->arrive_and_drop();
      }
    });
  for (auto& th : pool) th.join();
}

// The `launch` functor of synthesize_kernels.cuh, as synthesize_cuda.cu's.
struct Launch {
  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), int64_t blocks, size_t smem, Args... args) const {
    if (blocks == 0 || fault.load()) return;
    run(blocks, smem, [&] { kernel(args...); });
  }
};

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

static Geometry geometry(int64_t N, int64_t R, int64_t K, int64_t C, int64_t h, int64_t w, int64_t s) {
  return Geometry{N, R, K, C, h, w, s, h * s, w * s, C * h * w};
}

template <typename T>
static int forward(const T* A, const T* B, const int64_t* idx, T* out, Geometry g) {
  fault = 0;
  launch_forward<T, typename Acc<T>::type>(Launch{}, A, B, idx, out, g);
  return fault.load();
}

// The launch sequence of synthesize_backward_cuda, with its ATen calls as
// loops, G_low held for `budget` elements at a time (kLowBudget on the GPU).
// grad_addresses: (R, K); grad_bases: (K, D).
template <typename T>
static int backward(const T* grad, const T* A, const T* B, const int64_t* idx, T* grad_addresses, T* grad_bases,
                    Geometry g, int64_t budget) {
  using acc_t = typename Acc<T>::type;
  fault = 0;
  const int64_t chunk = backward_chunk_rows(g, budget);
  std::vector<acc_t> low(chunk * g.D), grad_rows(g.N * g.K), bases_acc(g.K * g.D, acc_t(0));
  for (int64_t n0 = 0; n0 < g.N; n0 += chunk) {
    const int64_t m = std::min(chunk, g.N - n0);
    if (g.s == 1) {
      for (int64_t e = 0; e < m * g.D; ++e) low[e] = static_cast<acc_t>(grad[n0 * g.D + e]);
    } else {
      launch_adjoint<T>(Launch{}, grad, low.data(), g, n0, m);
    }
    // The GEMMs: grad_rows = G_low B^T, grad_bases += A_rows^T G_low. (On the
    // GPU, index_select checks the index too; here only the kernels do.)
    for (int64_t i = 0; i < m; ++i) {
      const int64_t n = n0 + i;
      const int64_t r = idx ? idx[n] : n;
      const bool valid = r >= 0 && r < g.R;
      for (int64_t k = 0; k < g.K; ++k) {
        const acc_t a = valid ? static_cast<acc_t>(A[r * g.K + k]) : acc_t(0);
        acc_t dot = acc_t(0);
        for (int64_t d = 0; d < g.D; ++d) {
          dot += low[i * g.D + d] * static_cast<acc_t>(B[k * g.D + d]);
          bases_acc[k * g.D + d] += a * low[i * g.D + d];
        }
        grad_rows[n * g.K + k] = dot;
      }
    }
  }
  for (int64_t e = 0; e < g.K * g.D; ++e) grad_bases[e] = static_cast<T>(bases_acc[e]);
  if (idx) {
    // at::sort(stable=true) on the GPU.
    std::vector<int64_t> order(g.N), sorted(g.N);
    for (int64_t n = 0; n < g.N; ++n) order[n] = n;
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return idx[a] < idx[b]; });
    for (int64_t j = 0; j < g.N; ++j) sorted[j] = idx[order[j]];
    std::vector<int> bounds(2 * g.R, 0);
    launch_index_rows<T>(Launch{}, grad_rows.data(), sorted.data(), order.data(), bounds.data(), grad_addresses, g);
  } else {
    for (int64_t e = 0; e < g.N * g.K; ++e) grad_addresses[e] = static_cast<T>(grad_rows[e]);
  }
  return fault.load();
}

// The taps and footprints of an axis of `in` samples upsampled by s, as the
// kernels compute them (fused where they may be) and as the host does: the
// number of coordinates whose taps differ, plus the number of tiles of `tile`
// coordinates whose footprint exceeds the host's largest (which sizes the
// shared memory).
template <typename acc_t>
__device__ void device_source_index(int64_t X, int64_t in, int64_t s, int64_t& i0, int64_t& i1, acc_t& l1) {
  source_index<acc_t>(X, in, s, i0, i1, l1);
}
template <typename acc_t>
__device__ int64_t device_footprint(int64_t a, int64_t b, int64_t in, int64_t s) {
  int64_t first, last;
  footprint<acc_t>(a, b, in, s, first, last);
  return last - first + 1;
}
template <typename acc_t>
static int64_t tap_mismatches(int64_t in, int64_t s, int64_t tile) {
  const int64_t out = in * s, most = max_footprint<acc_t>(out, in, s, tile);
  int64_t bad = 0;
  for (int64_t X = 0; X < out; ++X) {
    int64_t h0, h1, d0, d1;
    acc_t hl, dl;
    source_index<acc_t>(X, in, s, h0, h1, hl);
    device_source_index<acc_t>(X, in, s, d0, d1, dl);
    bad += h0 != d0 || h1 != d1 || std::memcmp(&hl, &dl, sizeof(acc_t)) != 0;
  }
  for (int64_t a = 0; a < out; a += tile) bad += device_footprint<acc_t>(a, std::min(a + tile, out), in, s) > most;
  return bad;
}

#define EMULATE(suffix, T)                                                                                       \
  int emulate_forward_##suffix(const T* A, const T* B, const int64_t* idx, T* out, int64_t N, int64_t R,      \
                               int64_t K, int64_t C, int64_t h, int64_t w, int64_t s) {                       \
    return forward(A, B, idx, out, geometry(N, R, K, C, h, w, s));                                            \
  }                                                                                                           \
  int emulate_backward_##suffix(const T* grad, const T* A, const T* B, const int64_t* idx, T* grad_addresses, \
                                T* grad_bases, int64_t N, int64_t R, int64_t K, int64_t C, int64_t h,         \
                                int64_t w, int64_t s, int64_t budget) {                                       \
    return backward(grad, A, B, idx, grad_addresses, grad_bases, geometry(N, R, K, C, h, w, s), budget);      \
  }

extern "C" {
EMULATE(f64, double)
EMULATE(f32, float)
EMULATE(f16, c10::Half)
EMULATE(bf16, c10::BFloat16)
const char* emulate_fault_message() { return fault_message.c_str(); }
int64_t emulate_tap_mismatches_f64(int64_t in, int64_t s, int64_t tile) { return tap_mismatches<double>(in, s, tile); }
int64_t emulate_tap_mismatches_f32(int64_t in, int64_t s, int64_t tile) { return tap_mismatches<float>(in, s, tile); }
// x * y + z as the kernels compute it: with one rounding where the build
// fuses it, as nvcc does.
__device__ double emulate_device_mul_add(double x, double y, double z) { return x * y + z; }
int64_t emulate_vector_accesses() { return vector_accesses.load(); }
}
