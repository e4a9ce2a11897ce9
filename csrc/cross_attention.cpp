// Attention core of cross_attention on the CPU: bharnet::cross_attention_core_cpp and its backward.
//
// Math (bharnet/ops/cross_attention.py; the Triton op bharnet::cross_attention_core computes the
// same). q (N, Lq, D) and kv (N, Lk, 2D) = [k | v]; head h is features [h d, (h+1) d) of q, k and
// v (D = heads * d); valid[j] = key_mask[n, j] (every key without a mask); scale = 1/sqrt(d).
// Per (n, h):
//   s[i, j] = scale * q_i . k_j                      (valid keys only)
//   m_i     = max_j s[i, j],   l_i = sum_j exp(s[i, j] - m_i),   lse_i = m_i + log l_i
//   P[i, j] = exp(s[i, j] - m_i) / l_i  (= exp(s[i, j] - lse_i); 0 at invalid keys)
//   o_i     = sum_j P[i, j] v_j
// A query without valid keys gets o_i = 0 and lse_i = +inf (so its recomputed P is 0 as well).
// Backward (dO = dL/do; P recomputed from lse):
//   dV = P^T dO,   dP = dO V^T,   delta_i = sum_j P[i, j] dP[i, j] (= dO_i . o_i),
//   dS = P * (dP - delta),   dQ = scale dS K,   dK = scale dS^T Q
// Invalid keys have P = 0, hence dS = 0: they get exactly zero dK and dV. delta is taken from
// the recomputed P (as the softmax's own backward does, and unlike dO . o), so that dS sums to
// zero over each row as exactly as the rounding allows: a query with one valid key gets dS = 0
// and dQ = 0 exactly, like the reference.
//
// Structure. The forward runs per (n, h, block of kQueryBlock queries): it packs k_h transposed
// (d x Lk) and v_h (Lk x d) into zero-padded buffers (kept for the task's next block of the same
// (n, h)), computes the block's scores S = Q K^T with the register-tiled micro-kernel of
// cpu_simd.h (64-byte tiles on AVX-512), turns each row into P with a two-pass softmax
// (max, then exp and sum; the whole key range is in the buffer, so no online rescaling) and
// multiplies P V into o. The backward runs per (n, h), because dK and dV sum over every query:
// per query block it recomputes the scores with the same code (so s - lse is exactly 0 where P
// is 1) and P, forms dP, delta and dS, accumulates dV += P^T dO and dK += dS^T Q in per-task
// buffers and writes dQ = scale dS K; dK and dV are stored at the end. Every output element is
// written by one task in a fixed order: results do not depend on the thread count. Arithmetic
// is in the input dtype (float32 or float64); exp is vectorised for float32
// (simd::exp_nonpositive), std::exp for float64.
//
// The CUDA kernels of both ops are csrc/cross_attention_kernels.cu (bound by
// csrc/cross_attention_cuda.cpp); the input checks they share with this file are in
// csrc/cross_attention.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "cpu_simd.h"
#include "cross_attention.h"

namespace bharnet {
namespace {

template <typename T> using Vec = simd::vec<T>;

// Queries per block: the block's scores (kQueryBlock x Lkp) stay in cache next to k and v.
constexpr int64_t kQueryBlock = 64;

using Sizes = AttnSizes;

// exp of each lane (y <= 0 up to rounding). float32: simd::exp_nonpositive, whose range
// reduction builds 2^n in the exponent bits and so holds down to n = -126, y = -87: y is clamped
// there (exp(y) is then ~1e-38 instead of smaller, invisible next to the row's largest term,
// 1; NaN stays NaN). float64: std::exp per lane.
template <int Bytes = 32>
BHARNET_INLINE simd::vec<float, Bytes> exp_lanes(simd::vec<float, Bytes> y) {
  return simd::exp_nonpositive<Bytes>(y < -87.0f ? simd::broadcast<float, Bytes>(-87.0f) : y);
}

template <int Bytes = 32>
BHARNET_INLINE simd::vec<double, Bytes> exp_lanes(simd::vec<double, Bytes> y) {
  for (int i = 0; i < simd::kLanes<double, Bytes>; ++i) y[i] = std::exp(y[i]);
  return y;
}

// c[r * ldc + n] (+)= scale sum_k A(r, k) B(k, n) for r < rows, n < cols, with
// A(r, k) = a[r * sam + k * sak] and B(k, n) = b[k * ldb + n] (b's rows padded to whole tiles),
// in the micro-kernel tiles of the Bytes-wide path (simd::tiles; the same sums either way).
template <typename T, int Bytes = 32>
BHARNET_INLINE void gemm(int64_t rows, int64_t cols, int64_t K, const T* a, int64_t sam, int64_t sak, const T* b,
                         int64_t ldb, T* c, int64_t ldc, bool accumulate, T scale = T(1)) {
  simd::tiles<T, Bytes>(rows, cols, [&](auto& tile, int64_t r, int nr, int64_t n, int nc)
                                        __attribute__((always_inline)) {
    tile.fma(K, a + r * sam, sam, sak, b + n, ldb, nr);
    tile.scale_by(scale);
    tile.store_to(c + r * ldc + n, ldc, nr, nc, accumulate);
  });
}

// Asks for row j + 8 of x (its first and last of d entries) while row j is copied: the packs are
// the first reads of kv (and of q and dO in the backward), as d-wide slices of rows 2D or D apart,
// which the hardware prefetchers do not fetch ahead on their own (measured on 2 cores, frame
// mode: 15% of the forward's time, 25% of the backward's).
template <typename T>
BHARNET_INLINE void prefetch_ahead(const T* x, int64_t stride, int64_t j, int64_t rows, int64_t d) {
  const T* row = x + std::min(j + 8, rows - 1) * stride;
  __builtin_prefetch(row);
  __builtin_prefetch(row + d - 1);
}

// out[j * ld + c] = x[j * stride + c] (rows x d), columns d..ld zero.
template <typename T>
BHARNET_INLINE void pack_rows(const T* x, int64_t stride, int64_t rows, int64_t d, int64_t ld, T* out) {
  for (int64_t j = 0; j < rows; ++j) {
    prefetch_ahead(x, stride, j, rows, d);
    for (int64_t c = 0; c < d; ++c) out[j * ld + c] = x[j * stride + c];
    for (int64_t c = d; c < ld; ++c) out[j * ld + c] = T(0);
  }
}

// out[c * ld + j] = x[j * stride + c] (the transpose, d x rows), columns rows..ld zero. Reads
// row by row: down a column, a power-of-two stride (2D) would keep hitting the same cache sets.
template <typename T>
BHARNET_INLINE void pack_transposed(const T* x, int64_t stride, int64_t rows, int64_t d, int64_t ld, T* out) {
  for (int64_t j = 0; j < rows; ++j) {
    prefetch_ahead(x, stride, j, rows, d);
    for (int64_t c = 0; c < d; ++c) out[c * ld + j] = x[j * stride + c];
  }
  for (int64_t c = 0; c < d; ++c)
    for (int64_t j = rows; j < ld; ++j) out[c * ld + j] = T(0);
}

// keep[j] = 1 for the valid keys of sequence n (j < Lk and mask[n, j]), 0 elsewhere (up to Lkp).
template <typename T>
BHARNET_INLINE void valid_keys(const bool* mask, int64_t Lk, int64_t Lkp, T* keep) {
  for (int64_t j = 0; j < Lkp; ++j) keep[j] = (j < Lk && (mask == nullptr || mask[j])) ? T(1) : T(0);
}

// Per-task scratch buffers (one set per thread chunk). Rows indexed by keys have length Lkp
// and rows indexed by features length dp (simd::packed_ld: whole tiles, zero-padded); the
// products compute Lkc = Lk and dc = d rounded up to whole tiles only.
template <typename T>
struct Scratch {
  int64_t Lkp, Lkc, dp, dc;
  int64_t packed = -1;  // forward: the (n, h) whose keys kt, vp and keep hold (-1: none)
  std::vector<T> keep, kt, vt, kp, vp, scores, grads, qb, dob, dk, dv;
  Scratch(const Sizes& s, bool backward)
      : Lkp(simd::packed_ld<T>(s.Lk)), Lkc(simd::round_up(s.Lk, simd::kTileCols<T>)), dp(simd::packed_ld<T>(s.d)),
        dc(simd::round_up(s.d, simd::kTileCols<T>)), keep(Lkp), kt(s.d * Lkp), scores(kQueryBlock * Lkp) {
    if (backward) {
      vt.resize(s.d * Lkp);
      kp.resize(s.Lk * dp);
      grads.resize(kQueryBlock * Lkp);
      qb.resize(kQueryBlock * dp);
      dob.resize(kQueryBlock * dp);
      dk.resize(s.Lk * dp);
      dv.resize(s.Lk * dp);
    } else {
      vp.resize(s.Lk * dp);
    }
  }
};

// Row s[0:Lkc] (scores) -> softmax over the valid keys (0 elsewhere); returns lse_i.
// Passes: max, then exp and sum, then the normalisation, in Bytes-wide vectors (Lkc is whole
// 64-byte tiles) with the same results on both paths. Each vector select tests one comparison:
// GCC 12 turns a 64-byte select on two and-ed comparisons into per-lane scalar code (2x slower).
template <typename T, int Bytes = 32>
BHARNET_INLINE T softmax_row(T* s, const T* keep, int64_t Lkc) {
  using W = simd::vec<T, Bytes>;
  constexpr int L = simd::kLanes<T, Bytes>;
  const W zero{}, minus_inf = simd::broadcast<T, Bytes>(-std::numeric_limits<T>::infinity());
  W top = minus_inf;
  for (int64_t j = 0; j < Lkc; j += L) {
    const W x = simd::load<T, Bytes>(keep + j) != T(0) ? simd::load<T, Bytes>(s + j) : minus_inf;
    top = x > top ? x : top;
  }
  T m = top[0];
  for (int i = 1; i < L; ++i) m = std::max(m, top[i]);
  if (m == -std::numeric_limits<T>::infinity()) {
    // No valid key: o = 0, lse = +inf. Valid keys whose scores are all NaN or -inf (the max
    // skips NaN): NaN, as the reference's softmax gives, so that a NaN does not turn into 0.
    bool any_valid = false;
    for (int64_t j = 0; j < Lkc && !any_valid; ++j) any_valid = keep[j] != T(0);
    const T fill = any_valid ? std::numeric_limits<T>::quiet_NaN() : T(0);
    for (int64_t j = 0; j < Lkc; ++j) s[j] = fill;
    return any_valid ? std::numeric_limits<T>::quiet_NaN() : std::numeric_limits<T>::infinity();
  }
  Vec<T> total{};
  for (int64_t j = 0; j < Lkc; j += L) {
    const W p = simd::load<T, Bytes>(keep + j) != T(0) ? exp_lanes<Bytes>(simd::load<T, Bytes>(s + j) - m) : zero;
    simd::store<T, Bytes>(s + j, p);
    simd::add_in_32_byte_lanes<T, Bytes>(total, p);
  }
  T l = T(0);
  for (int i = 0; i < simd::kLanes<T>; ++i) l += total[i];
  const T inv = T(1) / l;
  for (int64_t j = 0; j < Lkc; j += L) simd::store<T, Bytes>(s + j, simd::load<T, Bytes>(s + j) * inv);
  return m + std::log(l);
}

// o and lse of queries i0..i1 of (n, h). The packed keys and values of (n, h) stay in the
// task's scratch for its next query block of the same (n, h).
template <typename T>
struct ForwardBlock {
  template <int Bytes>
  static BHARNET_INLINE void run(Sizes s, const T* q, const T* kv, const bool* mask, int64_t n, int64_t h, int64_t i0,
                                 int64_t i1, Scratch<T>* w, T* o, T* lse) {
    const int64_t d = s.d, D = s.D, Lkp = w->Lkp, Lkc = w->Lkc, dp = w->dp, rows = i1 - i0;
    const T scale = T(1) / std::sqrt(T(d));
    if (w->packed != n * s.heads + h) {
      const T* k = kv + n * s.Lk * 2 * D + h * d;
      valid_keys(mask ? mask + n * s.Lk : nullptr, s.Lk, Lkp, w->keep.data());
      pack_transposed(k, 2 * D, s.Lk, d, Lkp, w->kt.data());
      pack_rows(k + D, 2 * D, s.Lk, d, dp, w->vp.data());
      w->packed = n * s.heads + h;
    }
    const T* qi = q + (n * s.Lq + i0) * D + h * d;
    gemm<T, Bytes>(rows, Lkc, d, qi, D, 1, w->kt.data(), Lkp, w->scores.data(), Lkp, false, scale);
    T* lse_i = lse + (n * s.heads + h) * s.Lq + i0;
    for (int64_t i = 0; i < rows; ++i)
      lse_i[i] = softmax_row<T, Bytes>(w->scores.data() + i * Lkp, w->keep.data(), Lkc);
    gemm<T, Bytes>(rows, d, s.Lk, w->scores.data(), Lkp, 1, w->vp.data(), dp, o + (n * s.Lq + i0) * D + h * d, D,
                   false);
  }
};

// dq, dk and dv of (n, h), in Bytes-wide tiles and vectors (the same results on both paths).
template <typename T>
struct BackwardHead {
  template <int Bytes>
  static BHARNET_INLINE void run(Sizes s, const T* grad_o, const T* q, const T* kv, const T* lse, const bool* mask,
                                 int64_t n, int64_t h, Scratch<T>* scratch, T* dq, T* dkv) {
    Scratch<T>& w = *scratch;
    using W = simd::vec<T, Bytes>;
    constexpr int L = simd::kLanes<T, Bytes>;
    const int64_t d = s.d, D = s.D, Lk = s.Lk, Lkp = w.Lkp, Lkc = w.Lkc, dp = w.dp, dc = w.dc;
    const T scale = T(1) / std::sqrt(T(d));
    const T* k = kv + n * Lk * 2 * D + h * d;
    valid_keys(mask ? mask + n * Lk : nullptr, Lk, Lkp, w.keep.data());
    pack_transposed(k, 2 * D, Lk, d, Lkp, w.kt.data());
    pack_transposed(k + D, 2 * D, Lk, d, Lkp, w.vt.data());
    pack_rows(k, 2 * D, Lk, d, dp, w.kp.data());
    std::fill(w.dk.begin(), w.dk.end(), T(0));
    std::fill(w.dv.begin(), w.dv.end(), T(0));
    T* P = w.scores.data();
    T* dS = w.grads.data();
    for (int64_t i0 = 0; i0 < s.Lq; i0 += kQueryBlock) {
      const int64_t rows = std::min(kQueryBlock, s.Lq - i0), offset = (n * s.Lq + i0) * D + h * d;
      const T* lse_i = lse + (n * s.heads + h) * s.Lq + i0;
      pack_rows(q + offset, D, rows, d, dp, w.qb.data());
      pack_rows(grad_o + offset, D, rows, d, dp, w.dob.data());
      gemm<T, Bytes>(rows, Lkc, d, q + offset, D, 1, w.kt.data(), Lkp, P, Lkp, false, scale);  // scores
      gemm<T, Bytes>(rows, Lkc, d, grad_o + offset, D, 1, w.vt.data(), Lkp, dS, Lkp, false);  // dP
      for (int64_t i = 0; i < rows; ++i) {  // P from the scores, then dS from dP
        T* p_row = P + i * Lkp;
        T* ds_row = dS + i * Lkp;
        Vec<T> lanes{};  // delta's per-lane sums, in the 32-byte lane order on both paths
        for (int64_t j = 0; j < Lkc; j += L) {
          const W x = simd::load<T, Bytes>(p_row + j) - lse_i[i];
          const W p = simd::load<T, Bytes>(w.keep.data() + j) != T(0) ? exp_lanes<Bytes>(x) : W{};
          simd::store<T, Bytes>(p_row + j, p);
          simd::add_products_in_32_byte_lanes<T, Bytes>(lanes, p, simd::load<T, Bytes>(ds_row + j));
        }
        T delta = T(0);
        for (int l = 0; l < simd::kLanes<T>; ++l) delta += lanes[l];
        for (int64_t j = 0; j < Lkc; j += L)
          simd::store<T, Bytes>(ds_row + j,
                                simd::load<T, Bytes>(p_row + j) * (simd::load<T, Bytes>(ds_row + j) - delta));
      }
      gemm<T, Bytes>(Lk, dc, rows, P, 1, Lkp, w.dob.data(), dp, w.dv.data(), dp, true);  // dV += P^T dO
      gemm<T, Bytes>(Lk, dc, rows, dS, 1, Lkp, w.qb.data(), dp, w.dk.data(), dp, true);  // dK += dS^T Q
      gemm<T, Bytes>(rows, d, Lk, dS, Lkp, 1, w.kp.data(), dp, dq + offset, D, false, scale);  // dQ = scale dS K
    }
    T* dk = dkv + n * Lk * 2 * D + h * d;
    for (int64_t j = 0; j < Lk; ++j)
      for (int64_t c = 0; c < d; ++c) {
        dk[j * 2 * D + c] = scale * w.dk[j * dp + c];
        dk[j * 2 * D + D + c] = w.dv[j * dp + c];
      }
  }
};

constexpr const char* kForwardName = "bharnet::cross_attention_core_cpp";
constexpr const char* kBackwardName = "bharnet::cross_attention_core_cpp_backward";

Sizes check_inputs(const char* op, const at::Tensor& q, const at::Tensor& kv, const std::optional<at::Tensor>& mask,
                   int64_t heads) {
  TORCH_CHECK(q.device().is_cpu(), op, " (CPU kernel): expected CPU tensors, got q on ", q.device());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble, op,
              ": the CPU kernels take float32 or float64, got q in ", q.scalar_type());
  return attn_check(op, q, kv, mask, heads);
}

void check_same(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape, const at::Tensor& q) {
  attn_check_like(op, name, t, shape, q.scalar_type(), "q's dtype", q);
}

const bool* mask_ptr(const at::Tensor& mask) { return mask.defined() ? mask.data_ptr<bool>() : nullptr; }

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& q_in, const at::Tensor& kv_in,
                                               const std::optional<at::Tensor>& mask_in, int64_t heads) {
  const Sizes s = check_inputs(kForwardName, q_in, kv_in, mask_in, heads);
  const auto q = q_in.contiguous(), kv = kv_in.contiguous();
  const auto mask = mask_in ? mask_in->contiguous() : at::Tensor();
  auto o = at::empty({s.N, s.Lq, s.D}, q.options());
  auto lse = at::empty({s.N, s.heads, s.Lq}, q.options());
  if (o.numel() == 0) return {o, lse};
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), kForwardName, [&] {
    const int64_t blocks = (s.Lq + kQueryBlock - 1) / kQueryBlock;
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kvp = kv.data_ptr<scalar_t>();
    scalar_t* op = o.data_ptr<scalar_t>();
    scalar_t* lp = lse.data_ptr<scalar_t>();
    at::parallel_for(0, s.N * s.heads * blocks, 1, [&](int64_t begin, int64_t end) {
      Scratch<scalar_t> scratch(s, false);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t nh = task / blocks, i0 = task % blocks * kQueryBlock;
        simd::run_per_isa<ForwardBlock<scalar_t>>(s, qp, kvp, mask_ptr(mask), nh / s.heads, nh % s.heads, i0,
                                                   std::min(s.Lq, i0 + kQueryBlock), &scratch, op, lp);
      }
    });
  });
  return {o, lse};
}

std::tuple<at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad_o_in, const at::Tensor& q_in,
                                                const at::Tensor& kv_in, const at::Tensor& lse_in,
                                                const std::optional<at::Tensor>& mask_in, int64_t heads) {
  const Sizes s = check_inputs(kBackwardName, q_in, kv_in, mask_in, heads);
  check_same(kBackwardName, "grad_o", grad_o_in, q_in.sizes(), q_in);
  check_same(kBackwardName, "lse", lse_in, {s.N, s.heads, s.Lq}, q_in);
  const auto grad_o = grad_o_in.contiguous(), q = q_in.contiguous(), kv = kv_in.contiguous();
  const auto lse = lse_in.contiguous();
  const auto mask = mask_in ? mask_in->contiguous() : at::Tensor();
  auto dq = at::empty_like(q), dkv = at::empty_like(kv);
  if (dq.numel() == 0 || dkv.numel() == 0) {
    dq.zero_();
    dkv.zero_();
    return {dq, dkv};
  }
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), kBackwardName, [&] {
    const scalar_t* gp = grad_o.data_ptr<scalar_t>();
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kvp = kv.data_ptr<scalar_t>();
    const scalar_t* lp = lse.data_ptr<scalar_t>();
    scalar_t* dqp = dq.data_ptr<scalar_t>();
    scalar_t* dkvp = dkv.data_ptr<scalar_t>();
    at::parallel_for(0, s.N * s.heads, 1, [&](int64_t begin, int64_t end) {
      Scratch<scalar_t> scratch(s, true);
      for (int64_t nh = begin; nh < end; ++nh)
        simd::run_per_isa<BackwardHead<scalar_t>>(s, gp, qp, kvp, lp, mask_ptr(mask), nh / s.heads, nh % s.heads,
                                                   &scratch, dqp, dkvp);
    });
  });
  return {dq, dkv};
}

}  // namespace
}  // namespace bharnet

TORCH_LIBRARY_FRAGMENT(bharnet, m) {
  m.def("cross_attention_core_cpp(Tensor q, Tensor kv, Tensor? key_mask, int heads) -> (Tensor, Tensor)");
  m.def("cross_attention_core_cpp_backward(Tensor grad_o, Tensor q, Tensor kv, Tensor lse, "
        "Tensor? key_mask, int heads) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bharnet, CPU, m) {
  m.impl("cross_attention_core_cpp", &bharnet::forward_cpu);
  m.impl("cross_attention_core_cpp_backward", &bharnet::backward_cpu);
}
