// CTR-GC / ST-GC aggregation on CUDA (torch-free; bound by csrc/ctr_graph_conv_cuda.cpp).
//
// Math (bharnet/ops/ctr_graph_conv.py; group g(c) = c / (C/G)):
//   topo[b,h,g,i,j] = alpha (sum_r W[h,g,r] tanh(q[b,h,r,i] - k[b,h,r,j]) + bias[h,g]) + A[h,i,j]
//   y[b,c,t,i]      = sum_h sum_j topo[b,h,g(c),i,j] v[b,h,c,t,j]
//   dv[b,h,c,t,j]   = sum_i topo[b,h,g(c),i,j] dy[b,c,t,i]
//   dtopo[b,h,g,i,j] = sum_{c in g, t} dy[b,c,t,i] v[b,h,c,t,j]
// Inside one (b, g) the rows m = c_local T + t of v[b, h, group g] and y[b, group g] are
// contiguous, so each product is a batched GEMM with V-wide rows, run by cuda_gemm.cuh's tiled
// kernel reading v, dy and the (small, cache-resident) topology directly:
//   forward  batch (b, g):    y_g (M x V) = sum over k = (h, j) of v_hg[m, j] topo_h[i, j]
//   dv       batch (b, h, g): dv_hg (M x V) = dy_g (M x V) . topo_hg (V x V)
//   dtopo    batch (b, h, g): (V x V) = dy_g^T (V x M) . v_hg (M x V), K = M = C/G * T
// The topology kernel writes the (B, H, G, V, V) refined topologies once per call (acc dtype);
// it is tiny next to v. Accumulation in float32 (float64 for float64 features).
#include "cuda_gemm.cuh"

namespace bharnet {
namespace cuda {
namespace {

template <typename acc_t>
__global__ void topology_kernel(CtrShape s, const acc_t* A, const acc_t* q, const acc_t* k, const acc_t* weight,
                                const acc_t* bias, const acc_t* alpha, acc_t* topo) {
  const int64_t V = s.V, VV = s.V * s.V;
  const int64_t total = s.B * s.H * s.G * VV;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = idx % V, i = idx / V % V, g = idx / VV % s.G, bh = idx / (VV * s.G), h = bh % s.H;
    const acc_t* qr = q + bh * s.R * V + i;
    const acc_t* kr = k + bh * s.R * V + j;
    const acc_t* w = weight + (h * s.G + g) * s.R;
    acc_t sum = acc_t(0);
    for (int64_t r = 0; r < s.R; ++r) sum += w[r] * tanh(qr[r * V] - kr[r * V]);
    topo[idx] = alpha[0] * (sum + bias[h * s.G + g]) + A[(h * V + i) * V + j];
  }
}

// Offset of the topology of (b, h, g) (static mode: A, shared by every b).
__device__ __forceinline__ int64_t topology_offset(const CtrShape& s, int64_t b, int64_t h, int64_t g) {
  return (((s.dynamic ? b : 0) * s.H + h) * s.G + g) * s.V * s.V;
}

// batch = b G + g; rows m of the group; k = h V + j; n = i.
template <typename T>
struct ForwardProblem {
  using acc_t = acc_of<T>;
  static constexpr bool kAContiguousInK = true;
  CtrShape s;
  const T* v;
  const acc_t* topo;
  T* y;
  __device__ int64_t m_size() const { return s.C / s.G * s.T; }
  __device__ int64_t n_size() const { return s.V; }
  __device__ int64_t k_size(int64_t) const { return s.H * s.V; }
  __device__ acc_t a(int64_t batch, int64_t m, int64_t k) const {
    const int64_t b = batch / s.G, g = batch % s.G, h = k / s.V, j = k % s.V;
    return to_acc(v[((b * s.H + h) * s.C + g * (s.C / s.G)) * s.T * s.V + m * s.V + j]);
  }
  __device__ acc_t b(int64_t batch, int64_t k, int64_t n) const {
    const int64_t h = k / s.V, j = k % s.V;
    return topo[topology_offset(s, batch / s.G, h, batch % s.G) + n * s.V + j];
  }
  __device__ void store(int64_t batch, int64_t m, int64_t n, acc_t value) const {
    const int64_t b = batch / s.G, g = batch % s.G;
    y[(b * s.C + g * (s.C / s.G)) * s.T * s.V + m * s.V + n] = from_acc<T>(value);
  }
};

// batch = (b H + h) G + g; rows m of the group; k = i; n = j.
template <typename T>
struct InputGradProblem {
  using acc_t = acc_of<T>;
  static constexpr bool kAContiguousInK = true;
  CtrShape s;
  const T* dy;
  const acc_t* topo;
  T* dv;
  __device__ int64_t m_size() const { return s.C / s.G * s.T; }
  __device__ int64_t n_size() const { return s.V; }
  __device__ int64_t k_size(int64_t) const { return s.V; }
  __device__ acc_t a(int64_t batch, int64_t m, int64_t k) const {
    const int64_t b = batch / (s.H * s.G), g = batch % s.G;
    return to_acc(dy[(b * s.C + g * (s.C / s.G)) * s.T * s.V + m * s.V + k]);
  }
  __device__ acc_t b(int64_t batch, int64_t k, int64_t n) const {
    const int64_t b = batch / (s.H * s.G), h = batch / s.G % s.H, g = batch % s.G;
    return topo[topology_offset(s, b, h, g) + k * s.V + n];
  }
  __device__ void store(int64_t batch, int64_t m, int64_t n, acc_t value) const {
    const int64_t b = batch / (s.H * s.G), h = batch / s.G % s.H, g = batch % s.G;
    dv[((b * s.H + h) * s.C + g * (s.C / s.G)) * s.T * s.V + m * s.V + n] = from_acc<T>(value);
  }
};

// batch = (b H + h) G + g; rows i; k = m (rows of the group); n = j.
template <typename T>
struct TopologyGradProblem {
  using acc_t = acc_of<T>;
  static constexpr bool kAContiguousInK = false;  // A(i, m) = dy[m, i]: contiguous in i
  CtrShape s;
  const T* dy;
  const T* v;
  acc_t* dtopo;
  __device__ int64_t m_size() const { return s.V; }
  __device__ int64_t n_size() const { return s.V; }
  __device__ int64_t k_size(int64_t) const { return s.C / s.G * s.T; }
  __device__ acc_t a(int64_t batch, int64_t m, int64_t k) const {
    const int64_t b = batch / (s.H * s.G), g = batch % s.G;
    return to_acc(dy[(b * s.C + g * (s.C / s.G)) * s.T * s.V + k * s.V + m]);
  }
  __device__ acc_t b(int64_t batch, int64_t k, int64_t n) const {
    const int64_t b = batch / (s.H * s.G), h = batch / s.G % s.H, g = batch % s.G;
    return to_acc(v[((b * s.H + h) * s.C + g * (s.C / s.G)) * s.T * s.V + k * s.V + n]);
  }
  __device__ void store(int64_t batch, int64_t m, int64_t n, acc_t value) const {
    dtopo[(batch * s.V + m) * s.V + n] = value;
  }
};

}  // namespace

cudaError_t ctr_topology(DType dtype, const CtrShape& s, const void* A, const void* q, const void* k,
                         const void* weight, const void* bias, const void* alpha, void* topo, cudaStream_t stream) {
  const int64_t total = s.B * s.H * s.G * s.V * s.V;
  if (total == 0) return cudaSuccess;
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>((total + threads - 1) / threads < 65535 ? (total + threads - 1) / threads : 65535);
  if (dtype == DType::kFloat64) {
    topology_kernel<double><<<blocks, threads, 0, stream>>>(
        s, static_cast<const double*>(A), static_cast<const double*>(q), static_cast<const double*>(k),
        static_cast<const double*>(weight), static_cast<const double*>(bias), static_cast<const double*>(alpha),
        static_cast<double*>(topo));
  } else {
    topology_kernel<float><<<blocks, threads, 0, stream>>>(
        s, static_cast<const float*>(A), static_cast<const float*>(q), static_cast<const float*>(k),
        static_cast<const float*>(weight), static_cast<const float*>(bias), static_cast<const float*>(alpha),
        static_cast<float*>(topo));
  }
  return cudaGetLastError();
}

cudaError_t ctr_forward(DType dtype, const CtrShape& s, const void* v, const void* topo, void* y, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const ForwardProblem<T> p{s, static_cast<const T*>(v), static_cast<const acc_of<T>*>(topo), static_cast<T*>(y)};
    return launch_gemm<64, 32, 16, 4, 2>(p, s.C / s.G * s.T, s.V, s.B * s.G, stream);
  });
}

cudaError_t ctr_backward(DType dtype, const CtrShape& s, const void* dy, const void* v, const void* topo, void* dv,
                         void* dtopo, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using acc_t = acc_of<T>;
    const InputGradProblem<T> pv{s, static_cast<const T*>(dy), static_cast<const acc_t*>(topo), static_cast<T*>(dv)};
    cudaError_t error = launch_gemm<64, 32, 16, 4, 2>(pv, s.C / s.G * s.T, s.V, s.B * s.H * s.G, stream);
    if (error != cudaSuccess) return error;
    const TopologyGradProblem<T> pt{s, static_cast<const T*>(dy), static_cast<const T*>(v), static_cast<acc_t*>(dtopo)};
    return launch_gemm<32, 32, 32, 2, 2>(pt, s.V, s.V, s.B * s.H * s.G, stream);
  });
}

}  // namespace cuda
}  // namespace bharnet
