// CTR-GC / ST-GC aggregation on CUDA (torch-free; bound by csrc/ctr_graph_conv_cuda.cpp).
//
// Math (bharnet/ops/ctr_graph_conv.py; group g(c) = c / (C/G)):
//   topo[b,h,g,i,j] = alpha (sum_r W[h,g,r] tanh(q[b,h,r,i] - k[b,h,r,j]) + bias[h,g]) + A[h,i,j]
//   y[b,c,t,i]      = sum_h sum_j topo[b,h,g(c),i,j] v[b,h,c,t,j]
//   dv[b,h,c,t,j]   = sum_i topo[b,h,g(c),i,j] dy[b,c,t,i]
//   dtopo[b,h,g,i,j] = sum_{c in g, t} dy[b,c,t,i] v[b,h,c,t,j]
// Inside one (b, g) the rows m = c_local T + t of v[b, h, group g] and y[b, group g] are
// contiguous runs of V elements, so each product is a batched GEMM with M = C/G * T rows:
//   forward  batch (b, g):    y_g (M x V) = sum over k = (h, j) of v_hg[m, j] topo_h[i, j]
//   dv       batch (b, h, g): dv_hg (M x V) = dy_g (M x V) . topo_hg (V x V)
//   dtopo    batch (b, h, g): (V x V) = dy_g^T (V x M) . v_hg (M x V), K = M
// The topology kernel writes the (B, H, G, V, V) refined topologies once per call (acc dtype);
// it is tiny next to v; the refinement kernels below turn dtopo into the gradients of q, k,
// W, bias, alpha and A. Accumulation in float32 (float64 for float64 features).
//
// float16 / bfloat16 with V <= 128 on sm_80+: tensor-core kernels (WMMA 16x16x16, float32
// accumulators), 8 warps per block. V is padded to Vp = 16 NT (NT = 1..8, a template
// parameter); tiles live in dynamic shared memory as rows of ld = Vp + 8 16-bit elements (ld a
// multiple of 8 and 2 ld bytes an odd multiple of 16: fragment pointers stay 32-byte aligned
// and ldmatrix rows hit distinct banks), with zeros in the padding. A tile of consecutive rows
// is one contiguous run of rows * V elements in global memory: it is copied flat (coalesced,
// positions (e / V, e % V) advanced without divisions) into those padded rows, and results go
// back the same way from a float32 staging tile (ld Vp + 4). The float32 topology is rounded to
// the 16-bit dtype when staged, as the reference casts it to v's dtype.
//   forward_mma:  block = (b, g, 128-row tile); for each h: stage the v_hg rows and topo_hg
//                 (as B = topo^T, col-major); warp w accumulates rows 16w..16w+15 x all NT
//                 column tiles over k = (h, j); then y's rows go out through the staging tile,
//                 which aliases the v and topology tiles.
//   backward_mma: block = (b, h, g), looping over the M rows in tiles of BM (128 for NT <= 4,
//                 else 64): stage the dy_g and v_hg rows (rows past M zeroed), then
//                 dtopo += dy^T v (the NT^2 output fragments spread over the warps, kept in
//                 registers for the whole loop: deterministic, no atomics, no second pass) and
//                 dv = dy topo (topo staged once per block) out through the staging tile.
//                 dtopo goes out per fragment through a per-warp 16x16 scratch.
// Offsets inside a group use 32-bit ints (M V < 2^30, checked by the binding); group bases are 64-bit.
// float32 / float64, V > 128 or pre-sm_80 devices take cuda_gemm.cuh's generic SIMT GEMM,
// whose operands are read through the problem objects below.
#include <mma.h>

#include <climits>
#include <type_traits>

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

// The refinement gradients (ctr_refinement_grad in cuda_launchers.h), three launches:
//   refinement_grad_kernel  block (b, h, r): th = tanh(q_i - k_j), slope = alpha D_r (1 - th^2)
//                           over the V x V grid, warp w taking rows w, w + 4, ... with its lanes
//                           on 128 columns at a time: dq[b, h, r, i] (warp sums of its rows) and
//                           dk[b, h, r, j] (column sums over the warps, in shared memory) complete;
//                           then P[b, h, g, r] = sum_ij dtopo th (block sums, 8 groups per sweep).
//   refinement_sums_kernel  S[h, g] = sum_{b, ij} dtopo (block sums), dA[h, ij] = sum_{b, g} dtopo,
//                           P[h, g, r] summed over b: to scratch and dA.
//   refinement_params_kernel one block: dW = alpha P, dbias = alpha S, dalpha = sum W P + sum bias S.
// Every sum has a fixed order (no atomics).
constexpr int kRefineThreads = 128;
constexpr int kRefineWarps = kRefineThreads / 32;
constexpr int kRefineColumns = 128;  // columns per sweep: 4 per lane
constexpr int kPGroups = 8;          // groups whose P one sweep sums

template <typename A>
__global__ void __launch_bounds__(kRefineThreads)
    refinement_grad_kernel(CtrShape s, const A* dtopo, const A* q, const A* k, const A* weight, const A* alpha, A* dq,
                           A* dk, A* p_part) {
  __shared__ A column_part[kRefineWarps][kRefineColumns];
  __shared__ A red[kRefineWarps];
  const int V = static_cast<int>(s.V), G = static_cast<int>(s.G), R = static_cast<int>(s.R);
  const int r = static_cast<int>(blockIdx.x % R);
  const int64_t bh = blockIdx.x / R;
  const int h = static_cast<int>(bh % s.H);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const A a = alpha[0];
  const int64_t qk_row = (bh * R + r) * V;
  const A* dt = dtopo + bh * G * V * V;
  const A* w = weight + static_cast<int64_t>(h) * G * R + r;  // w[g R] = W[h, g, r]
  for (int j0 = 0; j0 < V; j0 += kRefineColumns) {
    A column[kRefineColumns / 32];
    for (int c = 0; c < kRefineColumns / 32; ++c) column[c] = A(0);
    for (int i = warp; i < V; i += kRefineWarps) {
      const A qi = q[qk_row + i];
      A row = A(0);
      for (int c = 0; c < kRefineColumns / 32; ++c) {
        const int j = j0 + 32 * c + lane;
        if (j >= V) continue;
        const A th = tanh(qi - k[qk_row + j]);
        A D = A(0);
        for (int g = 0; g < G; ++g) D += w[g * R] * dt[(static_cast<int64_t>(g) * V + i) * V + j];
        const A slope = a * D * (A(1) - th * th);
        row += slope;
        column[c] += slope;
      }
      row = warp_sum(row);
      if (lane == 0) dq[qk_row + i] = (j0 == 0 ? A(0) : dq[qk_row + i]) + row;
    }
    for (int c = 0; c < kRefineColumns / 32; ++c) column_part[warp][32 * c + lane] = column[c];
    __syncthreads();
    if (tid < kRefineColumns && j0 + tid < V) {
      A sum = A(0);
      for (int wp = 0; wp < kRefineWarps; ++wp) sum += column_part[wp][tid];
      dk[qk_row + j0 + tid] = -sum;
    }
    __syncthreads();
  }
  // P for kPGroups groups per sweep of the V x V grid (th once per element and sweep).
  for (int g0 = 0; g0 < G; g0 += kPGroups) {
    const int groups = G - g0 < kPGroups ? G - g0 : kPGroups;
    A sums[kPGroups];
#pragma unroll
    for (int c = 0; c < kPGroups; ++c) sums[c] = A(0);
    for (int e = tid; e < V * V; e += kRefineThreads) {
      const int i = e / V, j = e - i * V;
      const A th = tanh(q[qk_row + i] - k[qk_row + j]);
#pragma unroll
      for (int c = 0; c < kPGroups; ++c)
        if (c < groups) sums[c] += dt[static_cast<int64_t>(g0 + c) * V * V + e] * th;
    }
#pragma unroll
    for (int c = 0; c < kPGroups; ++c) {
      if (c >= groups) break;
      const A total = block_sum<kRefineThreads>(sums[c], red);
      if (tid == 0) p_part[(bh * G + g0 + c) * R + r] = total;
    }
  }
}

constexpr int kSumThreads = 256;

// Blocks [0, H G): S[h, g]; the next ceil(H V V / kSumThreads): dA; the rest: P summed over b.
// scratch: P (H, G, R) then S (H, G).
template <typename A>
__global__ void __launch_bounds__(kSumThreads)
    refinement_sums_kernel(CtrShape s, const A* dtopo, const A* p_part, A* dA, A* scratch) {
  __shared__ A red[kSumThreads / 32];
  const int64_t HG = s.H * s.G, VV = s.V * s.V, HVV = s.H * VV, HGR = HG * s.R;
  const int64_t da_blocks = (HVV + kSumThreads - 1) / kSumThreads;
  const int64_t block = blockIdx.x;
  if (block < HG) {
    const int64_t h = block / s.G, g = block % s.G;
    A sum = A(0);
    for (int64_t b = 0; b < s.B; ++b) {
      const A* dt = dtopo + ((b * s.H + h) * s.G + g) * VV;
      for (int64_t e = threadIdx.x; e < VV; e += kSumThreads) sum += dt[e];
    }
    sum = block_sum<kSumThreads>(sum, red);
    if (threadIdx.x == 0) scratch[HGR + block] = sum;
    return;
  }
  const int64_t index = (block < HG + da_blocks ? block - HG : block - HG - da_blocks) * kSumThreads + threadIdx.x;
  A sum = A(0);
  if (block < HG + da_blocks) {
    if (index >= HVV) return;
    const int64_t h = index / VV, e = index % VV;
    for (int64_t b = 0; b < s.B; ++b)
      for (int64_t g = 0; g < s.G; ++g) sum += dtopo[((b * s.H + h) * s.G + g) * VV + e];
    dA[index] = sum;
  } else {
    if (index >= HGR) return;
    for (int64_t b = 0; b < s.B; ++b) sum += p_part[b * HGR + index];
    scratch[index] = sum;
  }
}

template <typename A>
__global__ void __launch_bounds__(kSumThreads)
    refinement_params_kernel(CtrShape s, const A* scratch, const A* weight, const A* bias, const A* alpha, A* dweight,
                             A* dbias, A* dalpha) {
  __shared__ A red[kSumThreads / 32];
  const int64_t HG = s.H * s.G, HGR = HG * s.R;
  const A a = alpha[0];
  A sum = A(0);
  for (int64_t e = threadIdx.x; e < HGR; e += kSumThreads) {
    dweight[e] = a * scratch[e];
    sum += weight[e] * scratch[e];
  }
  for (int64_t e = threadIdx.x; e < HG; e += kSumThreads) {
    dbias[e] = a * scratch[HGR + e];
    sum += bias[e] * scratch[HGR + e];
  }
  sum = block_sum<kSumThreads>(sum, red);
  if (threadIdx.x == 0) dalpha[0] = sum;
}

// Offset of the topology of (b, h, g) (static mode: A, shared by every b).
BHARNET_HD int64_t topology_offset(const CtrShape& s, int64_t b, int64_t h, int64_t g) {
  return (((s.dynamic ? b : 0) * s.H + h) * s.G + g) * s.V * s.V;
}

// batch = b G + g; rows m of the group; k = h V + j (split by by_V); n = i.
template <typename T>
struct ForwardProblem {
  using acc_t = acc_of<T>;
  static constexpr bool kAContiguousInK = true;
  CtrShape s;
  FastDivmod by_V;
  const T* v;
  const acc_t* topo;
  T* y;
  struct View {
    int M, N, K, V;
    FastDivmod by_V;
    int64_t v_head, topo_head;  // strides of h in v and in the topologies
    const T* vg;                // v[b, 0, group g]
    const acc_t* topo_g;        // topo[b, 0, g]
    T* yg;                      // y[b, group g]
    BHARNET_HD acc_t a(int m, int k) const {
      int h, j;
      by_V.divmod(k, h, j);
      return to_acc(vg[h * v_head + m * V + j]);
    }
    BHARNET_HD acc_t b(int k, int n) const {
      int h, j;
      by_V.divmod(k, h, j);
      return topo_g[h * topo_head + n * V + j];
    }
    BHARNET_HD void store(int m, int n, acc_t value) const { yg[m * V + n] = from_acc<T>(value); }
  };
  BHARNET_HD View at(int64_t batch) const {
    const int64_t b = batch / s.G, g = batch % s.G, group = g * (s.C / s.G) * s.T * s.V;
    const int M = static_cast<int>(s.C / s.G * s.T), V = static_cast<int>(s.V);
    return {M, V, static_cast<int>(s.H) * V, V, by_V, s.C * s.T * s.V, s.G * s.V * s.V,
            v + b * s.H * s.C * s.T * s.V + group, topo + topology_offset(s, b, 0, g), y + b * s.C * s.T * s.V + group};
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
  struct View {
    int M, N, K;
    const T* dyg;           // dy[b, group g]
    const acc_t* topo_hg;   // topo[b, h, g]
    T* dvg;                 // dv[b, h, group g]
    BHARNET_HD acc_t a(int m, int k) const { return to_acc(dyg[m * K + k]); }
    BHARNET_HD acc_t b(int k, int n) const { return topo_hg[k * N + n]; }
    BHARNET_HD void store(int m, int n, acc_t value) const { dvg[m * N + n] = from_acc<T>(value); }
  };
  BHARNET_HD View at(int64_t batch) const {
    const int64_t b = batch / (s.H * s.G), h = batch / s.G % s.H, g = batch % s.G;
    const int64_t group = g * (s.C / s.G) * s.T * s.V;
    const int M = static_cast<int>(s.C / s.G * s.T), V = static_cast<int>(s.V);
    return {M, V, V, dy + b * s.C * s.T * s.V + group, topo + topology_offset(s, b, h, g),
            dv + (b * s.H + h) * s.C * s.T * s.V + group};
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
  struct View {
    int M, N, K;
    const T* dyg;      // dy[b, group g]
    const T* vhg;      // v[b, h, group g]
    acc_t* dtopo_hg;   // dtopo[b, h, g]
    BHARNET_HD acc_t a(int m, int k) const { return to_acc(dyg[k * M + m]); }
    BHARNET_HD acc_t b(int k, int n) const { return to_acc(vhg[k * N + n]); }
    BHARNET_HD void store(int m, int n, acc_t value) const { dtopo_hg[m * N + n] = value; }
  };
  BHARNET_HD View at(int64_t batch) const {
    const int64_t b = batch / (s.H * s.G), h = batch / s.G % s.H, g = batch % s.G;
    const int64_t group = g * (s.C / s.G) * s.T * s.V;
    const int V = static_cast<int>(s.V);
    return {V, V, static_cast<int>(s.C / s.G * s.T), dy + b * s.C * s.T * s.V + group,
            v + (b * s.H + h) * s.C * s.T * s.V + group, dtopo + batch * s.V * s.V};
  }
};

// ---- Tensor-core path (float16 / bfloat16 features, float32 topologies) ---------------------

namespace wmma = nvcuda::wmma;

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kChunk = 8;            // elements per thread in flight while a tile is staged
constexpr int kForwardRows = 128;    // rows m of a forward block (one 16-row strip per warp)
constexpr int kMaxJoints = 128;      // NT <= 8

// The sizes the kernels index with (32-bit: the host checks M V < 2^31).
struct MmaDims {
  int H, C, T, V, G;
  int CG, M;       // channels per group C / G, rows per group CG * T
  int row_tiles;   // forward blocks per (b, g): ceil(M / kForwardRows)
  bool dynamic;
};

// Shared-memory layout for V padded to Vp = 16 NT (16-bit tiles as raw uint16_t bits).
template <int NT>
struct Tiles {
  static constexpr int kVp = 16 * NT;
  static constexpr int kLd = kVp + 8;     // elements per row of a staged 16-bit tile
  static constexpr int kLdOut = kVp + 4;  // floats per row of the float32 staging tile
  static constexpr int kBackwardRows = NT <= 4 ? 128 : 64;
  // Resident blocks per SM asked of ptxas (registers per thread <= 65536 / (kThreads blocks)):
  // as many as the accumulators allow with at most a few bytes of spills (ptxas -v, sm_90).
  static constexpr int kForwardMinBlocks = NT <= 3 ? 4 : NT <= 5 ? 3 : 2;
  static constexpr int kBackwardMinBlocks = NT <= 2 ? 4 : NT <= 6 ? 2 : 1;
  // forward: v rows (kForwardRows x kLd) and the topology (kVp x kLd); the staging tile
  // (kForwardRows x kLdOut floats) aliases both.
  static constexpr int kForwardTileBytes = (kForwardRows + kVp) * kLd * 2;
  static constexpr int kForwardOutBytes = kForwardRows * kLdOut * 4;
  static constexpr int kForwardBytes = kForwardTileBytes > kForwardOutBytes ? kForwardTileBytes : kForwardOutBytes;
  // backward: dy rows and v rows (kBackwardRows x kLd each), the topology (kVp x kLd), then the
  // staging tile (kBackwardRows x kLdOut floats; own space, as the tiles' zero padding must
  // survive from one row tile to the next), which the per-warp 16x16 dtopo scratch aliases at the end.
  static constexpr int kBackwardOutOffset = (2 * kBackwardRows + kVp) * kLd * 2;
  static constexpr int kBackwardBytes = kBackwardOutOffset + kBackwardRows * kLdOut * 4;
  static_assert(kWarps * 256 <= kBackwardRows * kLdOut, "dtopo scratch must fit in the staging tile");
  static_assert(kForwardBytes % 16 == 0 && kBackwardBytes % 16 == 0, "zeroed in 16-byte words");
};

template <typename T> struct Bits16;
template <> struct Bits16<__half> {
  static __device__ __forceinline__ uint16_t from_float(float x) { return __half_as_ushort(__float2half_rn(x)); }
};
template <> struct Bits16<__nv_bfloat16> {
  static __device__ __forceinline__ uint16_t from_float(float x) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));
  }
};

template <typename T, class Layout> using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, Layout>;
template <typename T, class Layout> using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, Layout>;
using FragAcc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

template <typename T>
__device__ __forceinline__ const T* as_elements(const uint16_t* tile) {
  return reinterpret_cast<const T*>(tile);
}

// Row and column (e / V, e % V) of the element e = threadIdx.x + u kThreads of a flat run of
// V-element rows, for u = 0, 1, ... in turn (next()), without divisions.
struct RowWalk {
  int row, col, row_step, col_step, V;  // kThreads = row_step V + col_step
  __device__ explicit RowWalk(int joints) : V(joints) {
    row = static_cast<int>(threadIdx.x) / V;
    col = static_cast<int>(threadIdx.x) - row * V;
    row_step = kThreads / V;
    col_step = kThreads - row_step * V;
  }
  __device__ __forceinline__ void next() {
    row += row_step;
    col += col_step;
    if (col >= V) {
      col -= V;
      ++row;
    }
  }
};

// For each run r: dst[r][(e / V) LD + e % V] = convert(src[r][e]) for e < n_valid, 0 for
// n_valid <= e < n. kChunk loads per thread and run are issued before their shared-memory stores.
template <int LD, int kRuns, typename Src, class Convert>
__device__ __forceinline__ void stage_rows(const Src* const (&src)[kRuns], uint16_t* const (&dst)[kRuns], int n_valid,
                                           int n, RowWalk walk, Convert convert) {
  for (int e0 = static_cast<int>(threadIdx.x); e0 < n; e0 += kChunk * kThreads) {
    uint16_t value[kRuns][kChunk];
#pragma unroll
    for (int u = 0; u < kChunk; ++u) {
      const int e = e0 + u * kThreads;
#pragma unroll
      for (int r = 0; r < kRuns; ++r) value[r][u] = e < n_valid ? convert(src[r][e]) : uint16_t(0);
    }
#pragma unroll
    for (int u = 0; u < kChunk; ++u) {
      if (e0 + u * kThreads < n) {
#pragma unroll
        for (int r = 0; r < kRuns; ++r) dst[r][walk.row * LD + walk.col] = value[r][u];
      }
      walk.next();
    }
  }
}

// dst[e] = convert(src[(e / V) LD + e % V]) for e < n (coalesced global stores).
template <int LD, class Convert>
__device__ __forceinline__ void unstage_rows(const float* src, int n, RowWalk walk, uint16_t* __restrict__ dst,
                                             Convert convert) {
  for (int e = static_cast<int>(threadIdx.x); e < n; e += kThreads) {
    dst[e] = convert(src[walk.row * LD + walk.col]);
    walk.next();
  }
}

template <int kBytes>
__device__ __forceinline__ void zero_shared(unsigned char* smem) {
  for (int i = static_cast<int>(threadIdx.x); i < kBytes / 16; i += kThreads) {
    reinterpret_cast<int4*>(smem)[i] = make_int4(0, 0, 0, 0);
  }
}

__device__ __forceinline__ int64_t topology_index(const MmaDims& d, int b, int h, int g) {
  return ((static_cast<int64_t>(d.dynamic ? b : 0) * d.H + h) * d.G + g) * d.V * d.V;
}

// Block (b, g, row tile): y_g[m0 + r, i] = sum_h sum_j v_hg[m0 + r, j] topo_hg[i, j] for the
// kForwardRows rows r; warp w owns rows 16w..16w+15 and all NT column tiles.
template <typename T, int NT>
__global__ void __launch_bounds__(kThreads, Tiles<NT>::kForwardMinBlocks)
    forward_mma_kernel(MmaDims d, const uint16_t* __restrict__ v, const float* __restrict__ topo,
                       uint16_t* __restrict__ y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using L = Tiles<NT>;
  constexpr int LD = L::kLd, LDO = L::kLdOut;
  BHARNET_DYNAMIC_SHARED(128, smem);
  uint16_t* v_tile = reinterpret_cast<uint16_t*>(smem);
  uint16_t* topo_tile = v_tile + kForwardRows * LD;  // [i][j]: B = topo^T, col-major
  uint16_t* const tile_v[1] = {v_tile};
  uint16_t* const tile_topo[1] = {topo_tile};
  float* out = reinterpret_cast<float*>(smem);
  const int block = static_cast<int>(blockIdx.x);
  const int row_tile = block % d.row_tiles, bg = block / d.row_tiles, g = bg % d.G, b = bg / d.G;
  const int m0 = row_tile * kForwardRows, rows = min(kForwardRows, d.M - m0);
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const bool active = warp * 16 < rows;
  const RowWalk walk(d.V);
  const auto raw = [](uint16_t x) { return x; };
  const auto round = [](float x) { return Bits16<T>::from_float(x); };
  zero_shared<L::kForwardBytes>(smem);
  FragAcc acc[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) wmma::fill_fragment(acc[nt], 0.0f);
  for (int h = 0; h < d.H; ++h) {
    __syncthreads();  // shared memory zeroed (h = 0) or the previous h's tiles consumed
    const int64_t v_base = ((static_cast<int64_t>(b) * d.H + h) * d.C + static_cast<int64_t>(g) * d.CG) * d.T * d.V;
    // Rows past M keep their zeros: they only feed output rows that are never stored.
    const uint16_t* const v_rows[1] = {v + v_base + m0 * d.V};
    const float* const topo_hg[1] = {topo + topology_index(d, b, h, g)};
    stage_rows<LD>(v_rows, tile_v, rows * d.V, rows * d.V, walk, raw);
    stage_rows<LD>(topo_hg, tile_topo, d.V * d.V, d.V * d.V, walk, round);
    __syncthreads();
    if (active) {
#pragma unroll
      for (int kt = 0; kt < NT; ++kt) {
        FragA<T, wmma::row_major> a;
        wmma::load_matrix_sync(a, as_elements<T>(v_tile + warp * 16 * LD + kt * 16), LD);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          FragB<T, wmma::col_major> bt;
          wmma::load_matrix_sync(bt, as_elements<T>(topo_tile + nt * 16 * LD + kt * 16), LD);
          wmma::mma_sync(acc[nt], a, bt, acc[nt]);
        }
      }
    }
  }
  __syncthreads();  // the staging tile overwrites the v and topology tiles
  if (active) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      wmma::store_matrix_sync(out + warp * 16 * LDO + nt * 16, acc[nt], LDO, wmma::mem_row_major);
    }
  }
  __syncthreads();
  const int64_t y_base = (static_cast<int64_t>(b) * d.C + static_cast<int64_t>(g) * d.CG) * d.T * d.V;
  unstage_rows<LDO>(out, rows * d.V, walk, y + y_base + m0 * d.V, round);
#endif
}

// Block (b, h, g): for each tile of BM rows m, dtopo += dy_g^T v_hg (fragment f = (i tile, j
// tile) of the NT^2 belongs to warp f % kWarps) and dv_hg = dy_g topo_hg (warp w: row strip
// w % (BM / 16), column tiles w / (BM / 16) + u (kWarps / (BM / 16))).
template <typename T, int NT>
__global__ void __launch_bounds__(kThreads, Tiles<NT>::kBackwardMinBlocks)
    backward_mma_kernel(MmaDims d, const uint16_t* __restrict__ dy, const uint16_t* __restrict__ v,
                        const float* __restrict__ topo, uint16_t* __restrict__ dv, float* __restrict__ dtopo) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using L = Tiles<NT>;
  constexpr int BM = L::kBackwardRows, LD = L::kLd, LDO = L::kLdOut;
  constexpr int kStrips = BM / 16, kColGroups = kWarps / kStrips;
  constexpr int kDvFrags = (NT + kColGroups - 1) / kColGroups;
  constexpr int kTopoFrags = (NT * NT + kWarps - 1) / kWarps;
  BHARNET_DYNAMIC_SHARED(128, smem);
  uint16_t* dy_tile = reinterpret_cast<uint16_t*>(smem);
  uint16_t* v_tile = dy_tile + BM * LD;
  uint16_t* topo_tile = v_tile + BM * LD;  // [i][j]: B of dv, row-major
  float* out = reinterpret_cast<float*>(smem + L::kBackwardOutOffset);
  const int bhg = static_cast<int>(blockIdx.x);
  const int g = bhg % d.G, bh = bhg / d.G, h = bh % d.H, b = bh / d.H;
  const int64_t dy_base = (static_cast<int64_t>(b) * d.C + static_cast<int64_t>(g) * d.CG) * d.T * d.V;
  const int64_t v_base = (static_cast<int64_t>(bh) * d.C + static_cast<int64_t>(g) * d.CG) * d.T * d.V;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int strip = warp % kStrips, col_group = warp / kStrips;
  const RowWalk walk(d.V);
  const auto raw = [](uint16_t x) { return x; };
  const auto round = [](float x) { return Bits16<T>::from_float(x); };
  zero_shared<L::kBackwardBytes>(smem);
  __syncthreads();
  const float* const topo_hg[1] = {topo + topology_index(d, b, h, g)};
  uint16_t* const tile_topo[1] = {topo_tile};
  stage_rows<LD>(topo_hg, tile_topo, d.V * d.V, d.V * d.V, walk, round);
  uint16_t* const tile_dy_v[2] = {dy_tile, v_tile};
  FragAcc acc_topo[kTopoFrags];
#pragma unroll
  for (int u = 0; u < kTopoFrags; ++u) wmma::fill_fragment(acc_topo[u], 0.0f);
  for (int m0 = 0; m0 < d.M; m0 += BM) {
    const int rows = min(BM, d.M - m0);
    __syncthreads();  // topology staged (first tile) or the previous tile's fragments and dv rows consumed
    // Rows past M are zeroed: they are part of dtopo's reduction.
    const uint16_t* const dy_v_rows[2] = {dy + dy_base + m0 * d.V, v + v_base + m0 * d.V};
    stage_rows<LD>(dy_v_rows, tile_dy_v, rows * d.V, BM * d.V, walk, raw);
    __syncthreads();
    const int k_tiles = (rows + 15) / 16;
#pragma unroll
    for (int u = 0; u < kTopoFrags; ++u) {
      const int f = warp + u * kWarps;
      if (f < NT * NT) {
        const int it = f / NT, jt = f % NT;
        for (int kt = 0; kt < k_tiles; ++kt) {
          FragA<T, wmma::col_major> a;  // A[i][m] = dy[m][i]
          FragB<T, wmma::row_major> bv;
          wmma::load_matrix_sync(a, as_elements<T>(dy_tile + kt * 16 * LD + it * 16), LD);
          wmma::load_matrix_sync(bv, as_elements<T>(v_tile + kt * 16 * LD + jt * 16), LD);
          wmma::mma_sync(acc_topo[u], a, bv, acc_topo[u]);
        }
      }
    }
    if (strip * 16 < rows) {
      FragAcc acc_dv[kDvFrags];
#pragma unroll
      for (int u = 0; u < kDvFrags; ++u) wmma::fill_fragment(acc_dv[u], 0.0f);
#pragma unroll
      for (int kt = 0; kt < NT; ++kt) {
        FragA<T, wmma::row_major> a;
        wmma::load_matrix_sync(a, as_elements<T>(dy_tile + strip * 16 * LD + kt * 16), LD);
#pragma unroll
        for (int u = 0; u < kDvFrags; ++u) {
          const int nt = col_group + u * kColGroups;
          if (nt < NT) {
            FragB<T, wmma::row_major> bt;
            wmma::load_matrix_sync(bt, as_elements<T>(topo_tile + kt * 16 * LD + nt * 16), LD);
            wmma::mma_sync(acc_dv[u], a, bt, acc_dv[u]);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kDvFrags; ++u) {
        const int nt = col_group + u * kColGroups;
        if (nt < NT) wmma::store_matrix_sync(out + strip * 16 * LDO + nt * 16, acc_dv[u], LDO, wmma::mem_row_major);
      }
    }
    __syncthreads();  // the dv tile is in the staging tile
    unstage_rows<LDO>(out, rows * d.V, walk, dv + v_base + m0 * d.V, round);
  }
  __syncthreads();  // the dtopo scratch overwrites the staging tile of the last row tile
  float* scratch = out + warp * 256;
  float* dtopo_hg = dtopo + static_cast<int64_t>(bhg) * d.V * d.V;
#pragma unroll
  for (int u = 0; u < kTopoFrags; ++u) {
    const int f = warp + u * kWarps;
    if (f < NT * NT) {
      const int i0 = f / NT * 16, j0 = f % NT * 16;
      wmma::store_matrix_sync(scratch, acc_topo[u], 16, wmma::mem_row_major);
      __syncwarp();
#pragma unroll
      for (int q = 0; q < 8; ++q) {
        const int e = lane + 32 * q, i = i0 + e / 16, j = j0 + e % 16;
        if (i < d.V && j < d.V) dtopo_hg[i * d.V + j] = scratch[e];
      }
      __syncwarp();
    }
  }
#endif
}

// The tensor-core kernels need sm_80 (bfloat16 WMMA); asked of the current device.
bool device_has_tensor_cores() {
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return false;
  return major >= 8;
}

MmaDims mma_dims(const CtrShape& s) {
  const int64_t M = s.C / s.G * s.T;
  return {static_cast<int>(s.H), static_cast<int>(s.C), static_cast<int>(s.T), static_cast<int>(s.V),
          static_cast<int>(s.G), static_cast<int>(s.C / s.G), static_cast<int>(M),
          static_cast<int>((M + kForwardRows - 1) / kForwardRows), s.dynamic};
}

// Calls fn(std::integral_constant<int, NT>()) with NT = ceil(V / 16), 1 <= NT <= 8.
template <class Fn>
cudaError_t with_joint_tiles(int64_t V, Fn&& fn) {
  switch ((V + 15) / 16) {
    case 1: return fn(std::integral_constant<int, 1>());
    case 2: return fn(std::integral_constant<int, 2>());
    case 3: return fn(std::integral_constant<int, 3>());
    case 4: return fn(std::integral_constant<int, 4>());
    case 5: return fn(std::integral_constant<int, 5>());
    case 6: return fn(std::integral_constant<int, 6>());
    case 7: return fn(std::integral_constant<int, 7>());
    case 8: return fn(std::integral_constant<int, 8>());
  }
  return cudaErrorInvalidValue;
}

// Whether this build's tensor-core kernels for V's tile width can run on the current device:
// compiled for sm_80+ (below that their bodies are empty, e.g. in a build for older GPUs
// only, JIT-compiled from PTX), and with shared memory within the device's opt-in limit
// (consumer GPUs allow about 99 KB per block; the NT = 8 backward needs about 101 KB).
template <typename T>
bool mma_kernels_usable(int64_t V) {
  int device = 0, optin = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    return false;
  }
  return with_joint_tiles(V, [&](auto nt) {
    constexpr int NT = decltype(nt)::value;
    cudaFuncAttributes forward{}, backward{};
    const bool usable = Tiles<NT>::kForwardBytes <= optin && Tiles<NT>::kBackwardBytes <= optin &&
                        cudaFuncGetAttributes(&forward, forward_mma_kernel<T, NT>) == cudaSuccess &&
                        cudaFuncGetAttributes(&backward, backward_mma_kernel<T, NT>) == cudaSuccess &&
                        forward.ptxVersion >= 80 && backward.ptxVersion >= 80;
    return usable ? cudaSuccess : cudaErrorNotSupported;
  }) == cudaSuccess;
}

template <typename T>
cudaError_t forward_mma(const CtrShape& s, const void* v, const void* topo, void* y, cudaStream_t stream) {
  const MmaDims d = mma_dims(s);
  return with_joint_tiles(s.V, [&](auto nt) {
    constexpr int NT = decltype(nt)::value;
    return launch_blocks(forward_mma_kernel<T, NT>, s.B * s.G * d.row_tiles, kThreads, Tiles<NT>::kForwardBytes,
                         stream, d, static_cast<const uint16_t*>(v), static_cast<const float*>(topo),
                         static_cast<uint16_t*>(y));
  });
}

template <typename T>
cudaError_t backward_mma(const CtrShape& s, const void* dy, const void* v, const void* topo, void* dv, void* dtopo,
                         cudaStream_t stream) {
  const MmaDims d = mma_dims(s);
  return with_joint_tiles(s.V, [&](auto nt) {
    constexpr int NT = decltype(nt)::value;
    return launch_blocks(backward_mma_kernel<T, NT>, s.B * s.H * s.G, kThreads, Tiles<NT>::kBackwardBytes, stream,
                         d, static_cast<const uint16_t*>(dy), static_cast<const uint16_t*>(v),
                         static_cast<const float*>(topo), static_cast<uint16_t*>(dv), static_cast<float*>(dtopo));
  });
}

}  // namespace

bool ctr_mma_usable(DType dtype, const CtrShape& s) {
  if (dtype != DType::kFloat16 && dtype != DType::kBFloat16) return false;
  const int64_t M = s.C / s.G * s.T;
  const int64_t row_tiles = (M + kForwardRows - 1) / kForwardRows;
  const bool fits = s.V >= 1 && s.V <= kMaxJoints && M * s.V <= INT_MAX && s.C <= INT_MAX && s.H <= INT_MAX &&
                    s.B * s.H * s.G <= INT_MAX && s.B * s.G * row_tiles <= INT_MAX;
  const bool usable = fits && device_has_tensor_cores() &&
                      (dtype == DType::kFloat16 ? mma_kernels_usable<__half>(s.V)
                                                : mma_kernels_usable<__nv_bfloat16>(s.V));
  if (!usable) cudaGetLastError();  // a failed runtime query leaves no pending error for the SIMT launch
  return usable;
}

cudaError_t ctr_topology(DType dtype, const CtrShape& s, const void* A, const void* q, const void* k,
                         const void* weight, const void* bias, const void* alpha, void* topo, cudaStream_t stream) {
  const int64_t total = s.B * s.H * s.G * s.V * s.V;
  if (total == 0) return cudaSuccess;
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>((total + threads - 1) / threads < 65535 ? (total + threads - 1) / threads : 65535);
  if (dtype == DType::kFloat64) {
    BHARNET_LAUNCH(topology_kernel<double>, blocks, threads, 0, stream)(
        s, static_cast<const double*>(A), static_cast<const double*>(q), static_cast<const double*>(k),
        static_cast<const double*>(weight), static_cast<const double*>(bias), static_cast<const double*>(alpha),
        static_cast<double*>(topo));
  } else {
    BHARNET_LAUNCH(topology_kernel<float>, blocks, threads, 0, stream)(
        s, static_cast<const float*>(A), static_cast<const float*>(q), static_cast<const float*>(k),
        static_cast<const float*>(weight), static_cast<const float*>(bias), static_cast<const float*>(alpha),
        static_cast<float*>(topo));
  }
  return cudaGetLastError();
}

cudaError_t ctr_forward(DType dtype, const CtrShape& s, const void* v, const void* topo, void* y, cudaStream_t stream) {
  if (ctr_mma_usable(dtype, s)) {
    return dtype == DType::kFloat16 ? forward_mma<__half>(s, v, topo, y, stream)
                                    : forward_mma<__nv_bfloat16>(s, v, topo, y, stream);
  }
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const ForwardProblem<T> p{s, FastDivmod(s.V), static_cast<const T*>(v), static_cast<const acc_of<T>*>(topo),
                              static_cast<T*>(y)};
    return launch_gemm<64, 32, 16, 4, 2>(p, s.C / s.G * s.T, s.V, s.B * s.G, stream);
  });
}

cudaError_t ctr_backward(DType dtype, const CtrShape& s, const void* dy, const void* v, const void* topo, void* dv,
                         void* dtopo, cudaStream_t stream) {
  if (ctr_mma_usable(dtype, s)) {
    return dtype == DType::kFloat16 ? backward_mma<__half>(s, dy, v, topo, dv, dtopo, stream)
                                    : backward_mma<__nv_bfloat16>(s, dy, v, topo, dv, dtopo, stream);
  }
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

cudaError_t ctr_refinement_grad(DType dtype, const CtrShape& s, const void* dtopo, const void* q, const void* k,
                                const void* weight, const void* bias, const void* alpha, void* dA, void* dq, void* dk,
                                void* dweight, void* dbias, void* dalpha, void* scratch, cudaStream_t stream) {
  const auto run = [&](auto tag) {
    using A = decltype(tag);
    const auto* dt = static_cast<const A*>(dtopo);
    A* p_part = static_cast<A*>(scratch) + s.H * s.G * s.R + s.H * s.G;
    cudaError_t error = launch_blocks(refinement_grad_kernel<A>, s.B * s.H * s.R, kRefineThreads, 0, stream, s, dt,
                                      static_cast<const A*>(q), static_cast<const A*>(k), static_cast<const A*>(weight),
                                      static_cast<const A*>(alpha), static_cast<A*>(dq), static_cast<A*>(dk), p_part);
    if (error != cudaSuccess) return error;
    const int64_t HG = s.H * s.G;
    const int64_t blocks = HG + (s.H * s.V * s.V + kSumThreads - 1) / kSumThreads + (HG * s.R + kSumThreads - 1) / kSumThreads;
    error = launch_blocks(refinement_sums_kernel<A>, blocks, kSumThreads, 0, stream, s, dt,
                          static_cast<const A*>(p_part), static_cast<A*>(dA), static_cast<A*>(scratch));
    if (error != cudaSuccess) return error;
    return launch_blocks(refinement_params_kernel<A>, 1, kSumThreads, 0, stream, s, static_cast<const A*>(scratch),
                         static_cast<const A*>(weight), static_cast<const A*>(bias), static_cast<const A*>(alpha),
                         static_cast<A*>(dweight), static_cast<A*>(dbias), static_cast<A*>(dalpha));
  };
  return dtype == DType::kFloat64 ? run(double()) : run(float());
}

}  // namespace cuda
}  // namespace bharnet
