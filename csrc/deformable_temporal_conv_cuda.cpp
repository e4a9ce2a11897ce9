// CUDA binding of bharnet::deformable_temporal_conv_cpp* (kernels in
// csrc/deformable_temporal_conv_kernels.cu; schemas in csrc/deformable_temporal_conv.cpp): checks,
// allocations and launches. The kernels build the sampling and scatter tables (det_tables) and
// sum the split-K partials (det_finish_param_grad); dbias = sum dy is torch's reduction. A forward
// is two launches, a backward five.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "cuda_binding.h"
#include "deformable_temporal_conv.h"

namespace bharnet {
namespace {

constexpr const char* kForwardName = "bharnet::deformable_temporal_conv_cpp";
constexpr const char* kBackwardName = "bharnet::deformable_temporal_conv_cpp_backward";
// Programs the split-K parameter-gradient launch aims for (enough to fill a large GPU).
constexpr int64_t kTargetBlocks = 512;

at::ScalarType acc_dtype(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// The kernels' shape, after checking the 32-bit index ranges of cuda_launchers.h.
cuda::DetShape cuda_shape(const char* op, const DetSizes& s) {
  const int64_t largest = std::max({s.C * s.T * s.V, s.O * s.T_out * s.V, s.B * s.T_out * s.V, s.B * s.T,
                                    2 * s.O * s.C * s.E, 2 * s.T_out * s.E * s.O});
  TORCH_CHECK(largest < cuda::kMaxIndexExtent, op, " (CUDA kernel): the kernels' 32-bit indices need C T V, ",
              "C_out T_out V, B T_out V, B T, 2 C_out C E and 2 T_out E C_out below 2^30, got B ", s.B, ", C ", s.C,
              ", C_out ", s.O, ", T ", s.T, ", T_out ", s.T_out, ", V ", s.V, ", E ", s.E);
  return {s.B, s.C, s.T, s.V, s.O, s.E, s.T_out};
}

// The kernels' tables in two allocations: int32 [p0 | p1 | row_start | src] and acc
// [w | inside | coef] (the CSR part and inside only with `scatter`, for the backward).
struct Tables {
  at::Tensor ints, accs;
  int32_t *p0, *p1, *row_start = nullptr, *src = nullptr;
  void *w, *inside = nullptr, *coef = nullptr;
};

Tables tables(const char* op, const DetSizes& s, const cuda::DetShape& shape, cuda::DType dtype, const at::Tensor& x,
              const at::Tensor& offsets, bool scatter, bool bounds_pass_grad, cudaStream_t stream) {
  const int64_t n = s.T_out * s.E;
  Tables t;
  t.ints = at::empty({scatter ? 4 * n + s.T + 1 : 2 * n}, x.options().dtype(at::kInt));
  t.accs = at::empty({scatter ? 4 * n : n}, x.options().dtype(acc_dtype(x)));
  t.p0 = t.ints.data_ptr<int32_t>();
  t.p1 = t.p0 + n;
  char* accs = static_cast<char*>(t.accs.data_ptr());
  const int64_t bytes = t.accs.element_size();
  t.w = accs;
  if (scatter) {
    t.row_start = t.p1 + n;
    t.src = t.row_start + s.T + 1;
    t.inside = accs + n * bytes;
    t.coef = accs + 2 * n * bytes;
  }
  check_launch(cuda::det_tables(dtype, shape, s.stride, offsets.data_ptr(), offsets.scalar_type() == at::kDouble,
                                bounds_pass_grad, t.p0, t.p1, t.w, t.inside, t.row_start, t.src, t.coef, stream),
               op);
  return t;
}

at::Tensor forward_cuda(const at::Tensor& x_in, const at::Tensor& offsets_in, const at::Tensor& weight_in,
                        const std::optional<at::Tensor>& bias_in, int64_t stride) {
  TORCH_CHECK(x_in.is_cuda(), kForwardName, " (CUDA kernel): expected CUDA tensors, got ", x_in.device());
  const DetSizes s = det_check(kForwardName, x_in, offsets_in, weight_in, bias_in, stride);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous(), offsets = offsets_in.contiguous(), weight = weight_in.contiguous();
  const auto bias = bias_in ? bias_in->contiguous() : at::Tensor();
  auto y = at::empty({s.B, s.O, s.T_out, s.V}, x.options());
  if (y.numel() == 0) return y;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const cuda::DetShape shape = cuda_shape(kForwardName, s);
  const cuda::DType dtype = cuda_dtype(x, kForwardName, "x");
  const Tables tab = tables(kForwardName, s, shape, dtype, x, offsets, false, false, stream);
  check_launch(cuda::det_forward(dtype, shape, x.data_ptr(), tab.p0, tab.p1, tab.w, weight.data_ptr(),
                                 bias.defined() ? bias.data_ptr() : nullptr, y.data_ptr(), stream),
               kForwardName);
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cuda(const at::Tensor& dy_in,
                                                                         const at::Tensor& x_in,
                                                                         const at::Tensor& offsets_in,
                                                                         const at::Tensor& weight_in, int64_t stride,
                                                                         bool bounds_pass_grad) {
  TORCH_CHECK(x_in.is_cuda(), kBackwardName, " (CUDA kernel): expected CUDA tensors, got ", x_in.device());
  const DetSizes s = det_check(kBackwardName, x_in, offsets_in, weight_in, {}, stride);
  det_check_grad(kBackwardName, dy_in, x_in, s);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto dy = dy_in.contiguous(), x = x_in.contiguous();
  const auto offsets = offsets_in.contiguous(), weight = weight_in.contiguous();
  if (dy.numel() == 0) {
    return {at::zeros_like(x), at::zeros_like(offsets), at::zeros_like(weight), at::zeros({s.O}, weight.options())};
  }
  // Accumulated in float32 for 16-bit dy, like the kernels (weight has dy's dtype).
  const auto dbias = dy.sum(at::IntArrayRef{0, 2, 3});
  if (s.E == 0 || x.numel() == 0) {  // no samples, or no input channels (y = bias): only dbias
    return {at::zeros_like(x), at::zeros_like(offsets), at::zeros_like(weight), dbias};
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const cuda::DetShape shape = cuda_shape(kBackwardName, s);
  const cuda::DType dtype = cuda_dtype(x, kBackwardName, "x");
  const Tables tab = tables(kBackwardName, s, shape, dtype, x, offsets, true, bounds_pass_grad, stream);

  // dW and D: one split-K GEMM over the flattened (b, t', v) with [dW | D] as its columns, then
  // the partials' sums: dW, and dtau = sum_{o, c} W D.
  const int64_t K = s.C * s.E, reduction = s.B * s.T_out * s.V;
  const int64_t row_tile = cuda::det_row_tile(s.O);
  const int64_t tiles = ((s.O + row_tile - 1) / row_tile) * ((2 * K + cuda::kDetColTile - 1) / cuda::kDetColTile);
  const int64_t splits = std::max<int64_t>(1, std::min(kTargetBlocks / tiles, (reduction + 255) / 256));
  const auto acc = x.options().dtype(acc_dtype(x));
  const auto part = at::empty({splits, s.O, 2 * K}, acc);
  check_launch(cuda::det_param_grad(dtype, shape, dy.data_ptr(), x.data_ptr(), tab.p0, tab.p1, tab.w, tab.inside,
                                    splits, part.data_ptr(), stream), kBackwardName);
  auto dweight = at::empty_like(weight);
  const auto dtau = at::empty({s.E}, acc);
  check_launch(cuda::det_finish_param_grad(dtype, shape, splits, part.data_ptr(), weight.data_ptr(),
                                           dweight.data_ptr(), dtau.data_ptr(), stream), kBackwardName);

  // dx: one GEMM per (b, t) over the CSR entries of row t.
  auto dx = at::empty_like(x);
  check_launch(cuda::det_input_grad(dtype, shape, dy.data_ptr(), weight.data_ptr(), tab.row_start, tab.src,
                                    tab.coef, dx.data_ptr(), stream), kBackwardName);
  return {dx, dtau.to(offsets.scalar_type()), dweight, dbias};
}

}  // namespace
}  // namespace bharnet

TORCH_LIBRARY_IMPL(bharnet, CUDA, m) {
  m.impl("deformable_temporal_conv_cpp", &bharnet::forward_cuda);
  m.impl("deformable_temporal_conv_cpp_backward", &bharnet::backward_cuda);
}
