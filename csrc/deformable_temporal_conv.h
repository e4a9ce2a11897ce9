// Shape and dtype checks of the bharnet::deformable_temporal_conv_cpp* ops, shared by the CPU
// kernels (deformable_temporal_conv.cpp) and the CUDA binding (deformable_temporal_conv_cuda.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace bharnet {

// x (B, C, T, V); offsets (E,); weight (O, C, E); bias (O,); T_out = (T - 1) / stride + 1.
// x_batch: the distance between x's samples (C T V, or more for a slice of x's channels; set by
// the CPU kernels, which read such slices in place).
struct DetSizes {
  int64_t B, C, T, V, O, E, stride, T_out, x_batch;
};

// Positions are computed in float64 when x or offsets is float64, else in float32.
inline at::ScalarType det_position_dtype(at::ScalarType x, at::ScalarType offsets) {
  return (x == at::kDouble || offsets == at::kDouble) ? at::kDouble : at::kFloat;
}

// weight and bias have x's dtype, or `param_dtype` where given (float32 for the CPU forward of
// bfloat16 x, which computes in float32).
inline DetSizes det_check(const char* op, const at::Tensor& x, const at::Tensor& offsets, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, int64_t stride,
                          std::optional<at::ScalarType> param_dtype = std::nullopt) {
  const auto params = param_dtype.value_or(x.scalar_type());
  TORCH_CHECK(x.dim() == 4, op, ": x must have shape (B, C_in, T, V), got ", x.sizes());
  TORCH_CHECK(offsets.dim() == 1, op, ": offsets must have shape (E,), got ", offsets.sizes());
  TORCH_CHECK(stride >= 1, op, ": stride must be positive, got ", stride);
  DetSizes s{x.size(0), x.size(1), x.size(2), x.size(3), weight.size(0), offsets.size(0), stride, 0,
             x.size(1) * x.size(2) * x.size(3)};
  s.T_out = s.T == 0 ? 0 : (s.T - 1) / stride + 1;
  TORCH_CHECK(weight.dim() == 3 && weight.size(1) == s.C && weight.size(2) == s.E, op,
              ": weight must have shape (C_out, ", s.C, ", ", s.E, "), got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == params, op, ": weight must be ", params, " for x of dtype ", x.scalar_type(),
              ", got ", weight.scalar_type());
  TORCH_CHECK(offsets.scalar_type() == det_position_dtype(x.scalar_type(), offsets.scalar_type()), op,
              ": offsets must be float32 or float64 (float64 for float64 x), got ", offsets.scalar_type());
  TORCH_CHECK(weight.device() == x.device() && offsets.device() == x.device(), op,
              ": offsets and weight must be on x's device ", x.device());
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == s.O, op, ": bias must have shape (", s.O, ",), got ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == params && bias->device() == x.device(), op, ": bias must be ", params,
                " on x's device");
  }
  return s;
}

inline void det_check_grad(const char* op, const at::Tensor& dy, const at::Tensor& x, const DetSizes& s) {
  TORCH_CHECK(dy.sizes() == at::IntArrayRef({s.B, s.O, s.T_out, s.V}) && dy.scalar_type() == x.scalar_type() &&
                  dy.device() == x.device(),
              op, ": grad_y must have shape (", s.B, ", ", s.O, ", ", s.T_out, ", ", s.V, ") and x's dtype, got ",
              dy.sizes(), " ", dy.scalar_type());
}

}  // namespace bharnet
