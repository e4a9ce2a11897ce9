// CTR-GC / ST-GC aggregation on the CPU: bharnet::ctr_graph_conv_cpp and its backward ops.
//
// Math (bharnet/ops/ctr_graph_conv.py; channel c in group g(c) = c / (C/G)):
//   th[b,h,r,i,j]   = tanh(q[b,h,r,i] - k[b,h,r,j])
//   Aref[b,h,g,i,j] = alpha * (sum_r W[h,g,r] * th[b,h,r,i,j] + bias[h,g]) + A[h,i,j]
//                     (static ST-GC: Aref[h] = A[h], one group)
//   y[b,c,t,i]      = sum_h sum_j Aref[b,h,g(c),i,j] * v[b,h,c,t,j]
// Backward:
//   dv[b,h,c,t,j]    = sum_i Aref[b,h,g(c),i,j] * dy[b,c,t,i]
//   dAref[b,h,g,i,j] = sum_{c in g, t} dy[b,c,t,i] * v[b,h,c,t,j]
//   dA[h]            = sum_{b,g} dAref[b,h,g]
//   with u_r = (sum_g W[h,g,r] dAref[b,h,g]) * (1 - th_r^2):
//   dq[b,h,r,i] = alpha sum_j u_r[i,j],   dk[b,h,r,j] = -alpha sum_i u_r[i,j]
//   P[b,h,g,r]  = sum_ij dAref[b,h,g] * th_r,   S[b,h,g] = sum_ij dAref[b,h,g]
//   dW = alpha sum_b P,  dbias = alpha sum_b S,  dalpha = sum W * sum_b P + sum bias * sum_b S
//
// Structure. Inside one (b, g) the rows m = c_local * T + t of v[b, h, group g] and of
// y[b, group g] are contiguous (M = C/G * T rows of V joints), so every product is a small GEMM
// with V-wide rows:
//   forward   y_g  (M x V) = sum_h v_hg (M x V) . Aref_h^T (V x V)
//   backward  dv_hg(M x V) = dy_g (M x V) . Aref_h (V x V);  dAref_hg (V x V) = dy_g^T . v_hg
// Phase 1 computes the topologies (B, H, G, V, Vp) once per (b, h) - tanh once per (b, h, r, i, j),
// shared by all groups, from 2V exponentials per (b, h, r) in float32; the sums over r as a
// register-tiled GEMM - into a zero-padded buffer (Vp = V rounded up to the micro-kernel's
// column tile) that the GEMMs read as their B operand. A channels-last v (the view of a
// channels-last convolution output) is read in place by a frame-wise forward, which reads the
// topologies as its A operand (see ForwardFramesChannelsLast). Phase 2 runs the GEMMs with the
// register-tiled micro-kernel of cpu_simd.h, parallel over (b, g, row blocks) forward and over
// (b, g, h) backward. The backward keeps dAref (B, H, G, V, V) and finishes dq, dk, dW, dbias,
// dalpha and dA from it (phases 3-4, parallel over (b, h) and (h, i)). Every output element is
// written by exactly one task and every sum runs in a fixed order: results are deterministic.
// Accumulation is in the compute dtype (float32 or float64). The forward also takes bfloat16 v
// (for inference on bfloat16 models), widened to float32 exactly (channels-last: each group's
// slice of a frame first; channels-first: each task's row block first), computes in float32
// with float32 topologies, and rounds y to bfloat16 as it stores it. So does the backward
// (bfloat16 training under CPU autocast): each task widens its group's bfloat16 dy and v into
// float32 scratch (groups over kWidenedGroupLimit values: as the GEMMs read them), dv is rounded
// as it is stored, the other gradients are float32: each value the float32 kernels' on the
// widened inputs (dv then rounded), with no float32 copies of whole features.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu_dtypes.h"
#include "cpu_simd.h"
#include "ctr_graph_conv.h"

namespace bharnet {
namespace {

using simd::round_up;

// Rows of one forward task (a block of one group's M rows): whole row tiles of both paths
// (6 rows; 8, 12 or 16 rows wide).
constexpr int64_t kForwardRowBlock = 240;
// Software prefetch distance of the row-walking GEMMs, in row tiles.
constexpr int64_t kPrefetchTiles = 2;

// th[i, j] = tanh(q[i] - k[j]) for one relation channel (i, j < V, row stride V). float32:
// with M the largest q or k, a_i = exp(2 (q_i - M)) and b_j = exp(2 (k_j - M)),
//   tanh(q_i - k_j) = (a_i - b_j) / (a_i + b_j)
// takes 2V exponentials (ab: 2 x Vp scratch) and a division per element instead of V^2
// exponentials. The exponents' rounding (their ulp grows with the spread of q and k) makes the
// absolute error about 2^-24 (M - min): it is used for rows whose q and k span at most
// kFactorisedSpread (measured error <= 5.2e-7; simd::tanh's ~1e-7), else simd::tanh, which
// also takes rows with NaN or inf (NaN stays NaN). float64: std::tanh.
constexpr float kFactorisedSpread = 8.0f;

template <typename T, int Bytes>
BHARNET_INLINE void tanh_differences(int64_t V, int64_t Vp, const T* q, const T* k, T* th, T* ab) {
  if constexpr (std::is_same_v<T, float>) {
    using F = simd::vec<float, Bytes>;
    constexpr int L = simd::kLanes<float, Bytes>;
    float hi = q[0], lo = q[0];
    bool finite = true;
    for (int64_t i = 0; i < V; ++i) {
      hi = std::max(hi, std::max(q[i], k[i]));
      lo = std::min(lo, std::min(q[i], k[i]));
      finite = finite && std::isfinite(q[i]) && std::isfinite(k[i]);
    }
    const bool factorised = finite && hi - lo <= kFactorisedSpread;
    float* a = ab;
    float* e = ab + Vp;
    for (int64_t j = 0; j < Vp; ++j) {
      a[j] = j < V ? q[j] : hi;
      e[j] = j < V ? k[j] : hi;
    }
    if (factorised) {
      for (int64_t j = 0; j < Vp; j += L) {
        simd::store<float, Bytes>(a + j, simd::exp_nonpositive<Bytes>(2.0f * (simd::load<float, Bytes>(a + j) - hi)));
        simd::store<float, Bytes>(e + j, simd::exp_nonpositive<Bytes>(2.0f * (simd::load<float, Bytes>(e + j) - hi)));
      }
    }
    auto row_vector = [&](int64_t i, int64_t j) __attribute__((always_inline)) {
      const F ej = simd::load<float, Bytes>(e + j);
      return factorised ? (a[i] - ej) / (a[i] + ej) : simd::tanh<Bytes>(q[i] - ej);
    };
    for (int64_t i = 0; i < V; ++i) {
      float* out = th + i * V;
      int64_t j = 0;
      for (; j + L <= V; j += L) simd::store<float, Bytes>(out + j, row_vector(i, j));
      if (j < V) {
        float tail[L];
        simd::store<float, Bytes>(tail, row_vector(i, j));
        for (int64_t jj = j; jj < V; ++jj) out[jj] = tail[jj - j];
      }
    }
  } else {
    for (int64_t i = 0; i < V; ++i)
      for (int64_t j = 0; j < V; ++j) th[i * V + j] = std::tanh(q[i] - k[j]);
  }
}

// The tanh values of one (b, h), R x V x V, are followed by this many zeros: the refinement GEMM
// reads their rows as whole tiles (at most a tile's width minus one past the last row).
template <typename T> constexpr int64_t kThSlack = simd::kTileCols<T>;

// Distance between the tanh values of consecutive (b, h) in a th buffer.
template <typename T>
inline int64_t th_stride(const CtrSizes& s) { return s.R * s.V * s.V + kThSlack<T>; }

// Refined topologies of one (b, h) for every group g, zero-padded to V x Vp:
// aref[g, i, j] (row i, column j) and/or aref_t[g, j, i] (transposed); th receives the
// R x V x V tanh values (th[r, i, j]; kThSlack<T> readable values after them). For each row i
// the G x V block sum_r W[h, g, r] th[r, i, :] is a GEMM over r (refined: G x Vp scratch;
// ab: 2 x Vp scratch).
template <typename T>
struct RefineTopology {
  template <int Bytes>
  static BHARNET_INLINE void run(CtrSizes s, int64_t Vp, int64_t b, int64_t h, const T* A, const T* q, const T* k,
                                 const T* weight, const T* bias, T alpha, T* th, T* ab, T* refined, T* aref,
                                 T* aref_t) {
    const int64_t V = s.V, R = s.R, G = s.G;
    for (int64_t r = 0; r < R; ++r) {
      const int64_t offset = ((b * s.H + h) * R + r) * V;
      tanh_differences<T, Bytes>(V, Vp, q + offset, k + offset, th + r * V * V, ab);
    }
    const T* w = weight + h * G * R;
    const T* Ah = A + h * V * V;
    for (int64_t i = 0; i < V; ++i) {
      simd::tiles<T, Bytes>(G, V, [&](auto& tile, int64_t g, int rows, int64_t n0, int cols)
                                      __attribute__((always_inline)) {
        tile.fma(R, w + g * R, R, 1, th + i * V + n0, V * V, rows);
        tile.store_to(refined + g * Vp + n0, Vp, rows, cols, false);
      });
      for (int64_t g = 0; g < G; ++g) {
        const T bg = bias[h * G + g];
        T* row = refined + g * Vp;
        for (int64_t j = 0; j < V; ++j) row[j] = alpha * (row[j] + bg) + Ah[i * V + j];
        if (aref) {
          T* out = aref + (g * V + i) * Vp;
          for (int64_t j = 0; j < V; ++j) out[j] = row[j];
          for (int64_t j = V; j < Vp; ++j) out[j] = T(0);
        }
        if (aref_t) {
          for (int64_t j = 0; j < V; ++j) aref_t[(g * V + j) * Vp + i] = row[j];
        }
      }
    }
    if (aref_t) {
      for (int64_t g = 0; g < G; ++g)
        for (int64_t j = 0; j < V; ++j)
          for (int64_t i = V; i < Vp; ++i) aref_t[(g * V + j) * Vp + i] = T(0);
    }
  }
};

// Static topology A[h], zero-padded: aref[h, i, j] and aref_t[h, j, i] (either may be null).
template <typename T>
void static_topology(const CtrSizes& s, int64_t Vp, const T* A, T* aref, T* aref_t) {
  const int64_t V = s.V;
  for (int64_t h = 0; h < s.H; ++h)
    for (int64_t i = 0; i < Vp; ++i)
      for (int64_t j = 0; j < Vp; ++j) {
        const T value = (i < V && j < V) ? A[(h * V + i) * V + j] : T(0);
        if (aref && i < V) aref[(h * V + i) * Vp + j] = value;
        if (aref_t && j < V) aref_t[(h * V + j) * Vp + i] = value;
      }
}

// Offset of topology (b, h, g) in a (B or 1, H, G, V, Vp) buffer (static mode: shared by all b).
inline int64_t topology_offset(const CtrSizes& s, int64_t Vp, int64_t b, int64_t h, int64_t g) {
  return (((s.dynamic ? b : 0) * s.H + h) * s.G + g) * s.V * Vp;
}

// Padded topologies of the whole batch (aref and/or aref_t; th_all: B * H blocks of th_stride
// for the tanh values, or null to keep them in a per-task scratch buffer).
template <typename T>
void compute_topologies(const CtrSizes& s, int64_t Vp, const T* A, const T* q, const T* k, const T* weight,
                        const T* bias, const T* alpha, T* aref, T* aref_t, T* th_all) {
  if (!s.dynamic) {
    static_topology(s, Vp, A, aref, aref_t);
    return;
  }
  const T alpha_value = *alpha;
  at::parallel_for(0, s.B * s.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> th_scratch(th_all ? 0 : th_stride<T>(s)), ab(2 * Vp), refined(s.G * Vp);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / s.H, h = bh % s.H;
      T* th = th_all ? th_all + bh * th_stride<T>(s) : th_scratch.data();
      std::fill(th + s.R * s.V * s.V, th + th_stride<T>(s), T(0));
      simd::run_per_isa<RefineTopology<T>>(s, Vp, b, h, A, q, k, weight, bias, alpha_value, th, ab.data(),
                                           refined.data(),
                                           aref ? aref + topology_offset(s, Vp, b, h, 0) : nullptr,
                                           aref_t ? aref_t + topology_offset(s, Vp, b, h, 0) : nullptr);
    }
  });
}

// dst[i] = src[i] widened to float32, i < n.
template <int Bytes>
BHARNET_INLINE void widen(const simd::bf16* src, int64_t n, float* dst) {
  constexpr int L = simd::kLanes<float, Bytes>;
  int64_t i = 0;
  for (; i + L <= n; i += L) simd::store<float, Bytes>(dst + i, simd::load_as<float, Bytes>(src + i));
  for (; i < n; ++i) dst[i] = simd::value_as<float>(src[i]);
}

struct Widen {
  template <int Bytes>
  static BHARNET_INLINE void run(const simd::bf16* src, int64_t n, float* dst) {
    widen<Bytes>(src, n, dst);
  }
};

// y rows [m0, m1) of group g in batch b: y_g[m, :] = sum_h v_hg[m, :] . Aref_h^T (v and y stored
// as S: T, or bf16 for T = float). bfloat16 v: the block's rows of each v_hg are first widened
// into `widened` (H x (m1 - m0) x V values; unused otherwise), because the GEMM broadcasts v's
// values one at a time and a bfloat16 one would cost a conversion at each broadcast.
template <typename T, typename S>
struct ForwardRows {
  template <int Bytes>
  static BHARNET_INLINE void run(CtrSizes s, int64_t Vp, const S* v, const T* aref_t, int64_t b, int64_t g,
                                 int64_t m0, int64_t m1, S* y, T* widened) {
    constexpr bool kWiden = !std::is_same_v<S, T>;
    const int64_t V = s.V, CG = s.group_channels();
    S* yg = y + ((b * s.C + g * CG) * s.T + m0) * V;
    const int64_t M = m1 - m0;
    auto rows_of = [&](int64_t h) __attribute__((always_inline)) {  // v_hg from row m0 on
      return v + (((b * s.H + h) * s.C + g * CG) * s.T + m0) * V;
    };
    if constexpr (kWiden) {
      for (int64_t h = 0; h < s.H; ++h) widen<Bytes>(rows_of(h), M * V, widened + h * M * V);
    }
    simd::tiles<T, Bytes>(M, V, [&](auto& tile, int64_t m, int rows, int64_t n0, int cols)
                                    __attribute__((always_inline)) {
      const int64_t ahead = m + kPrefetchTiles * rows;  // the rows this loop reaches kPrefetchTiles tiles on
      const int64_t ahead_n = n0 == 0 && ahead < M ? std::min<int64_t>(rows, M - ahead) * V : 0;
      simd::prefetch<true>(yg + ahead * V, ahead_n);
      for (int64_t h = 0; h < s.H; ++h) {
        if constexpr (kWiden) {
          tile.fma(V, widened + (h * M + m) * V, V, 1, aref_t + topology_offset(s, Vp, b, h, g) + n0, Vp, rows);
        } else {
          const S* vg = rows_of(h);
          simd::prefetch(vg + ahead * V, ahead_n);
          tile.fma(V, vg + m * V, V, 1, aref_t + topology_offset(s, Vp, b, h, g) + n0, Vp, rows);
        }
      }
      tile.store_as(yg + m * V + n0, V, rows, cols);
    });
  }
};

// Zeros after the forward's transposed topologies: the channels-last forward reads each (g, j)'s
// row of Vp values in whole tiles of rows; the last tile of rows, full or half height, ends at
// most MR / 2 - 1 values past V - 1 (MR <= 16), i.e. past the row's end into the next row (its
// values land in dropped rows) or, for the buffer's last row, into these zeros.
constexpr int64_t kTopologySlack = 16;
static_assert(kTopologySlack >= 16 / 2 - 1, "kTopologySlack: the tallest tile's overrun");

// Rows of the channels-last forward's two-frame tiles (12 x 2 vectors).
constexpr int64_t kPairRows = 12;

// Channels-last forward, frames [t0, t1) of batch b: v is memory (B, T, V, H, C) and y memory
// (B, T, V, C), so for each frame t and group g
//   Y_t[i, c in g] = sum_h sum_j Aref[b, h, g, i, j] * V_t[j, h, c in g]
// is a GEMM whose B operand rows are the group's channel runs of v (row stride H * C) and whose
// output rows are channel runs of y; its A operand is read from the transposed topologies
// aref_t (fma_columns: one pointer per j, whole tiles of rows). The group width must be whole
// 64-byte vectors of T (the tiles read whole vectors of v's rows); a group of one vector takes
// two frames per tile (12 x 2 vectors, instead of 16 x 1 with a broadcast per FMA: 15-23% less
// time at C = 64, single thread, this project's Xeon), an odd last frame alone. Same products,
// same order (h, then j) as ForwardRows; v and y stored as S like there. bfloat16 v: each
// group's slice of the frame (or pair) is widened into `widened` (2 x V x H x CG values) before
// its tiles, which read each value once per tile of rows (10-21% less time than widening at
// each read, single thread, this Xeon; float32 v copied the same way was slower).
template <typename T, typename S>
struct ForwardFramesChannelsLast {
  template <int Bytes>
  static BHARNET_INLINE void run(CtrSizes s, int64_t Vp, const S* v, const T* aref_t, int64_t b, int64_t t0,
                                 int64_t t1, S* y, T* widened) {
    constexpr bool kWiden = !std::is_same_v<S, T>;
    const int64_t V = s.V, C = s.C, CG = s.group_channels(), H = s.H, HC = H * C;
    // use(B, h_stride, ldb, frame_stride) with the B operand of group g in frames t.. t + frames - 1:
    // rows (j, h) at B + j * ldb + h * h_stride, frames frame_stride apart. v itself, or bfloat16
    // v widened into `widened` first (each value once, not at every row tile's read of it).
    auto with_group_rows = [&](int64_t t, int64_t g, int frames, const auto& use) __attribute__((always_inline)) {
      const S* vt = v + (b * s.T + t) * V * HC + g * CG;
      if constexpr (kWiden) {
        for (int n = 0; n < frames; ++n)
          for (int64_t jh = 0; jh < V * H; ++jh)
            widen<Bytes>(vt + n * V * HC + jh * C, CG, widened + (n * V * H + jh) * CG);
        use(widened, CG, H * CG, V * H * CG);
      } else {
        use(vt, C, HC, V * HC);
      }
    };
    int64_t t = t0;
    // one vector per group (possible on the wide path only): two frames per tile
    if constexpr (Bytes == 64) {
      for (; CG == simd::kLanes<T, Bytes> && t + 1 < t1; t += 2) {
        S* yt = y + (b * s.T + t) * V * C;
        for (int64_t g = 0; g < s.G; ++g) {
          with_group_rows(t, g, 2, [&](const T* vg, int64_t h_stride, int64_t ldb, int64_t frame_stride)
                                       __attribute__((always_inline)) {
            auto frame_pair = [&](auto& tile, int64_t i, int rows, int64_t, int) __attribute__((always_inline)) {
              for (int64_t h = 0; h < H; ++h)
                tile.fma_columns(V, aref_t + topology_offset(s, Vp, b, h, g) + i, Vp, vg + h * h_stride, ldb,
                                 frame_stride);
              for (int n = 0; n < 2; ++n) tile.store_vector_as(n, yt + n * V * C + i * C + g * CG, C, rows);
            };
            for (int64_t i = 0; i < V; i += kPairRows)
              simd::row_tile<T, kPairRows, 2, Bytes>(i, static_cast<int>(std::min(kPairRows, V - i)), 0, 0, frame_pair);
          });
        }
      }
    }
    for (; t < t1; ++t) {
      S* yt = y + (b * s.T + t) * V * C;
      for (int64_t g = 0; g < s.G; ++g) {
        with_group_rows(t, g, 1, [&](const T* vg, int64_t h_stride, int64_t ldb, int64_t)
                                     __attribute__((always_inline)) {
          simd::tiles<T, Bytes>(V, CG, [&](auto& tile, int64_t i, int rows, int64_t n0, int cols)
                                           __attribute__((always_inline)) {
            for (int64_t h = 0; h < H; ++h)
              tile.fma_columns(V, aref_t + topology_offset(s, Vp, b, h, g) + i, Vp, vg + h * h_stride + n0, ldb);
            tile.store_as(yt + i * C + g * CG + n0, C, rows, cols);
          });
        });
      }
    }
  }
};

// Rows of v_hg that a GEMM can read in place as whole vectors (Vp values from each row's start)
// without passing the end of v_hg's M rows of V.
inline int64_t rows_readable_in_place(int64_t M, int64_t V, int64_t Vp) {
  return M * V >= Vp ? std::min(M, (M * V - Vp) / V + 1) : 0;
}

// dv_hg = dy_g . Aref_hg and dAref_hg = dy_g^T . v_hg for one (b, h, g): dy_g and v_hg (M x V,
// stored as In: T, or bf16 for T = float, widened as they are read) at dyg and vg, dv_hg stored
// as Out (rounded as it is stored) at dvg; tail: scratch for the rows past
// rows_readable_in_place, zero-padded to Vp (at most Vp / V + 1 rows).
template <typename T, typename In, typename Out>
struct BackwardGroup {
  template <int Bytes>
  static BHARNET_INLINE void run(CtrSizes s, int64_t Vp, const In* dyg, const In* vg, const T* aref, int64_t b,
                                 int64_t h, int64_t g, Out* dvg, T* dtopo, T* tail) {
    const int64_t V = s.V, M = s.group_rows();
    const T* topo = aref + topology_offset(s, Vp, b, h, g);
    simd::tiles<T, Bytes>(M, V, [&](auto& tile, int64_t m, int rows, int64_t n0, int cols)
                                    __attribute__((always_inline)) {
      const int64_t ahead = m + kPrefetchTiles * rows;  // dy_g rows, and v_hg's for dAref below
      const int64_t ahead_n = n0 == 0 && ahead < M ? std::min<int64_t>(rows, M - ahead) * V : 0;
      simd::prefetch(dyg + ahead * V, ahead_n);
      simd::prefetch(vg + ahead * V, ahead_n);
      simd::prefetch<true>(dvg + ahead * V, ahead_n);
      tile.fma(V, dyg + m * V, V, 1, topo + n0, Vp, rows);
      tile.store_as(dvg + m * V + n0, V, rows, cols);
    });
    // dAref's B operand is v_hg read in place: a row's whole vectors run into the rows after it,
    // whose values land in dropped columns; the last rows (whose vectors would pass the end of
    // v_hg, maybe of the tensor) are read from a zero-padded copy. Same sums in the same order as
    // over a padded copy of every row.
    const int64_t in_place = rows_readable_in_place(M, V, Vp);
    for (int64_t m = in_place; m < M; ++m)
      for (int64_t j = 0; j < Vp; ++j) tail[(m - in_place) * Vp + j] = j < V ? simd::value_as<T>(vg[m * V + j]) : T(0);
    T* out = dtopo + ((b * s.H + h) * s.G + g) * V * V;
    simd::tiles<T, Bytes>(V, V, [&](auto& tile, int64_t i, int rows, int64_t n0, int cols)
                                    __attribute__((always_inline)) {
      tile.fma(in_place, dyg + i, 1, V, vg + n0, V, rows);
      tile.fma(M - in_place, dyg + in_place * V + i, 1, V, tail + n0, Vp, rows);
      tile.store_to(out + i * V + n0, V, rows, cols, false);
    });
  }
};

// lanes[0] += a * b as one 32-byte vector, or a 64-byte one as two: its low half into lanes[0],
// its high half into lanes[1] (products fused into the sums alike).
template <typename T, int Bytes>
BHARNET_INLINE void add_products_to_32_byte_lanes(simd::vec<T, 32>* lanes, const simd::vec<T, Bytes>& a,
                                                  const simd::vec<T, Bytes>& b) {
  if constexpr (Bytes == 32) {
    lanes[0] += a * b;
  } else {
    lanes[0] += simd::half_of<T>(a, 0) * simd::half_of<T>(b, 0);
    lanes[1] += simd::half_of<T>(a, 1) * simd::half_of<T>(b, 1);
  }
}

// dst[e] = w * src[e] (first) or dst[e] += w * src[e], and lanes[c] += src[e] * th[e] for the
// 32-byte chunks c = 0..3 of the 4 * L32 entries from e0: `Bytes`-wide operations, the same sums
// on both paths.
template <typename T, int Bytes>
BHARNET_INLINE void weigh_and_correlate(int64_t e0, int chunks, T w, bool first, const T* src, const T* th, T* dst,
                                        simd::vec<T, 32>* lanes) {
  constexpr int L = simd::kLanes<T, Bytes>, L32 = simd::kLanes<T, 32>;
  for (int c = 0; c < chunks * L32; c += L) {
    const auto d = simd::load<T, Bytes>(src + e0 + c);
    simd::store<T, Bytes>(dst + e0 + c, first ? w * d : simd::load<T, Bytes>(dst + e0 + c) + w * d);
    add_products_to_32_byte_lanes<T, Bytes>(lanes + c / L32, d, simd::load<T, Bytes>(th + e0 + c));
  }
}

// dq, dk (R x V each), P (G x R) and S (G) of one (b, h) from its dAref (G x V x V) and th
// (R x V x V); D: V x V scratch. With u_r = (sum_g W[h, g, r] dAref[g]) * (1 - th_r^2):
//   S[g] = sum_ij dAref[g, i, j]     P[g, r] = sum_ij dAref[g, i, j] th[r, i, j]
//   dq[r, i] = alpha sum_j u_r[i, j]     dk[r, j] = -alpha sum_i u_r[i, j]
// P's V x V products are summed in four 32-byte lane vectors (the 8-float chunk c of each 32
// floats into vector c; the same operations on both widths, leftover chunks 32 bytes at a time),
// then their lanes and the last V*V mod L32 products in double; the other sums run in double.
template <typename T>
struct RefinementGrad {
  template <int Bytes>
  static BHARNET_INLINE void run(CtrSizes s, const T* dtopo, const T* th, const T* weight_h, T alpha, T* dq, T* dk,
                                 T* P, T* S, T* D) {
    constexpr int L32 = simd::kLanes<T, 32>;
    const int64_t V = s.V, VV = s.V * s.V, R = s.R, G = s.G;
    const int64_t quads_end = VV / (4 * L32) * (4 * L32), chunks_end = VV / L32 * L32;
    for (int64_t g = 0; g < G; ++g) S[g] = static_cast<T>(simd::sum(dtopo + g * VV, VV));
    for (int64_t r = 0; r < R; ++r) {
      const T* th_r = th + r * VV;
      for (int64_t g = 0; g < G; ++g) {
        const T w = weight_h[g * R + r];
        const T* dt = dtopo + g * VV;
        simd::vec<T, 32> lanes[4] = {};
        for (int64_t e = 0; e < quads_end; e += 4 * L32)
          weigh_and_correlate<T, Bytes>(e, 4, w, g == 0, dt, th_r, D, lanes);
        weigh_and_correlate<T, 32>(quads_end, static_cast<int>((chunks_end - quads_end) / L32), w, g == 0, dt, th_r,
                                   D, lanes);
        double total = 0.0;
        for (int c = 0; c < 4; ++c)
          for (int i = 0; i < L32; ++i) total += lanes[c][i];
        for (int64_t e = chunks_end; e < VV; ++e) {
          D[e] = g == 0 ? w * dt[e] : D[e] + w * dt[e];
          total += static_cast<double>(dt[e]) * th_r[e];
        }
        P[g * R + r] = static_cast<T>(total);
      }
      // D becomes u_r = D_r * (1 - th_r^2); dq sums its rows, dk its columns.
      for (int64_t e = 0; e < VV; ++e) D[e] *= T(1) - th_r[e] * th_r[e];
      T* dk_r = dk + r * V;
      for (int64_t j = 0; j < V; ++j) dk_r[j] = T(0);
      for (int64_t i = 0; i < V; ++i) {
        dq[r * V + i] = alpha * static_cast<T>(simd::sum(D + i * V, V));
        for (int64_t j = 0; j < V; ++j) dk_r[j] += D[i * V + j];
      }
      for (int64_t j = 0; j < V; ++j) dk_r[j] = -alpha * dk_r[j];
    }
  }
};

void check_cpu(const at::Tensor& v) {
  TORCH_CHECK(v.device().is_cpu(), "bharnet::ctr_graph_conv_cpp (CPU kernel): expected CPU tensors, got ", v.device());
  check_cpu_dtype("bharnet::ctr_graph_conv_cpp", v.scalar_type(), " v");
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return t ? t->contiguous() : at::Tensor();
}

// Whether v is the (B, H, C, T, V) view of a channels-last (B, H * C, T, V) convolution output
// (memory (B, T, V, H, C)) and not also contiguous: then the output is channels-last too.
bool is_channels_last(const at::Tensor& v) {
  return !v.is_contiguous() && v.permute({0, 3, 4, 1, 2}).is_contiguous();
}

// y = the aggregation of v (stored as S: T, or bf16 for T = float) into the allocated y.
// Contiguous v: tasks (b, g, block of kForwardRowBlock rows) over the transposed topologies.
// Channels-last v: tasks of frames, over the same ones.
template <typename T, typename S>
void forward_into(const CtrSizes& s, bool channels_last, const at::Tensor& v, const at::Tensor& A,
                  const at::Tensor& q, const at::Tensor& k, const at::Tensor& weight, const at::Tensor& bias,
                  const at::Tensor& alpha, at::Tensor& y) {
  const int64_t Vp = round_up(s.V, simd::kTileCols<T>);
  const int64_t topo_size = (s.dynamic ? s.B : 1) * s.H * s.G * s.V * Vp;
  auto topo = at::empty({topo_size + kTopologySlack}, A.options());
  topo.narrow(0, topo_size, kTopologySlack).zero_();
  T* tp = topo.data_ptr<T>();
  compute_topologies<T>(s, Vp, A.data_ptr<T>(), ptr_or_null<T>(q), ptr_or_null<T>(k), ptr_or_null<T>(weight),
                        ptr_or_null<T>(bias), ptr_or_null<T>(alpha), nullptr, tp, nullptr);
  const S* vp = static_cast<const S*>(v.data_ptr());
  S* yp = static_cast<S*>(y.data_ptr());
  if (channels_last) {
    at::parallel_for(0, s.B * s.T, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> widened(std::is_same_v<S, T> ? 0 : 2 * s.V * s.H * s.group_channels());  // bf16 v
      for (int64_t bt = begin; bt < end;) {  // the frames of one b at a time
        const int64_t b = bt / s.T, t1 = std::min(end, (b + 1) * s.T);
        simd::run_per_isa<ForwardFramesChannelsLast<T, S>>(s, Vp, vp, tp, b, bt - b * s.T, t1 - b * s.T, yp,
                                                           widened.data());
        bt = t1;
      }
    });
    return;
  }
  const int64_t M = s.group_rows();
  const int64_t blocks = (M + kForwardRowBlock - 1) / kForwardRowBlock;
  at::parallel_for(0, s.B * s.G * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> widened(std::is_same_v<S, T> ? 0 : s.H * std::min(M, kForwardRowBlock) * s.V);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t block = task % blocks, bg = task / blocks;
      const int64_t m0 = block * kForwardRowBlock;
      simd::run_per_isa<ForwardRows<T, S>>(s, Vp, vp, tp, bg / s.G, bg % s.G, m0, std::min(M, m0 + kForwardRowBlock),
                                           yp, widened.data());
    }
  });
}

// The channels-last path needs groups of whole 64-byte vectors of the compute dtype.
at::Tensor forward_cpu(const at::Tensor& v_in, const at::Tensor& A_in, const std::optional<at::Tensor>& q_in,
                       const std::optional<at::Tensor>& k_in, const std::optional<at::Tensor>& weight_in,
                       const std::optional<at::Tensor>& bias_in, const std::optional<at::Tensor>& alpha_in) {
  check_cpu(v_in);
  const CtrSizes s = ctr_check(v_in, A_in, q_in, k_in, weight_in, bias_in, alpha_in);
  const bool channels_last = is_channels_last(v_in);
  const int64_t compute_bytes = v_in.scalar_type() == at::kDouble ? 8 : 4;
  if (channels_last && s.group_channels() * compute_bytes % 64 != 0) {
    // groups of other widths: the channels-first kernel, output converted back
    auto y = at::empty({s.B, s.C, s.T, s.V}, v_in.options().memory_format(at::MemoryFormat::ChannelsLast));
    return y.copy_(forward_cpu(v_in.contiguous(), A_in, q_in, k_in, weight_in, bias_in, alpha_in));
  }
  const auto v = channels_last ? v_in : v_in.contiguous(), A = A_in.contiguous();
  const auto q = contiguous_or_undefined(q_in), k = contiguous_or_undefined(k_in);
  const auto weight = contiguous_or_undefined(weight_in), bias = contiguous_or_undefined(bias_in);
  const auto alpha = contiguous_or_undefined(alpha_in);
  auto y = at::empty({s.B, s.C, s.T, s.V}, v.options().memory_format(channels_last ? at::MemoryFormat::ChannelsLast
                                                                                   : at::MemoryFormat::Contiguous));
  if (y.numel() == 0) return y;
  if (v.scalar_type() == at::kBFloat16) {
    forward_into<float, simd::bf16>(s, channels_last, v, A, q, k, weight, bias, alpha, y);
  } else {
    AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "bharnet::ctr_graph_conv_cpp", [&] {
      forward_into<scalar_t, scalar_t>(s, channels_last, v, A, q, k, weight, bias, alpha, y);
    });
  }
  return y;
}

// bfloat16 dy_g and v_hg up to this many values each are widened once per task into float32
// scratch (the GEMMs read each value many times; widening it at every read made the backward
// 1.5x as long as the float32 one); larger groups are widened as they are read.
constexpr int64_t kWidenedGroupLimit = int64_t(1) << 20;

// dv and dAref (B, H, G, V, V) for the whole batch; aref: the padded topologies; dy, v and dv
// stored as S.
template <typename T, typename S>
void topology_grad(const CtrSizes& s, int64_t Vp, const S* dy, const S* v, const T* aref, S* dv, T* dtopo) {
  const int64_t MV = s.group_rows() * s.V;
  const bool widen = !std::is_same_v<S, T> && MV <= kWidenedGroupLimit;
  at::parallel_for(0, s.B * s.H * s.G, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> tail((Vp / s.V + 1) * Vp);
    std::vector<T> widened(widen ? 2 * MV : 0);  // dy_g, then v_hg
    int64_t widened_dy = -1;  // the (b, g) whose dy_g is in `widened`
    for (int64_t task = begin; task < end; ++task) {
      // h fastest: the H tasks that read the same dy_g run one after another (dy_g stays in cache)
      const int64_t h = task % s.H, g = (task / s.H) % s.G, b = task / (s.G * s.H);
      const S* dyg = dy + (b * s.C + g * s.group_channels()) * s.T * s.V;
      const int64_t vg_offset = ((b * s.H + h) * s.C + g * s.group_channels()) * s.T * s.V;
      if constexpr (std::is_same_v<S, T>) {
        simd::run_per_isa<BackwardGroup<T, T, T>>(s, Vp, dyg, v + vg_offset, aref, b, h, g, dv + vg_offset, dtopo,
                                                   tail.data());
      } else if (widen) {
        if (widened_dy != b * s.G + g) {
          simd::run_per_isa<Widen>(dyg, MV, widened.data());
          widened_dy = b * s.G + g;
        }
        simd::run_per_isa<Widen>(v + vg_offset, MV, widened.data() + MV);
        simd::run_per_isa<BackwardGroup<T, T, S>>(s, Vp, widened.data(), widened.data() + MV, aref, b, h, g,
                                                   dv + vg_offset, dtopo, tail.data());
      } else {
        simd::run_per_isa<BackwardGroup<T, S, S>>(s, Vp, dyg, v + vg_offset, aref, b, h, g, dv + vg_offset, dtopo,
                                                   tail.data());
      }
    }
  });
}

// dA[h, i, j] = sum_{b, g} dtopo[b, h, g, i, j], in a fixed order.
template <typename T>
void adjacency_grad(const CtrSizes& s, const T* dtopo, T* dA) {
  const int64_t V = s.V;
  at::parallel_for(0, s.H * V, 1, [&](int64_t begin, int64_t end) {
    for (int64_t hi = begin; hi < end; ++hi) {
      const int64_t h = hi / V, i = hi % V;
      T* out = dA + hi * V;
      for (int64_t j = 0; j < V; ++j) out[j] = T(0);
      for (int64_t b = 0; b < s.B; ++b)
        for (int64_t g = 0; g < s.G; ++g) {
          const T* src = dtopo + (((b * s.H + h) * s.G + g) * V + i) * V;
          for (int64_t j = 0; j < V; ++j) out[j] += src[j];
        }
    }
  });
}

// The backward's input checks; dy, v and A made contiguous.
CtrSizes check_backward(const char* op, at::Tensor& dy, at::Tensor& v, at::Tensor& A, const at::Tensor& q,
                        const at::Tensor& k, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& alpha) {
  check_cpu(v);
  const CtrSizes s = weight.defined() ? ctr_check(v, A, q, k, weight, bias, alpha) : ctr_check(v, A, {}, {}, {}, {}, {});
  TORCH_CHECK(dy.sizes() == at::IntArrayRef({s.B, s.C, s.T, s.V}) && dy.scalar_type() == v.scalar_type() &&
                  dy.device() == v.device(),
              op, ": dy must be like the output (", s.B, ", ", s.C, ", ", s.T, ", ", s.V, ") in v's dtype, got ",
              dy.sizes(), " ", dy.scalar_type());
  dy = dy.contiguous();
  v = v.contiguous();
  A = A.contiguous();
  return s;
}

// dv and dA of the static (ST-GC) backward; dy and v stored as S.
template <typename T, typename S>
void static_backward_into(const CtrSizes& s, const at::Tensor& dy, const at::Tensor& v, const at::Tensor& A,
                          at::Tensor& dv, at::Tensor& dA) {
  const int64_t Vp = round_up(s.V, simd::kTileCols<T>);
  at::Tensor aref = at::empty({s.H * s.V * Vp}, A.options());
  at::Tensor dtopo = at::empty({s.B, s.H, 1, s.V, s.V}, A.options());
  static_topology<T>(s, Vp, A.data_ptr<T>(), aref.data_ptr<T>(), nullptr);
  topology_grad<T, S>(s, Vp, static_cast<const S*>(dy.data_ptr()), static_cast<const S*>(v.data_ptr()),
                      aref.data_ptr<T>(), static_cast<S*>(dv.data_ptr()), dtopo.data_ptr<T>());
  adjacency_grad<T>(s, dtopo.data_ptr<T>(), dA.data_ptr<T>());
}

std::tuple<at::Tensor, at::Tensor> static_backward_cpu(const at::Tensor& dy_in, const at::Tensor& v_in,
                                                       const at::Tensor& A_in) {
  constexpr const char* op = "bharnet::ctr_graph_conv_cpp_static_backward";
  at::Tensor dy = dy_in, v = v_in, A = A_in;
  const CtrSizes s = check_backward(op, dy, v, A, {}, {}, {}, {}, {});
  auto dv = at::empty_like(v);
  auto dA = at::zeros_like(A);
  if (v.numel() == 0) return {dv, dA};
  if (v.scalar_type() == at::kBFloat16) {
    static_backward_into<float, simd::bf16>(s, dy, v, A, dv, dA);
  } else {
    AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), op, [&] {
      static_backward_into<scalar_t, scalar_t>(s, dy, v, A, dv, dA);
    });
  }
  return {dv, dA};
}

// Every gradient of the CTR-GC backward (the module comment's formulas); dy, v and dv stored as S.
template <typename T, typename S>
void backward_into(const CtrSizes& s, const at::Tensor& dy, const at::Tensor& v, const at::Tensor& A,
                   const at::Tensor& q, const at::Tensor& k, const at::Tensor& weight, const at::Tensor& bias,
                   const at::Tensor& alpha, at::Tensor& dv, at::Tensor& dA, at::Tensor& dq, at::Tensor& dk,
                   at::Tensor& dweight, at::Tensor& dbias, at::Tensor& dalpha) {
  const int64_t Vp = round_up(s.V, simd::kTileCols<T>);
  const int64_t VV = s.V * s.V;
  const auto options = A.options();  // the compute dtype
  at::Tensor aref = at::empty({s.B * s.H * s.G * s.V * Vp}, options);
  at::Tensor th = at::empty({s.B * s.H * th_stride<T>(s)}, options);
  at::Tensor dtopo = at::empty({s.B, s.H, s.G, s.V, s.V}, options);
  at::Tensor P = at::empty({s.B, s.H, s.G, s.R}, options);
  at::Tensor S_sums = at::empty({s.B, s.H, s.G}, options);
  const T* wp = weight.data_ptr<T>();
  const T* bp = bias.data_ptr<T>();
  const T alpha_value = *alpha.data_ptr<T>();
  compute_topologies<T>(s, Vp, A.data_ptr<T>(), q.data_ptr<T>(), k.data_ptr<T>(), wp, bp, alpha.data_ptr<T>(),
                        aref.data_ptr<T>(), nullptr, th.data_ptr<T>());
  topology_grad<T, S>(s, Vp, static_cast<const S*>(dy.data_ptr()), static_cast<const S*>(v.data_ptr()),
                      aref.data_ptr<T>(), static_cast<S*>(dv.data_ptr()), dtopo.data_ptr<T>());
  const T* dtp = dtopo.data_ptr<T>();
  at::parallel_for(0, s.B * s.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> D(VV);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t h = bh % s.H;
      simd::run_per_isa<RefinementGrad<T>>(s, dtp + bh * s.G * VV, th.data_ptr<T>() + bh * th_stride<T>(s),
                                            wp + h * s.G * s.R, alpha_value, dq.data_ptr<T>() + bh * s.R * s.V,
                                            dk.data_ptr<T>() + bh * s.R * s.V, P.data_ptr<T>() + bh * s.G * s.R,
                                            S_sums.data_ptr<T>() + bh * s.G, D.data());
    }
  });
  adjacency_grad<T>(s, dtp, dA.data_ptr<T>());
  // Tiny sums over b, in a fixed order, in double.
  const int64_t HGR = s.H * s.G * s.R, HG = s.H * s.G;
  const T* Pp = P.data_ptr<T>();
  const T* Sp = S_sums.data_ptr<T>();
  T* dwp = dweight.data_ptr<T>();
  T* dbp = dbias.data_ptr<T>();
  double dalpha_value = 0.0;
  for (int64_t e = 0; e < HGR; ++e) {
    double sum = 0.0;
    for (int64_t b = 0; b < s.B; ++b) sum += Pp[b * HGR + e];
    dwp[e] = static_cast<T>(alpha_value * sum);
    dalpha_value += wp[e] * sum;
  }
  for (int64_t e = 0; e < HG; ++e) {
    double sum = 0.0;
    for (int64_t b = 0; b < s.B; ++b) sum += Sp[b * HG + e];
    dbp[e] = static_cast<T>(alpha_value * sum);
    dalpha_value += bp[e] * sum;
  }
  *dalpha.data_ptr<T>() = static_cast<T>(dalpha_value);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& dy_in, const at::Tensor& v_in, const at::Tensor& A_in, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& weight_in, const at::Tensor& bias_in, const at::Tensor& alpha_in) {
  constexpr const char* op = "bharnet::ctr_graph_conv_cpp_backward";
  at::Tensor dy = dy_in, v = v_in, A = A_in;
  const CtrSizes s = check_backward(op, dy, v, A, q_in, k_in, weight_in, bias_in, alpha_in);
  const auto q = q_in.contiguous(), k = k_in.contiguous(), weight = weight_in.contiguous();
  const auto bias = bias_in.contiguous(), alpha = alpha_in.contiguous();
  auto dv = at::empty_like(v);
  auto dA = at::zeros_like(A), dq = at::zeros_like(q), dk = at::zeros_like(k);
  auto dweight = at::zeros_like(weight), dbias = at::zeros_like(bias), dalpha = at::zeros_like(alpha);
  if (v.numel() == 0) return {dv, dA, dq, dk, dweight, dbias, dalpha};
  if (v.scalar_type() == at::kBFloat16) {
    backward_into<float, simd::bf16>(s, dy, v, A, q, k, weight, bias, alpha, dv, dA, dq, dk, dweight, dbias, dalpha);
  } else {
    AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), op, [&] {
      backward_into<scalar_t, scalar_t>(s, dy, v, A, q, k, weight, bias, alpha, dv, dA, dq, dk, dweight, dbias,
                                        dalpha);
    });
  }
  return {dv, dA, dq, dk, dweight, dbias, dalpha};
}

}  // namespace
}  // namespace bharnet

TORCH_LIBRARY_FRAGMENT(bharnet, m) {
  m.def("ctr_graph_conv_cpp(Tensor v, Tensor A, Tensor? q, Tensor? k, Tensor? weight, Tensor? bias, "
        "Tensor? alpha) -> Tensor");
  m.def("ctr_graph_conv_cpp_backward(Tensor dy, Tensor v, Tensor A, Tensor q, Tensor k, Tensor weight, "
        "Tensor bias, Tensor alpha) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("ctr_graph_conv_cpp_static_backward(Tensor dy, Tensor v, Tensor A) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bharnet, CPU, m) {
  m.impl("ctr_graph_conv_cpp", &bharnet::forward_cpu);
  m.impl("ctr_graph_conv_cpp_backward", &bharnet::backward_cpu);
  m.impl("ctr_graph_conv_cpp_static_backward", &bharnet::static_backward_cpu);
}
