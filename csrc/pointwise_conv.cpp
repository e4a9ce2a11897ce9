// 1x1 convolution of NCHW tensors on the CPU: bharnet::pointwise_conv_cpp and its backward.
//
// Math (bharnet/ops/pointwise_conv.py), x (N, C_in, P) with P = T x V, weight W (C_out, C_in),
// bias b (C_out) or none:
//   y[n, o, p]  = sum_i W[o, i] x[n, i, p] + b[o]
//   dx[n, i, p] = sum_o W[o, i] dy[n, o, p]
//   dW[o, i]    = sum_{n, p} dy[n, o, p] x[n, i, p]        db[o] = sum_{n, p} dy[n, o, p]
//
// y_n = W x_n and dx_n = W^T dy_n are GEMMs on the register tiles of cpu_simd.h with P as the
// vector dimension, reading x_n / dy_n in place (rows of P values; the last P mod (one 64-byte
// vector) columns from a zero-padded copy, so that no vector load passes the end of the
// tensor); each output is summed in k order on both vector widths (bitwise equal). dW is
// either a C_out x C_in block of dot products of rows of dy and x, read in place and vectorised
// along p (WeightGradDots: the same 32-byte lane sums on both widths), over blocks of samples
// that run in parallel even when dW is a few rows; or, for wide weights at small batches, a
// GEMM over the N x P products with the narrower operand packed transposed (weight_grad says
// which). The bias gradient by simd::sum_rows (32-byte lanes on both).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu_simd.h"

namespace bharnet {
namespace {

// Output columns per task of the forward and dx GEMMs: a B panel of C x 96 values stays in
// L2 while every row of the output is computed from it.
constexpr int64_t kColumnBlock = 96;

struct PwSizes {
  int64_t N, Cin, Cout, P;
};

// C (M x P, row stride P) = A (M x K; A(r, k) = a[r sam + k sak]) B (K x P, row stride P)
// (+ bias[r]) for columns [c0, c1) of whole vectors read in place, or for the edge columns
// [c0, P) from `edge` (simd::copy_edge of B) when c0 is the edge.
template <typename T>
struct ColumnBlock {
  template <int Bytes>
  static BHARNET_INLINE void run(int64_t M, int64_t K, int64_t P, const T* a, int64_t sam, int64_t sak, const T* b,
                                 const T* bias, int64_t c0, int64_t c1, const T* edge, T* c) {
    const bool at_edge = edge != nullptr;
    const T* src = at_edge ? edge : b + c0;
    const int64_t ldb = at_edge ? simd::kEdgeColumns<T> : P;
    simd::tiles<T, Bytes>(M, c1 - c0, [&](auto& tile, int64_t m, int rows, int64_t n0, int cols)
                                          __attribute__((always_inline)) {
      if (bias) tile.fill_rows(bias + m, rows);
      tile.fma(K, a + m * sam, sam, sak, src + n0, ldb, rows);
      tile.store_to(c + m * P + c0 + n0, P, rows, cols, false);
    });
  }
};

// For each n: C_n = A B_n (+ bias) with B_n = b + n b_stride (K x P) and C_n = c + n c_stride
// (M x P); tasks of (n, column block), the edge columns a task of their own.
template <typename T>
void column_gemms(const PwSizes& s, int64_t M, int64_t K, const T* a, int64_t sam, int64_t sak, const T* b,
                  int64_t b_stride, const T* bias, T* c, int64_t c_stride) {
  const int64_t in_place = simd::edge_start<T>(s.P);
  const int64_t blocks = (in_place + kColumnBlock - 1) / kColumnBlock + (in_place < s.P ? 1 : 0);
  at::parallel_for(0, s.N * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> edge;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks, block = task % blocks;
      const T* bn = b + n * b_stride;
      const int64_t c0 = block * kColumnBlock;
      if (c0 >= in_place) {  // the last columns, from a zero-padded copy
        simd::copy_edge(bn, K, s.P, edge);
        simd::run_per_isa<ColumnBlock<T>>(M, K, s.P, a, sam, sak, bn, bias, in_place, s.P,
                                          static_cast<const T*>(edge.data()), c + n * c_stride);
      } else {
        simd::run_per_isa<ColumnBlock<T>>(M, K, s.P, a, sam, sak, bn, bias, c0, std::min(in_place, c0 + kColumnBlock),
                                          static_cast<const T*>(nullptr), c + n * c_stride);
      }
    }
  });
}

// The packed dW GEMM (for wide weights at small batches, see weight_grad): products per K
// block (a packed block of kKBlock rows stays in cache), output rows per task.
constexpr int64_t kKBlock = 128;
constexpr int64_t kPackedTaskRows = 48;

// out[p, j] = src[j, p] for p < P, j < J (src rows of P values), out rows of ld values whose
// columns past J are zero.
template <typename T>
void transpose_into(const T* src, int64_t J, int64_t P, int64_t ld, T* out) {
  constexpr int64_t kBlock = 16;
  for (int64_t p0 = 0; p0 < P; p0 += kBlock) {
    const int64_t p1 = std::min(P, p0 + kBlock);
    for (int64_t j0 = 0; j0 < J; j0 += kBlock) {
      const int64_t j1 = std::min(J, j0 + kBlock);
      for (int64_t p = p0; p < p1; ++p)
        for (int64_t j = j0; j < j1; ++j) out[p * ld + j] = src[j * P + p];
    }
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t j = J; j < ld; ++j) out[p * ld + j] = T(0);
  }
}

// Rows [r0, r1) of G (R x J, row stride J) = sum_n A_n Bt_n with A_n = a + n a_stride (R x P,
// rows of P values) and Bt_n = packed + n P ld (P x ld, the transposed other operand), K blocks
// of kKBlock products in order.
template <typename T>
struct WeightGradRows {
  template <int Bytes>
  static BHARNET_INLINE void run(int64_t N, int64_t P, int64_t J, int64_t ld, const T* a, int64_t a_stride,
                                 const T* packed, int64_t r0, int64_t r1, T* g) {
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k0 = 0; k0 < P; k0 += kKBlock) {
        const int64_t kb = std::min(kKBlock, P - k0);
        const bool first = n == 0 && k0 == 0;
        const T* an = a + n * a_stride + r0 * P + k0;
        const T* bn = packed + (n * P + k0) * ld;
        simd::tiles<T, Bytes>(r1 - r0, J, [&](auto& tile, int64_t m, int rows, int64_t n0, int cols)
                                              __attribute__((always_inline)) {
          tile.fma(kb, an + m * P, P, 1, bn + n0, ld, rows);
          tile.store_to(g + (r0 + m) * J + n0, J, rows, cols, !first);
        });
      }
  }
};

// dW as a GEMM over the N x P products with the narrower of x_n^T and dy_n^T packed (transposed,
// rows padded) so that its rows are vectors: dW = sum_n dy_n x_n^T when C_in <= C_out, else
// dW^T = sum_n x_n dy_n^T (then transposed into dw). Tasks of kPackedTaskRows output rows.
template <typename T>
void packed_weight_grad(const PwSizes& s, const T* dy, const T* x, T* dw) {
  const bool pack_x = s.Cin <= s.Cout;
  const int64_t R = pack_x ? s.Cout : s.Cin, J = pack_x ? s.Cin : s.Cout;
  const T* a = pack_x ? dy : x;
  const T* other = pack_x ? x : dy;
  const int64_t ld = simd::packed_ld<T>(J);
  std::vector<T> packed(s.N * s.P * ld);
  at::parallel_for(0, s.N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) transpose_into(other + n * J * s.P, J, s.P, ld, packed.data() + n * s.P * ld);
  });
  std::vector<T> transposed(pack_x ? 0 : R * J);
  T* g = pack_x ? dw : transposed.data();
  at::parallel_for(0, (R + kPackedTaskRows - 1) / kPackedTaskRows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block)
      simd::run_per_isa<WeightGradRows<T>>(s.N, s.P, J, ld, a, R * s.P, static_cast<const T*>(packed.data()),
                                           block * kPackedTaskRows, std::min(R, (block + 1) * kPackedTaskRows), g);
  });
  if (!pack_x) transpose_into(g, s.Cin, s.Cout, s.Cin, dw);  // dw[o, i] = g[i, o]
}

// dW's sum over samples runs in blocks of samples, each block's partial sums (L lanes per
// element) kept apart and the blocks added in order at the end: a block has at least
// kBlockProducts products per dW element (whole samples), and there are at most
// kMaxSampleBlocks blocks, fewer when their partial sums would take more than
// kMaxPartialBytes (wide weights have rows enough to split). Both are fixed by the shapes, not
// by the thread count, and so are the sums.
constexpr int64_t kBlockProducts = 2048;
constexpr int64_t kMaxSampleBlocks = 16;
constexpr int64_t kMaxPartialBytes = 16 << 20;
// dW rows per task: at most this many, fewer when that gives each thread fewer than
// kTasksPerThread tasks (rows per task do not change the sums, so they may follow the threads).
constexpr int64_t kMaxTaskRows = 64;
constexpr int64_t kTasksPerThread = 4;

// The lanes (L = 32 / sizeof(T) per element) of dW rows [r0, r1) summed over samples [n0, n1):
//   lanes[r - r0, i, l] += sum_n sum_{p = l mod L} dy[n, r, p] x[n, i, p]
// with every row read in place, RB x CB elements at a time (32-byte path 2 x 3, 64-byte path
// 4 x 6: their accumulators and the loaded rows fit the 16, resp. 32, vector registers).
// An element's sum over one sample's P products runs in chunks of L (one 32-byte vector): the
// even chunks (p / L even) into one accumulator, the odd into another, each lane an FMA chain
// in p order. The 32-byte path keeps the two in two 32-byte vectors, the 64-byte path in the
// low and high halves of one 64-byte vector, which multiplies two chunks at a time (a last even
// chunk alone, its high half zero). Then the halves are added lane by lane into the element's
// lanes, and the last P mod L products into lanes 0, 1, ...: the same operations on the same
// values on both widths.
template <typename T>
struct WeightGradDots {
  template <int Bytes>
  static BHARNET_INLINE void run(const PwSizes& s, const T* dy, const T* x, int64_t n0, int64_t n1, int64_t r0,
                                 int64_t r1, T* lanes) {
    using Vec = simd::vec<T, Bytes>;
    constexpr int L = simd::kLanes<T, 32>, RB = Bytes == 64 ? 4 : 2, CB = Bytes == 64 ? 6 : 3;
    constexpr int kHalves = Bytes == 64 ? 1 : 2;  // accumulators per element
    const int64_t P = s.P, chunks_end = P / L * L, pairs_end = P / (2 * L) * (2 * L);
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t i = 0; i < s.Cin; i += CB) {  // x's CB rows stay in L1 while dy's rows stream by
        const int cols = static_cast<int>(std::min<int64_t>(CB, s.Cin - i));
        const T* b[CB];
        for (int v = 0; v < CB; ++v) b[v] = x + (n * s.Cin + i + std::min(v, cols - 1)) * P;
        for (int64_t r = r0; r < r1; r += RB) {
          const int rows = static_cast<int>(std::min<int64_t>(RB, r1 - r));
          const T* a[RB];
          for (int u = 0; u < RB; ++u) a[u] = dy + (n * s.Cout + r + std::min(u, rows - 1)) * P;
          Vec acc[kHalves][RB][CB];
          for (int h = 0; h < kHalves; ++h)
            for (int u = 0; u < RB; ++u)
              for (int v = 0; v < CB; ++v) acc[h][u][v] = Vec{};
          for (int64_t p = 0; p < pairs_end; p += 2 * L) {
            for (int h = 0; h < kHalves; ++h) {
              Vec bv[CB];
              for (int v = 0; v < CB; ++v) bv[v] = simd::load<T, Bytes>(b[v] + p + h * L);
              for (int u = 0; u < RB; ++u) {
                const Vec av = simd::load<T, Bytes>(a[u] + p + h * L);
                for (int v = 0; v < CB; ++v) acc[h][u][v] += av * bv[v];
              }
            }
          }
          if (pairs_end < chunks_end) {  // a last even chunk
            for (int u = 0; u < RB; ++u)
              for (int v = 0; v < CB; ++v) {
                Vec av{}, bv{};
                std::memcpy(&av, a[u] + pairs_end, 32);
                std::memcpy(&bv, b[v] + pairs_end, 32);
                acc[0][u][v] += av * bv;
              }
          }
          for (int u = 0; u < RB; ++u)
            for (int v = 0; v < CB; ++v) {
              if (u >= rows || v >= cols) continue;
              T* out = lanes + ((r - r0 + u) * s.Cin + i + v) * L;
              simd::vec<T, 32> sum = simd::load<T, 32>(out);
              if constexpr (Bytes == 64) {
                sum += simd::half_of<T>(acc[0][u][v], 0) + simd::half_of<T>(acc[0][u][v], 1);
              } else {
                sum += acc[0][u][v] + acc[1][u][v];
              }
              for (int64_t p = chunks_end; p < P; ++p) sum[p - chunks_end] += a[u][p] * b[v][p];
              simd::store<T, 32>(out, sum);
            }
        }
      }
    }
  }
};

// dW = sum_n dy_n x_n^T: tasks of (block of samples, task_rows rows of dW) sum into their
// block's lanes; then each element adds its blocks' lanes in order, in double.
template <typename T>
void dot_weight_grad(const PwSizes& s, const T* dy, const T* x, T* dw) {
  constexpr int L = simd::kLanes<T, 32>;
  const int64_t size = s.Cout * s.Cin;
  const int64_t max_blocks =
      std::clamp<int64_t>(kMaxPartialBytes / std::max<int64_t>(1, size * L * sizeof(T)), 1, kMaxSampleBlocks);
  const int64_t per_block = std::max((kBlockProducts + s.P - 1) / s.P, (s.N + max_blocks - 1) / max_blocks);
  const int64_t blocks = (s.N + per_block - 1) / per_block;
  const int64_t wanted_tasks = kTasksPerThread * at::get_num_threads();
  const int64_t task_rows = std::clamp(simd::round_up((s.Cout * blocks + wanted_tasks - 1) / wanted_tasks, 4),
                                       int64_t(4), kMaxTaskRows);
  const int64_t row_tasks = (s.Cout + task_rows - 1) / task_rows;
  std::vector<T> lanes(blocks * size * L, T(0));
  at::parallel_for(0, blocks * row_tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t block = task / row_tasks, r0 = task % row_tasks * task_rows;
      simd::run_per_isa<WeightGradDots<T>>(s, dy, x, block * per_block, std::min(s.N, (block + 1) * per_block), r0,
                                           std::min(s.Cout, r0 + task_rows),
                                           lanes.data() + (block * size + r0 * s.Cin) * L);
    }
  });
  at::parallel_for(0, size, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      double total = 0.0;
      for (int64_t block = 0; block < blocks; ++block)
        for (int l = 0; l < L; ++l) total += lanes[(block * size + e) * L + l];
      dw[e] = static_cast<T>(total);
    }
  });
}

// dW by the packed GEMM when both channel counts are at least kPackedMinChannels (its column
// padding then costs at most 1/16) and the packed operand takes at most kMaxPackedBytes (small
// batches: it is written and read once more); else by dot products, which read both operands
// in place, waste no columns and split the samples across threads. Measured ad hoc on a 2-core
// Xeon (AVX-512, 2 threads): dW of 256 -> 768 at 2 x 672 positions 2.4-2.6 ms packed against
// 3.2-3.4 ms as dot products, and 256 -> 256 at 2 x 400 0.92-1.05 ms against 1.13-1.26 ms;
// with 128 channels the dot products were as fast or faster; 64 -> 64 at 128 x 1600, 84.7 ms
// packed (a 65 MB copy) against 32-37 ms; 32 -> 8 at 32 x 672, 0.45 against 0.12 ms. Either way
// the sums are fixed by the shapes.
constexpr int64_t kPackedMinChannels = 256;
constexpr int64_t kMaxPackedBytes = 8 << 20;

template <typename T>
void weight_grad(const PwSizes& s, const T* dy, const T* x, T* dw) {
  const int64_t narrow = std::min(s.Cin, s.Cout);
  if (narrow >= kPackedMinChannels && s.N * s.P * simd::packed_ld<T>(narrow) * int64_t(sizeof(T)) <= kMaxPackedBytes) {
    packed_weight_grad(s, dy, x, dw);
  } else {
    dot_weight_grad(s, dy, x, dw);
  }
}

// db[o] = sum_{n, p} dy[n, o, p] for o in [o0, o1) (simd::sum_rows, compiled per ISA).
template <typename T>
BHARNET_CLONES void bias_grad_rows(const PwSizes& s, const T* dy, int64_t o0, int64_t o1, T* db) {
  for (int64_t o = o0; o < o1; ++o) db[o] = static_cast<T>(simd::sum_rows(dy + o * s.P, s.N, s.Cout * s.P, s.P));
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu(), "bharnet::pointwise_conv_cpp (CPU kernel): expected CPU tensors, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "bharnet::pointwise_conv_cpp: the CPU kernels take float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 2, "bharnet::pointwise_conv_cpp: x must have shape (N, C_in, ...), got ", x.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1),
              "bharnet::pointwise_conv_cpp: weight must have shape (C_out, C_in = ", x.size(1), "), got ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.device() == x.device(),
              "bharnet::pointwise_conv_cpp: weight must be a ", x.scalar_type(), " CPU tensor like x, got ",
              weight.scalar_type(), " on ", weight.device());
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->scalar_type() == x.scalar_type() &&
                    bias->device() == x.device(),
                "bharnet::pointwise_conv_cpp: bias must be a (C_out = ", weight.size(0), ") ", x.scalar_type(),
                " CPU tensor, got ", bias->sizes(), " ", bias->scalar_type());
  }
}

PwSizes sizes_of(const at::Tensor& x, const at::Tensor& weight) {
  int64_t P = 1;
  for (int64_t d = 2; d < x.dim(); ++d) P *= x.size(d);
  return {x.size(0), x.size(1), weight.size(0), P};
}

std::vector<int64_t> output_shape(const at::Tensor& x, int64_t channels) {
  auto shape = x.sizes().vec();
  shape[1] = channels;
  return shape;
}

at::Tensor forward_cpu(const at::Tensor& x_in, const at::Tensor& weight_in, const std::optional<at::Tensor>& bias_in) {
  check_inputs(x_in, weight_in, bias_in);
  const auto x = x_in.contiguous(), weight = weight_in.contiguous();
  const auto bias = bias_in ? bias_in->contiguous() : at::Tensor();
  const PwSizes s = sizes_of(x, weight);
  auto y = at::empty(output_shape(x, s.Cout), x.options());
  if (y.numel() == 0) return y;
  if (s.Cin == 0) {  // no products: the bias alone
    y.view({s.N, s.Cout, s.P}).copy_(bias.defined() ? bias.view({1, s.Cout, 1}) : at::zeros({1, 1, 1}, y.options()));
    return y;
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bharnet::pointwise_conv_cpp", [&] {
    using T = scalar_t;
    column_gemms<T>(s, s.Cout, s.Cin, weight.data_ptr<T>(), s.Cin, 1, x.data_ptr<T>(), s.Cin * s.P,
                    bias.defined() ? bias.data_ptr<T>() : nullptr, y.data_ptr<T>(), s.Cout * s.P);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>> backward_cpu(const at::Tensor& dy_in,
                                                                           const at::Tensor& x_in,
                                                                           const at::Tensor& weight_in,
                                                                           bool bias_grad) {
  check_inputs(x_in, weight_in, std::nullopt);
  const auto x = x_in.contiguous(), weight = weight_in.contiguous();
  const PwSizes s = sizes_of(x, weight);
  const auto y_shape = output_shape(x, s.Cout);
  TORCH_CHECK(dy_in.sizes() == at::IntArrayRef(y_shape) && dy_in.scalar_type() == x.scalar_type() &&
                  dy_in.device() == x.device(),
              "bharnet::pointwise_conv_cpp_backward: dy must be like the output ", at::IntArrayRef(y_shape),
              " in x's dtype, got ", dy_in.sizes(), " ", dy_in.scalar_type());
  const auto dy = dy_in.contiguous();
  auto dx = at::empty_like(x);
  auto dweight = at::empty_like(weight);  // every element is stored below (or zeroed when there are no products)
  auto dbias = bias_grad ? at::zeros({s.Cout}, weight.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bharnet::pointwise_conv_cpp_backward", [&] {
    using T = scalar_t;
    const T* xp = x.data_ptr<T>();
    const T* dyp = dy.data_ptr<T>();
    const T* wp = weight.data_ptr<T>();
    if (bias_grad && s.N * s.P > 0) {
      T* dbp = dbias.data_ptr<T>();
      at::parallel_for(0, s.Cout, 16, [&](int64_t begin, int64_t end) { bias_grad_rows(s, dyp, begin, end, dbp); });
    }
    if (s.N * s.P == 0 || s.Cin * s.Cout == 0) {
      dx.zero_();
      dweight.zero_();
      return;
    }
    // dx_n = W^T dy_n: A(i, o) = W[o, i]
    column_gemms<T>(s, s.Cin, s.Cout, wp, 1, s.Cin, dyp, s.Cout * s.P, nullptr, dx.data_ptr<T>(), s.Cin * s.P);
    weight_grad<T>(s, dyp, xp, dweight.data_ptr<T>());
  });
  return {dx, dweight, bias_grad ? std::optional<at::Tensor>(dbias) : std::nullopt};
}

}  // namespace
}  // namespace bharnet

TORCH_LIBRARY_FRAGMENT(bharnet, m) {
  m.def("pointwise_conv_cpp(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("pointwise_conv_cpp_backward(Tensor dy, Tensor x, Tensor weight, bool bias_grad) -> (Tensor, Tensor, Tensor?)");
}

TORCH_LIBRARY_IMPL(bharnet, CPU, m) {
  m.impl("pointwise_conv_cpp", &bharnet::forward_cpu);
  m.impl("pointwise_conv_cpp_backward", &bharnet::backward_cpu);
}
