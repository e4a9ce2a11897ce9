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
//   param grads  batch = split of the (b, n) reduction: partial (O x K) = dy . xs^T (or dxs^T),
//                summed over the splits by the binding (deterministic, no atomics)
//   dx           batch (b, t): dx[b, :, t, :] (C x V) = sum over k = (entry, o) of
//                coef W[o, c, e] . dy[b, o, t', :], entries from the CSR table of row t
// Accumulation in float32 (float64 for float64 x).
#include "cuda_gemm.cuh"

namespace bharnet {
namespace cuda {
namespace {

template <typename T>
__device__ __forceinline__ acc_of<T> sample(const DetShape& s, const T* x, const int32_t* p0, const int32_t* p1,
                                            const acc_of<T>* w, int64_t b, int64_t k, int64_t n,
                                            const acc_of<T>* inside) {
  const int64_t c = k / s.E, e = k % s.E, t = n / s.V, v = n % s.V, i = t * s.E + e;
  const T* xc = x + (b * s.C + c) * s.T * s.V + v;
  const acc_of<T> x0 = to_acc(xc[static_cast<int64_t>(p0[i]) * s.V]);
  const acc_of<T> x1 = to_acc(xc[static_cast<int64_t>(p1[i]) * s.V]);
  if (inside) return inside[i] * (x1 - x0);
  return (acc_of<T>(1) - w[i]) * x0 + w[i] * x1;
}

// batch = b; m = o; k = c E + e; n = t' V + v.
template <typename T>
struct ForwardProblem {
  using acc_t = acc_of<T>;
  static constexpr bool kAContiguousInK = true;
  DetShape s;
  const T* x;
  const int32_t* p0;
  const int32_t* p1;
  const acc_t* w;
  const T* weight;
  const T* bias;
  T* y;
  __device__ int64_t m_size() const { return s.O; }
  __device__ int64_t n_size() const { return s.T_out * s.V; }
  __device__ int64_t k_size(int64_t) const { return s.C * s.E; }
  __device__ acc_t a(int64_t, int64_t m, int64_t k) const { return to_acc(weight[m * s.C * s.E + k]); }
  __device__ acc_t b(int64_t batch, int64_t k, int64_t n) const { return sample(s, x, p0, p1, w, batch, k, n, nullptr); }
  __device__ void store(int64_t batch, int64_t m, int64_t n, acc_t value) const {
    if (bias) value += to_acc(bias[m]);
    y[(batch * s.O + m) * s.T_out * s.V + n] = from_acc<T>(value);
  }
};

// batch = split; m = o; the reduction index q runs over split's share [q0, q0 + per) of the
// flattened (b, n); n (of the GEMM) = k = c E + e.
template <typename T>
struct ParamGradProblem {
  using acc_t = acc_of<T>;
  static constexpr bool kAContiguousInK = true;
  DetShape s;
  const T* dy;
  const T* x;
  const int32_t* p0;
  const int32_t* p1;
  const acc_t* w;
  const acc_t* inside;
  int64_t per_split;
  acc_t* out;
  __device__ int64_t m_size() const { return s.O; }
  __device__ int64_t n_size() const { return s.C * s.E; }
  __device__ int64_t k_size(int64_t batch) const {
    const int64_t rest = s.B * s.T_out * s.V - batch * per_split;
    return rest < 0 ? 0 : (rest < per_split ? rest : per_split);
  }
  __device__ acc_t a(int64_t batch, int64_t m, int64_t q) const {
    const int64_t flat = batch * per_split + q, N = s.T_out * s.V;
    return to_acc(dy[(flat / N * s.O + m) * N + flat % N]);
  }
  __device__ acc_t b(int64_t batch, int64_t q, int64_t k) const {
    const int64_t flat = batch * per_split + q, N = s.T_out * s.V;
    return sample(s, x, p0, p1, w, flat / N, k, flat % N, inside);
  }
  __device__ void store(int64_t batch, int64_t m, int64_t n, acc_t value) const {
    out[(batch * s.O + m) * s.C * s.E + n] = value;
  }
};

// batch = b T + t; m = c; k = (entry - row_start[t]) O + o; n = v.
template <typename T>
struct InputGradProblem {
  using acc_t = acc_of<T>;
  static constexpr bool kAContiguousInK = false;  // A(c, (entry, o)) = coef W[o, c, e]: stride E in c
  DetShape s;
  const T* dy;
  const T* weight;
  const int32_t* row_start;
  const int32_t* src;
  const acc_t* coef;
  T* dx;
  __device__ int64_t m_size() const { return s.C; }
  __device__ int64_t n_size() const { return s.V; }
  __device__ int64_t k_size(int64_t batch) const {
    const int64_t t = batch % s.T;
    return static_cast<int64_t>(row_start[t + 1] - row_start[t]) * s.O;
  }
  __device__ acc_t a(int64_t batch, int64_t m, int64_t k) const {
    const int64_t entry = row_start[batch % s.T] + k / s.O, o = k % s.O, e = src[entry] % s.E;
    return coef[entry] * to_acc(weight[(o * s.C + m) * s.E + e]);
  }
  __device__ acc_t b(int64_t batch, int64_t k, int64_t n) const {
    const int64_t entry = row_start[batch % s.T] + k / s.O, o = k % s.O, t_out = src[entry] / s.E;
    return to_acc(dy[((batch / s.T * s.O + o) * s.T_out + t_out) * s.V + n]);
  }
  __device__ void store(int64_t batch, int64_t m, int64_t n, acc_t value) const {
    const int64_t b = batch / s.T, t = batch % s.T;
    dx[((b * s.C + m) * s.T + t) * s.V + n] = from_acc<T>(value);
  }
};

}  // namespace

cudaError_t det_forward(DType dtype, const DetShape& s, const void* x, const int32_t* p0, const int32_t* p1,
                        const void* w, const void* weight, const void* bias, void* y, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const ForwardProblem<T> p{s, static_cast<const T*>(x), p0, p1, static_cast<const acc_of<T>*>(w),
                              static_cast<const T*>(weight), static_cast<const T*>(bias), static_cast<T*>(y)};
    return launch_gemm<64, 64, 16, 4, 4>(p, s.O, s.T_out * s.V, s.B, stream);
  });
}

cudaError_t det_param_grad(DType dtype, const DetShape& s, const void* dy, const void* x, const int32_t* p0,
                           const int32_t* p1, const void* w, const void* inside, int64_t splits, void* out,
                           cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using acc_t = acc_of<T>;
    const int64_t total = s.B * s.T_out * s.V;
    const ParamGradProblem<T> p{s, static_cast<const T*>(dy), static_cast<const T*>(x), p0, p1,
                                static_cast<const acc_t*>(w), static_cast<const acc_t*>(inside),
                                (total + splits - 1) / splits, static_cast<acc_t*>(out)};
    return launch_gemm<64, 64, 16, 4, 4>(p, s.O, s.C * s.E, splits, stream);
  });
}

cudaError_t det_input_grad(DType dtype, const DetShape& s, const void* dy, const void* weight,
                           const int32_t* row_start, const int32_t* src, const void* coef, void* dx,
                           cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const InputGradProblem<T> p{s, static_cast<const T*>(dy), static_cast<const T*>(weight), row_start, src,
                                static_cast<const acc_of<T>*>(coef), static_cast<T*>(dx)};
    return launch_gemm<32, 32, 16, 2, 2>(p, s.C, s.V, s.B * s.T, stream);
  });
}

}  // namespace cuda
}  // namespace bharnet
