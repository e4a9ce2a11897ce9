// Deformable temporal convolution (DeTGC) on the CPU: bharnet::deformable_temporal_conv_cpp and
// its backward.
//
// Math (bharnet/ops/deformable_temporal_conv.py; E offsets tau, stride s, T_out = (T-1)/s + 1,
// k = c * E + e, K = C * E, n = t' * V + v, N = T_out * V):
//   r[t',e] = t' * s + tau[e];  p = clamp(r, 0, T-1);  p0 = floor(p);  p1 = min(p0+1, T-1);  w = p - p0
//   xs[b,k,n] = (1-w) * x[b,c,p0,v] + w * x[b,c,p1,v]
//   y[b,o,n]  = bias[o] + sum_k W[o,k] * xs[b,k,n]
// Backward (g[b,c,t',e,v] = sum_o W[o,c,e] dy[b,o,t',v]; dxs = inside(r) * (x[p1] - x[p0]) with
// inside = 0 <= r <= T-1, or 0 < r < T-1 when torch's clamp has derivative 0 at its bounds,
// `bounds_pass_grad`):
//   dbias[o] = sum_{b,n} dy[b,o,n]
//   dW[o,k]  = sum_{b,n} dy[b,o,n] * xs[b,k,n]
//   dtau[e]  = sum_{b,c,t',v} g[b,c,t',e,v] * dxs[b,c,t',e,v]
//   dx[b,c,t,v] = sum over the samples (t', e) that read row t (as p0 with coefficient 1-w, as p1
//                 with coefficient w) of coef * g[b,c,t',e,v]
//
// Structure. The forward runs per (b, block of output times): it gathers and interpolates the
// block's K x (block * V) samples into a zero-padded buffer and multiplies W (O x K) by it with
// the register-tiled micro-kernel of cpu_simd.h (bias preloaded into the accumulators).
// dW runs per (b, time block) too, with the samples gathered transposed (n-major, so that k is
// the vector dimension): a GEMM dy (O x n) . xs^T (n x K) accumulated into one of a fixed number
// of partial buffers (the tasks are split into slices independent of the thread count) that are
// then summed in order. dx and dtau run per (b, block of kTileRows channels): for every (t', e)
// micro-kernel tiles (up to 3 64-byte vectors wide on the AVX-512 path) compute g for those
// channels, which is added to rows p0 and p1 of dx (rows that only this task writes: no atomics)
// and dotted with dxs for dtau's per-task partial sums (in double, summed in task order).
// Everything is deterministic. Accumulation is in the compute dtype (float32 or float64);
// positions in float32, or float64 for float64 offsets. Both directions also take bfloat16 x
// and dy (with float32 weight and bias: inference on bfloat16 models, training under CPU
// autocast), computed in float32 on the values widened as read, y and dx rounded as stored: each
// value the float32 kernels' on the widened inputs.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "cpu_dtypes.h"
#include "cpu_simd.h"
#include "deformable_temporal_conv.h"

namespace bharnet {
namespace {

using simd::kTileRows;
using simd::round_up;
using simd::Tile;

// Output-time blocks hold about this many columns n = (t', v).
constexpr int64_t kColumnsPerBlock = 128;
// The parameter gradients are reduced into at most this many partial buffers.
constexpr int64_t kMaxSlices = 16;

// One sample position: rows p0 and p1 of x, interpolation weight w, and whether the clamp
// passes the gradient to tau.
template <typename T>
struct Sample {
  int64_t p0, p1;
  T w;
  bool inside;
};

// Samples of every (t', e), in that order; positions in P exactly as the reference computes them.
template <typename T, typename P>
std::vector<Sample<T>> sample_table(const DetSizes& s, const P* tau, bool bounds_pass_grad) {
  std::vector<Sample<T>> samples(s.T_out * s.E);
  const P last = P(s.T - 1);
  for (int64_t t = 0; t < s.T_out; ++t)
    for (int64_t e = 0; e < s.E; ++e) {
      const P r = P(t * s.stride) + tau[e];
      const P p = r < P(0) ? P(0) : (r > last ? last : r);  // NaN stays NaN
      const P floor_p = std::floor(p);
      const int64_t p0 = floor_p >= P(0) ? std::min<int64_t>(static_cast<int64_t>(floor_p), s.T - 1) : 0;
      const bool inside = bounds_pass_grad ? (r >= P(0) && r <= last) : (r > P(0) && r < last);
      samples[t * s.E + e] = Sample<T>{p0, std::min<int64_t>(p0 + 1, s.T - 1), static_cast<T>(p - floor_p), inside};
    }
  return samples;
}

inline int64_t times_per_block(const DetSizes& s) { return std::max<int64_t>(1, kColumnsPerBlock / std::max<int64_t>(s.V, 1)); }

// y[b, :, t0:t1, :] = bias + W . xs for one block of output times; xs: K x NBp scratch
// (NBp = (t1 - t0) * V rounded up to the tile width; its padding columns are never stored).
// x and y are stored as S: T, or bf16 for T = float (widened as read, rounded as stored).
template <typename T, typename S>
struct ForwardBlock {
  template <int Bytes>
  static BHARNET_INLINE void run(DetSizes s, const S* x, const T* weight, const T* bias, const Sample<T>* samples,
                                 int64_t b, int64_t t0, int64_t t1, T* xs, S* y) {
    const int64_t V = s.V, K = s.C * s.E, N = s.T_out * V;
    const int64_t NB = (t1 - t0) * V, NBp = simd::packed_ld<T>(NB);
    int64_t first = s.T, last = 0;  // the rows of x that this block's samples read
    for (int64_t i = t0 * s.E; i < t1 * s.E; ++i) {
      first = std::min(first, samples[i].p0);
      last = std::max(last, samples[i].p1);
    }
    for (int64_t c = 0; c < s.C; ++c) {
      const S* xc = x + b * s.x_batch + c * s.T * V;
      if (c + 1 < s.C) simd::prefetch(xc + (s.T + first) * V, (last - first + 1) * V);  // channel c + 1's rows
      for (int64_t e = 0; e < s.E; ++e) {
        T* row = xs + (c * s.E + e) * NBp;
        for (int64_t t = t0; t < t1; ++t) {
          const Sample<T>& smp = samples[t * s.E + e];
          const S* x0 = xc + smp.p0 * V;
          const S* x1 = xc + smp.p1 * V;
          const T w = smp.w, w0 = T(1) - smp.w;
          T* out = row + (t - t0) * V;
          for (int64_t v = 0; v < V; ++v)
            out[v] = simd::value_as<T>(x0[v]) * w0 + simd::value_as<T>(x1[v]) * w;
        }
        for (int64_t n = NB; n < NBp; ++n) row[n] = T(0);
      }
    }
    S* yb = y + b * s.O * N + t0 * V;
    simd::tiles<T, Bytes>(s.O, NB, [&](auto& tile, int64_t o, int rows, int64_t n0, int cols)
                                       __attribute__((always_inline)) {
      if (bias) tile.fill_rows(bias + o, rows);
      tile.fma(K, weight + o * K, K, 1, xs + n0, NBp, rows);
      tile.store_as(yb + o * N + n0, N, rows, cols);
    });
  }
};

// Channels-last forward, output times [t0, t1) of batch b: x is memory (B, T, V, C) and y memory
// (B, T_out, V, O). The block's samples go into rows n = (t', v) of xs (row length K1 = 1 + K:
// a 1 for the bias, then k' = e * C + c, so that each sample is a contiguous run of channels),
// and Y[n, :] = xs[n, :] . wt with wt[0, o] = bias[o], wt[1 + e * C + c, o] = W[o, c, e]
// (row length Op, packed once per call). x and y stored as S, like ForwardBlock's.
template <typename T, typename S>
struct ForwardBlockChannelsLast {
  template <int Bytes>
  static BHARNET_INLINE void run(DetSizes s, const S* x, const T* wt, int64_t Op, const Sample<T>* samples, int64_t b,
                                 int64_t t0, int64_t t1, T* xs, S* y) {
    const int64_t V = s.V, C = s.C, K1 = 1 + s.C * s.E, NB = (t1 - t0) * V;
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t e = 0; e < s.E; ++e) {
        const Sample<T>& smp = samples[t * s.E + e];
        const T w = smp.w, w0 = T(1) - smp.w;
        const S* x0 = x + (b * s.T + smp.p0) * V * C;
        const S* x1 = x + (b * s.T + smp.p1) * V * C;
        for (int64_t v = 0; v < V; ++v) {
          T* out = xs + ((t - t0) * V + v) * K1 + 1 + e * C;
          for (int64_t c = 0; c < C; ++c)
            out[c] = simd::value_as<T>(x0[v * C + c]) * w0 + simd::value_as<T>(x1[v * C + c]) * w;
        }
      }
    for (int64_t n = 0; n < NB; ++n) xs[n * K1] = T(1);
    S* yb = y + (b * s.T_out + t0) * V * s.O;
    simd::tiles<T, Bytes>(NB, s.O, [&](auto& tile, int64_t n, int rows, int64_t o0, int cols)
                                       __attribute__((always_inline)) {
      tile.fma(K1, xs + n * K1, K1, 1, wt + o0, Op, rows);
      tile.store_as(yb + n * s.O + o0, s.O, rows, cols);
    });
  }
};

// Adds one (b, time block)'s terms to the partial sums dW (O x Kp) and dbias (O).
// xst: NB x Kp scratch whose padding columns K..Kp are zero. x and dy stored as S (widened as read).
template <typename T, typename S>
struct WeightGradBlock {
  template <int Bytes>
  static BHARNET_INLINE void run(DetSizes s, const S* x, const S* dy, const Sample<T>* samples, int64_t b, int64_t t0,
                                 int64_t t1, T* xst, T* dw, T* dbias) {
    const int64_t V = s.V, K = s.C * s.E, Kp = simd::packed_ld<T>(K), N = s.T_out * V;
    const int64_t NB = (t1 - t0) * V;
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t e = 0; e < s.E; ++e) {
        const Sample<T>& smp = samples[t * s.E + e];
        const T w = smp.w, w0 = T(1) - smp.w;
        for (int64_t c = 0; c < s.C; ++c) {
          const S* xc = x + b * s.x_batch + c * s.T * V;
          const S* x0 = xc + smp.p0 * V;
          const S* x1 = xc + smp.p1 * V;
          T* out = xst + (t - t0) * V * Kp + c * s.E + e;
          for (int64_t v = 0; v < V; ++v) out[v * Kp] = simd::value_as<T>(x0[v]) * w0 + simd::value_as<T>(x1[v]) * w;
        }
      }
    const S* dyb = dy + b * s.O * N + t0 * V;
    simd::tiles<T, Bytes>(s.O, Kp, [&](auto& tile, int64_t o, int rows, int64_t k0, int cols)
                                       __attribute__((always_inline)) {
      tile.fma(NB, dyb + o * N, N, 1, xst + k0, Kp, rows);
      tile.store_to(dw + o * Kp + k0, Kp, rows, cols, true);
    });
    for (int64_t o = 0; o < s.O; ++o) {
      T sum = T(0);
      for (int64_t n = 0; n < NB; ++n) sum += simd::value_as<T>(dyb[o * N + n]);
      dbias[o] += sum;
    }
  }
};

// dx[b, c0:c1] and this block's share of dtau, for channels c0..c1 of batch b:
// g[c, e, t', :] = sum_o W[o, c, e] dy[b, o, t', :] (micro-kernel tiles of kTileRows channels per
// (t', e): 2 vectors of 32 bytes, or up to 3 of 64 on the wide path) is sent to rows p0 (times
// 1-w) and p1 (times w) of dx[b, c], and dtau_part[e] += g . dxs. The scatter and the dot run in
// units of NR = 64-byte columns in the same order on both paths, so the results are bitwise
// the same. dyp: dy transposed to (B, T_out, O, Vp), zero-padded rows of Vp (a multiple of NR).
// x and dx stored as S: bf16 x is widened as read, and its dx rows summed in dx_acc (rows x T x V
// scratch) and rounded at the end.
template <typename T, typename S>
struct InputGradBlock {
  template <int Bytes>
  static BHARNET_INLINE void run(DetSizes s, int64_t Vp, const S* x, const T* dyp, const T* weight,
                                 const Sample<T>* samples, int64_t b, int64_t c0, int64_t c1, S* dx, T* dx_acc,
                                 double* dtau_part) {
    constexpr int NR = simd::kTileCols<T>;
    const int64_t V = s.V, K = s.C * s.E, TV = s.T * V;
    const int rows = static_cast<int>(c1 - c0);
    T* dxb;
    if constexpr (std::is_same_v<S, T>) {
      dxb = dx + (b * s.C + c0) * TV;
    } else {
      dxb = dx_acc;
    }
    const S* xb = x + b * s.x_batch + c0 * TV;
    for (int64_t i = 0; i < rows * TV; ++i) dxb[i] = T(0);
    T g[kTileRows * 3 * NR];
    T dot[NR];  // per-lane partial sums of g . dxs (vectorisable)
    // One tile of g at columns v0.. for (t', e), then its scatter and dot in units of NR columns.
    auto chunk = [&](auto tag, int64_t t, int64_t e, int64_t v0) __attribute__((always_inline)) {
      using TileT = typename decltype(tag)::type;
      constexpr int W = TileT::kCols;
      const Sample<T>& smp = samples[t * s.E + e];
      const T w = smp.w, w0 = T(1) - smp.w;
      TileT tile;
      tile.zero();
      tile.fma(s.O, weight + c0 * s.E + e, s.E, K, dyp + (b * s.T_out + t) * s.O * Vp + v0, Vp, rows);
      tile.store_to(g, W, rows, W, false);
      for (int64_t u0 = 0; u0 < W && v0 + u0 < V; u0 += NR) {
        const int cols = static_cast<int>(std::min<int64_t>(NR, V - v0 - u0));
        for (int r = 0; r < rows; ++r) {
          const T* gr = g + r * W + u0;
          T* d0 = dxb + r * TV + smp.p0 * V + v0 + u0;
          T* d1 = dxb + r * TV + smp.p1 * V + v0 + u0;
          for (int v = 0; v < cols; ++v) d0[v] += w0 * gr[v];
          for (int v = 0; v < cols; ++v) d1[v] += w * gr[v];
          if (smp.inside) {
            const S* x0 = xb + r * TV + smp.p0 * V + v0 + u0;
            const S* x1 = xb + r * TV + smp.p1 * V + v0 + u0;
            for (int v = 0; v < cols; ++v) dot[v] += gr[v] * (simd::value_as<T>(x1[v]) - simd::value_as<T>(x0[v]));
          }
        }
      }
    };
    for (int64_t t = 0; t < s.T_out; ++t)
      for (int64_t e = 0; e < s.E; ++e) {
        for (int v = 0; v < NR; ++v) dot[v] = T(0);
        if constexpr (Bytes == 32) {
          for (int64_t v0 = 0; v0 < V; v0 += NR) chunk(simd::TypeTag<Tile<T, kTileRows, 2, 32>>{}, t, e, v0);
        } else {
          simd::wide_column_chunks<T>(V, [&](auto vectors, int64_t v0) __attribute__((always_inline)) {
            chunk(simd::TypeTag<Tile<T, kTileRows, decltype(vectors)::value, 64>>{}, t, e, v0);
          });
        }
        for (int v = 0; v < NR; ++v) dtau_part[e] += dot[v];
      }
    if constexpr (!std::is_same_v<S, T>) simd::narrow_to_bf16(dxb, rows * TV, dx + (b * s.C + c0) * TV);
  }
};

constexpr const char* kForwardName = "bharnet::deformable_temporal_conv_cpp";
constexpr const char* kBackwardName = "bharnet::deformable_temporal_conv_cpp_backward";

// The kernels' x: float32 or float64, or bfloat16 (with float32 weight and bias).
bool check_cpu(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), op, " (CPU kernel): expected CPU tensors, got ", x.device());
  return check_cpu_dtype(op, x.scalar_type(), " x");
}

// Calls fn(T(), P()) for x's dtype T and the position dtype P (offsets' dtype).
template <typename Fn>
void dispatch_dtypes(const at::Tensor& x, const at::Tensor& offsets, Fn&& fn) {
  if (x.scalar_type() == at::kDouble) {
    fn(double(), double());
  } else if (offsets.scalar_type() == at::kDouble) {
    fn(float(), double());
  } else {
    fn(float(), float());
  }
}

// Whether x is channels-last (memory (B, T, V, C)) and not also contiguous: then so is the output.
bool is_channels_last(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// x as the NCHW kernels read it: in place where each sample's C x T x V values are contiguous
// (a contiguous x, or a slice of a contiguous tensor's channels, as the MSTCN's stacked branches
// pass), else a contiguous copy. s.x_batch is set to its distance between samples.
at::Tensor rows_of(const at::Tensor& x, DetSizes& s) {
  const bool in_place = x.stride(3) == 1 && x.stride(2) == s.V && x.stride(1) == s.T * s.V &&
                        x.stride(0) >= s.C * s.T * s.V;
  const auto rows = in_place || x.is_contiguous() ? x : x.contiguous();
  s.x_batch = rows.stride(0);
  return rows;
}

// y = the convolution of x (stored as S) with weight and bias in T, into the allocated y.
// Tasks (b, block of output times); a channels-last x takes ForwardBlockChannelsLast with the
// weight packed transposed (bias as row 0) once per call, a contiguous one ForwardBlock.
template <typename T, typename P, typename S>
void forward_into(const DetSizes& s, bool channels_last, const at::Tensor& x, const at::Tensor& offsets,
                  const at::Tensor& weight, const at::Tensor& bias, at::Tensor& y) {
  const auto samples = sample_table<T, P>(s, offsets.data_ptr<P>(), true);
  const int64_t tb = times_per_block(s), blocks = (s.T_out + tb - 1) / tb;
  const S* xp = static_cast<const S*>(x.data_ptr());
  const T* wp = weight.data_ptr<T>();
  const T* bp = bias.defined() ? bias.data_ptr<T>() : nullptr;
  S* yp = static_cast<S*>(y.data_ptr());
  const int64_t K1 = 1 + s.C * s.E, Op = simd::packed_ld<T>(s.O);
  std::vector<T> wt;
  if (channels_last) {
    wt.assign(K1 * Op, T(0));
    for (int64_t o = 0; o < s.O; ++o) {
      wt[o] = bp ? bp[o] : T(0);
      for (int64_t c = 0; c < s.C; ++c)
        for (int64_t e = 0; e < s.E; ++e) wt[(1 + e * s.C + c) * Op + o] = wp[(o * s.C + c) * s.E + e];
    }
  }
  const int64_t scratch = channels_last ? tb * s.V * K1 : s.C * s.E * simd::packed_ld<T>(tb * s.V);
  at::parallel_for(0, s.B * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> xs(scratch);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, t0 = task % blocks * tb;
      const int64_t t1 = std::min(s.T_out, t0 + tb);
      if (channels_last) {
        simd::run_per_isa<ForwardBlockChannelsLast<T, S>>(s, xp, wt.data(), Op, samples.data(), b, t0, t1,
                                                           xs.data(), yp);
      } else {
        simd::run_per_isa<ForwardBlock<T, S>>(s, xp, wp, bp, samples.data(), b, t0, t1, xs.data(), yp);
      }
    }
  });
}

// bfloat16 x (with float32 weight and bias) is computed in float32: x widened as the samples
// are gathered, y rounded as it is stored.
at::Tensor forward_cpu(const at::Tensor& x_in, const at::Tensor& offsets_in, const at::Tensor& weight_in,
                       const std::optional<at::Tensor>& bias_in, int64_t stride) {
  const bool bf16 = check_cpu(kForwardName, x_in);
  DetSizes s = det_check(kForwardName, x_in, offsets_in, weight_in, bias_in, stride,
                         bf16 ? std::optional<at::ScalarType>(at::kFloat) : std::nullopt);
  const bool channels_last = is_channels_last(x_in);
  const auto x = channels_last ? x_in : rows_of(x_in, s);
  const auto offsets = offsets_in.contiguous(), weight = weight_in.contiguous();
  const auto bias = bias_in ? bias_in->contiguous() : at::Tensor();
  auto y = at::empty({s.B, s.O, s.T_out, s.V}, x.options().memory_format(channels_last ? at::MemoryFormat::ChannelsLast
                                                                                       : at::MemoryFormat::Contiguous));
  if (y.numel() == 0) return y;
  dispatch_dtypes(x, offsets, [&](auto t_tag, auto p_tag) {
    using T = decltype(t_tag);
    using P = decltype(p_tag);
    if constexpr (std::is_same_v<T, float>) {
      if (bf16) return forward_into<T, P, simd::bf16>(s, channels_last, x, offsets, weight, bias, y);
    }
    forward_into<T, P, T>(s, channels_last, x, offsets, weight, bias, y);
  });
  return y;
}

// Every gradient of the backward (the module comment's formulas); x, dy and dx stored as S (bf16
// for T = float: widened as read, dx rounded as stored), the parameters' gradients in T and P.
template <typename T, typename P, typename S>
void backward_into(const DetSizes& s, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& offsets,
                   const at::Tensor& weight, bool bounds_pass_grad, at::Tensor& dx, at::Tensor& doffsets,
                   at::Tensor& dweight, at::Tensor& dbias) {
  constexpr int NR = simd::kTileCols<T>;
  const auto samples = sample_table<T, P>(s, offsets.data_ptr<P>(), bounds_pass_grad);
  const S* xp = static_cast<const S*>(x.data_ptr());
  const S* dyp = static_cast<const S*>(dy.data_ptr());
  const T* wp = weight.data_ptr<T>();
  const int64_t K = s.C * s.E, Kp = simd::packed_ld<T>(K);

  // dW and dbias: tasks (b, time block), reduced into `slices` partial buffers.
  const int64_t tb = times_per_block(s), blocks = (s.T_out + tb - 1) / tb;
  const int64_t tasks = s.B * blocks, slices = std::min(tasks, kMaxSlices);
  std::vector<T> dw_part(slices * s.O * Kp, T(0)), dbias_part(slices * s.O, T(0));
  at::parallel_for(0, slices, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> xst(tb * s.V * Kp, T(0));
    for (int64_t slice = begin; slice < end; ++slice)
      for (int64_t task = slice * tasks / slices; task < (slice + 1) * tasks / slices; ++task) {
        const int64_t b = task / blocks, t0 = task % blocks * tb;
        simd::run_per_isa<WeightGradBlock<T, S>>(s, xp, dyp, samples.data(), b, t0, std::min(s.T_out, t0 + tb),
                                              xst.data(), dw_part.data() + slice * s.O * Kp,
                                              dbias_part.data() + slice * s.O);
      }
  });
  T* dwp = dweight.data_ptr<T>();
  T* dbp = dbias.data_ptr<T>();
  for (int64_t slice = 0; slice < slices; ++slice)
    for (int64_t o = 0; o < s.O; ++o) {
      for (int64_t k = 0; k < K; ++k) dwp[o * K + k] += dw_part[(slice * s.O + o) * Kp + k];
      dbp[o] += dbias_part[slice * s.O + o];
    }

  // dx and dtau: dy as (B, T_out, O, Vp) - the O rows of one time contiguous - then tasks (b, block of kTileRows channels), each
  // with its own dtau partial sums (added in task order).
  const int64_t Vp = round_up(s.V, NR);
  std::vector<T> dy_padded(s.B * s.T_out * s.O * Vp);
  at::parallel_for(0, s.B * s.O * s.T_out, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {  // row = (b, o, t') of dy
      const int64_t b = row / (s.O * s.T_out), o = row / s.T_out % s.O, t = row % s.T_out;
      T* out = dy_padded.data() + ((b * s.T_out + t) * s.O + o) * Vp;
      for (int64_t v = 0; v < s.V; ++v) out[v] = simd::value_as<T>(dyp[row * s.V + v]);
      for (int64_t v = s.V; v < Vp; ++v) out[v] = T(0);
    }
  });
  const int64_t c_blocks = (s.C + kTileRows - 1) / kTileRows;
  std::vector<double> dtau_part(s.B * c_blocks * s.E, 0.0);
  S* dxp = static_cast<S*>(dx.data_ptr());
  at::parallel_for(0, s.B * c_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> dx_acc(std::is_same_v<S, T> ? 0 : kTileRows * s.T * s.V);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / c_blocks, c0 = task % c_blocks * kTileRows;
      simd::run_per_isa<InputGradBlock<T, S>>(s, Vp, xp, dy_padded.data(), wp, samples.data(), b, c0,
                                              std::min(s.C, c0 + kTileRows), dxp, dx_acc.data(),
                                              dtau_part.data() + task * s.E);
    }
  });
  P* dtau = doffsets.data_ptr<P>();
  for (int64_t e = 0; e < s.E; ++e) {
    double sum = 0.0;
    for (int64_t task = 0; task < s.B * c_blocks; ++task) sum += dtau_part[task * s.E + e];
    dtau[e] = static_cast<P>(sum);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(const at::Tensor& dy_in,
                                                                        const at::Tensor& x_in,
                                                                        const at::Tensor& offsets_in,
                                                                        const at::Tensor& weight_in, int64_t stride,
                                                                        bool bounds_pass_grad) {
  const bool bf16 = check_cpu(kBackwardName, x_in);
  DetSizes s = det_check(kBackwardName, x_in, offsets_in, weight_in, {}, stride,
                         bf16 ? std::optional<at::ScalarType>(at::kFloat) : std::nullopt);
  det_check_grad(kBackwardName, dy_in, x_in, s);
  const auto dy = dy_in.contiguous(), x = rows_of(x_in, s);
  const auto offsets = offsets_in.contiguous(), weight = weight_in.contiguous();
  auto dx = at::empty(x.sizes(), x.options());
  auto doffsets = at::zeros_like(offsets), dweight = at::zeros_like(weight);
  auto dbias = at::zeros({s.O}, weight.options());
  if (dy.numel() == 0 || x.numel() == 0) {  // without input channels y = bias: only dbias
    dx.zero_();
    if (dy.numel() > 0) dbias = dy.sum(at::IntArrayRef{0, 2, 3}, false, weight.scalar_type());
    return {dx, doffsets, dweight, dbias};
  }
  dispatch_dtypes(x, offsets, [&](auto t_tag, auto p_tag) {
    using T = decltype(t_tag);
    using P = decltype(p_tag);
    if constexpr (std::is_same_v<T, float>) {
      if (bf16) return backward_into<T, P, simd::bf16>(s, dy, x, offsets, weight, bounds_pass_grad, dx, doffsets,
                                                       dweight, dbias);
    }
    backward_into<T, P, T>(s, dy, x, offsets, weight, bounds_pass_grad, dx, doffsets, dweight, dbias);
  });
  return {dx, doffsets, dweight, dbias};
}

}  // namespace
}  // namespace bharnet

TORCH_LIBRARY_FRAGMENT(bharnet, m) {
  m.def("deformable_temporal_conv_cpp(Tensor x, Tensor offsets, Tensor weight, Tensor? bias, int stride) -> Tensor");
  m.def("deformable_temporal_conv_cpp_backward(Tensor grad_y, Tensor x, Tensor offsets, Tensor weight, int stride, "
        "bool bounds_pass_grad) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bharnet, CPU, m) {
  m.impl("deformable_temporal_conv_cpp", &bharnet::forward_cpu);
  m.impl("deformable_temporal_conv_cpp_backward", &bharnet::backward_cpu);
}
