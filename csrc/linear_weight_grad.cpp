// The weight gradient of a linear layer y = x W^T on the CPU: bharnet::linear_weight_grad_cpp.
//
// Math (bharnet/ops/cpu_linear.py), dy (M, N) and x (M, K) row-major:
//   dW[n, k] = sum_m dy[m, n] x[m, k]
//
// A GEMM on the register tiles of cpu_simd.h that reads both operands in place: the tile rows
// (n) broadcast consecutive entries of a row of dy, the tile columns are whole vectors of x's
// rows (the last K mod one-vector columns come from a zero-padded copy, so that no load passes
// the end of x). The sum over m runs in blocks of kRowBlock rows of dy and x (the block of x
// a tile reads stays in cache), partial sums stored in between, in m order on both vector
// widths. oneDNN's matmul, which cpu_linear.py uses for the other products, first copies the
// transposed dy into a row-major buffer.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu_simd.h"

namespace bharnet {
namespace {

// Products per block of the sum over m.
constexpr int64_t kRowBlock = 256;
// Output rows and columns per task.
constexpr int64_t kTaskRows = 48, kTaskColumns = 96;

// dW rows [r0, r1) x columns [c0, c1); `edge`: simd::copy_edge of x, for columns [c0, K)
// (null for in-place columns).
template <typename T>
struct WeightGradBlock {
  template <int Bytes>
  static BHARNET_INLINE void run(int64_t M, int64_t N, int64_t K, const T* dy, const T* x, int64_t r0, int64_t r1,
                                 int64_t c0, int64_t c1, const T* edge, T* dw) {
    const T* src = edge ? edge : x + c0;
    const int64_t ldb = edge ? simd::kEdgeColumns<T> : K;
    for (int64_t m0 = 0; m0 < M; m0 += kRowBlock) {
      const int64_t mb = std::min(kRowBlock, M - m0);
      simd::tiles<T, Bytes>(r1 - r0, c1 - c0, [&](auto& tile, int64_t r, int rows, int64_t n0, int cols)
                                                  __attribute__((always_inline)) {
        tile.fma(mb, dy + m0 * N + r0 + r, 1, N, src + m0 * ldb + n0, ldb, rows);
        tile.store_to(dw + (r0 + r) * K + c0 + n0, K, rows, cols, m0 > 0);
      });
    }
  }
};

at::Tensor weight_grad_cpu(const at::Tensor& dy_in, const at::Tensor& x_in) {
  TORCH_CHECK(dy_in.device().is_cpu() && x_in.device().is_cpu(),
              "bharnet::linear_weight_grad_cpp (CPU kernel): expected CPU tensors, got ", dy_in.device(), " and ",
              x_in.device());
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble,
              "bharnet::linear_weight_grad_cpp: the CPU kernel takes float32 or float64, got ", x_in.scalar_type());
  TORCH_CHECK(dy_in.dim() == 2 && x_in.dim() == 2 && dy_in.size(0) == x_in.size(0) &&
                  dy_in.scalar_type() == x_in.scalar_type(),
              "bharnet::linear_weight_grad_cpp: dy (M, N) and x (M, K) must be matrices with the same rows and dtype, "
              "got ", dy_in.sizes(), " ", dy_in.scalar_type(), " and ", x_in.sizes(), " ", x_in.scalar_type());
  const auto dy = dy_in.contiguous(), x = x_in.contiguous();
  const int64_t M = x.size(0), N = dy.size(1), K = x.size(1);
  auto dw = at::empty({N, K}, x.options());
  if (dw.numel() == 0) return dw;
  if (M == 0) return dw.zero_();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bharnet::linear_weight_grad_cpp", [&] {
    using T = scalar_t;
    const T* dyp = dy.data_ptr<T>();
    const T* xp = x.data_ptr<T>();
    T* dwp = dw.data_ptr<T>();
    const int64_t in_place = simd::edge_start<T>(K);
    std::vector<T> edge;
    if (in_place < K) simd::copy_edge(xp, M, K, edge);
    const int64_t row_tasks = (N + kTaskRows - 1) / kTaskRows;
    const int64_t column_tasks = (in_place + kTaskColumns - 1) / kTaskColumns + (in_place < K ? 1 : 0);
    at::parallel_for(0, row_tasks * column_tasks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t r0 = task / column_tasks * kTaskRows, c0 = task % column_tasks * kTaskColumns;
        const int64_t r1 = std::min(N, r0 + kTaskRows);
        if (c0 >= in_place) {
          simd::run_per_isa<WeightGradBlock<T>>(M, N, K, dyp, xp, r0, r1, in_place, K,
                                                static_cast<const T*>(edge.data()), dwp);
        } else {
          simd::run_per_isa<WeightGradBlock<T>>(M, N, K, dyp, xp, r0, r1, c0, std::min(in_place, c0 + kTaskColumns),
                                                static_cast<const T*>(nullptr), dwp);
        }
      }
    });
  });
  return dw;
}

}  // namespace
}  // namespace bharnet

TORCH_LIBRARY_FRAGMENT(bharnet, m) {
  m.def("linear_weight_grad_cpp(Tensor dy, Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(bharnet, CPU, m) {
  m.impl("linear_weight_grad_cpp", &bharnet::weight_grad_cpu);
}
