// Shared CUDA building blocks (torch-free): dtype conversions and a shared-memory tiled GEMM
// whose operands are read through a "problem" object, so that each op's gather (interpolated
// samples, topology lookups, CSR tables) happens while the tiles are loaded and no
// intermediate tensor is ever written.
//
// tiled_gemm<P, BM, BN, BK, TM, TN>: for every batch index (grid z, plus batch_base), with
// the batch's operand view `op = P.at(batch)` (a small struct holding the batch's base
// pointers, so that the per-element loads do no batch arithmetic):
//   C[m, n] = sum_{k < op.K} op.a(m, k) * op.b(k, n),  then op.store(m, n, C)
// for m < op.M, n < op.N (int: a batch's GEMM has fewer than kMaxIndexExtent = 2^30 rows,
// columns and reduction steps). A block owns a BM x BN tile of C (grid y over m, x over n);
// each of its (BM/TM)(BN/TN) threads accumulates a TM x TN micro-tile in registers, in the
// accumulation type P::acc_t, over BK-deep slices of k staged in shared memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "cuda_launchers.h"
#include "fast_divmod.h"  // also BHARNET_HD: host-device functions

// Kernel launches and dynamic shared memory are spelled with these macros, so that the kernels
// also compile for tests/ops/cuda_host/cuda_emulation.h, which runs them on the CPU in tests.
#if defined(BHARNET_CUDA_EMULATION)
#define BHARNET_LAUNCH(kernel, grid, block, bytes, stream) ::bharnet::emu::launch(kernel, grid, block, bytes)
#define BHARNET_DYNAMIC_SHARED(alignment, name) unsigned char* name = ::bharnet::emu::dynamic_shared()
#else
#define BHARNET_LAUNCH(kernel, grid, block, bytes, stream) kernel<<<grid, block, bytes, stream>>>
#define BHARNET_DYNAMIC_SHARED(alignment, name) extern __shared__ __align__(alignment) unsigned char name[]
#endif

namespace bharnet {
namespace cuda {

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using acc_of = typename AccOf<T>::type;

BHARNET_HD float to_acc(__half x) { return __half2float(x); }
BHARNET_HD float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
BHARNET_HD float to_acc(float x) { return x; }
BHARNET_HD double to_acc(double x) { return x; }

template <typename T> BHARNET_HD T from_acc(acc_of<T> x);
template <> BHARNET_HD __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> BHARNET_HD __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> BHARNET_HD float from_acc<float>(float x) { return x; }
template <> BHARNET_HD double from_acc<double>(double x) { return x; }

inline constexpr unsigned kFullMask = 0xffffffffu;  // every lane of a warp

// Xor-butterfly sum over the warp (all 32 lanes take part): every lane ends with the same value.
template <typename A>
__device__ __forceinline__ A warp_sum(A x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

// The sum of every thread's x over a block of kThreads (a multiple of 32), in thread 0 (the
// other threads get 0); `red` is shared memory for kThreads / 32 values. Every thread of the block
// must call it; it starts with a barrier, so it can be called in a loop with the same `red`.
template <int kThreads, typename A>
__device__ A block_sum(A x, A* red) {
  x = warp_sum(x);
  __syncthreads();
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = x;
  __syncthreads();
  A total = A(0);
  if (threadIdx.x == 0)
    for (int w = 0; w < kThreads / 32; ++w) total += red[w];
  return total;
}

template <class P, int BM, int BN, int BK, int TM, int TN>
__global__ void __launch_bounds__((BM / TM) * (BN / TN)) tiled_gemm(P p, int64_t batch_base, int n_tiles) {
  using acc_t = typename P::acc_t;
  constexpr int kThreads = (BM / TM) * (BN / TN);
  __shared__ acc_t As[BK][BM + 1];  // +1: the k-major stores below hit different banks
  __shared__ acc_t Bs[BK][BN];
  const auto op = p.at(batch_base + blockIdx.z);
  // blockIdx.x numbers the (m, n) output tiles, n fastest (grid.y would cap the m tiles at 65535)
  const int tile = static_cast<int>(blockIdx.x);
  const int m0 = tile / n_tiles * BM, n0 = tile % n_tiles * BN;
  const int M = op.M, N = op.N, K = op.K;
  const int tid = threadIdx.x;
  const int tx = tid % (BN / TN), ty = tid / (BN / TN);
  acc_t acc[TM][TN];
#pragma unroll
  for (int r = 0; r < TM; ++r)
#pragma unroll
    for (int c = 0; c < TN; ++c) acc[r][c] = acc_t(0);
  for (int k0 = 0; k0 < K; k0 += BK) {
    for (int e = tid; e < BM * BK; e += kThreads) {
      // Consecutive threads walk the operand's contiguous dimension (coalesced loads).
      const int mm = P::kAContiguousInK ? e / BK : e % BM;
      const int kk = P::kAContiguousInK ? e % BK : e / BM;
      const int m = m0 + mm, k = k0 + kk;
      As[kk][mm] = (m < M && k < K) ? op.a(m, k) : acc_t(0);
    }
    for (int e = tid; e < BN * BK; e += kThreads) {
      const int nn = e % BN, kk = e / BN;
      const int n = n0 + nn, k = k0 + kk;
      Bs[kk][nn] = (n < N && k < K) ? op.b(k, n) : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      acc_t a[TM], b[TN];
#pragma unroll
      for (int r = 0; r < TM; ++r) a[r] = As[kk][ty * TM + r];
#pragma unroll
      for (int c = 0; c < TN; ++c) b[c] = Bs[kk][tx * TN + c];
#pragma unroll
      for (int r = 0; r < TM; ++r)
#pragma unroll
        for (int c = 0; c < TN; ++c) acc[r][c] += a[r] * b[c];
    }
    __syncthreads();
  }
#pragma unroll
  for (int r = 0; r < TM; ++r)
#pragma unroll
    for (int c = 0; c < TN; ++c) {
      const int m = m0 + ty * TM + r, n = n0 + tx * TN + c;
      if (m < M && n < N) op.store(m, n, acc[r][c]);
    }
}

// Launches tiled_gemm over `batches` batch indices (in chunks of at most 65535, the grid's z
// limit) with the M x N output tiles along grid.x (M, N: the largest op.M, op.N of any batch,
// below kMaxIndexExtent, as every op.K); returns the launch error.
template <int BM, int BN, int BK, int TM, int TN, class P>
cudaError_t launch_gemm(const P& p, int64_t M, int64_t N, int64_t batches, cudaStream_t stream) {
  if (M <= 0 || N <= 0) return cudaSuccess;
  if (M >= kMaxIndexExtent || N >= kMaxIndexExtent) return cudaErrorInvalidValue;
  constexpr int64_t kMaxZ = 65535;
  const int64_t n_tiles = (N + BN - 1) / BN, tiles = (M + BM - 1) / BM * n_tiles;
  if (tiles > INT_MAX) return cudaErrorInvalidConfiguration;
  const dim3 block((BM / TM) * (BN / TN));
  for (int64_t base = 0; base < batches; base += kMaxZ) {
    const int64_t count = batches - base < kMaxZ ? batches - base : kMaxZ;
    const dim3 grid(static_cast<unsigned>(tiles), 1, static_cast<unsigned>(count));
    const auto kernel = tiled_gemm<P, BM, BN, BK, TM, TN>;
    BHARNET_LAUNCH(kernel, grid, block, 0, stream)(p, base, static_cast<int>(n_tiles));
  }
  return cudaGetLastError();
}

// Launches kernel on `blocks` one-dimensional blocks of `threads` with `bytes` of dynamic shared
// memory, opting in above the 48 KB default; returns the launch error.
template <class Kernel, class... Args>
cudaError_t launch_blocks(Kernel kernel, int64_t blocks, int threads, size_t bytes, cudaStream_t stream,
                          Args... args) {
  constexpr size_t kDefaultSharedBytes = 48 * 1024;
  if (blocks == 0) return cudaSuccess;
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  if (bytes > kDefaultSharedBytes) {
    const cudaError_t error =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
    if (error != cudaSuccess) return error;
  }
  BHARNET_LAUNCH(kernel, static_cast<unsigned>(blocks), threads, bytes, stream)(args...);
  return cudaGetLastError();
}

// Calls fn(T()) with the storage type T of `dtype`.
template <class Fn>
cudaError_t dispatch(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat16: return fn(__half());
    case DType::kBFloat16: return fn(__nv_bfloat16());
    case DType::kFloat32: return fn(float());
    case DType::kFloat64: return fn(double());
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace bharnet
