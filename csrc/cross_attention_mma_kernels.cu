// Tensor-core path of the cross-attention core on CUDA: float16 / bfloat16 q and kv, head dims up
// to 128, sm_80+ (called by attn_forward / attn_backward in cross_attention_kernels.cu, whose
// header states the math; the contract is cuda_launchers.h's).
//
// Flash-attention structure with WMMA 16x16x16 products (float32 accumulators). A block is 4
// warps and owns kBlockRows = 64 rows of one (n, h) (queries, or keys for dk/dv); warp w owns rows
// 16w..16w+15 and walks the other side in steps of kStep = 64, staged in shared memory as 16-bit
// rows of ld = DP + 8 elements (DP = the head dim rounded up to 16, 32, 64 or 128; padding
// features and rows past Lq / Lk are zero). The scores and their gradients of a warp's 16 x 64
// step go through a per-warp float32 scratch, where lane l owns row l / 2, columns 32 (l % 2) ..
// +31: it applies the scale, the key mask and the softmax there and writes P (and dS) back as
// 16-bit operands of the next products (rounded once, as the Triton kernels round p and ds).
//   forward_mma:   o = sum_j P v_j with the online softmax (running max m and sum l per row;
//                  the float32 o accumulator lives in shared memory, rescaled by exp(m_old -
//                  m_new) per step, then o / l); lse = m + log l (+inf without valid keys, o = 0).
//   query_grad_mma: pass 1 over the keys: delta_i = sum_j P dP (written out); pass 2:
//                  dS = P (dP - delta), dq = scale dS K (accumulated in registers).
//   key_grad_mma:  per query step: S^T = K Q^T, P^T = exp(S^T - lse), dP^T = V dO^T,
//                  dS^T = P^T (dP^T - delta); dv += P^T dO and dk += dS^T Q in registers;
//                  dk = scale dk. Masked keys get P = 0, so zero dk and dv.
// The forward and the query-side backward compute each score with the same WMMA products (Q
// rows times K rows, in the same order), so dq's P = exp(s - lse) is the forward's; the
// key-side backward computes S^T = K Q^T, the same products with the operands swapped.
// Deterministic: each output element is written by one thread, sums run in a fixed order.
// Global offsets are 64-bit; indices inside a block are int.
#include <mma.h>

#include <climits>
#include <type_traits>

#include "cross_attention_device.cuh"
#include "cuda_gemm.cuh"

namespace bharnet {
namespace cuda {
namespace {

using namespace nvcuda;

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kBlockRows = 16 * kWarps;  // rows of one block: 16 per warp
constexpr int kStep = 64;                // rows of the other side per step

template <int DP>
struct Layout {
  static constexpr int kLd = DP + 8;         // 16-bit elements per staged row
  static constexpr int kLdS = kStep + 4;     // floats per scratch row (scores, dP)
  static constexpr int kLdP = kStep + 8;     // 16-bit elements per P / dS row
  static constexpr int kLdO = DP + 4;        // floats per accumulator / output staging row
  static constexpr int kTileBytes = kBlockRows * kLd * 2;         // one staged 64-row tile
  static constexpr int kScratchBytes = kWarps * 16 * kLdS * 4;    // one float scratch, all warps
  static constexpr int kOperandBytes = kWarps * 16 * kLdP * 2;    // one 16-bit P / dS, all warps
  static constexpr int kAccBytes = kWarps * 16 * kLdO * 4;        // forward o accumulator
  static constexpr int kForwardBytes = 3 * kTileBytes + kScratchBytes + kOperandBytes + kAccBytes + kStep * 4;
  static constexpr int kQueryGradBytes = 4 * kTileBytes + 2 * kScratchBytes + kOperandBytes + kStep * 4;
  static constexpr int kKeyGradBytes = 4 * kTileBytes + 2 * kScratchBytes + 2 * kOperandBytes + 2 * kStep * 4;
  static_assert(2 * kLdS >= kLdO, "a warp's two scratch tiles stage its 16 x DP output rows");
  static_assert(kTileBytes % 128 == 0 && kScratchBytes % 128 == 0 && kOperandBytes % 128 == 0 && kAccBytes % 128 == 0,
                "regions stay 128-byte aligned");
};

template <typename T> using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
template <typename T> using FragBRow = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major>;
template <typename T> using FragBCol = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major>;
using FragAcc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// Bump allocator over the dynamic shared memory (regions are multiples of 128 bytes).
struct Carve {
  unsigned char* next;
  template <typename U>
  __device__ U* take(int bytes) {
    U* p = reinterpret_cast<U*>(next);
    next += bytes;
    return p;
  }
};

// tile[r * ld + c] = src[(row0 + r) * stride + c] for rows row0 + r < rows and c < d, zero
// elsewhere (kBlockRows x DP). Consecutive threads read consecutive features of a row: 16 bytes
// (8 features) at a time when d, the stride and src keep every row's features 16-byte aligned
// (the model's head dims and widths), else one element at a time.
template <typename T, int DP>
__device__ __forceinline__ void stage(T* tile, const T* src, int64_t stride, int64_t row0, int64_t rows, int d) {
  constexpr int ld = Layout<DP>::kLd;
  if (d % 8 == 0 && stride % 8 == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0) {
    constexpr int chunks = DP / 8;  // 16-byte chunks per staged row; ld * 2 bytes is a multiple of 16
    for (int e = threadIdx.x; e < kBlockRows * chunks; e += kThreads) {
      const int r = e / chunks, c = e % chunks * 8;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (row0 + r < rows && c < d) v = *reinterpret_cast<const uint4*>(src + (row0 + r) * stride + c);
      *reinterpret_cast<uint4*>(tile + r * ld + c) = v;
    }
    return;
  }
  for (int e = threadIdx.x; e < kBlockRows * DP; e += kThreads) {
    const int r = e / DP, c = e % DP;
    tile[r * ld + c] = (row0 + r < rows && c < d) ? src[(row0 + r) * stride + c] : from_acc<T>(0.0f);
  }
}

// The keys and values of (n, h) from key j0 (kStep rows, zero past Lk) into k_tile and v_tile,
// and valid[j] = 1 for the valid keys among them (0 elsewhere).
template <typename T, int DP>
__device__ __forceinline__ void stage_keys(T* k_tile, T* v_tile, float* valid, const AttnShape& s, const T* kv,
                                           const bool* mask, int64_t n, int64_t h, int64_t j0) {
  static_assert(kStep == kBlockRows, "stage() fills kBlockRows rows");
  const int d = static_cast<int>(s.d);
  const T* k_rows = kv + n * s.Lk * 2 * s.D + h * d;
  stage<T, DP>(k_tile, k_rows, 2 * s.D, j0, s.Lk, d);
  stage<T, DP>(v_tile, k_rows + s.D, 2 * s.D, j0, s.Lk, d);
  for (int j = threadIdx.x; j < kStep; j += kThreads) valid[j] = key_valid(mask, n, j0 + j, s.Lk) ? 1.0f : 0.0f;
}

// out (16 x kStep, ld kLdS) = a_rows (16 x DP) . b_rows^T (b_rows: kStep rows of DP): the scores
// of a warp's rows against a step of the other side, or dP = dO V^T.
template <typename T, int DP>
__device__ __forceinline__ void rows_times_rows_t(const T* a_rows, const T* b_rows, float* out) {
  constexpr int ld = Layout<DP>::kLd;
#pragma unroll
  for (int nt = 0; nt < kStep / 16; ++nt) {
    FragAcc acc;
    wmma::fill_fragment(acc, 0.0f);
#pragma unroll
    for (int kt = 0; kt < DP / 16; ++kt) {
      FragA<T> a;
      FragBCol<T> b;
      wmma::load_matrix_sync(a, a_rows + kt * 16, ld);
      wmma::load_matrix_sync(b, b_rows + nt * 16 * ld + kt * 16, ld);
      wmma::mma_sync(acc, a, b, acc);
    }
    wmma::store_matrix_sync(out + nt * 16, acc, Layout<DP>::kLdS, wmma::mem_row_major);
  }
}

// acc[ct] += p (16 x kStep, ld kLdP) . rows (kStep x DP, ld kLd), for the DP / 16 column tiles.
template <typename T, int DP>
__device__ __forceinline__ void accumulate_product(FragAcc (&acc)[DP / 16], const T* p, const T* rows) {
#pragma unroll
  for (int kt = 0; kt < kStep / 16; ++kt) {
    FragA<T> a;
    wmma::load_matrix_sync(a, p + kt * 16, Layout<DP>::kLdP);
#pragma unroll
    for (int ct = 0; ct < DP / 16; ++ct) {
      FragBRow<T> b;
      wmma::load_matrix_sync(b, rows + kt * 16 * Layout<DP>::kLd + ct * 16, Layout<DP>::kLd);
      wmma::mma_sync(acc[ct], a, b, acc[ct]);
    }
  }
}

// The warp's 16 accumulated rows, times `scale`, to dst[r * stride + c] for rows row0 + r < rows
// and c < d, through the warp's float staging area (16 x kLdO).
template <typename T, int DP>
__device__ __forceinline__ void store_rows(FragAcc (&acc)[DP / 16], float* staging, float scale, T* dst,
                                           int64_t stride, int64_t row0, int64_t rows, int d) {
  constexpr int ld = Layout<DP>::kLdO;
#pragma unroll
  for (int ct = 0; ct < DP / 16; ++ct) wmma::store_matrix_sync(staging + ct * 16, acc[ct], ld, wmma::mem_row_major);
  __syncwarp();
  const int lane = threadIdx.x % 32;
  for (int e = lane; e < 16 * DP; e += 32) {
    const int r = e / DP, c = e % DP;
    if (row0 + r < rows && c < d) dst[(row0 + r) * stride + c] = from_acc<T>(scale * staging[r * ld + c]);
  }
}

// The (n, h) and first row of this block, for blocks of kBlockRows of `rows` rows per (n, h).
struct BlockRows {
  int64_t nh, n, h, row0;
};

__device__ __forceinline__ BlockRows block_rows(const AttnShape& s, int64_t rows) {
  const int64_t tiles = (rows + kBlockRows - 1) / kBlockRows, nh = blockIdx.x / tiles;
  return {nh, nh / s.heads, nh % s.heads, static_cast<int64_t>(blockIdx.x % tiles) * kBlockRows};
}

// Block = (n, h, 64 queries).
template <typename T, int DP>
__global__ void __launch_bounds__(kThreads)
    forward_mma_kernel(AttnShape s, const T* __restrict__ q, const T* __restrict__ kv, const bool* __restrict__ mask,
                       T* __restrict__ o, float* __restrict__ lse, float scale) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using L = Layout<DP>;
  BHARNET_DYNAMIC_SHARED(128, smem);
  Carve carve{smem};
  T* q_tile = carve.take<T>(L::kTileBytes);
  T* k_tile = carve.take<T>(L::kTileBytes);
  T* v_tile = carve.take<T>(L::kTileBytes);
  float* scores = carve.take<float>(L::kScratchBytes);
  T* p_tile = carve.take<T>(L::kOperandBytes);
  float* o_acc = carve.take<float>(L::kAccBytes);
  float* valid = carve.take<float>(kStep * 4);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, d = static_cast<int>(s.d);
  const BlockRows block = block_rows(s, s.Lq);
  const int64_t nh = block.nh, n = block.n, h = block.h, i0 = block.row0;
  const int64_t D = s.D;
  stage<T, DP>(q_tile, q + n * s.Lq * D + h * d, D, i0, s.Lq, d);
  float* my_scores = scores + warp * 16 * L::kLdS;
  T* my_p = p_tile + warp * 16 * L::kLdP;
  float* my_o = o_acc + warp * 16 * L::kLdO;
  for (int e = lane; e < 16 * L::kLdO; e += 32) my_o[e] = 0.0f;
  __syncwarp();  // read back by other lanes (at the end when Lk = 0)
  const bool active = i0 + 16 * warp < s.Lq;  // a warp whose rows are all past Lq only stages
  const int row = lane / 2, col0 = (lane % 2) * (kStep / 2);
  float m = -INFINITY, l = 0.0f;
  for (int64_t j0 = 0; j0 < s.Lk; j0 += kStep) {
    stage_keys<T, DP>(k_tile, v_tile, valid, s, kv, mask, n, h, j0);
    __syncthreads();
    if (active) {
      rows_times_rows_t<T, DP>(q_tile + warp * 16 * L::kLd, k_tile, my_scores);
      __syncwarp();
      float top = -INFINITY;
      for (int c = col0; c < col0 + kStep / 2; ++c)
        if (valid[c] != 0.0f) top = fmaxf(top, scaled(scale, my_scores[row * L::kLdS + c]));
      top = fmaxf(top, __shfl_xor_sync(kFullMask, top, 1));
      const float m_new = fmaxf(m, top);
      const float correction = m_new == -INFINITY ? 1.0f : expf(m - m_new);
      float sum = 0.0f;
      for (int c = col0; c < col0 + kStep / 2; ++c) {
        const float p = valid[c] != 0.0f ? expf(scaled(scale, my_scores[row * L::kLdS + c]) - m_new) : 0.0f;
        sum += p;
        my_p[row * L::kLdP + c] = from_acc<T>(p);
      }
      sum += __shfl_xor_sync(kFullMask, sum, 1);
      l = l * correction + sum;
      m = m_new;
      for (int c = (lane % 2) * (DP / 2); c < (lane % 2 + 1) * (DP / 2); ++c) my_o[row * L::kLdO + c] *= correction;
      __syncwarp();
      FragAcc acc[DP / 16];  // o += P V, through the rescaled accumulator in shared memory
#pragma unroll
      for (int ct = 0; ct < DP / 16; ++ct)
        wmma::load_matrix_sync(acc[ct], my_o + ct * 16, L::kLdO, wmma::mem_row_major);
      accumulate_product<T, DP>(acc, my_p, v_tile);
#pragma unroll
      for (int ct = 0; ct < DP / 16; ++ct)
        wmma::store_matrix_sync(my_o + ct * 16, acc[ct], L::kLdO, wmma::mem_row_major);
    }
    __syncthreads();
  }
  if (!active) return;
  const int64_t i = i0 + 16 * warp + row;
  if (i < s.Lq) {
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    T* o_row = o + (n * s.Lq + i) * D + h * d;
    for (int c = (lane % 2) * (DP / 2); c < (lane % 2 + 1) * (DP / 2) && c < d; ++c)
      o_row[c] = from_acc<T>(my_o[row * L::kLdO + c] * inv);
    // l = 0: no valid key (+inf); l NaN: NaN scores (fmaxf skipped them), NaN as in the reference
    if (lane % 2 == 0) lse[nh * s.Lq + i] = l > 0.0f ? m + logf(l) : (l == l ? INFINITY : NAN);
  }
#endif
}

// P (and dP) of a warp's 16 rows against a step: lane's row `row`, columns col0.. +31. For the
// query-side kernels the rows are queries (lse, delta per row; valid per column); for the
// key-side kernel they are keys (valid per row; lse, delta per column).
__device__ __forceinline__ float probability(float s, float scale, float lse, bool valid) {
  return valid ? expf(scaled(scale, s) - lse) : 0.0f;
}

// Block = (n, h, 64 queries): delta, then dq.
template <typename T, int DP>
__global__ void __launch_bounds__(kThreads)
    query_grad_mma_kernel(AttnShape s, const T* __restrict__ grad_o, const T* __restrict__ q,
                          const T* __restrict__ kv, const float* __restrict__ lse, const bool* __restrict__ mask,
                          float* __restrict__ delta, T* __restrict__ dq, float scale) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using L = Layout<DP>;
  BHARNET_DYNAMIC_SHARED(128, smem);
  Carve carve{smem};
  T* q_tile = carve.take<T>(L::kTileBytes);
  T* do_tile = carve.take<T>(L::kTileBytes);
  T* k_tile = carve.take<T>(L::kTileBytes);
  T* v_tile = carve.take<T>(L::kTileBytes);
  float* scratch = carve.take<float>(2 * L::kScratchBytes);  // per warp: scores, then dP
  T* ds_tile = carve.take<T>(L::kOperandBytes);
  float* valid = carve.take<float>(kStep * 4);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, d = static_cast<int>(s.d);
  const BlockRows block = block_rows(s, s.Lq);
  const int64_t nh = block.nh, n = block.n, h = block.h, i0 = block.row0;
  const int64_t D = s.D;
  stage<T, DP>(q_tile, q + n * s.Lq * D + h * d, D, i0, s.Lq, d);
  stage<T, DP>(do_tile, grad_o + n * s.Lq * D + h * d, D, i0, s.Lq, d);
  float* my_scores = scratch + warp * 2 * 16 * L::kLdS;  // with my_dp: the output staging at the end
  float* my_dp = my_scores + 16 * L::kLdS;
  T* my_ds = ds_tile + warp * 16 * L::kLdP;
  const bool active = i0 + 16 * warp < s.Lq;
  const int row = lane / 2, col0 = (lane % 2) * (kStep / 2);
  const int64_t i = i0 + 16 * warp + row;
  const float lse_i = i < s.Lq ? lse[nh * s.Lq + i] : INFINITY;
  float delta_i = 0.0f;
  FragAcc acc[DP / 16];
#pragma unroll
  for (int ct = 0; ct < DP / 16; ++ct) wmma::fill_fragment(acc[ct], 0.0f);
  for (int pass = 0; pass < 2; ++pass) {
    for (int64_t j0 = 0; j0 < s.Lk; j0 += kStep) {
      stage_keys<T, DP>(k_tile, v_tile, valid, s, kv, mask, n, h, j0);
      __syncthreads();
      if (active) {
        rows_times_rows_t<T, DP>(q_tile + warp * 16 * L::kLd, k_tile, my_scores);
        rows_times_rows_t<T, DP>(do_tile + warp * 16 * L::kLd, v_tile, my_dp);
        __syncwarp();
        if (pass == 0) {
          for (int c = col0; c < col0 + kStep / 2; ++c)
            delta_i += probability(my_scores[row * L::kLdS + c], scale, lse_i, valid[c] != 0.0f) *
                       my_dp[row * L::kLdS + c];
        } else {
          for (int c = col0; c < col0 + kStep / 2; ++c) {
            const float p = probability(my_scores[row * L::kLdS + c], scale, lse_i, valid[c] != 0.0f);
            my_ds[row * L::kLdP + c] = from_acc<T>(p * (my_dp[row * L::kLdS + c] - delta_i));
          }
          __syncwarp();
          accumulate_product<T, DP>(acc, my_ds, k_tile);
        }
              }
      __syncthreads();
    }
    if (pass == 0 && active) {
      delta_i += __shfl_xor_sync(kFullMask, delta_i, 1);
      if (lane % 2 == 0 && i < s.Lq) delta[nh * s.Lq + i] = delta_i;
    }
  }
  if (active) store_rows<T, DP>(acc, my_scores, scale, dq + n * s.Lq * D + h * d, D, i0 + 16 * warp, s.Lq, d);
#endif
}

// Block = (n, h, 64 keys): dk and dv.
template <typename T, int DP>
__global__ void __launch_bounds__(kThreads)
    key_grad_mma_kernel(AttnShape s, const T* __restrict__ grad_o, const T* __restrict__ q, const T* __restrict__ kv,
                        const float* __restrict__ lse, const bool* __restrict__ mask,
                        const float* __restrict__ delta, T* __restrict__ dkv, float scale) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using L = Layout<DP>;
  BHARNET_DYNAMIC_SHARED(128, smem);
  Carve carve{smem};
  T* k_tile = carve.take<T>(L::kTileBytes);
  T* v_tile = carve.take<T>(L::kTileBytes);
  T* q_tile = carve.take<T>(L::kTileBytes);
  T* do_tile = carve.take<T>(L::kTileBytes);
  float* scratch = carve.take<float>(2 * L::kScratchBytes);  // per warp: scores, then dP
  T* p_tile = carve.take<T>(L::kOperandBytes);
  T* ds_tile = carve.take<T>(L::kOperandBytes);
  float* lse_step = carve.take<float>(kStep * 4);
  float* delta_step = carve.take<float>(kStep * 4);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, d = static_cast<int>(s.d);
  const BlockRows block = block_rows(s, s.Lk);
  const int64_t nh = block.nh, n = block.n, h = block.h, j0 = block.row0;
  const int64_t D = s.D;
  const T* k_rows = kv + n * s.Lk * 2 * D + h * d;
  stage<T, DP>(k_tile, k_rows, 2 * D, j0, s.Lk, d);
  stage<T, DP>(v_tile, k_rows + D, 2 * D, j0, s.Lk, d);
  float* my_scores = scratch + warp * 2 * 16 * L::kLdS;  // with my_dp: the output staging at the end
  float* my_dp = my_scores + 16 * L::kLdS;
  T* my_p = p_tile + warp * 16 * L::kLdP;
  T* my_ds = ds_tile + warp * 16 * L::kLdP;
  const bool active = j0 + 16 * warp < s.Lk;
  const int row = lane / 2, col0 = (lane % 2) * (kStep / 2);
  const bool row_valid = key_valid(mask, n, j0 + 16 * warp + row, s.Lk);
  FragAcc dk[DP / 16], dv[DP / 16];
#pragma unroll
  for (int ct = 0; ct < DP / 16; ++ct) {
    wmma::fill_fragment(dk[ct], 0.0f);
    wmma::fill_fragment(dv[ct], 0.0f);
  }
  for (int64_t i0 = 0; i0 < s.Lq; i0 += kStep) {
    stage<T, DP>(q_tile, q + n * s.Lq * D + h * d, D, i0, s.Lq, d);
    stage<T, DP>(do_tile, grad_o + n * s.Lq * D + h * d, D, i0, s.Lq, d);
    for (int c = threadIdx.x; c < kStep; c += kThreads) {
      const bool inside = i0 + c < s.Lq;
      lse_step[c] = inside ? lse[nh * s.Lq + i0 + c] : INFINITY;
      delta_step[c] = inside ? delta[nh * s.Lq + i0 + c] : 0.0f;
    }
    __syncthreads();
    if (active) {
      rows_times_rows_t<T, DP>(k_tile + warp * 16 * L::kLd, q_tile, my_scores);
      rows_times_rows_t<T, DP>(v_tile + warp * 16 * L::kLd, do_tile, my_dp);
      __syncwarp();
      for (int c = col0; c < col0 + kStep / 2; ++c) {
        const float p = probability(my_scores[row * L::kLdS + c], scale, lse_step[c], row_valid);
        my_p[row * L::kLdP + c] = from_acc<T>(p);
        my_ds[row * L::kLdP + c] = from_acc<T>(p * (my_dp[row * L::kLdS + c] - delta_step[c]));
      }
      __syncwarp();
      accumulate_product<T, DP>(dv, my_p, do_tile);
      accumulate_product<T, DP>(dk, my_ds, q_tile);
          }
    __syncthreads();
  }
  if (!active) return;
  T* out = dkv + n * s.Lk * 2 * D + h * d;
  store_rows<T, DP>(dk, my_scores, scale, out, 2 * D, j0 + 16 * warp, s.Lk, d);
  __syncwarp();
  store_rows<T, DP>(dv, my_scores, 1.0f, out + D, 2 * D, j0 + 16 * warp, s.Lk, d);
#endif
}

// Calls fn(std::integral_constant<int, DP>()) with DP = d rounded up to 16, 32, 64 or 128.
template <class Fn>
cudaError_t with_head_tile(int64_t d, Fn&& fn) {
  if (d <= 16) return fn(std::integral_constant<int, 16>());
  if (d <= 32) return fn(std::integral_constant<int, 32>());
  if (d <= 64) return fn(std::integral_constant<int, 64>());
  return fn(std::integral_constant<int, 128>());
}

template <typename T>
bool kernels_probe(const AttnShape& s) {
  int device = 0, major = 0, optin = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess || major < 8) {
    return false;
  }
  return with_head_tile(s.d, [&](auto dp) {
    constexpr int DP = decltype(dp)::value;
    using L = Layout<DP>;
    cudaFuncAttributes forward{}, query{}, key{};
    const bool usable = L::kForwardBytes <= optin && L::kQueryGradBytes <= optin && L::kKeyGradBytes <= optin &&
                        cudaFuncGetAttributes(&forward, forward_mma_kernel<T, DP>) == cudaSuccess &&
                        cudaFuncGetAttributes(&query, query_grad_mma_kernel<T, DP>) == cudaSuccess &&
                        cudaFuncGetAttributes(&key, key_grad_mma_kernel<T, DP>) == cudaSuccess &&
                        forward.ptxVersion >= 80 && query.ptxVersion >= 80 && key.ptxVersion >= 80;
    return usable ? cudaSuccess : cudaErrorNotSupported;
  }) == cudaSuccess;
}

template <typename T>
bool kernels_usable(const AttnShape& s) {
  const bool usable = kernels_probe<T>(s);
  if (!usable) cudaGetLastError();  // a failed runtime query leaves no pending error for the SIMT launch
  return usable;
}

template <typename T>
cudaError_t forward_mma(const AttnShape& s, const void* q, const void* kv, const bool* mask, void* o, void* lse,
                        float scale, cudaStream_t stream) {
  return with_head_tile(s.d, [&](auto dp) {
    constexpr int DP = decltype(dp)::value;
    const int64_t blocks = s.N * s.heads * ((s.Lq + kBlockRows - 1) / kBlockRows);
    return launch_blocks(forward_mma_kernel<T, DP>, blocks, kThreads, Layout<DP>::kForwardBytes, stream, s,
                         static_cast<const T*>(q), static_cast<const T*>(kv), mask, static_cast<T*>(o),
                         static_cast<float*>(lse), scale);
  });
}

template <typename T>
cudaError_t backward_mma(const AttnShape& s, const void* grad_o, const void* q, const void* kv, const void* lse,
                         const bool* mask, void* delta, void* dq, void* dkv, float scale, cudaStream_t stream) {
  return with_head_tile(s.d, [&](auto dp) {
    constexpr int DP = decltype(dp)::value;
    const int64_t query_blocks = s.N * s.heads * ((s.Lq + kBlockRows - 1) / kBlockRows);
    const int64_t key_blocks = s.N * s.heads * ((s.Lk + kBlockRows - 1) / kBlockRows);
    const cudaError_t error = launch_blocks(
        query_grad_mma_kernel<T, DP>, query_blocks, kThreads, Layout<DP>::kQueryGradBytes, stream, s,
        static_cast<const T*>(grad_o), static_cast<const T*>(q), static_cast<const T*>(kv),
        static_cast<const float*>(lse), mask, static_cast<float*>(delta), static_cast<T*>(dq), scale);
    if (error != cudaSuccess) return error;
    return launch_blocks(key_grad_mma_kernel<T, DP>, key_blocks, kThreads, Layout<DP>::kKeyGradBytes, stream, s,
                         static_cast<const T*>(grad_o), static_cast<const T*>(q), static_cast<const T*>(kv),
                         static_cast<const float*>(lse), mask, static_cast<const float*>(delta),
                         static_cast<T*>(dkv), scale);
  });
}

}  // namespace

bool attn_mma_usable(DType dtype, const AttnShape& s) {
  if (s.d < 1 || s.d > 128) return false;
  if (dtype == DType::kFloat16) return kernels_usable<__half>(s);
  if (dtype == DType::kBFloat16) return kernels_usable<__nv_bfloat16>(s);
  return false;
}

cudaError_t attn_forward_mma(DType dtype, const AttnShape& s, const void* q, const void* kv, const bool* mask,
                             void* o, void* lse, cudaStream_t stream) {
  const float scale = 1.0f / sqrtf(static_cast<float>(s.d));
  return dtype == DType::kFloat16 ? forward_mma<__half>(s, q, kv, mask, o, lse, scale, stream)
                                  : forward_mma<__nv_bfloat16>(s, q, kv, mask, o, lse, scale, stream);
}

cudaError_t attn_backward_mma(DType dtype, const AttnShape& s, const void* grad_o, const void* q, const void* kv,
                              const void* lse, const bool* mask, void* delta, void* dq, void* dkv,
                              cudaStream_t stream) {
  const float scale = 1.0f / sqrtf(static_cast<float>(s.d));
  return dtype == DType::kFloat16
             ? backward_mma<__half>(s, grad_o, q, kv, lse, mask, delta, dq, dkv, scale, stream)
             : backward_mma<__nv_bfloat16>(s, grad_o, q, kv, lse, mask, delta, dq, dkv, scale, stream);
}

}  // namespace cuda
}  // namespace bharnet
