// CUDA binding of bharnet::deformable_temporal_conv_cpp* (kernels in
// csrc/deformable_temporal_conv_kernels.cu; schemas in csrc/deformable_temporal_conv.cpp). Small ATen ops
// build the sampling table exactly as the reference computes positions
//   r = t' s + tau[e] (in offsets' dtype);  p = clamp(r, 0, T-1);  p0 = floor(p);  w = (p - p0) in x's dtype
// and the CSR table of which samples read each input row (coefficient 1-w at p0, w at p1),
// and finish the small sums: dW and D over the split-K partials, dtau = sum_{o,c} W D, dbias = sum dy.
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

struct Samples {
  at::Tensor p0, p1;  // int32 (T_out, E)
  at::Tensor w;       // weight of row p1, rounded to x's dtype as in the reference (T_out, E)
  at::Tensor r;       // unclamped positions (T_out, E)
};

Samples samples(const DetSizes& s, const at::Tensor& x, const at::Tensor& offsets) {
  const auto t = at::arange(s.T_out, offsets.options()) * s.stride;
  const auto r = t.unsqueeze(1) + offsets.unsqueeze(0);
  const auto p = r.clamp(0, s.T - 1);
  const auto floor_p = p.floor();
  const auto p0 = floor_p.nan_to_num(0).clamp(0, s.T - 1).to(at::kInt);
  return {p0.contiguous(), (p0 + 1).clamp_max(s.T - 1).to(at::kInt).contiguous(),
          (p - floor_p).to(x.scalar_type()), r};
}

at::Tensor forward_cuda(const at::Tensor& x_in, const at::Tensor& offsets_in, const at::Tensor& weight_in,
                        const std::optional<at::Tensor>& bias_in, int64_t stride) {
  TORCH_CHECK(x_in.is_cuda(), kForwardName, " (CUDA kernel): expected CUDA tensors, got ", x_in.device());
  const DetSizes s = det_check(kForwardName, x_in, offsets_in, weight_in, bias_in, stride);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous(), weight = weight_in.contiguous();
  const auto bias = bias_in ? bias_in->contiguous() : at::Tensor();
  auto y = at::empty({s.B, s.O, s.T_out, s.V}, x.options());
  if (y.numel() == 0) return y;
  const Samples smp = samples(s, x, offsets_in.contiguous());
  const auto w = smp.w.to(acc_dtype(x)).contiguous();
  check_launch(cuda::det_forward(cuda_dtype(x, kForwardName, "x"), cuda_shape(kForwardName, s), x.data_ptr(),
                                 smp.p0.data_ptr<int32_t>(), smp.p1.data_ptr<int32_t>(), w.data_ptr(),
                                 weight.data_ptr(), bias.defined() ? bias.data_ptr() : nullptr, y.data_ptr(),
                                 c10::cuda::getCurrentCUDAStream()), kForwardName);
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
  if (dy.numel() == 0 || x.numel() == 0) {
    return {at::zeros_like(x), at::zeros_like(offsets), at::zeros_like(weight), at::zeros({s.O}, weight.options())};
  }
  const auto acc = acc_dtype(x);
  const auto dbias = dy.sum(at::IntArrayRef{0, 2, 3}, false, acc).to(weight.scalar_type());
  if (s.E == 0) {  // no samples: only the bias has a gradient
    return {at::zeros_like(x), at::zeros_like(offsets), at::zeros_like(weight), dbias};
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const Samples smp = samples(s, x, offsets);
  const auto w = smp.w.to(acc).contiguous();
  const auto last = static_cast<double>(s.T - 1);
  const auto inside = (bounds_pass_grad ? (smp.r >= 0) & (smp.r <= last) : (smp.r > 0) & (smp.r < last))
                          .to(acc)
                          .contiguous();

  // dW and D: one split-K GEMM over the flattened (b, t', v) with [dW | D] as its columns,
  // partials summed here.
  const cuda::DetShape shape = cuda_shape(kBackwardName, s);
  const cuda::DType dtype = cuda_dtype(x, kBackwardName, "x");
  const int64_t K = s.C * s.E, reduction = s.B * s.T_out * s.V;
  const int64_t row_tile = cuda::det_row_tile(s.O);
  const int64_t tiles = ((s.O + row_tile - 1) / row_tile) * ((2 * K + cuda::kDetColTile - 1) / cuda::kDetColTile);
  const int64_t splits = std::max<int64_t>(1, std::min(kTargetBlocks / tiles, (reduction + 255) / 256));
  auto part = at::empty({splits, s.O, 2 * K}, x.options().dtype(acc));
  const int32_t* p0 = smp.p0.data_ptr<int32_t>();
  const int32_t* p1 = smp.p1.data_ptr<int32_t>();
  check_launch(cuda::det_param_grad(dtype, shape, dy.data_ptr(), x.data_ptr(), p0, p1, w.data_ptr(),
                                    inside.data_ptr(), splits, part.data_ptr(), stream), kBackwardName);
  const auto sums = part.sum(0);  // (O, 2K) = [dW | D]
  const auto D = sums.slice(1, K, 2 * K).reshape({s.O, s.C, s.E});
  const auto doffsets = (weight.to(acc) * D).sum(at::IntArrayRef{0, 1}).to(offsets.scalar_type());
  const auto dweight = sums.slice(1, 0, K).reshape({s.O, s.C, s.E}).to(weight.scalar_type());

  // dx: CSR table of the samples reading each input row, then one GEMM per (b, t).
  const auto rows = at::cat({smp.p0.flatten(), smp.p1.flatten()}).to(at::kLong);
  const auto coef = at::cat({(1 - smp.w).flatten(), smp.w.flatten()}).to(acc);
  const auto src = at::arange(s.T_out * s.E, smp.p0.options()).repeat({2});
  const auto [sorted_rows, order] = at::sort(rows, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const auto row_start = at::searchsorted(sorted_rows, at::arange(s.T + 1, rows.options()), /*out_int32=*/true);
  const auto entry_src = src.index_select(0, order).contiguous();
  const auto entry_coef = coef.index_select(0, order).contiguous();
  auto dx = at::empty_like(x);
  check_launch(cuda::det_input_grad(dtype, shape, dy.data_ptr(), weight.data_ptr(), row_start.data_ptr<int32_t>(),
                                    entry_src.data_ptr<int32_t>(), entry_coef.data_ptr(), dx.data_ptr(), stream),
               kBackwardName);
  return {dx, doffsets, dweight, dbias};
}

}  // namespace
}  // namespace bharnet

TORCH_LIBRARY_IMPL(bharnet, CUDA, m) {
  m.impl("deformable_temporal_conv_cpp", &bharnet::forward_cuda);
  m.impl("deformable_temporal_conv_cpp_backward", &bharnet::backward_cuda);
}
