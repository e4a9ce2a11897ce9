// The dtypes of the CPU kernels of ctr_graph_conv, deformable_temporal_conv and
// temporal_max_pool: they compute in float32 or float64, and their forwards also take bfloat16
// (stored as simd::bf16, computed in float32).
#pragma once

#include <ATen/ATen.h>

namespace bharnet {

inline void check_cpu_dtype(const char* op, at::ScalarType dtype, bool forward) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || (forward && dtype == at::kBFloat16), op,
              ": the CPU kernels take float32 or float64 (the forward also bfloat16), got ", dtype);
}

}  // namespace bharnet
