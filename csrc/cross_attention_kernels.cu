// Attention core of cross_attention on CUDA (torch-free; bound by csrc/cross_attention_cuda.cpp).
//
// Math (bharnet/ops/cross_attention.py; the CPU kernels in csrc/cross_attention.cpp and the
// Triton op compute the same). q (N, Lq, D) and kv (N, Lk, 2D) = [k | v]; head h is features
// [h d, (h+1) d) of q, k and v; valid[j] = key_mask[n, j] (every key without a mask);
// scale = 1/sqrt(d). Per (n, h):
//   s[i, j] = scale q_i . k_j   (valid keys only)
//   lse_i   = log sum_j exp(s[i, j]),   P[i, j] = exp(s[i, j] - lse_i)  (0 at invalid keys)
//   o_i     = sum_j P[i, j] v_j
// A query without valid keys gets o_i = 0 and lse_i = +inf (so its recomputed P is 0 as well).
// Backward (dO = dL/do; P recomputed from lse):
//   dP = dO V^T,  delta_i = sum_j P[i, j] dP[i, j],  dS = P * (dP - delta),
//   dQ = scale dS K,  dK = scale dS^T Q,  dV = P^T dO
// delta is taken from the recomputed P (as in the CPU kernels): with one valid key P = 1 and
// delta = dP exactly, so dS = 0 and dQ = 0 like the reference.
//
// float16 / bfloat16 on sm_80+ take the tensor-core kernels of cross_attention_mma_kernels.cu
// (attn_mma_usable); what follows is the SIMT path for the other dtypes and devices.
// Structure: plain SIMT, one warp per row, lanes over keys for the scores and over features for
// the products (d <= 128: NC = 1, 2 or 4 features per lane, a template parameter). A
// block of kWarps warps owns kRows = kWarps * kRowsPerWarp rows of one (n, h) (warp w: rows
// w, w + kWarps, ...) and streams the other side in tiles of kTile = 32 rows (one per lane)
// staged in shared memory in the accumulation dtype (rows indexed by lane are padded to d + 1
// elements: bank-conflict free).
//   forward_kernel:      rows = queries; per key tile, lane j computes s[i, j] (a sequential FMA
//                        chain over the features, the same in every kernel, so the backward
//                        recomputes the forward's scores bitwise), then an online softmax
//                        (running max m_i and sum l_i, rescaled by exp(m_old - m_new)) and
//                        o_i += p_j v_j with p_j broadcast by shuffles; o = acc / l at the end.
//   backward_query_kernel: rows = queries; pass 1 over the key tiles sums delta_i (per lane, then
//                        a warp reduction) and writes it to the delta buffer; pass 2 recomputes
//                        P and dP and accumulates dq_i = scale sum_j dS[i, j] k_j.
//   backward_key_kernel: rows = keys; per query tile (q, dO, lse and delta staged), lane i
//                        computes P[i, j] and dS[i, j]; dv_j += P dO_i and dk_j += dS q_i with
//                        the lane values broadcast by shuffles; dk = scale * that sum.
// Each output element is written once by one thread, sums run in a fixed order (warp
// reductions are xor butterflies, which leave the same value in every lane): deterministic, no
// atomics. Arithmetic in float32 (float64 for float64 inputs), exp/log the accurate expf/logf.
// Global offsets are 64-bit; indices inside a block (rows < 32, features < 129) are int.
#include <climits>
#include <cmath>
#include <type_traits>

#include "cross_attention_device.cuh"
#include "cuda_gemm.cuh"

namespace bharnet {
namespace cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kRowsPerWarp = 4;
constexpr int kRows = kWarps * kRowsPerWarp;  // rows (queries, or keys for dk/dv) of one block
constexpr int kTile = 32;                     // rows of the other side per staged tile: one per lane
constexpr int kMaxChunks = 4;                 // head dims up to 32 * kMaxChunks = 128

__device__ __forceinline__ float madd(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double madd(double a, double b, double c) { return fma(a, b, c); }
__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

template <typename A>
__device__ __forceinline__ A infinity() {
  return static_cast<A>(INFINITY);
}

// Xor-butterfly maximum over the warp (warp_sum: cuda_gemm.cuh): every lane ends with the same value.
template <typename A>
__device__ __forceinline__ A warp_max(A x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const A y = __shfl_xor_sync(kFullMask, x, offset);
    x = y > x ? y : x;
  }
  return x;
}

// a . b over d features: one sequential FMA chain (every kernel computes a score with this, in
// this operand order, so the backward's scores equal the forward's bitwise).
template <typename A>
__device__ __forceinline__ A dot(const A* a, const A* b, int d) {
  A sum = A(0);
  for (int c = 0; c < d; ++c) sum = madd(a[c], b[c], sum);
  return sum;
}

// dst[r * ld + c] = src[r * stride + c] in acc for r < count, c < d; rows count..total-1 zero.
// Consecutive threads read consecutive features of a row (coalesced).
template <typename T>
__device__ __forceinline__ void stage(const T* src, int64_t stride, int count, int total, int d, int ld,
                                      acc_of<T>* dst) {
  for (int e = threadIdx.x; e < total * d; e += kThreads) {
    const int r = e / d, c = e - r * d;
    dst[r * ld + c] = r < count ? to_acc(src[r * stride + c]) : acc_of<T>(0);
  }
}

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Block = (n, h, kRows queries). Shared: q rows (kRows x d), k tile (kTile x (d + 1)), v tile
// (kTile x d).
template <typename T, int NC>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(AttnShape s, const T* __restrict__ q, const T* __restrict__ kv, const bool* __restrict__ mask,
                   T* __restrict__ o, acc_of<T>* __restrict__ lse, acc_of<T> scale) {
  using A = acc_of<T>;
  BHARNET_DYNAMIC_SHARED(16, shared);
  const int d = static_cast<int>(s.d), ld = d + 1;
  const int64_t D = s.D, Lq = s.Lq, Lk = s.Lk;
  const int64_t row_blocks = (Lq + kRows - 1) / kRows;
  const int64_t nh = blockIdx.x / row_blocks, i0 = blockIdx.x % row_blocks * kRows;
  const int64_t n = nh / s.heads, h = nh % s.heads;
  const int rows = static_cast<int>(min64(kRows, Lq - i0));
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  A* q_s = reinterpret_cast<A*>(shared);
  A* k_s = q_s + kRows * d;
  A* v_s = k_s + kTile * ld;

  stage(q + (n * Lq + i0) * D + h * d, D, rows, kRows, d, d, q_s);
  A m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][NC];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    m[r] = -infinity<A>();
    l[r] = A(0);
#pragma unroll
    for (int t = 0; t < NC; ++t) acc[r][t] = A(0);
  }

  const T* k_base = kv + n * Lk * 2 * D + h * d;
  for (int64_t j0 = 0; j0 < Lk; j0 += kTile) {
    const int count = static_cast<int>(min64(kTile, Lk - j0));
    __syncthreads();  // the previous tile (and, the first time, nothing) is consumed
    stage(k_base + j0 * 2 * D, 2 * D, count, kTile, d, ld, k_s);
    stage(k_base + j0 * 2 * D + D, 2 * D, count, kTile, d, d, v_s);
    __syncthreads();
    const bool valid = key_valid(mask, n, j0 + lane, Lk);
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int row = r * kWarps + warp;
      if (row >= rows) continue;  // warp-uniform
      const A score = valid ? scaled(scale, dot(q_s + row * d, k_s + lane * ld, d)) : -infinity<A>();
      // A NaN score counts as +inf in the max, so that every lane agrees on it (a comparison
      // skips NaN) and the row comes out NaN (p = exp(NaN - inf)), as in the reference.
      const A tile_max = warp_max(score != score ? infinity<A>() : score);
      const A m_new = tile_max > m[r] ? tile_max : m[r];
      if (m_new == -infinity<A>()) continue;  // no valid key yet (warp-uniform)
      const A rescale = exp_acc(m[r] - m_new);  // 0 while m[r] = -inf
      const A p = valid ? exp_acc(score - m_new) : A(0);
      l[r] = l[r] * rescale + warp_sum(p);
      m[r] = m_new;
#pragma unroll
      for (int t = 0; t < NC; ++t) acc[r][t] *= rescale;
      for (int jj = 0; jj < count; ++jj) {
        const A pj = __shfl_sync(kFullMask, p, jj);
#pragma unroll
        for (int t = 0; t < NC; ++t) {
          const int c = lane + 32 * t;
          if (c < d) acc[r][t] = madd(pj, v_s[jj * d + c], acc[r][t]);
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int row = r * kWarps + warp;
    if (row >= rows) continue;
    const bool empty = m[r] == -infinity<A>();
    const A inv = empty ? A(0) : A(1) / l[r];
    T* o_row = o + (n * Lq + i0 + row) * D + h * d;
#pragma unroll
    for (int t = 0; t < NC; ++t) {
      const int c = lane + 32 * t;
      if (c < d) o_row[c] = from_acc<T>(acc[r][t] * inv);
    }
    if (lane == 0) lse[nh * Lq + i0 + row] = empty ? infinity<A>() : m[r] + log_acc(l[r]);
  }
}

// Block = (n, h, kRows queries). Shared: q and dO rows (kRows x d each), k and v tiles
// (kTile x (d + 1) each). Writes dq and delta.
template <typename T, int NC>
__global__ void __launch_bounds__(kThreads)
    backward_query_kernel(AttnShape s, const T* __restrict__ grad_o, const T* __restrict__ q,
                          const T* __restrict__ kv, const acc_of<T>* __restrict__ lse,
                          const bool* __restrict__ mask, acc_of<T>* __restrict__ delta_out, T* __restrict__ dq,
                          acc_of<T> scale) {
  using A = acc_of<T>;
  BHARNET_DYNAMIC_SHARED(16, shared);
  const int d = static_cast<int>(s.d), ld = d + 1;
  const int64_t D = s.D, Lq = s.Lq, Lk = s.Lk;
  const int64_t row_blocks = (Lq + kRows - 1) / kRows;
  const int64_t nh = blockIdx.x / row_blocks, i0 = blockIdx.x % row_blocks * kRows;
  const int64_t n = nh / s.heads, h = nh % s.heads;
  const int rows = static_cast<int>(min64(kRows, Lq - i0));
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  A* q_s = reinterpret_cast<A*>(shared);
  A* do_s = q_s + kRows * d;
  A* k_s = do_s + kRows * d;
  A* v_s = k_s + kTile * ld;

  const int64_t offset = (n * Lq + i0) * D + h * d;
  stage(q + offset, D, rows, kRows, d, d, q_s);
  stage(grad_o + offset, D, rows, kRows, d, d, do_s);
  A lse_r[kRowsPerWarp], delta[kRowsPerWarp], acc[kRowsPerWarp][NC];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int row = r * kWarps + warp;
    lse_r[r] = row < rows ? lse[nh * Lq + i0 + row] : infinity<A>();
    delta[r] = A(0);
#pragma unroll
    for (int t = 0; t < NC; ++t) acc[r][t] = A(0);
  }

  const T* k_base = kv + n * Lk * 2 * D + h * d;
  const bool one_tile = Lk <= kTile;  // then pass 2 reuses pass 1's staged tile
  for (int pass = 0; pass < 2; ++pass) {
    for (int64_t j0 = 0; j0 < Lk; j0 += kTile) {
      const int count = static_cast<int>(min64(kTile, Lk - j0));
      if (pass == 0 || !one_tile) {
        __syncthreads();
        stage(k_base + j0 * 2 * D, 2 * D, count, kTile, d, ld, k_s);
        stage(k_base + j0 * 2 * D + D, 2 * D, count, kTile, d, ld, v_s);
        __syncthreads();
      }
      const bool valid = key_valid(mask, n, j0 + lane, Lk);
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const int row = r * kWarps + warp;
        if (row >= rows || lse_r[r] == infinity<A>()) continue;  // warp-uniform
        A p = A(0), dp = A(0);
        if (valid) {
          p = exp_acc(scaled(scale, dot(q_s + row * d, k_s + lane * ld, d)) - lse_r[r]);
          dp = dot(do_s + row * d, v_s + lane * ld, d);
        }
        if (pass == 0) {
          delta[r] += p * dp;  // per-lane partial sum, reduced after the pass
          continue;
        }
        const A ds = p * (dp - delta[r]);
        for (int jj = 0; jj < count; ++jj) {
          const A dsj = __shfl_sync(kFullMask, ds, jj);
#pragma unroll
          for (int t = 0; t < NC; ++t) {
            const int c = lane + 32 * t;
            if (c < d) acc[r][t] = madd(dsj, k_s[jj * ld + c], acc[r][t]);
          }
        }
      }
    }
    if (pass == 0) {
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) delta[r] = warp_sum(delta[r]);
    }
  }

#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int row = r * kWarps + warp;
    if (row >= rows) continue;
    T* dq_row = dq + offset + static_cast<int64_t>(row) * D;
#pragma unroll
    for (int t = 0; t < NC; ++t) {
      const int c = lane + 32 * t;
      if (c < d) dq_row[c] = from_acc<T>(scale * acc[r][t]);
    }
    if (lane == 0) delta_out[nh * Lq + i0 + row] = delta[r];
  }
}

// Block = (n, h, kRows keys). Shared: k and v rows (kRows x d each), q and dO tiles
// (kTile x (d + 1) each), the tile's lse and delta (kTile each). Writes dkv = [dk | dv].
template <typename T, int NC>
__global__ void __launch_bounds__(kThreads)
    backward_key_kernel(AttnShape s, const T* __restrict__ grad_o, const T* __restrict__ q,
                        const T* __restrict__ kv, const acc_of<T>* __restrict__ lse,
                        const bool* __restrict__ mask, const acc_of<T>* __restrict__ delta, T* __restrict__ dkv,
                        acc_of<T> scale) {
  using A = acc_of<T>;
  BHARNET_DYNAMIC_SHARED(16, shared);
  const int d = static_cast<int>(s.d), ld = d + 1;
  const int64_t D = s.D, Lq = s.Lq, Lk = s.Lk;
  const int64_t key_blocks = (Lk + kRows - 1) / kRows;
  const int64_t nh = blockIdx.x / key_blocks, j0 = blockIdx.x % key_blocks * kRows;
  const int64_t n = nh / s.heads, h = nh % s.heads;
  const int rows = static_cast<int>(min64(kRows, Lk - j0));
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  A* k_s = reinterpret_cast<A*>(shared);
  A* v_s = k_s + kRows * d;
  A* q_s = v_s + kRows * d;
  A* do_s = q_s + kTile * ld;
  A* lse_s = do_s + kTile * ld;
  A* delta_s = lse_s + kTile;

  const int64_t kv_offset = (n * Lk + j0) * 2 * D + h * d;
  stage(kv + kv_offset, 2 * D, rows, kRows, d, d, k_s);
  stage(kv + kv_offset + D, 2 * D, rows, kRows, d, d, v_s);
  bool active[kRowsPerWarp];
  A dk[kRowsPerWarp][NC], dv[kRowsPerWarp][NC];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int row = r * kWarps + warp;
    active[r] = row < rows && key_valid(mask, n, j0 + row, Lk);  // masked keys: dk = dv = 0
#pragma unroll
    for (int t = 0; t < NC; ++t) dk[r][t] = dv[r][t] = A(0);
  }

  const int64_t q_offset = n * Lq * D + h * d, stat_offset = nh * Lq;
  for (int64_t i0 = 0; i0 < Lq; i0 += kTile) {
    const int count = static_cast<int>(min64(kTile, Lq - i0));
    __syncthreads();
    stage(q + q_offset + i0 * D, D, count, kTile, d, ld, q_s);
    stage(grad_o + q_offset + i0 * D, D, count, kTile, d, ld, do_s);
    if (threadIdx.x < kTile) {
      const int i = threadIdx.x;
      lse_s[i] = i < count ? lse[stat_offset + i0 + i] : infinity<A>();
      delta_s[i] = i < count ? delta[stat_offset + i0 + i] : A(0);
    }
    __syncthreads();
    const A lse_i = lse_s[lane], delta_i = delta_s[lane];
    const bool query = lse_i != infinity<A>();  // a real query with at least one valid key
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      if (!active[r]) continue;  // warp-uniform
      const int row = r * kWarps + warp;
      A p = A(0), ds = A(0);
      if (query) {
        p = exp_acc(scaled(scale, dot(q_s + lane * ld, k_s + row * d, d)) - lse_i);
        ds = p * (dot(do_s + lane * ld, v_s + row * d, d) - delta_i);
      }
      for (int ii = 0; ii < count; ++ii) {
        const A pi = __shfl_sync(kFullMask, p, ii);
        const A dsi = __shfl_sync(kFullMask, ds, ii);
#pragma unroll
        for (int t = 0; t < NC; ++t) {
          const int c = lane + 32 * t;
          if (c < d) {
            dv[r][t] = madd(pi, do_s[ii * ld + c], dv[r][t]);
            dk[r][t] = madd(dsi, q_s[ii * ld + c], dk[r][t]);
          }
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int row = r * kWarps + warp;
    if (row >= rows) continue;
    T* dk_row = dkv + kv_offset + static_cast<int64_t>(row) * 2 * D;
#pragma unroll
    for (int t = 0; t < NC; ++t) {
      const int c = lane + 32 * t;
      if (c < d) {
        dk_row[c] = from_acc<T>(scale * dk[r][t]);
        dk_row[D + c] = from_acc<T>(dv[r][t]);
      }
    }
  }
}

// Calls fn(std::integral_constant<int, NC>()) with NC features per lane: 1 for d <= 32, 2 for
// d <= 64, else kMaxChunks = 4 (no NC = 3 instance: d in 65..96 runs with one idle chunk,
// sparing a quarter of the file's compile time).
template <class Fn>
cudaError_t with_chunks(int64_t d, Fn&& fn) {
  if (d <= 32) return fn(std::integral_constant<int, 1>());
  if (d <= 64) return fn(std::integral_constant<int, 2>());
  return fn(std::integral_constant<int, kMaxChunks>());
}

bool valid_shape(const AttnShape& s) {
  return s.d >= 1 && s.d <= 32 * kMaxChunks && s.D == s.heads * s.d && s.N >= 0 && s.Lq >= 0 && s.Lk >= 0;
}

template <typename A>
A attention_scale(int64_t d) {
  return A(1) / std::sqrt(A(d));
}

}  // namespace

cudaError_t attn_forward(DType dtype, const AttnShape& s, const void* q, const void* kv, const bool* mask, void* o,
                         void* lse, cudaStream_t stream) {
  if (!valid_shape(s)) return cudaErrorInvalidValue;
  if (attn_mma_usable(dtype, s)) return attn_forward_mma(dtype, s, q, kv, mask, o, lse, stream);
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_of<T>;
    return with_chunks(s.d, [&](auto chunks) {
      constexpr int NC = decltype(chunks)::value;
      const size_t bytes = (kRows * s.d + kTile * (s.d + 1) + kTile * s.d) * sizeof(A);
      const int64_t blocks = s.N * s.heads * ((s.Lq + kRows - 1) / kRows);
      return launch_blocks(forward_kernel<T, NC>, blocks, kThreads, bytes, stream, s, static_cast<const T*>(q),
                           static_cast<const T*>(kv), mask, static_cast<T*>(o), static_cast<A*>(lse),
                           attention_scale<A>(s.d));
    });
  });
}

cudaError_t attn_backward(DType dtype, const AttnShape& s, const void* grad_o, const void* q, const void* kv,
                          const void* lse, const bool* mask, void* delta, void* dq, void* dkv, cudaStream_t stream) {
  if (!valid_shape(s)) return cudaErrorInvalidValue;
  if (attn_mma_usable(dtype, s)) return attn_backward_mma(dtype, s, grad_o, q, kv, lse, mask, delta, dq, dkv, stream);
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_of<T>;
    return with_chunks(s.d, [&](auto chunks) {
      constexpr int NC = decltype(chunks)::value;
      const A scale = attention_scale<A>(s.d);
      const size_t query_bytes = (2 * kRows * s.d + 2 * kTile * (s.d + 1)) * sizeof(A);
      const int64_t query_blocks = s.N * s.heads * ((s.Lq + kRows - 1) / kRows);
      const int64_t key_blocks = s.N * s.heads * ((s.Lk + kRows - 1) / kRows);
      cudaError_t error = launch_blocks(backward_query_kernel<T, NC>, query_blocks, kThreads, query_bytes, stream, s,
                                        static_cast<const T*>(grad_o), static_cast<const T*>(q),
                                        static_cast<const T*>(kv), static_cast<const A*>(lse), mask,
                                        static_cast<A*>(delta), static_cast<T*>(dq), scale);
      if (error != cudaSuccess) return error;
      const size_t key_bytes = (2 * kRows * s.d + 2 * kTile * (s.d + 1) + 2 * kTile) * sizeof(A);
      return launch_blocks(backward_key_kernel<T, NC>, key_blocks, kThreads, key_bytes, stream, s,
                           static_cast<const T*>(grad_o), static_cast<const T*>(q), static_cast<const T*>(kv),
                           static_cast<const A*>(lse), mask, static_cast<const A*>(delta), static_cast<T*>(dkv),
                           scale);
    });
  });
}

}  // namespace cuda
}  // namespace bharnet
