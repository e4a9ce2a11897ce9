// Host harness for the CUDA kernels' operand views (see test_cuda_views.py): runs a problem
// object of csrc/*_kernels.cu through the contract of cuda_gemm.cuh's tiled_gemm
// (C[m, n] = sum_{k < op.K} op.a(m, k) op.b(k, n), stored by op.store) with plain loops on
// the CPU, so that the gathers' index arithmetic is checked against the ops' math without a GPU.
#pragma once

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

namespace views_check {

template <class P>
void host_gemm(const P& p, int64_t batches) {
  for (int64_t batch = 0; batch < batches; ++batch) {
    const auto op = p.at(batch);
    for (int m = 0; m < op.M; ++m) {
      for (int n = 0; n < op.N; ++n) {
        typename P::acc_t acc = 0;
        for (int k = 0; k < op.K; ++k) acc += op.a(m, k) * op.b(k, n);
        op.store(m, n, acc);
      }
    }
  }
}

inline std::vector<double> random_values(size_t n, unsigned seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<double> dist(-1.0, 1.0);
  std::vector<double> out(n);
  for (auto& x : out) x = dist(gen);
  return out;
}

template <typename T>
std::vector<T> cast(const std::vector<double>& x) {
  return std::vector<T>(x.begin(), x.end());
}

// Fails the process unless |got - want| <= tol (1 + |want|) everywhere.
template <typename T>
void expect_close(const char* what, const std::vector<T>& got, const std::vector<double>& want, double tol) {
  if (got.size() != want.size()) {
    std::printf("FAIL %s: %zu values, expected %zu\n", what, got.size(), want.size());
    std::exit(1);
  }
  double worst = 0;
  size_t at = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::fabs(static_cast<double>(got[i]) - want[i]) / (1 + std::fabs(want[i]));
    if (std::isnan(err)) {
      std::printf("FAIL %s: NaN at %zu\n", what, i);
      std::exit(1);
    }
    if (err > worst) {
      worst = err;
      at = i;
    }
  }
  if (!(worst <= tol)) {
    std::printf("FAIL %s: relative error %.3g at %zu (got %.17g, expected %.17g), tolerance %.1g\n", what, worst,
                at, static_cast<double>(got[at]), want[at], tol);
    std::exit(1);
  }
  std::printf("ok %s (max relative error %.2g)\n", what, worst);
}

}  // namespace views_check
