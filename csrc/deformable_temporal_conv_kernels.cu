// Deformable temporal convolution (DeTGC) on CUDA (torch-free; bound by
// csrc/deformable_temporal_conv_cuda.cpp, which also builds the sampling and scatter tables).
//
// Math (bharnet/ops/deformable_temporal_conv.py; k = c E + e, n = t' V + v, N = T_out V):
//   xs[b,k,n] = (1 - w[t',e]) x[b,c,p0[t',e],v] + w[t',e] x[b,c,p1[t',e],v]
//   y[b,o,n]  = bias[o] + sum_k W[o,k] xs[b,k,n]
//   dW[o,k]   = sum_{b,n} dy[b,o,n] xs[b,k,n]
//   D[o,k]    = sum_{b,n} dy[b,o,n] dxs[b,k,n],  dxs = inside[t',e] (x[p1] - x[p0]);  dtau[e] = sum_{o,c} W[o,c,e] D[o,c,e]
//   dx[b,c,t,v] = sum_{(t',e,coef) reading row t} coef sum_o W[o,c,e] dy[b,o,t',v]
// All three are GEMMs of cuda_gemm.cuh's tiled kernel whose operand loads do the gather:
//   forward      batch b: y_b (O x N) = W (O x K) . xs_b (K x N)
//   param grads  batch = split of the (b, n) reduction: partial (O x 2K) = dy . [xs | dxs]^T,
//                dW in columns [0, K) and D in [K, 2K) of one GEMM (dy's tile is loaded once
//                for both), summed over the splits by the binding (deterministic, no atomics)
//   dx           batch (b, t): dx[b, :, t, :] (C x V) = sum over k = (entry, o) of
//                coef W[o, c, e] . dy[b, o, t', :], entries from the CSR table of row t
// The gathers split flat indices (k into c, e; n into t', v; ...) on every operand load, so
// they divide by FastDivmod (fast_divmod.h) in 32-bit ints: the binding keeps one sample's
// tensors, the flattened (b, t', v) reduction and each GEMM's extent below 2^30 (DetShape in
// cuda_launchers.h); only the sample's base offset is 64-bit. The output-row tile (BM = 16,
// 32 or 64) follows O, so that narrow layers (the model's O is 16 to 256) do not run FMAs on
// padding rows.
// Accumulation in float32 (float64 for float64 x).
#include "cuda_gemm.cuh"

namespace bharnet {
namespace cuda {
namespace {

// One sample's sizes in 32-bit ints, with the divisors the gathers use.
struct DetDims {
  int C, T, V, O, E, T_out, N, K;  // N = T_out V, K = C E
  FastDivmod by_E, by_V, by_N, by_O, by_T;
};

DetDims det_dims(const DetShape& s) {
  const auto i = [](int64_t x) { return static_cast<int>(x); };
  return {i(s.C), i(s.T), i(s.V), i(s.O), i(s.E), i(s.T_out), i(s.T_out * s.V), i(s.C * s.E),
          FastDivmod(s.E), FastDivmod(s.V), FastDivmod(s.T_out * s.V), FastDivmod(s.O), FastDivmod(s.T)};
}

// The interpolated sample xs[b, k, n] (inside == null) or dxs[b, k, n] = inside (x[p1] - x[p0]);
// xb = x + b C T V.
template <typename T>
BHARNET_HD acc_of<T> sample(const DetDims& d, const T* xb, const int32_t* p0, const int32_t* p1, const acc_of<T>* w,
                            int k, int n, const acc_of<T>* inside) {
  int c, e, t, v;
  d.by_E.divmod(k, c, e);
  d.by_V.divmod(n, t, v);
  const int i = t * d.E + e;
  const T* xc = xb + c * d.T * d.V + v;
  const acc_of<T> x0 = to_acc(xc[p0[i] * d.V]);
  const acc_of<T> x1 = to_acc(xc[p1[i] * d.V]);
  if (inside) return inside[i] * (x1 - x0);
  return (acc_of<T>(1) - w[i]) * x0 + w[i] * x1;
}

// batch = b; m = o; k = c E + e; n = t' V + v.
template <typename T>
struct ForwardProblem {
  using acc_t = acc_of<T>;
  static constexpr bool kAContiguousInK = true;
  DetDims d;
  const T* x;
  const int32_t* p0;
  const int32_t* p1;
  const acc_t* w;
  const T* weight;
  const T* bias;
  T* y;
  struct View {
    int M, N, K;
    const DetDims* d;
    const ForwardProblem* p;
    const T* xb;
    T* yb;
    BHARNET_HD acc_t a(int m, int k) const { return to_acc(p->weight[m * K + k]); }
    BHARNET_HD acc_t b(int k, int n) const { return sample(*d, xb, p->p0, p->p1, p->w, k, n, nullptr); }
    BHARNET_HD void store(int m, int n, acc_t value) const {
      if (p->bias) value += to_acc(p->bias[m]);
      yb[m * N + n] = from_acc<T>(value);
    }
  };
  BHARNET_HD View at(int64_t b) const {
    return {d.O, d.N, d.K, &d, this, x + b * d.C * d.T * d.V, y + b * d.O * d.N};
  }
};

// batch = split; m = o; the reduction index q runs over split's share [q0, q0 + per) of the
// flattened (b, n); n (of the GEMM) = k = c E + e for dW (n < K) and K + k for D.
template <typename T>
struct ParamGradProblem {
  using acc_t = acc_of<T>;
  static constexpr bool kAContiguousInK = true;
  DetDims d;
  int total;  // B N, the length of the reduction
  int per_split;
  const T* dy;
  const T* x;
  const int32_t* p0;
  const int32_t* p1;
  const acc_t* w;
  const acc_t* inside;
  acc_t* out;
  struct View {
    int M, N, K, q0;
    const DetDims* d;
    const ParamGradProblem* p;
    acc_t* out;
    BHARNET_HD acc_t a(int m, int q) const {
      int b, n;
      d->by_N.divmod(q0 + q, b, n);
      return to_acc(p->dy[static_cast<int64_t>(b) * d->O * d->N + m * d->N + n]);
    }
    BHARNET_HD acc_t b(int q, int col) const {
      int b, n;
      d->by_N.divmod(q0 + q, b, n);
      const bool derivative = col >= d->K;
      return sample(*d, p->x + static_cast<int64_t>(b) * d->C * d->T * d->V, p->p0, p->p1, p->w,
                    derivative ? col - d->K : col, n, derivative ? p->inside : nullptr);
    }
    BHARNET_HD void store(int m, int n, acc_t value) const { out[m * N + n] = value; }
  };
  BHARNET_HD View at(int64_t split) const {
    const int q0 = static_cast<int>(split) * per_split;
    const int rest = total - q0;
    return {d.O, 2 * d.K, rest < per_split ? rest : per_split, q0, &d, this, out + split * d.O * 2 * d.K};
  }
};

// batch = b T + t; m = c; k = (entry - row_start[t]) O + o; n = v.
template <typename T>
struct InputGradProblem {
  using acc_t = acc_of<T>;
  static constexpr bool kAContiguousInK = false;  // A(c, (entry, o)) = coef W[o, c, e]: stride E in c
  DetDims d;
  const T* dy;
  const T* weight;
  const int32_t* row_start;
  const int32_t* src;
  const acc_t* coef;
  T* dx;
  struct View {
    int M, N, K, first;  // first: the row's first CSR entry
    const DetDims* d;
    const InputGradProblem* p;
    const T* dyb;
    T* dxt;  // dx[b, :, t, :]
    BHARNET_HD acc_t a(int m, int k) const {
      int entry, o, t_out, e;
      d->by_O.divmod(k, entry, o);
      entry += first;
      d->by_E.divmod(p->src[entry], t_out, e);
      return p->coef[entry] * to_acc(p->weight[(o * d->C + m) * d->E + e]);
    }
    BHARNET_HD acc_t b(int k, int n) const {
      int entry, o;
      d->by_O.divmod(k, entry, o);
      const int t_out = d->by_E.div(p->src[first + entry]);
      return to_acc(dyb[o * d->N + t_out * d->V + n]);
    }
    BHARNET_HD void store(int m, int n, acc_t value) const { dxt[m * d->T * d->V + n] = from_acc<T>(value); }
  };
  BHARNET_HD View at(int64_t batch) const {
    int b, t;
    d.by_T.divmod(static_cast<int>(batch), b, t);
    const int first = row_start[t];
    return {d.C, d.V, (row_start[t + 1] - first) * d.O, first, &d, this, dy + static_cast<int64_t>(b) * d.O * d.N,
            dx + static_cast<int64_t>(b) * d.C * d.T * d.V + t * d.V};
  }
};

// Launches the GEMM of problem p with the output tile BM = det_row_tile(M) by BN = kDetColTile
// and 256 threads, BK = 16, 4 columns a thread.
template <class P>
cudaError_t launch_rows_tiled(const P& p, int64_t M, int64_t N, int64_t batches, cudaStream_t stream) {
  constexpr int BN = kDetColTile;
  switch (det_row_tile(M)) {
    case 16: return launch_gemm<16, BN, 16, 1, 4>(p, M, N, batches, stream);
    case 32: return launch_gemm<32, BN, 16, 2, 4>(p, M, N, batches, stream);
    default: return launch_gemm<64, BN, 16, 4, 4>(p, M, N, batches, stream);
  }
}

}  // namespace

cudaError_t det_forward(DType dtype, const DetShape& s, const void* x, const int32_t* p0, const int32_t* p1,
                        const void* w, const void* weight, const void* bias, void* y, cudaStream_t stream) {
  const DetDims d = det_dims(s);
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const ForwardProblem<T> p{d, static_cast<const T*>(x), p0, p1, static_cast<const acc_of<T>*>(w),
                              static_cast<const T*>(weight), static_cast<const T*>(bias), static_cast<T*>(y)};
    return launch_rows_tiled(p, s.O, s.T_out * s.V, s.B, stream);
  });
}

cudaError_t det_param_grad(DType dtype, const DetShape& s, const void* dy, const void* x, const int32_t* p0,
                           const int32_t* p1, const void* w, const void* inside, int64_t splits, void* out,
                           cudaStream_t stream) {
  const DetDims d = det_dims(s);
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using acc_t = acc_of<T>;
    const int64_t total = s.B * s.T_out * s.V;
    const ParamGradProblem<T> p{d, static_cast<int>(total), static_cast<int>((total + splits - 1) / splits),
                                static_cast<const T*>(dy), static_cast<const T*>(x), p0, p1,
                                static_cast<const acc_t*>(w), static_cast<const acc_t*>(inside),
                                static_cast<acc_t*>(out)};
    return launch_rows_tiled(p, s.O, 2 * s.C * s.E, splits, stream);
  });
}

cudaError_t det_input_grad(DType dtype, const DetShape& s, const void* dy, const void* weight,
                           const int32_t* row_start, const int32_t* src, const void* coef, void* dx,
                           cudaStream_t stream) {
  const DetDims d = det_dims(s);
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const InputGradProblem<T> p{d, static_cast<const T*>(dy), static_cast<const T*>(weight), row_start, src,
                                static_cast<const acc_of<T>*>(coef), static_cast<T*>(dx)};
    return launch_gemm<32, 32, 16, 2, 2>(p, s.C, s.V, s.B * s.T, stream);
  });
}

}  // namespace cuda
}  // namespace bharnet
