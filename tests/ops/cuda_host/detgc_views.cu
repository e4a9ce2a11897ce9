// Host check of the DeTGC CUDA kernels' operand views (csrc/deformable_temporal_conv_kernels.cu):
// forward, the split-K [dW | D] parameter gradients and the CSR input gradient, run through
// views_check::host_gemm and compared with the op's math written as plain loops.
#include <algorithm>
#include <numeric>

#include "deformable_temporal_conv_kernels.cu"
#include "views_check.h"

using namespace bharnet::cuda;
using views_check::expect_close;
using views_check::host_gemm;

struct Case {
  int64_t B, C, T, V, O, E, stride, splits;
  std::vector<double> offsets;
};

template <typename T>
void check(const Case& c, double tol) {
  using acc_t = acc_of<T>;
  const int64_t T_out = (c.T - 1) / c.stride + 1, K = c.C * c.E, N = T_out * c.V;
  const DetShape s{c.B, c.C, c.T, c.V, c.O, c.E, T_out};
  const DetDims d = det_dims(s);
  const auto x64 = views_check::random_values(c.B * c.C * c.T * c.V, 1);
  const auto weight64 = views_check::random_values(c.O * K, 2);
  const auto bias64 = views_check::random_values(c.O, 3);
  const auto dy64 = views_check::random_values(c.B * c.O * N, 4);
  const auto x = views_check::cast<T>(x64), weight = views_check::cast<T>(weight64);
  const auto bias = views_check::cast<T>(bias64), dy = views_check::cast<T>(dy64);

  // The sampling table as the binding builds it (positions clamped to [0, T-1]; inside: the
  // unclamped position strictly inside, as with torch >= 2.14's clamp gradient).
  std::vector<int32_t> p0(T_out * c.E), p1(T_out * c.E);
  std::vector<acc_t> w(T_out * c.E), inside(T_out * c.E);
  for (int64_t t = 0; t < T_out; ++t) {
    for (int64_t e = 0; e < c.E; ++e) {
      const double r = static_cast<double>(t * c.stride) + c.offsets[e];
      const double p = std::min(std::max(r, 0.0), static_cast<double>(c.T - 1));
      const int64_t i = t * c.E + e;
      p0[i] = static_cast<int32_t>(std::floor(p));
      p1[i] = static_cast<int32_t>(std::min<int64_t>(p0[i] + 1, c.T - 1));
      w[i] = static_cast<acc_t>(p - std::floor(p));
      inside[i] = (r > 0 && r < c.T - 1) ? 1 : 0;
    }
  }
  // CSR of the entries reading each input row: p0 entries (coefficient 1 - w), then p1 entries (w).
  std::vector<int32_t> row_start(c.T + 1, 0), src;
  std::vector<acc_t> coef;
  for (int64_t row = 0; row < c.T; ++row) {
    for (int side = 0; side < 2; ++side) {
      for (int64_t i = 0; i < T_out * c.E; ++i) {
        if ((side == 0 ? p0[i] : p1[i]) == row) {
          src.push_back(static_cast<int32_t>(i));
          coef.push_back(side == 0 ? 1 - w[i] : w[i]);
        }
      }
    }
    row_start[row + 1] = static_cast<int32_t>(src.size());
  }

  // The math as plain loops.
  std::vector<double> y_ref(c.B * c.O * N), pg_ref(c.O * 2 * K, 0.0), dx_ref(c.B * c.C * c.T * c.V, 0.0);
  for (int64_t b = 0; b < c.B; ++b) {
    for (int64_t t = 0; t < T_out; ++t) {
      for (int64_t v = 0; v < c.V; ++v) {
        for (int64_t o = 0; o < c.O; ++o) {
          double sum = bias64[o];
          for (int64_t ch = 0; ch < c.C; ++ch) {
            for (int64_t e = 0; e < c.E; ++e) {
              const int64_t i = t * c.E + e, xo = ((b * c.C + ch) * c.T) * c.V + v;
              const double x0 = x64[xo + p0[i] * c.V], x1 = x64[xo + p1[i] * c.V];
              const double wt = weight64[o * K + ch * c.E + e], g = dy64[(b * c.O + o) * N + t * c.V + v];
              sum += wt * ((1 - w[i]) * x0 + w[i] * x1);
              pg_ref[o * 2 * K + ch * c.E + e] += g * ((1 - w[i]) * x0 + w[i] * x1);
              pg_ref[o * 2 * K + K + ch * c.E + e] += g * inside[i] * (x1 - x0);
              dx_ref[xo + p0[i] * c.V] += (1 - w[i]) * wt * g;
              dx_ref[xo + p1[i] * c.V] += w[i] * wt * g;
            }
          }
          y_ref[(b * c.O + o) * N + t * c.V + v] = sum;
        }
      }
    }
  }

  std::vector<T> y(y_ref.size());
  host_gemm(ForwardProblem<T>{d, x.data(), p0.data(), p1.data(), w.data(), weight.data(), bias.data(), y.data()}, c.B);
  expect_close("forward", y, y_ref, tol);

  const int64_t total = c.B * N;
  std::vector<acc_t> part(c.splits * c.O * 2 * K, acc_t(-1));
  host_gemm(ParamGradProblem<T>{d, static_cast<int>(total), static_cast<int>((total + c.splits - 1) / c.splits),
                                dy.data(), x.data(), p0.data(), p1.data(), w.data(), inside.data(), part.data()},
            c.splits);
  std::vector<acc_t> pg(c.O * 2 * K, acc_t(0));
  for (int64_t split = 0; split < c.splits; ++split)
    for (int64_t j = 0; j < c.O * 2 * K; ++j) pg[j] += part[split * c.O * 2 * K + j];
  expect_close("parameter gradients [dW | D]", pg, pg_ref, tol);

  std::vector<T> dx(dx_ref.size(), T(-1));
  host_gemm(InputGradProblem<T>{d, dy.data(), weight.data(), row_start.data(), src.data(), coef.data(), dx.data()},
            c.B * c.T);
  expect_close("input gradient", dx, dx_ref, tol);
}

int main() {
  const Case cases[] = {
      {3, 5, 7, 5, 3, 3, 2, 5, {-1.3, 0.4, 2.7}},         // stride 2, odd sizes, uneven splits
      {2, 3, 6, 7, 40, 4, 1, 1, {-2.0, -2.0 / 3, 2.0 / 3, 2.0}},  // O > 32, positions at the bounds
      {1, 2, 5, 3, 17, 2, 1, 4, {0.25, -7.5}},            // offsets beyond the clamp range
      {2, 4, 3, 2, 5, 1, 3, 7, {0.5}},                    // E 1, T_out 1, more splits than steps: empty splits
  };
  for (const Case& c : cases) {
    std::printf("case B%ld C%ld T%ld V%ld O%ld E%ld stride %ld splits %ld\n", (long)c.B, (long)c.C, (long)c.T,
                (long)c.V, (long)c.O, (long)c.E, (long)c.stride, (long)c.splits);
    check<double>(c, 1e-12);
    check<float>(c, 1e-4);
  }
  std::printf("all DeTGC view checks passed\n");
  return 0;
}
