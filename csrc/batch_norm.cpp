// Training-mode batch normalisation of NCHW tensors on the CPU: bharnet::batch_norm_train_cpp.
//
// Math (bharnet/ops/batch_norm.py), x (N, C, P) with P the spatial positions, over the M = N x P
// values of each channel c:
//   mean_c = sum x / M     var_c = sum (x - mean_c)^2 / M     invstd_c = 1 / sqrt(var_c + eps)
//   y = (x - mean_c) invstd_c w_c + b_c, computed as (x - m_c) scale_c + shift_c with m_c the
//   mean rounded to T, scale_c = invstd_c w_c and shift_c = b_c - (mean_c - m_c) scale_c: the
//   subtraction first, so that a channel whose mean is large against its spread loses nothing
//   to cancellation (x scale_c + (b_c - mean_c scale_c) did: 2e-4 on a constant float32 channel)
// The backward is ATen's native_batch_norm_backward (csrc/autograd.cpp), fed mean and invstd.
//
// Why: PyTorch's CPU batch norm of a contiguous NCHW float tensor takes ~4x its backward's time
// (209 vs 61 us for 2 x 64 x 64 x 42 on this project's 2-core EPYC). Here each channel is one
// task: its N rows of P values (a few tens of KB at the models' shapes) are read from memory once
// for the mean, then from cache for the variance and the output. The sums are simd::sum_rows:
// 32-byte lanes, then double, the same operations on every CPU and thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>

#include "cpu_simd.h"

namespace bharnet {
namespace {

// Channels [c0, c1): mean, invstd, y, and the unbiased variance (M var_c / (M - 1), for the
// running statistic).
template <typename T>
BHARNET_CLONES void normalise_channels(const T* x, const T* weight, const T* bias, int64_t N, int64_t C, int64_t P,
                                       double eps, int64_t c0, int64_t c1, T* y, T* mean, T* invstd, T* var) {
  constexpr int L = simd::kLanes<T, 32>;
  const double M = static_cast<double>(N * P);
  for (int64_t c = c0; c < c1; ++c) {
    const T* xc = x + c * P;
    const double mu = simd::sum_rows<T>(xc, N, C * P, P) / M;
    const T mu_t = static_cast<T>(mu);
    const double rounding = mu - static_cast<double>(mu_t);
    const double variance = simd::sum_rows<T, true>(xc, N, C * P, P, mu_t) / M;
    // the variance about the rounded mean, plus the square of the rounding (exact in double)
    const double shifted = variance - rounding * rounding;
    const double inv = 1.0 / std::sqrt(std::max(shifted, 0.0) + eps);
    const double scale = inv * (weight ? static_cast<double>(weight[c]) : 1.0);
    const double shift = (bias ? static_cast<double>(bias[c]) : 0.0) - rounding * scale;
    mean[c] = mu_t;
    var[c] = static_cast<T>(std::max(shifted, 0.0) * (M / (M - 1.0)));  // unbiased (M > 1)
    invstd[c] = static_cast<T>(inv);
    const auto m = simd::broadcast<T, 32>(mu_t), s = simd::broadcast<T, 32>(static_cast<T>(scale)),
               t = simd::broadcast<T, 32>(static_cast<T>(shift));
    const int64_t chunks_end = P / L * L;
    for (int64_t n = 0; n < N; ++n) {
      const T* row = xc + n * C * P;
      T* out = y + (n * C + c) * P;
      for (int64_t p = 0; p < chunks_end; p += L) simd::store<T, 32>(out + p, (simd::load<T, 32>(row + p) - m) * s + t);
      for (int64_t p = chunks_end; p < P; ++p) out[p] = (row[p] - mu_t) * static_cast<T>(scale) + static_cast<T>(shift);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cpu(const at::Tensor& x_in,
                                                                       const std::optional<at::Tensor>& weight_in,
                                                                       const std::optional<at::Tensor>& bias_in,
                                                                       double eps) {
  TORCH_CHECK(x_in.device().is_cpu(), "bharnet::batch_norm_train_cpp (CPU kernel): expected a CPU tensor, got ",
              x_in.device());
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble,
              "bharnet::batch_norm_train_cpp: the CPU kernel takes float32 or float64, got ", x_in.scalar_type());
  TORCH_CHECK(x_in.dim() >= 2, "bharnet::batch_norm_train_cpp: x must have shape (N, C, ...), got ", x_in.sizes());
  const int64_t N = x_in.size(0), C = x_in.size(1);
  int64_t P = 1;
  for (int64_t d = 2; d < x_in.dim(); ++d) P *= x_in.size(d);
  TORCH_CHECK(N * P > 1, "bharnet::batch_norm_train_cpp: expected more than 1 value per channel, got input of size ",
              x_in.sizes());
  auto check_param = [&](const std::optional<at::Tensor>& t, const char* name) {
    TORCH_CHECK(!t || (t->dim() == 1 && t->size(0) == C && t->scalar_type() == x_in.scalar_type() &&
                       t->device() == x_in.device()),
                "bharnet::batch_norm_train_cpp: ", name, " must be a (C = ", C, ") ", x_in.scalar_type(),
                " CPU tensor, got ", t ? t->sizes() : at::IntArrayRef{}, " ",
                t ? t->scalar_type() : x_in.scalar_type());
  };
  check_param(weight_in, "weight");
  check_param(bias_in, "bias");
  const auto x = x_in.contiguous();
  const auto weight = weight_in ? weight_in->contiguous() : at::Tensor();
  const auto bias = bias_in ? bias_in->contiguous() : at::Tensor();
  auto y = at::empty_like(x);
  auto mean = at::empty({C}, x.options()), invstd = at::empty({C}, x.options()), var = at::empty({C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bharnet::batch_norm_train_cpp", [&] {
    using T = scalar_t;
    at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
      normalise_channels<T>(x.data_ptr<T>(), weight.defined() ? weight.data_ptr<T>() : nullptr,
                            bias.defined() ? bias.data_ptr<T>() : nullptr, N, C, P, eps, begin, end,
                            y.data_ptr<T>(), mean.data_ptr<T>(), invstd.data_ptr<T>(), var.data_ptr<T>());
    });
  });
  return {y, mean, invstd, var};
}

}  // namespace
}  // namespace bharnet

TORCH_LIBRARY_FRAGMENT(bharnet, m) {
  m.def("batch_norm_train_cpp(Tensor x, Tensor? weight, Tensor? bias, float eps) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bharnet, CPU, m) {
  m.impl("batch_norm_train_cpp", &bharnet::forward_cpu);
}
