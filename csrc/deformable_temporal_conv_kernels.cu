// Deformable temporal convolution (DeTGC) on CUDA (torch-free; bound by
// csrc/deformable_temporal_conv_cuda.cpp).
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
//                for both), summed over the splits by det_finish_param_grad (deterministic, no atomics)
//   dx           batch (b, t): dx[b, :, t, :] (C x V) = sum over k = (entry, o) of
//                coef W[o, c, e] . dy[b, o, t', :], entries from the CSR table of row t
// The gathers split flat indices (k into c, e; n into t', v; ...) on every operand load, so
// they divide by FastDivmod (fast_divmod.h) in 32-bit ints: the binding keeps one sample's
// tensors, the flattened (b, t', v) reduction and each GEMM's extent below 2^30 (DetShape in
// cuda_launchers.h); only the sample's base offset is 64-bit. The output-row tile (BM = 16,
// 32 or 64) follows O, so that narrow layers (the model's O is 16 to 256) do not run FMAs on
// padding rows.
// Around them, two small kernels: det_tables (one block) computes the sampling table of the
// (t', e) positions and, for the backward, the CSR table of the samples reading each input row;
// det_finish_param_grad sums the split-K partials into dW and dtau. A forward is two launches,
// a backward four (plus torch's dbias reduction).
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

BHARNET_HD float floor_of(float x) { return floorf(x); }
BHARNET_HD double floor_of(double x) { return floor(x); }

// min{t' in [0, T_out) : p[t' E + e] >= q}, or T_out if there is none. p (p0 or p1) is
// non-decreasing in t' for each e: so is the rounded position t' s + tau[e], and clamp and floor
// keep the order (NaN offsets give p0 = 0 and p1 = min(1, T - 1) for every t').
__device__ int first_at_least(const int32_t* p, int E, int e, int T_out, int q) {
  int lo = 0, hi = T_out;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (p[mid * E + e] >= q) hi = mid;
    else lo = mid + 1;
  }
  return lo;
}

// Appends to the CSR entries at `out` the samples (t', e) whose row p[t' E + e] is q, in ascending
// t' E + e, with coefficient 1 - w rounded to T (p = p0) or w (p = p1); returns the new end.
// The t' scanned span the non-empty per-tap ranges [first(q), first(q + 1)).
template <typename T>
__device__ int append_row_entries(const int32_t* p, bool is_p0, const acc_of<T>* w, int E, int T_out, int q,
                                  int out, int32_t* src, acc_of<T>* coef) {
  using acc_t = acc_of<T>;
  int lo = T_out, hi = 0;
  for (int e = 0; e < E; ++e) {
    const int first = first_at_least(p, E, e, T_out, q), stop = first_at_least(p, E, e, T_out, q + 1);
    if (first < stop) {  // taps without entries for row q do not widen the scan
      lo = min(lo, first);
      hi = max(hi, stop);
    }
  }
  for (int t = lo; t < hi; ++t)
    for (int e = 0; e < E; ++e) {
      const int i = t * E + e;
      if (p[i] != q) continue;
      src[out] = i;
      coef[out] = is_p0 ? to_acc(from_acc<T>(acc_t(1) - w[i])) : w[i];
      ++out;
    }
  return out;
}

constexpr int kTableThreads = 256;

// det_tables' kernel (cuda_launchers.h); one block. P: the position dtype.
template <typename T, typename P>
__global__ void __launch_bounds__(kTableThreads)
    det_tables_kernel(int T_len, int T_out, int E, int64_t stride, const P* tau, bool bounds_pass_grad, int32_t* p0,
                      int32_t* p1, acc_of<T>* w, acc_of<T>* inside, int32_t* row_start, int32_t* src,
                      acc_of<T>* coef) {
  using acc_t = acc_of<T>;
  __shared__ int scan[kTableThreads];
  const int tid = threadIdx.x;
  const P last = P(T_len - 1);
  for (int i = tid; i < T_out * E; i += kTableThreads) {
    const int t = i / E, e = i - t * E;
    const P r = P(t * stride) + tau[e];  // t * stride in integers: exact, and no contraction
    const P p = r < P(0) ? P(0) : (r > last ? last : r);  // NaN stays NaN
    const P floor_p = floor_of(p);
    const int q0 = floor_p >= P(0) ? static_cast<int>(floor_p) : 0;  // floor_p <= T - 1; NaN: 0
    p0[i] = q0;
    p1[i] = min(q0 + 1, T_len - 1);
    w[i] = to_acc(from_acc<T>(static_cast<acc_t>(p - floor_p)));
    const bool passes = bounds_pass_grad ? (r >= P(0) && r <= last) : (r > P(0) && r < last);
    if (inside) inside[i] = passes ? acc_t(1) : acc_t(0);
  }
  if (!row_start) return;
  __syncthreads();  // p0, p1 and w complete

  // Entries per row (into row_start[q + 1]), then their running sum in chunks of the block.
  for (int q = tid; q < T_len; q += kTableThreads) {
    int count = 0;
    for (int e = 0; e < E; ++e)
      count += first_at_least(p0, E, e, T_out, q + 1) - first_at_least(p0, E, e, T_out, q) +
               first_at_least(p1, E, e, T_out, q + 1) - first_at_least(p1, E, e, T_out, q);
    row_start[q + 1] = count;
  }
  if (tid == 0) row_start[0] = 0;
  __syncthreads();
  int carry = 0;
  for (int base = 0; base < T_len; base += kTableThreads) {
    const int q = base + tid;
    int value = q < T_len ? row_start[q + 1] : 0;
    for (int step = 1; step < kTableThreads; step *= 2) {  // inclusive scan (Hillis-Steele)
      scan[tid] = value;
      __syncthreads();
      if (tid >= step) value += scan[tid - step];
      __syncthreads();
    }
    if (q < T_len) row_start[q + 1] = carry + value;
    scan[tid] = value;
    __syncthreads();
    carry += scan[kTableThreads - 1];
    __syncthreads();
  }

  for (int q = tid; q < T_len; q += kTableThreads) {
    const int out = append_row_entries<T>(p0, true, w, E, T_out, q, row_start[q], src, coef);
    append_row_entries<T>(p1, false, w, E, T_out, q, out, src, coef);
  }
}

constexpr int kFinishThreads = 256;

// det_finish_param_grad's kernel: blocks [0, E) reduce dtau[e], the rest sum kFinishThreads
// elements of dW each. part: (splits, O, 2K), K = C E.
template <typename T>
__global__ void __launch_bounds__(kFinishThreads)
    det_finish_kernel(int splits, int O, int C, int E, const acc_of<T>* part, const T* weight, T* dweight,
                      acc_of<T>* dtau) {
  using acc_t = acc_of<T>;
  __shared__ acc_t red[kFinishThreads / 32];
  const int K = C * E;
  const int64_t row = 2 * static_cast<int64_t>(K);  // one (split, o) row of part
  const int tid = threadIdx.x;
  if (static_cast<int>(blockIdx.x) < E) {
    const int e = blockIdx.x;
    acc_t sum = 0;
    for (int j = tid; j < O * C; j += kFinishThreads) {
      const int o = j / C, k = (j - o * C) * E + e;
      acc_t D = 0;
      for (int split = 0; split < splits; ++split) D += part[(static_cast<int64_t>(split) * O + o) * row + K + k];
      sum += to_acc(weight[o * K + k]) * D;
    }
    sum = block_sum<kFinishThreads>(sum, red);
    if (tid == 0) dtau[e] = sum;
    return;
  }
  const int j = (static_cast<int>(blockIdx.x) - E) * kFinishThreads + tid;
  if (j >= O * K) return;
  const int o = j / K, k = j - o * K;
  acc_t sum = 0;
  for (int split = 0; split < splits; ++split) sum += part[(static_cast<int64_t>(split) * O + o) * row + k];
  dweight[j] = from_acc<T>(sum);
}

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

cudaError_t det_tables(DType dtype, const DetShape& s, int64_t stride, const void* offsets, bool offsets_fp64,
                       bool bounds_pass_grad, int32_t* p0, int32_t* p1, void* w, void* inside, int32_t* row_start,
                       int32_t* src, void* coef, cudaStream_t stream) {
  if (s.T_out * s.E == 0 && !row_start) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using acc_t = acc_of<T>;
    const auto launch = [&](auto position) {
      using P = decltype(position);
      return launch_blocks(det_tables_kernel<T, P>, 1, kTableThreads, 0, stream, static_cast<int>(s.T),
                           static_cast<int>(s.T_out), static_cast<int>(s.E), stride, static_cast<const P*>(offsets),
                           bounds_pass_grad, p0, p1, static_cast<acc_t*>(w), static_cast<acc_t*>(inside), row_start,
                           src, static_cast<acc_t*>(coef));
    };
    return offsets_fp64 ? launch(double()) : launch(float());
  });
}

cudaError_t det_finish_param_grad(DType dtype, const DetShape& s, int64_t splits, const void* part,
                                  const void* weight, void* dweight, void* dtau, cudaStream_t stream) {
  const int64_t blocks = s.E + (s.O * s.C * s.E + kFinishThreads - 1) / kFinishThreads;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using acc_t = acc_of<T>;
    return launch_blocks(det_finish_kernel<T>, blocks, kFinishThreads, 0, stream, static_cast<int>(splits),
                         static_cast<int>(s.O), static_cast<int>(s.C), static_cast<int>(s.E),
                         static_cast<const acc_t*>(part), static_cast<const T*>(weight), static_cast<T*>(dweight),
                         static_cast<acc_t*>(dtau));
  });
}

}  // namespace cuda
}  // namespace bharnet
