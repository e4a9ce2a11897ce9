// Torch-free interface between the CUDA kernels (csrc/*.cu, compiled by nvcc without torch
// headers) and their bindings (csrc/*_cuda.cpp): raw device pointers, sizes, a dtype code and
// the stream to launch on. Every launcher returns the launch's cudaError_t.
//
// Dtypes: features (v, dy, x, y, dx, DeTGC's weight and bias, the cross-attention's q, kv, o,
// grad_o, dq and dkv) have `dtype`; the accumulation dtype "acc" is float64 for kFloat64 and
// float32 otherwise, and is also the dtype of CTR-GC's topology inputs and of every buffer
// documented as "acc" below.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace bharnet {
namespace cuda {

enum class DType : int { kFloat16, kBFloat16, kFloat32, kFloat64 };

// The generic GEMM (cuda_gemm.cuh) and the operand views index inside one batch with int, and
// divide with FastDivmod (numerators below 2^31): the bindings keep every such index below
// 2^30, which leaves headroom for the tile edges (m0 + BM, k0 + BK) in int.
constexpr int64_t kMaxIndexExtent = int64_t(1) << 30;

// CTR-GC: v (B, H, C, T, V); topologies (B or 1, H, G, V, V) in acc (static mode: A itself,
// shared by every b, G = 1).
struct CtrShape {
  int64_t B, H, C, T, V, R, G;
  bool dynamic;
};

// topo[b, h, g, i, j] = alpha (sum_r W[h, g, r] tanh(q[b, h, r, i] - k[b, h, r, j]) + bias[h, g]) + A[h, i, j]
cudaError_t ctr_topology(DType dtype, const CtrShape& s, const void* A, const void* q, const void* k,
                         const void* weight, const void* bias, const void* alpha, void* topo, cudaStream_t stream);
// Whether ctr_forward and ctr_backward take their tensor-core kernels for these inputs: float16 /
// bfloat16, V <= 128, a device of sm_80 or newer with the shared memory they need, kernels
// compiled for it (else the SIMT GEMM; same contract).
bool ctr_mma_usable(DType dtype, const CtrShape& s);
// y[b, c, t, i] = sum_h sum_j topo[b, h, g(c), i, j] v[b, h, c, t, j]
cudaError_t ctr_forward(DType dtype, const CtrShape& s, const void* v, const void* topo, void* y, cudaStream_t stream);
// dv[b, h, c, t, j] = sum_i topo[b, h, g(c), i, j] dy[b, c, t, i];
// dtopo[b, h, g, i, j] (acc, (B, H, G, V, V)) = sum_{c in g, t} dy[b, c, t, i] v[b, h, c, t, j]
cudaError_t ctr_backward(DType dtype, const CtrShape& s, const void* dy, const void* v, const void* topo, void* dv,
                         void* dtopo, cudaStream_t stream);

// The refinement's gradients (dynamic mode), all in acc, from dtopo (B, H, G, V, V) = dL/dtopo, with
// th_r[i, j] = tanh(q[b, h, r, i] - k[b, h, r, j]) and D_r = sum_g weight[h, g, r] dtopo[b, h, g]:
//   dq[b, h, r, i] = alpha sum_j D_r (1 - th_r^2),  dk[b, h, r, j] = -alpha sum_i D_r (1 - th_r^2),
//   dA[h, i, j] = sum_{b, g} dtopo,  P[h, g, r] = sum_{b, i, j} dtopo[b, h, g] th_r,  S[h, g] = sum_{b, i, j} dtopo[b, h, g],
//   dweight = alpha P,  dbias = alpha S,  dalpha (1 element) = sum W P + sum bias S.
// scratch (acc) holds H G R + H G + B H G R elements. Three launches, no atomics.
cudaError_t ctr_refinement_grad(DType dtype, const CtrShape& s, const void* dtopo, const void* q, const void* k,
                                const void* weight, const void* bias, const void* alpha, void* dA, void* dq, void* dk,
                                void* dweight, void* dbias, void* dalpha, void* scratch, cudaStream_t stream);

// DeTGC: x (B, C, T, V); weight (O, C, E); y (B, O, T_out, V). The sampling table has one
// entry per (t', e): rows p0, p1 (int32) and the weight w (acc) of row p1. The kernels index
// within a sample, and the (b, t', v) reduction, in 32-bit ints: C T V, O T_out V, B T_out V,
// B T, 2 O C E and 2 T_out E O (an input row's reduction when every sample reads it) must be
// below kMaxIndexExtent (the binding checks).
struct DetShape {
  int64_t B, C, T, V, O, E, T_out;
};

// Output tile of the forward and parameter-gradient GEMMs: det_row_tile(O) rows for O output
// channels by kDetColTile columns (the binding sizes the split-K of the parameter gradients
// with them).
inline int64_t det_row_tile(int64_t O) { return O <= 16 ? 16 : O <= 32 ? 32 : 64; }
constexpr int64_t kDetColTile = 64;

// The tables, as the reference computes positions: in P (float64 if offsets_fp64, else float32;
// offsets tau (E,) in P) for every (t', e), i = t' E + e,
//   r = t' stride + tau[e];  p = clamp(r, 0, T - 1) (NaN stays NaN);  p0[i] = floor(p) (0 for NaN);
//   p1[i] = min(p0 + 1, T - 1);  w[i] (acc) = p - floor(p) rounded to dtype;
//   inside[i] (acc) = 1 where the clamp passes the gradient (0 <= r <= T - 1 if bounds_pass_grad,
//   else 0 < r < T - 1), 0 elsewhere; inside may be null.
// With row_start non-null, also the CSR table of the samples reading each input row q:
// row_start (T + 1), src (2 T_out E: i) and coef (acc, 2 T_out E), the entries of row q being
// those with p0[i] = q (coef 1 - w[i] rounded to dtype) in ascending i, then those with p1[i] = q
// (coef w[i]). One block of 256 threads.
cudaError_t det_tables(DType dtype, const DetShape& s, int64_t stride, const void* offsets, bool offsets_fp64,
                       bool bounds_pass_grad, int32_t* p0, int32_t* p1, void* w, void* inside, int32_t* row_start,
                       int32_t* src, void* coef, cudaStream_t stream);
// y[b, o, t', v] = bias[o] + sum_{c, e} weight[o, c, e] ((1 - w) x[b, c, p0, v] + w x[b, c, p1, v]); bias may be null
cudaError_t det_forward(DType dtype, const DetShape& s, const void* x, const int32_t* p0, const int32_t* p1,
                        const void* w, const void* weight, const void* bias, void* y, cudaStream_t stream);
// out[split, o, k] (acc, (splits, O, 2 C E)) = sum over split's share of (b, t', v) of dy[b, o, t', v] * s[b, k, t', v]
// with s = the interpolated samples for k < C E (dW), and inside[t', e] * (x[p1] - x[p0]) at k - C E for
// k >= C E (D; inside: acc 0/1).
cudaError_t det_param_grad(DType dtype, const DetShape& s, const void* dy, const void* x, const int32_t* p0,
                           const int32_t* p1, const void* w, const void* inside, int64_t splits, void* out,
                           cudaStream_t stream);
// From det_param_grad's partials part (acc, (splits, O, 2 C E)): dweight[o, k] = sum_split part[split, o, k]
// (in dtype, like weight) and dtau[e] (acc, (E,)) = sum_{o, c} weight[o, c, e] sum_split part[split, o, C E + c E + e].
cudaError_t det_finish_param_grad(DType dtype, const DetShape& s, int64_t splits, const void* part,
                                  const void* weight, void* dweight, void* dtau, cudaStream_t stream);
// dx[b, c, t, v] = sum_{entries i of row t} coef[i] sum_o weight[o, c, e_i] dy[b, o, t'_i, v] with the CSR table
// row_start (T + 1), src (t' E + e) and coef (acc).
cudaError_t det_input_grad(DType dtype, const DetShape& s, const void* dy, const void* weight,
                           const int32_t* row_start, const int32_t* src, const void* coef, void* dx,
                           cudaStream_t stream);

// Cross-attention core: q (N, Lq, D), kv (N, Lk, 2D) = [k | v], key mask (N, Lk) bool (True = may be
// attended; null: every key); head h is features [h d, (h+1) d) of q, k and v (D = heads d);
// o like q; lse, delta (N, heads, Lq) in acc. Per (n, h), with scale = 1/sqrt(d):
//   s[i, j] = scale q_i . k_j (valid keys j only),  lse_i = log sum_j exp(s[i, j]),  P[i, j] = exp(s[i, j] - lse_i)
// A query without valid keys has lse_i = +inf, P[i, :] = 0, o_i = 0 and zero gradients.
struct AttnShape {
  int64_t N, Lq, Lk, D, heads, d;
};

// o_i = sum_j P[i, j] v_j; lse as above. Needs d <= 128.
cudaError_t attn_forward(DType dtype, const AttnShape& s, const void* q, const void* kv, const bool* mask, void* o,
                         void* lse, cudaStream_t stream);
// dP[i, j] = dO_i . v_j,  delta_i = sum_j P[i, j] dP[i, j] (written to delta),  dS = P (dP - delta);
// dq_i = scale sum_j dS[i, j] k_j;  dkv[j] = [dk_j | dv_j] with dk_j = scale sum_i dS[i, j] q_i, dv_j = sum_i P[i, j] dO_i
// (P recomputed from lse; masked keys get dk = dv = 0). Needs d <= 128.
cudaError_t attn_backward(DType dtype, const AttnShape& s, const void* grad_o, const void* q, const void* kv,
                          const void* lse, const bool* mask, void* delta, void* dq, void* dkv, cudaStream_t stream);

// Their tensor-core path (csrc/cross_attention_mma_kernels.cu), which attn_forward and
// attn_backward take when attn_mma_usable: float16 / bfloat16, d <= 128, a device of sm_80 or
// newer with the shared memory it needs, kernels compiled for it. Same contract; delta in float32.
bool attn_mma_usable(DType dtype, const AttnShape& s);
cudaError_t attn_forward_mma(DType dtype, const AttnShape& s, const void* q, const void* kv, const bool* mask,
                             void* o, void* lse, cudaStream_t stream);
cudaError_t attn_backward_mma(DType dtype, const AttnShape& s, const void* grad_o, const void* q, const void* kv,
                              const void* lse, const bool* mask, void* delta, void* dq, void* dkv,
                              cudaStream_t stream);

}  // namespace cuda
}  // namespace bharnet
