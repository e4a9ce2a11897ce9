// Shape and dtype checks of the bharnet::ctr_graph_conv_cpp* ops, shared by the CPU kernels
// (ctr_graph_conv.cpp) and the CUDA binding (ctr_graph_conv_cuda.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace bharnet {

// v (B, H, C, T, V); A (H, V, V); q, k (B, H, R, V); weight (H, G, R); bias (H, G); alpha (1).
// Static mode (ST-GC) has no q, k, weight, bias, alpha: R = 0 and G = 1.
struct CtrSizes {
  int64_t B, H, C, T, V, R, G;
  bool dynamic;
  int64_t group_channels() const { return C / G; }
  int64_t group_rows() const { return C / G * T; }  // rows (c_local, t) of one channel group
};

// The compute dtype of the parameters: float64 for float64 features, else float32.
inline at::ScalarType ctr_parameter_dtype(at::ScalarType feature) {
  return feature == at::kDouble ? at::kDouble : at::kFloat;
}

inline CtrSizes ctr_check(const at::Tensor& v, const at::Tensor& A, const std::optional<at::Tensor>& q,
                          const std::optional<at::Tensor>& k, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& alpha) {
  TORCH_CHECK(v.dim() == 5, "bharnet::ctr_graph_conv_cpp: v must have shape (B, H, C, T, V), got ", v.sizes());
  CtrSizes s{v.size(0), v.size(1), v.size(2), v.size(3), v.size(4), 0, 1, false};
  const auto param_dtype = ctr_parameter_dtype(v.scalar_type());
  auto check = [&](const at::Tensor& t, const char* name, at::IntArrayRef shape) {
    TORCH_CHECK(t.sizes() == shape, "bharnet::ctr_graph_conv_cpp: ", name, " must have shape ", shape,
                ", got ", t.sizes());
    TORCH_CHECK(t.device() == v.device(), "bharnet::ctr_graph_conv_cpp: ", name, " is on ", t.device(),
                ", expected ", v.device(), " like v");
    TORCH_CHECK(t.scalar_type() == param_dtype, "bharnet::ctr_graph_conv_cpp: ", name, " must be ",
                param_dtype, " for v of dtype ", v.scalar_type(), ", got ", t.scalar_type());
  };
  check(A, "A", {s.H, s.V, s.V});
  const bool any = q || k || weight || bias || alpha;
  s.dynamic = q && k && weight && bias && alpha;
  TORCH_CHECK(s.dynamic || !any, "bharnet::ctr_graph_conv_cpp: q, k, weight, bias and alpha are given "
              "together (CTR-GC) or all None (ST-GC)");
  if (s.dynamic) {
    TORCH_CHECK(weight->dim() == 3, "bharnet::ctr_graph_conv_cpp: weight must have shape (H, G, R), got ",
                weight->sizes());
    s.G = weight->size(1);
    s.R = weight->size(2);
    TORCH_CHECK(s.G > 0 && s.C % s.G == 0, "bharnet::ctr_graph_conv_cpp: channels C=", s.C,
                " must be a multiple of the groups G=", s.G);
    check(*q, "q", {s.B, s.H, s.R, s.V});
    check(*k, "k", {s.B, s.H, s.R, s.V});
    check(*weight, "weight", {s.H, s.G, s.R});
    check(*bias, "bias", {s.H, s.G});
    TORCH_CHECK(alpha->numel() == 1, "bharnet::ctr_graph_conv_cpp: alpha must have one element");
    check(*alpha, "alpha", alpha->sizes());
  }
  return s;
}

}  // namespace bharnet
